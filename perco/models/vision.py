"""Frozen pretrained image encoders: a global embedding and a grid of patch features.

One interface over three families, chosen by a spec string (:func:`load_vision_encoder`):

* ``open_clip:<model>/<pretrained tag or file>`` — an open_clip vision tower (the default
  of PerCo-Image and of the SPRDiff-style semantic encoder, ``open_clip:ViT-B-16/openai``);
  ``open_clip:local-dir:<folder>`` reads an open_clip folder (``open_clip_config.json``
  and weights);
* ``dinov2:<hub id or folder>`` — a DINOv2 backbone through transformers' ``AutoModel``;
* ``alexnet:<safetensors file>`` — ImageNet AlexNet ``features`` (torchvision key names;
  ``$PERCO_ASSETS/lpips/alexnet_features.safetensors`` offline): the pretrained semantic
  encoder that is available without a download.

Whatever the family, :class:`VisionEncoder` maps images ``(B, 3, H, W)`` in ``[0, 1]`` to
``(embedding (B, D), grid (B, C, h, w))``. The image is resized to the encoder's input
size whole (no crop), so the grid covers the whole image and can be resized to any
latent grid. The encoder is a diffusers ``ModelMixin``: its architecture is rebuilt from
its config and its weights are saved with a PerCo checkpoint, which thus stays
self-contained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["VisionEncoder", "load_vision_encoder", "DEFAULT_VISION"]

DEFAULT_VISION = "open_clip:ViT-B-16/openai"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _build(kind: str, model_config: dict) -> nn.Module:
    """The randomly initialised backbone of a family (weights are loaded afterwards)."""
    if kind == "open_clip":
        from open_clip.model import _build_vision_tower

        return _build_vision_tower(
            model_config["embed_dim"],
            model_config["vision_cfg"],
            quick_gelu=model_config.get("quick_gelu", False),
        )
    if kind == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(**model_config))
    if kind == "alexnet":
        from torchvision.models import alexnet

        return alexnet().features[:-1]  # conv5 + ReLU, stride 16, 256 channels
    raise ValueError(f"unknown vision encoder family {kind!r} (open_clip, dinov2, alexnet)")


class VisionEncoder(ModelMixin, ConfigMixin):
    """A frozen image backbone: ``images → (embedding, grid)``.

    Args:
        kind: ``"open_clip"``, ``"dinov2"`` or ``"alexnet"``.
        model_config: the backbone's architecture (open_clip model config, DINOv2 config).
        image_size: side the image is resized to.
        mean, std: input normalisation of the backbone.
        embed_dim, grid_dim: widths of the embedding and of the grid features.
        source: where the pretrained weights came from (a spec of
            :func:`load_vision_encoder`), for the record.
    """

    @register_to_config
    def __init__(
        self,
        kind: str = "alexnet",
        model_config: dict | None = None,
        image_size: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        embed_dim: int = 256,
        grid_dim: int = 256,
        source: str = "",
    ):
        super().__init__()
        self.backbone = _build(kind, model_config or {})
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        return super().train(False)  # frozen: dropout and norms stay in eval mode

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def grid_dim(self) -> int:
        return self.config.grid_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` in ``[0, 1]`` → ``(embedding (B, D), grid (B, C, h, w))``."""
        size = self.config.image_size
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
        x = ((x - self.pixel_mean) / self.pixel_std).to(next(self.backbone.parameters()).dtype)
        kind = self.config.kind
        if kind == "open_clip":
            out = self.backbone.forward_intermediates(x, indices=1, normalize_intermediates=True)
            return out["image_features"], out["image_intermediates"][-1]
        if kind == "dinov2":
            hidden = self.backbone(pixel_values=x).last_hidden_state
            patch = self.backbone.config.patch_size
            skip = 1 + getattr(self.backbone.config, "num_register_tokens", 0)
            grid = hidden[:, skip:].transpose(1, 2).unflatten(2, (size // patch, size // patch))
            return hidden[:, 0], grid
        grid = self.backbone(x)
        return grid.mean(dim=(2, 3)), grid


def _open_clip(name: str) -> VisionEncoder:
    import json
    from pathlib import Path

    import open_clip

    if name.startswith("local-dir:"):
        model = open_clip.create_model(name)
        config = json.loads(
            (Path(name.removeprefix("local-dir:")) / "open_clip_config.json").read_text()
        )
        model_config = config["model_cfg"]
    else:
        arch, _, pretrained = name.partition("/")
        model = open_clip.create_model(arch, pretrained=pretrained or None)
        model_config = open_clip.get_model_config(arch)
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "patch_size"):
        raise ValueError(f"open_clip model {name!r} is not a ViT: no patch tokens")
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    encoder = VisionEncoder(
        kind="open_clip",
        model_config={
            k: model_config[k]
            for k in ("embed_dim", "vision_cfg", "quick_gelu")
            if k in model_config
        },
        image_size=size,
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        embed_dim=model_config["embed_dim"],
        grid_dim=visual.transformer.width,
        source=f"open_clip:{name}",
    )
    encoder.backbone.load_state_dict(visual.state_dict())
    return encoder


def _dinov2(name: str) -> VisionEncoder:
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(name)
    try:
        processor = AutoImageProcessor.from_pretrained(name)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except OSError:  # a bare model folder: DINOv2's published normalisation
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    cfg = model.config
    size = cfg.image_size - cfg.image_size % cfg.patch_size
    encoder = VisionEncoder(
        kind="dinov2",
        model_config=cfg.to_diff_dict(),
        image_size=size,
        mean=mean,
        std=std,
        embed_dim=cfg.hidden_size,
        grid_dim=cfg.hidden_size,
        source=f"dinov2:{name}",
    )
    encoder.backbone.load_state_dict(model.state_dict())
    return encoder


def _alexnet(path: str) -> VisionEncoder:
    from safetensors.torch import load_file

    encoder = VisionEncoder(kind="alexnet", source=f"alexnet:{path}")
    state = {k.removeprefix("features."): v.float() for k, v in load_file(path).items()}
    encoder.backbone.load_state_dict(state)
    return encoder


def load_vision_encoder(spec: str = DEFAULT_VISION, image_size: int | None = None) -> VisionEncoder:
    """A frozen :class:`VisionEncoder` from ``family:source`` (see the module docstring).

    ``image_size``: the side images are resized to, for the convolutional AlexNet only
    (e.g. the crop size of small CPU runs; default 224): a ViT's is fixed by its
    position embeddings."""
    kind, sep, source = spec.partition(":")
    loaders = {"open_clip": _open_clip, "dinov2": _dinov2, "alexnet": _alexnet}
    if not sep or kind not in loaders or not source:
        raise ValueError(
            f"vision encoder spec {spec!r} is not 'open_clip:<model>/<tag>', "
            "'dinov2:<id or folder>' or 'alexnet:<weights file>'"
        )
    encoder = loaders[kind](source)
    if image_size is not None and image_size != encoder.config.image_size:
        if kind != "alexnet":
            raise ValueError(f"the input size of {kind} encoders is fixed by their weights")
        encoder.register_to_config(image_size=image_size)
    return encoder.requires_grad_(False).eval()
