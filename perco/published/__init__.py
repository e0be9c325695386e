"""Published rate–metric points of other models, shipped as data with their sources.

Each file is a CompressAI results JSON (``name``, ``description``, ``results: {bpp: [...],
<metric>: [...]}``) with, per point, a ``sources`` entry: paper, table or figure,
dataset, resolution, metric definitions, and whether it was read off a figure (then with
its precision). :func:`load_reference` reads these by name and any CompressAI-format
file by path, so CompressAI's own result files can be drawn beside them::

    perco-plot runs/eval/kodak/tiny_taef2 --reference perco-sd-kodak --reference my.json

Sources that perco could not read numbers from (VTM, HiFiC, MS-ILLM and Text-Sketch
appear in PerCo's Fig. 3 only as curves) are left out rather than guessed.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["available", "load_reference", "for_dataset"]

# CompressAI's metric names → perco's result columns
_KEYS = {"psnr-rgb": "psnr", "ms-ssim-rgb": "ms_ssim", "ms-ssim": "ms_ssim", "psnr-y": "psnr_y"}


def available() -> list[str]:
    """Names of the shipped reference files."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def load_reference(source: str | Path) -> dict:
    """A shipped reference by name, or a CompressAI-format results file by path: the
    document with its metric names as perco's columns (``ms-ssim-rgb`` → ``ms_ssim``)."""
    if str(source) in available():
        text = resources.files(__name__).joinpath(f"{source}.json").read_text()
        where = f"reference {source}"
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{source}: neither a file nor a shipped reference "
                             f"({', '.join(available())})")  # fmt: skip
        text, where = path.read_text(), str(path)
    try:
        doc = json.loads(text)
        results = {_KEYS.get(k, k.replace("-", "_")): v for k, v in doc["results"].items()}
        name = doc["name"]
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{where}: not a CompressAI-format results file ({e!r})") from None
    lengths = {k: len(v) for k, v in results.items()}
    if "bpp" not in results or len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: results need a 'bpp' list and lists of one length {lengths}")
    return {**doc, "name": name, "results": results}


def for_dataset(dataset: str | None) -> list[str]:
    """The shipped references measured on ``dataset`` (an evaluation set's name)."""
    return [n for n in available() if load_reference(n).get("dataset") == dataset]
