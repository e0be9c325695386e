"""Evaluation sets: Kodak, COCO (prepared by ``scripts/prepare_coco.py``), any image folder.

An :class:`EvalSet` yields ``{"id", "image" (3, H, W) in [0, 1], "captions", "labels"}``
one image at a time; sizes are kept as they are (``transform="native"``: Kodak's 768×512
and 512×768) unless a transform is asked for:

- ``resize``: bicubic to ``size × size``, aspect ratio not kept (PerCo (SD)'s COCO-30k);
- ``center-crop``: shorter side to ``size`` (bicubic), then a centred square crop.

A prepared COCO folder holds ``images/<stem>.png``, ``captions.json`` (``{stem: [gt
captions]}``), optionally ``labels/<stem>.png`` label maps with ``labels.json`` (``{id:
class name}``, 255 = ignore) and ``prepare.json`` (how it was made).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..io import IMAGE_SUFFIXES, load_image, read_captions

__all__ = [
    "EvalItem",
    "EvalSet",
    "image_folder",
    "kodak",
    "prepared_coco",
    "load_eval_set",
    "coco30k_files",
    "kodak_checksums",
    "pixel_sha256",
    "TRANSFORMS",
]

TRANSFORMS = ("native", "resize", "center-crop")


@dataclass(frozen=True)
class EvalItem:
    id: str
    path: Path
    captions: tuple[str, ...] = ()
    labels: Path | None = None


@dataclass
class EvalSet(Dataset):
    """A list of images with their ground-truth captions and optional label maps."""

    name: str
    root: Path
    items: list[EvalItem]
    transform: str = "native"
    size: int | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} (one of {TRANSFORMS})")
        if self.transform != "native" and not self.size:
            raise ValueError(f"transform {self.transform!r} needs a size")
        if not self.items:
            raise FileNotFoundError(f"{self.name}: no images in {self.root}")
        ids = [it.id for it in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: image ids are not unique")

    def __len__(self) -> int:
        return len(self.items)

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of image ``index`` after the transform, read from the file header."""
        if self.transform != "native":
            return (self.size, self.size)
        with Image.open(self.items[index].path) as img:
            return (img.height, img.width)

    def describe(self) -> dict:
        transform = (
            self.transform if self.transform == "native" else f"{self.transform} {self.size}"
        )
        return {
            "dataset": self.name,
            "root": str(self.root),
            "images": len(self.items),
            "transform": transform,
            **self.notes,
        }

    def resize(self, x: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
        """Apply the set's transform to a ``(C, H, W)`` tensor (``nearest`` for labels)."""
        if self.transform == "native":
            return x
        h, w = x.shape[-2:]
        if self.transform == "resize":
            new = (self.size, self.size)
        else:
            scale = self.size / min(h, w)
            new = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        kwargs = {"antialias": True} if mode == "bicubic" else {}
        x = F.interpolate(x[None].float(), size=new, mode=mode, **kwargs)[0]
        if self.transform == "center-crop":
            top, left = (new[0] - self.size) // 2, (new[1] - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        return x

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image = self.resize(load_image(item.path)[0], "bicubic").clamp(0, 1)
        labels = None
        if item.labels is not None:
            array = np.array(Image.open(item.labels), dtype=np.uint8)
            labels = self.resize(torch.from_numpy(array)[None], "nearest")[0].long()
        return {"id": item.id, "image": image, "captions": list(item.captions), "labels": labels}


def _images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(
    root: str | os.PathLike,
    captions: str | os.PathLike | None = None,
    name: str | None = None,
    transform: str = "native",
    size: int | None = None,
    limit: int | None = None,
) -> EvalSet:
    """Every image directly in ``root``; ``captions`` as in :func:`perco.io.read_captions`."""
    root = Path(root)
    caps = read_captions(captions) if captions else {}
    items = []
    for p in _images(root)[:limit]:
        text = caps.get(p.name, caps.get(p.stem))
        items.append(EvalItem(p.stem, p, (text,) if text else ()))
    return EvalSet(name or root.name, root, items, transform, size)


def kodak(root: str | os.PathLike, limit: int | None = None) -> EvalSet:
    """The 24 Kodak images at native size (``perco-download kodak DIR`` fetches them)."""
    return image_folder(root, name="kodak", limit=limit)


def prepared_coco(
    root: str | os.PathLike,
    name: str = "coco",
    limit: int | None = None,
) -> EvalSet:
    """A folder written by ``scripts/prepare_coco.py`` (images already at their size)."""
    root = Path(root)
    if not (root / "captions.json").is_file():
        raise FileNotFoundError(f"{root}: not a prepared COCO folder (no captions.json)")
    captions = json.loads((root / "captions.json").read_text())
    label_names = {}
    if (root / "labels.json").is_file():
        label_names = {int(k): v for k, v in json.loads((root / "labels.json").read_text()).items()}
    items = []
    for p in _images(root / "images")[:limit]:
        labels = root / "labels" / f"{p.stem}.png"
        items.append(
            EvalItem(
                p.stem, p, tuple(captions.get(p.stem, ())), labels if labels.is_file() else None
            )
        )
    prep = root / "prepare.json"
    notes = {"prepared": json.loads(prep.read_text())} if prep.is_file() else {}
    return EvalSet(name, root, items, label_names=label_names, notes=notes)


def load_eval_set(
    kind: str,
    root: str | os.PathLike,
    *,
    name: str | None = None,
    captions: str | os.PathLike | None = None,
    transform: str = "native",
    size: int | None = None,
    limit: int | None = None,
) -> EvalSet:
    """``kind``: ``kodak``, ``coco`` (a prepared folder) or ``folder``."""
    if kind == "kodak":
        return kodak(root, limit)
    if kind == "coco":
        return prepared_coco(root, name or "coco", limit)
    if kind == "folder":
        return image_folder(root, captions, name, transform, size, limit)
    raise ValueError(f"unknown evaluation set kind {kind!r} (kodak, coco, folder)")


def coco30k_files() -> list[str]:
    """The 30,000 COCO train2017 file names of PerCo (SD)'s COCO-30k (Nikolai10/PerCo,
    Apache-2.0), shipped with the package."""
    data = resources.files(__package__).joinpath("coco30k_train2017_files.txt.gz").read_bytes()
    return gzip.decompress(data).decode().split()


def kodak_checksums() -> dict[str, str]:
    """``{file name: SHA-256 of its decoded RGB pixels}`` for the 24 Kodak images."""
    text = resources.files(__package__).joinpath("kodak_pixels.sha256").read_text()
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    return {name: digest for digest, name, *_ in rows}


def pixel_sha256(path: str | os.PathLike) -> str:
    import hashlib

    with Image.open(path) as img:
        return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()
