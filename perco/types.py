"""Typed outputs shared across perco (dataclasses, never growing dicts)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .rates import Rate

__all__ = ["QuantizerOutput", "EncodedImages", "PerCoLoss", "Local", "Capability"]


@dataclass
class QuantizerOutput:
    """What :class:`~perco.models.quantizer.VectorQuantizer` returns.

    Attributes:
        codes: quantized vectors in the codebook space, ``(B, codebook_dim, h, w)``, with
            straight-through gradients to the encoder output.
        indices: codebook indices ``(B, h, w)``, int64.
        loss: commitment loss (already weighted; zero when the weight is zero).
        perplexity: ``exp(entropy)`` of the code histogram of this batch.
        usage: fraction of the codebook used by this batch.
    """

    codes: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


@dataclass
class EncodedImages:
    """A batch of encoded images: everything a decoder needs, nothing more.

    All images in a batch share one padded size; ``sizes`` keeps each original size so
    the decoder crops the padding away.

    Attributes:
        indices: ``(B, h, w)`` codebook indices, the local context ``z_l``: the
            hyper-latent cells that overlap the image (cells over padding only are not
            coded; the decoder repeats the edge cells there).
        captions: the global context ``z_g`` per image (``None``: no caption, the decoder
            uses the null text embedding).
        sizes: original ``(height, width)`` per image.
        padded_size: ``(height, width)`` after padding, shared by the batch.
        rate: the rung the indices were produced at (as :class:`~perco.rates.Rate`).
        global_codes: ``(B, M)`` product-quantizer codes of a global image embedding
            (PerCo-Image), or ``None``.
        features: ``(B, codebook_dim, h, w)`` continuous codes on the padded grid, for the
            ablation without quantization (``PerCoConfig.local="continuous"``; its
            ``indices`` are then all zero and carry nothing), or ``None``.
    """

    indices: torch.Tensor
    captions: list[str | None]
    sizes: list[tuple[int, int]]
    padded_size: tuple[int, int]
    rate: Rate
    global_codes: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.indices.shape[0]


@dataclass
class PerCoLoss:
    """Training losses of one batch (paper eq. 3–4) and quantizer statistics.

    Attributes:
        loss: the total to backpropagate, ``diffusion + vq + image``.
        diffusion: mean squared error of the U-Net prediction (ε or v, per scheduler).
        vq: the quantizer's commitment loss (zero with EMA-only training).
        perplexity: code perplexity of the batch.
        usage: fraction of the codebook used by the batch.
        x0: the clean latent implied by the U-Net's prediction (with gradients), for
            image-level losses on its decoding.
        image: a variant's own image loss, already weighted (the SPRDiff-style coarse
            reconstruction loss); ``None`` for PerCo.
    """

    loss: torch.Tensor
    diffusion: torch.Tensor
    vq: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    x0: torch.Tensor
    image: torch.Tensor | None = None


class Capability(enum.Flag):
    """What a model variant can do besides PerCo's encode, decode and loss; callers ask
    ``model.capabilities`` instead of probing for methods."""

    NONE = 0
    COARSE = enum.auto()  # coarse(encoded): a one-pass pixel preview (SPRDiff-style)
    GLOBAL_CODEBOOKS = enum.auto()  # fit_global_codebooks(...) before training (PerCo-Image)


@dataclass
class Local:
    """What the coded hyper-latent gives the U-Net.

    Attributes:
        spatial: channels concatenated to ``x_t`` on the latent grid.
        tokens: extra cross-attention tokens derived from ``z_l`` (kept in both guidance
            branches), or ``None``.
        coarse: a coarse RGB reconstruction ``(B, 3, H, W)`` (SPRDiff-style), or ``None``.
    """

    spatial: torch.Tensor
    tokens: torch.Tensor | None = None
    coarse: torch.Tensor | None = None
