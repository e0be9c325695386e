"""Prepare a COCO evaluation folder from a local COCO copy (see :mod:`.eval_sets`).

Writes ``images/<stem>.png`` at the evaluation size, ``captions.json`` with every
ground-truth caption, and — when instance annotations are given — ``labels/<stem>.png``
semantic label maps of the 80 thing classes (COCO category ids; crowd regions and
unannotated pixels are 255 = ignore) with ``labels.json``. ``prepare.json`` records the
source, the file list and the transform. Every file is written through a temp file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..io import atomic_write, save_image
from .eval_sets import EvalItem, EvalSet, coco30k_files

__all__ = ["prepare_coco", "label_map"]

IGNORE = 255


def _rle_mask(segmentation: dict, height: int, width: int) -> np.ndarray:
    counts = segmentation["counts"]
    if isinstance(counts, str):
        raise ValueError("compressed RLE is not supported; use the instances JSON of COCO")
    flat = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for run in counts:
        flat[position : position + run] = value
        position, value = position + run, not value
    return flat.reshape(width, height).T  # COCO RLE is column-major


def label_map(annotations: list[dict], height: int, width: int) -> np.ndarray:
    """Paint instance annotations, largest first, into a ``(H, W)`` uint8 map."""
    canvas = Image.new("L", (width, height), IGNORE)
    draw = ImageDraw.Draw(canvas)
    for ann in sorted(annotations, key=lambda a: -a["area"]):
        value = IGNORE if ann.get("iscrowd") else ann["category_id"]
        seg = ann["segmentation"]
        if isinstance(seg, list):
            for polygon in seg:
                if len(polygon) >= 6:
                    draw.polygon(list(map(float, polygon)), fill=value)
        else:
            mask = Image.fromarray(_rle_mask(seg, height, width).astype(np.uint8) * 255)
            canvas.paste(value, mask=mask)
            draw = ImageDraw.Draw(canvas)
    return np.array(canvas)


def prepare_coco(
    images_dir: str | os.PathLike,
    captions_json: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    files: list[str] | None = None,
    instances_json: str | os.PathLike | None = None,
    size: int = 512,
    transform: str = "resize",
    allow_missing: bool = False,
) -> int:
    """Write the prepared folder; returns the number of images written.

    ``files`` defaults to the packaged COCO-30k train2017 list; ``transform`` is
    ``resize`` (bicubic to ``size²``, PerCo (SD)'s protocol) or ``center-crop``.
    """
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    files = coco30k_files() if files is None else files
    missing = [f for f in files if not (images_dir / f).is_file()]
    if missing and not allow_missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(files)} listed images are not in {images_dir} "
            f"(first: {missing[0]})"
        )
    files = [f for f in files if f not in set(missing)]
    meta = json.loads(Path(captions_json).read_text())
    by_name = {img["file_name"]: img for img in meta["images"]}
    captions = defaultdict(list)
    for ann in sorted(meta["annotations"], key=lambda a: a["id"]):
        captions[ann["image_id"]].append(ann["caption"].strip())

    instances, categories = defaultdict(list), {}
    if instances_json is not None:
        inst = json.loads(Path(instances_json).read_text())
        for ann in inst["annotations"]:
            instances[ann["image_id"]].append(ann)
        categories = {c["id"]: c["name"] for c in inst["categories"]}
        labelled = {img["id"] for img in inst["images"]}

    items = [EvalItem(Path(f).stem, images_dir / f) for f in files]
    resized = EvalSet("coco", images_dir, items, transform, size)
    out_captions = {}
    for index, item in enumerate(items):
        info = by_name.get(Path(files[index]).name)
        if info is None:
            raise KeyError(f"{files[index]} is not in {captions_json}")
        image = resized[index]["image"]
        save_image(image, out_dir / "images" / f"{item.id}.png")
        out_captions[item.id] = captions[info["id"]]
        if instances_json is not None and info["id"] in labelled:
            labels = label_map(instances[info["id"]], info["height"], info["width"])
            labels = resized.resize(torch.from_numpy(labels)[None], "nearest")[0]
            pil = Image.fromarray(labels.numpy().astype(np.uint8))
            path = out_dir / "labels" / f"{item.id}.png"
            atomic_write(path, lambda tmp, p=pil: p.save(tmp, format="PNG"))

    def dump(name: str, obj) -> None:
        text = json.dumps(obj, indent=1, ensure_ascii=False)
        atomic_write(out_dir / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    dump("captions.json", out_captions)
    if categories:
        dump("labels.json", {str(k): v for k, v in sorted(categories.items())})
    dump(
        "prepare.json",
        {
            "source": str(images_dir),
            "images": len(items),
            "missing": len(missing),
            "transform": f"{transform} {size} (bicubic, antialiased)",
            "labels": "instances: 80 thing classes, 255 = crowd/unannotated"
            if categories
            else None,
        },
    )
    return len(items)
