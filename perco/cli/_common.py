"""Helpers shared by the codec subcommands: model loading, inputs, reporting."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..models.loading import TINY
from ..rates import RATES

__all__ = [
    "add_model_arguments", "model_from_arguments", "collect", "output_path", "Report", "progress",
]  # fmt: skip


def add_model_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        default=TINY,
        help="a saved PerCo folder, a training run folder or a folder of per-rate folders "
        "(with --rate), a hub id, or 'tiny' (the tiny random model, for trying the codec; "
        "default)",
    )
    parser.add_argument("--rate", choices=list(RATES), help="rung (checked against the model)")
    parser.add_argument(
        "--device", help="where the model runs, e.g. cuda:1 (default: cuda if there is one)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def model_from_arguments(args):
    """The model ``--model``/``--rate`` name, on ``--device``."""
    import torch

    from ..models.loading import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.model, args.rate).to(torch.device(device))


def collect(inputs: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files named directly, and the files with one of ``suffixes`` in named folders."""
    files = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in suffixes)
        else:
            files.append(p)
    return files


def output_path(source: Path, output_dir: Path | None, suffix: str) -> Path:
    return (output_dir or source.parent) / (source.stem + suffix)


@dataclass
class Report:
    """What a run did: one entry per file, failures, timings."""

    files: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def fail(self, command: str, path: Path, error: Exception) -> None:
        self.failures.append({"file": str(path), "error": str(error)})
        print(f"perco {command}: error: {path}: {error}", file=sys.stderr)

    def write(self, command: str, source: Path, writer) -> bool:
        """Call ``writer()``; if it fails, report ``source`` as failed and return False."""
        try:
            writer()
        except OSError as e:
            self.fail(command, source, e)
            return False
        return True

    def note(self, path: Path | None, text: str) -> None:
        where = f"{path}: " if path is not None else ""
        self.notes.append(where + text)
        print(f"note: {where}{text}", file=sys.stderr)

    def finish(self, as_json: bool, table) -> int:
        if as_json:
            doc = {
                "files": self.files,
                "failures": self.failures,
                "notes": self.notes,
                "timings_s": self.timings,
            }
            print(json.dumps(doc, indent=2))
        else:
            table(self.files)
            if self.timings:
                print("\nstage timing (s)")
                for name, seconds in self.timings.items():
                    print(f"  {name:<20}{seconds:8.3f}")
        return 1 if self.failures else 0


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        disable=not sys.stderr.isatty() or total < 2,
        file=sys.stderr,
    )
