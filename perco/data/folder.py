"""A folder of images as a training or validation dataset."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import IMAGE_SUFFIXES, load_image, read_captions
from .transforms import crop

__all__ = ["ImageFolder", "collate"]

log = logging.getLogger(__name__)


class ImageFolder(Dataset):
    """Every image under ``root`` (recursively, sorted), cropped to ``crop_size``.

    Augmentation is a function of ``(seed, epoch, index)`` only, so a run resumed at any
    step sees exactly the samples an uninterrupted run would (call :meth:`set_epoch`).
    An unreadable image yields ``None``, which :func:`collate` drops and counts.

    Args:
        root: folder of images.
        crop_size: side of the square crops (smaller images are resized up first).
        captions: optional captions file (JSON ``{name or stem: caption}`` or
            ``name<TAB>caption`` lines); images without one get ``None`` (null text).
        random_crop: random crops and flips (training) or centre crops (validation).
        seed: base seed of the augmentation.
        limit: use only the first ``limit`` images.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        crop_size: int = 512,
        captions: str | os.PathLike | None = None,
        random_crop: bool = True,
        flip: bool = True,
        seed: int = 0,
        limit: int | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.files = files[:limit] if limit else files
        if not self.files:
            raise FileNotFoundError(f"no images in {self.root}")
        self.captions = read_captions(captions) if captions else {}
        self.crop_size, self.random_crop, self.flip, self.seed = crop_size, random_crop, flip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict | None:
        path = self.files[index]
        try:
            image = load_image(path)[0]
        except ValueError as e:
            log.warning("skipping unreadable image: %s", e)
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.random_crop else None
        caption = self.captions.get(path.name, self.captions.get(path.stem))
        return {
            "image": crop(image, self.crop_size, rng, self.flip),
            "caption": caption,
            "key": str(path.relative_to(self.root)),
        }


def collate(samples: list[dict | None]) -> dict:
    """Stack samples, dropping (and counting) the ``None`` of unreadable images.

    Samples carry ``image`` (pixels), ``latent`` (pre-computed latents) or both; the batch
    has ``images`` and/or ``latents`` accordingly, first (accelerate reads the batch size
    there).
    """
    kept = [s for s in samples if s is not None]
    if kept and "latent" in kept[0]:
        tensors = {"latents": torch.stack([s["latent"] for s in kept])}
        if "image" in kept[0]:
            tensors["images"] = torch.stack([s["image"] for s in kept])
    else:
        images = [s["image"] for s in kept]
        tensors = {"images": torch.stack(images) if kept else torch.empty(0, 3, 0, 0)}
    return {
        **tensors,
        "captions": [s["caption"] for s in kept],
        "keys": [s["key"] for s in kept],
        "skipped": len(samples) - len(kept),
    }
