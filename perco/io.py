"""Image files ↔ tensors in ``[0, 1]``; writes go to a temp file renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["load_image", "save_image"]


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image as RGB ``(1, 3, H, W)`` float32 in ``[0, 1]``, at its native size."""
    try:
        with Image.open(path) as img:
            array = np.array(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``(3, H, W)`` or ``(1, 3, H, W)`` in ``[0, 1]`` (format from the suffix)."""
    path = Path(path)
    image = image.detach().squeeze(0).clamp(0, 1).mul(255).round().byte()
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        pil.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
