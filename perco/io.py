"""Image files ↔ tensors in ``[0, 1]``; writes go to a temp file renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "load_image",
    "read_image",
    "save_image",
    "write_bytes",
    "atomic_write",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, str | None]:
    """Read an image as RGB ``(1, 3, H, W)`` float32 in ``[0, 1]`` at its native size.

    Returns the tensor and, when the file was not 8-bit RGB, a note saying what was
    converted (16-bit and grayscale images are scaled and replicated to three channels,
    alpha is dropped, palettes are expanded).
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _SIXTEEN_BIT:
                gray = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if mode != "I" or gray.max() > 255 else 255.0
                array = np.repeat((gray / peak).clip(0, 1)[..., None], 3, axis=2)
                tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float()
            else:
                rgb = np.array(img.convert("RGB"))
                tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    note = None if mode == "RGB" else f"converted {mode} image to 8-bit RGB"
    return tensor, note


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image as RGB ``(1, 3, H, W)`` float32 in ``[0, 1]``, at its native size."""
    return read_image(path)[0]


def to_pil(image: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` or ``(1, 3, H, W)`` in ``[0, 1]`` → an 8-bit RGB PIL image."""
    image = image.detach().squeeze(0).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``(3, H, W)`` or ``(1, 3, H, W)`` in ``[0, 1]`` (format from the suffix)."""
    pil = to_pil(image)
    atomic_write(
        path,
        lambda tmp: pil.save(tmp, format=Image.registered_extensions()[Path(path).suffix.lower()]),
    )


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file renamed into place."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, writer) -> None:
    """Call ``writer(tmp_path)`` then rename ``tmp_path`` to ``path``; no partial files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """Captions keyed by file name or stem: a JSON object, JSON lines ``{"id", "caption"}``
    (``perco-caption``'s output), or ``name<TAB>caption`` lines."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = (json.loads(line) for line in text.splitlines() if line.strip())
        return {str(r["id"]): r["caption"] for r in rows if r.get("caption") is not None}
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of file name -> caption")
        return {str(k): str(v) for k, v in data.items()}
    captions = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if "\t" not in line:
                raise ValueError(f"{path}:{number}: expected 'name<TAB>caption'")
            name, caption = line.split("\t", 1)
            captions[name] = caption
    return captions
