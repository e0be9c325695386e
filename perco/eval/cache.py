"""The per-image result cache under ``<out>/cache``: a rerun skips finished images.

Each image's rows, FID features and mIoU counts are written when it is done (features
first, the JSON last: a JSON file marks a finished image), and the protocol the cache was
made under is kept beside them, so a cache from other settings is never mixed in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write

__all__ = ["ImageResult", "write_result", "load_result", "is_done", "check_protocol"]


@dataclass
class ImageResult:
    """One image's rows (one per series and sample), FID features and mIoU counts; the
    features and counts are keyed ``"<series>/<sample>"`` (``"real"``: the original)."""

    rows: list[dict] = field(default_factory=list)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    segmentation: dict[str, dict] = field(default_factory=dict)


def is_done(out: Path, image_id: str) -> bool:
    return (out / "cache" / f"{image_id}.json").is_file()


def write_result(out: Path, image_id: str, result: ImageResult) -> None:
    cache = out / "cache"
    if result.features:
        tensors = {k: v.contiguous() for k, v in result.features.items()}
        atomic_write(cache / f"{image_id}.safetensors", lambda tmp: save_file(tensors, tmp))
    doc = json.dumps({"rows": result.rows, "segmentation": result.segmentation})
    atomic_write(cache / f"{image_id}.json", lambda tmp: Path(tmp).write_text(doc))


def load_result(out: Path, image_id: str) -> ImageResult:
    doc = json.loads((out / "cache" / f"{image_id}.json").read_text())
    features = out / "cache" / f"{image_id}.safetensors"
    segmentation = {
        series: {int(c): v for c, v in counts.items()}
        for series, counts in doc["segmentation"].items()
    }
    return ImageResult(doc["rows"], load_file(features) if features.is_file() else {}, segmentation)


def check_protocol(out: Path, proto: dict, state) -> None:
    """A cache made under another protocol would mix results: refuse to resume it."""
    path = out / "cache" / "protocol.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        changed = sorted(k for k in set(cached) | set(proto) if cached.get(k) != proto.get(k))
        if changed:
            raise ValueError(
                f"{out}/cache was made with different settings ({', '.join(changed)}); "
                "use another output_dir or delete it"
            )
    elif state.is_main_process:
        text = json.dumps(proto, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    state.wait_for_everyone()
