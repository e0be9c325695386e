"""Random crops of whole-image latents: the frozen autoencoder runs once per image.

For a small autoencoder on a CPU (TAEF2 spends ~1.3 s on a 481×321 photo), encoding
every training crop at every step would cost more than the diffusion model. Instead each
image is encoded once, whole, and cached (safetensors); a training sample is a random
``crop × crop`` window of its latent (an 8-px-aligned image crop). Away from the window's
border this is the latent of the crop itself; near it the encoder saw real neighbouring
pixels instead of the crop's edge, which is harmless for training. No flips: a flipped
latent is not the latent of the flipped image. With ``images``, a sample also carries the
pixels under its window (for models whose encoders read pixels besides the latent:
PerCo-Image, SPRDiff-style).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ..io import IMAGE_SUFFIXES, atomic_write, load_image

__all__ = [
    "image_files",
    "cached_latents",
    "latent_statistics",
    "LatentCrops",
]

log = logging.getLogger(__name__)


def image_files(folders: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """``{relative name: path}`` of the images in ``folders``, named as the cache names
    their latents (``<folder>/<file>``)."""
    files = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        for p in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            files[f"{folder.name}/{p.name}"] = p
    return files


@torch.no_grad()
def cached_latents(
    encode, folders: Sequence[str | os.PathLike], cache: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """Raw latents ``{relative name: (C, h, w)}`` of every image in ``folders``.

    ``encode`` maps ``(1, 3, H, W)`` in ``[0, 1]`` to raw latents. The result is read from
    ``cache`` when it exists, else computed (images cropped to a multiple of 8) and
    written there atomically.
    """
    cache = Path(cache)
    if cache.is_file():
        return load_file(cache)
    files = image_files(folders)
    log.info("encoding %d images once for the latent cache %s", len(files), cache)
    latents = {}
    for name, path in files.items():
        x = load_image(path)
        h, w = (s - s % 8 for s in x.shape[-2:])
        latents[name] = encode(x[..., :h, :w])[0].float().contiguous()
    atomic_write(cache, lambda tmp: save_file(latents, tmp))
    return latents


def latent_statistics(latents: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over every position of every cached latent."""
    flat = torch.cat([z.flatten(1) for z in latents.values()], dim=1).double()
    return flat.mean(dim=1).float(), flat.std(dim=1).float()


class LatentCrops(Dataset):
    """``repeats`` random latent crops per image and epoch, normalised by ``mean``/``std``.

    Crop positions are a function of ``(seed, epoch, index)``, so resumed runs see the
    same samples (call :meth:`set_epoch`). ``images``: ``{name: image file}``; each
    sample then also has the ``image`` pixels of its window (``factor`` px per cell).
    """

    def __init__(
        self,
        latents: dict[str, torch.Tensor],
        crop: int,
        mean: torch.Tensor,
        std: torch.Tensor,
        seed: int = 0,
        repeats: int = 1,
        images: dict[str, Path] | None = None,
        factor: int = 8,
    ):
        self.names = sorted(latents)
        self.files = None if images is None else [images[n] for n in self.names]
        self.factor = factor
        self._pixels: dict[int, torch.Tensor] = {}  # decoded once, kept as uint8
        self.latents = [latents[n] for n in self.names]
        small = [
            n for n, z in zip(self.names, self.latents, strict=True) if min(z.shape[-2:]) < crop
        ]
        if small:
            raise ValueError(f"{len(small)} latents are smaller than the {crop}-cell crop")
        self.crop, self.seed, self.repeats, self.epoch = crop, seed, repeats, 0
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.latents) * self.repeats

    def __getitem__(self, index: int) -> dict:
        z = self.latents[index % len(self.latents)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        top = int(rng.integers(0, z.shape[1] - self.crop + 1))
        left = int(rng.integers(0, z.shape[2] - self.crop + 1))
        window = z[:, top : top + self.crop, left : left + self.crop]
        sample = {
            "latent": (window - self.mean) / self.std,
            "caption": None,
            "key": self.names[index % len(self.latents)],
        }
        if self.files is not None:
            f, size = self.factor, self.crop * self.factor
            i = index % len(self.latents)
            if i not in self._pixels:
                self._pixels[i] = load_image(self.files[i])[0].mul(255).round().to(torch.uint8)
            pixels = self._pixels[i][:, top * f : top * f + size, left * f : left * f + size]
            sample["image"] = pixels.float() / 255
        return sample
