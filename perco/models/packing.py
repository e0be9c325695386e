"""FLUX.2's latent packing: 2×2 latent positions a token, channel-major within a patch
(``Flux2KleinPipeline._patchify_latents`` then ``_pack_latents``). The FLUX.2 backbone
packs its input so; the FLUX.2 VAE keeps its latent statistics in the same layout."""

from __future__ import annotations

import torch

__all__ = ["PATCH", "pack", "unpack"]

PATCH = 2  # latent positions a token spans, each way


def pack(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` → tokens ``(B, hw/4, 4C)``, channel-major within each 2×2 patch."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`: tokens ``(B, hw/4, 4C)`` → ``(B, C, h, w)``."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.view(b, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)
