"""CLIP scores with open_clip: text–image (against a ground-truth caption) and image–image.

``text_image`` is torchmetrics' CLIPScore definition, ``100 · max(cos(image, text), 0)``;
``image_image`` is ``100 · cos`` between the embeddings of the original and the
reconstruction. (torchmetrics' own CLIPScore goes through transformers' CLIP, whose
``get_image_features`` changed in transformers 5, so the scores are computed here from
open_clip's embeddings.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipScorer"]

DEFAULT_MODEL, DEFAULT_PRETRAINED = "ViT-L-14", "openai"


class ClipScorer(nn.Module):
    """An open_clip model with its tokenizer and input normalisation.

    Images are resized (bicubic, shorter side) and centre-cropped to the model's input
    size, as open_clip's eval transform does.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str = "custom"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        size = model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.register_buffer("mean", torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN)))
        self.register_buffer("std", torch.tensor(cfg.get("std", OPENAI_DATASET_STD)))

    @classmethod
    def from_pretrained(
        cls, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED
    ) -> ClipScorer:
        """``open_clip.create_model(model, pretrained)`` (downloads on first use)."""
        import open_clip

        clip = open_clip.create_model(model, pretrained=pretrained)
        return cls(clip, open_clip.get_tokenizer(model), f"{model}/{pretrained}")

    def _embed_images(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        x = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size].clamp(0, 1)
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def text_image(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.mean.device)
        text = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return 100 * (self._embed_images(images) * text).sum(-1).clamp_min(0)

    @torch.no_grad()
    def image_image(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 100 * (self._embed_images(a) * self._embed_images(b)).sum(-1)
