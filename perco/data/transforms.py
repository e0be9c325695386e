"""Training crops: resize up when needed, random (or centre) crop, horizontal flip."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["crop"]


def crop(
    image: torch.Tensor, size: int, rng: np.random.Generator | None = None, flip: bool = True
) -> torch.Tensor:
    """A ``size × size`` crop of ``image (3, H, W)`` in ``[0, 1]``.

    Images whose shorter side is under ``size`` are first resized up (bicubic, aspect
    ratio kept) so that side equals ``size``; nothing is ever squashed. With ``rng`` the
    crop position and a horizontal flip (probability ½ when ``flip``) are random, without
    it the crop is centred and never flipped.
    """
    h, w = image.shape[-2:]
    if min(h, w) < size:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        image = F.interpolate(image[None], size=new, mode="bicubic", align_corners=False)[0]
        image = image.clamp(0, 1)
        h, w = new
    if rng is None:
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = image[:, top : top + size, left : left + size]
    if rng is not None and flip and rng.random() < 0.5:
        out = out.flip(-1)
    return out.contiguous()
