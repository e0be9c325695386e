"""PerCo-Image: the global context is a product-quantized image embedding, not a caption.

Careil et al., ICLR 2024, §4.3 ("Conditioning on global image features"): an embedding
from a pretrained image backbone replaces the caption; it is product-quantized with
``M = 16`` sub-vectors and ``V = 1024`` entries per sub-codebook (160 bits, 0.00061 bpp at
512², 3.5× fewer than a BLIP-2 caption)::

    image ─ frozen vision encoder ─► e (D) ─ PQ ─► codes (M)        (M·log2 V bits)
    codes ─ lookup ─► ê ─ Linear ─► K tokens (U-Net context width) ─► cross-attention

The tokens are appended to the text slot, which holds the learned null text (captions are
not coded), so the U-Net's cross-attention sees ``[null text; K image tokens]``.
Classifier-free guidance and the training drop treat the image tokens as the caption was
treated: the unconditional branch gets ``K`` learned null tokens. The codebooks are
fitted by k-means on training embeddings before training (``perco-train`` does it), then
frozen or EMA-updated (``ProductQuantizer(update=...)``).

What the paper leaves open and is chosen here: the backbone (open_clip ViT-B-16 by
default), ``K = 4`` tokens, and a linear projection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..rates import Rate
from .perco import Capability, PerCo
from .product_quantizer import ProductQuantizer
from .vision import VisionEncoder, load_vision_encoder

__all__ = ["PerCoImage", "EmbeddingTokens"]


class EmbeddingTokens(ModelMixin, ConfigMixin):
    """A vector ``(B, dim)`` → ``num_tokens`` cross-attention tokens ``(B, K, width)``,
    plus ``K`` learned null tokens for the unconditional branch."""

    @register_to_config
    def __init__(self, dim: int = 512, width: int = 1024, num_tokens: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, width * num_tokens)
        self.null = nn.Parameter(torch.zeros(1, num_tokens, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, width = self.config.num_tokens, self.config.width
        return self.proj(self.norm(x.float())).view(x.shape[0], k, width)

    def null_tokens(self, batch_size: int) -> torch.Tensor:
        return self.null.expand(batch_size, -1, -1)


class PerCoImage(PerCo):
    """PerCo whose global context ``z_g`` is a product-quantized image embedding.

    Build one with :meth:`from_components` (any PerCo parts plus a vision encoder spec)
    or load one with :meth:`PerCo.from_pretrained`.
    """

    variant = "perco_image"
    capabilities = Capability.GLOBAL_CODEBOOKS
    _MODULES = {
        **PerCo._MODULES,
        "vision": VisionEncoder,
        "image_quantizer": ProductQuantizer,
        "image_tokens": EmbeddingTokens,
    }
    _TRAINED = ("image_tokens",)

    def _check_consistency(self) -> None:
        super()._check_consistency()
        if self.image_quantizer.config.dim != self.vision.embed_dim:
            raise ValueError(
                f"the product quantizer takes {self.image_quantizer.config.dim}-d embeddings, "
                f"the vision encoder gives {self.vision.embed_dim}"
            )

    @classmethod
    def from_components(
        cls,
        autoencoder,
        denoiser,
        text_encoder,
        tokenizer,
        scheduler,
        rate: str | Rate,
        *,
        vision: str | VisionEncoder = "open_clip:ViT-B-16/openai",
        image_quantizer: dict | None = None,
        num_tokens: int = 4,
        **kwargs,
    ) -> PerCoImage:
        """PerCo parts (see :meth:`PerCo.from_components`) plus a frozen vision encoder
        (a :func:`~perco.models.vision.load_vision_encoder` spec or a module), a product
        quantizer (``image_quantizer`` overrides its defaults, M = 16, V = 1024) and the
        token projection. Captions are not used: ``guidance="text"`` contrasts the image
        tokens with the null tokens."""
        base = PerCo.from_components(
            autoencoder, denoiser, text_encoder, tokenizer, scheduler, rate, **kwargs
        )
        if isinstance(vision, str):
            vision = load_vision_encoder(vision)
        pq = ProductQuantizer(**{**(image_quantizer or {}), "dim": vision.embed_dim})
        tokens = EmbeddingTokens(vision.embed_dim, base.backbone.context_dim(denoiser), num_tokens)
        return cls._extend(base, vision=vision, image_quantizer=pq, image_tokens=tokens)

    @property
    def global_pq(self) -> tuple[int, int]:
        return self.image_quantizer.config.num_subvectors, self.image_quantizer.config.codebook_size

    @property
    def global_bits(self) -> int:
        """Bits of the coded global context per image, ``M·log2 V``."""
        return self.image_quantizer.bits

    # -- the global context -------------------------------------------------------------
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vision(images)[0].float()

    def _global(self, images):
        if images is None:
            raise ValueError("PerCo-Image needs the images (pixels) for its image embedding")
        if not bool(self.image_quantizer.fitted):
            raise RuntimeError(
                "the product quantizer's codebooks are not fitted: call "
                "fit_global_codebooks on training images first (perco-train does)"
            )
        quantized, codes = self.image_quantizer(self._embed(images))
        return quantized, codes

    def _global_from_codes(self, codes):
        if codes is None:
            raise ValueError("a PerCo-Image decoder needs the image embedding's codes")
        return self.image_quantizer.lookup(codes)

    def _context(self, captions: Sequence[str | None], embedding):
        text, null = super()._context([None] * len(captions), None)
        tokens = self.image_tokens(embedding.to(self.device))
        null_tokens = self.image_tokens.null_tokens(len(captions)).to(tokens)
        return self._append(text, tokens), self._append(null, null_tokens)

    @torch.no_grad()
    def fit_global_codebooks(
        self, batches: Iterable[dict], num_samples: int, generator: torch.Generator | None = None
    ) -> int:
        """k-means of the product quantizer on the embeddings of ``batches`` (training
        batches with ``images``) until ``num_samples`` are collected on this rank; with
        several ranks the embeddings of all are pooled. Returns the number used here."""
        embeddings, count = [], 0
        for batch in batches:
            if batch.get("images") is None:
                raise ValueError("fitting the image codebooks needs pixel batches ('images')")
            embeddings.append(self._embed(batch["images"].to(self.device)))
            count += embeddings[-1].shape[0]
            if count >= num_samples:
                break
        self.image_quantizer.fit(torch.cat(embeddings)[:num_samples], generator)
        return min(count, num_samples)
