"""Checkpoints that survive a kill: written aside, renamed into place when complete.

A checkpoint ``checkpoints/checkpoint_N`` is an ``accelerator.save_state`` folder (a
``perco/`` model folder, ``train_state.json``, optimizer, scheduler and RNG states) with a
``checkpoint.json`` marker written last. :func:`save_checkpoint` writes it as
``checkpoints/.checkpoint_N.partial`` on every rank, waits for all ranks, and rank 0
writes the marker and renames the folder into place. A kill at any moment leaves either
the complete checkpoint or a ``.partial`` folder that resuming ignores and the next save
clears. Pruning to ``checkpoint_total_limit`` happens only after the rename, and the
newest complete checkpoint is never pruned.

:func:`resume_checkpoint` takes the newest complete checkpoint (``trainer.resume=latest``)
and says in one log line which and why it passed over any others; a checkpoint named
explicitly that is incomplete is refused with :class:`CheckpointError`.

Failure points (``PERCO_FAILPOINT=<name>`` raises :class:`Failpoint` there, to test that a
write cut short loses nothing): ``checkpoint:after-model`` (the model folder and train
state are written, the optimizer state is not), ``checkpoint:before-marker`` (all state is
written, the marker and rename are not).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..io import atomic_write

__all__ = [
    "CheckpointError",
    "Failpoint",
    "failpoint",
    "checkpoint_status",
    "resume_checkpoint",
    "save_checkpoint",
]

log = logging.getLogger("perco.train")

MARKER = "checkpoint.json"
PARTIAL = ".partial"
# what accelerate and the save hook write; a checkpoint from before the marker existed
# counts as complete when all of these are there
_LEGACY_FILES = ("train_state.json", "perco/perco.json", "optimizer.bin", "scheduler.bin")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (said in one line)."""


class Failpoint(RuntimeError):
    """Raised where ``PERCO_FAILPOINT`` names the point being passed."""


def failpoint(name: str) -> None:
    if os.environ.get("PERCO_FAILPOINT") == name:
        raise Failpoint(f"failpoint {name} (PERCO_FAILPOINT)")


def _index(path: Path) -> int:
    return int(path.name.removesuffix(PARTIAL).lstrip(".").rsplit("_", 1)[1])


def checkpoint_status(folder: Path) -> str | None:
    """``None`` when ``folder`` is a complete checkpoint, else why it is not."""
    if not folder.is_dir():
        return "missing"
    if folder.name.endswith(PARTIAL):
        return "incomplete (its write was cut short)"
    try:
        if (folder / MARKER).is_file():
            files = json.loads((folder / MARKER).read_text())["files"]
        else:  # written before the marker existed
            files = dict.fromkeys(_LEGACY_FILES)
        missing = [
            name
            for name, size in files.items()
            if not (folder / name).is_file() or size not in (None, (folder / name).stat().st_size)
        ]
        if missing:
            return f"incomplete (missing or cut short: {', '.join(sorted(missing))})"
        json.loads((folder / "train_state.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def _checkpoints(run: Path) -> list[Path]:
    """The run's ``checkpoint_N`` folders (complete or not), newest first."""
    found = [p for p in (run / "checkpoints").glob("checkpoint_*") if p.is_dir()]
    return sorted(found, key=_index, reverse=True)


def next_index(run: Path) -> int:
    """The number of the next checkpoint: one past every ``checkpoint_N`` folder (a partial
    one left by a write cut short is cleared and written again)."""
    found = [_index(p) for p in _checkpoints(run)]
    return max(found, default=-1) + 1


def resume_checkpoint(run: Path, resume: str) -> Path | None:
    """The checkpoint that ``trainer.resume`` names: ``latest`` (the newest complete one,
    or ``None`` when there is none) or a folder, which must be complete."""
    if resume != "latest":
        folder = Path(resume)
        if (why := checkpoint_status(folder)) is not None:
            raise CheckpointError(f"cannot resume from {folder}: it is {why}")
        return folder
    passed = []
    for folder in _checkpoints(run):
        why = checkpoint_status(folder)
        if why is None:
            note = "; ".join(passed)
            log.info("resume=latest: %s%s", folder.name, f" (passed over {note})" if note else "")
            return folder
        passed.append(f"{folder.name}: {why}")
    if passed:
        log.warning("resume=latest: no complete checkpoint (%s); starting fresh", "; ".join(passed))
    return None


def save_checkpoint(accelerator, run: Path, index: int, step: int, total_limit: int | None) -> Path:
    """Write checkpoint ``index`` atomically on every rank; returns its folder."""
    folder = run / "checkpoints" / f"checkpoint_{index}"
    partial = folder.with_name(f".{folder.name}{PARTIAL}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a write that was cut short
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    failpoint("checkpoint:before-marker")
    accelerator.wait_for_everyone()  # every rank's RNG state is in
    if accelerator.is_main_process:
        files = {
            str(p.relative_to(partial)): p.stat().st_size
            for p in sorted(partial.rglob("*"))
            if p.is_file()
        }
        record = {"step": step, "processes": accelerator.num_processes, "files": files}
        record = json.dumps(record, indent=1) + "\n"
        atomic_write(partial / MARKER, lambda tmp: _write_synced(tmp, record))
        if folder.exists():  # a complete checkpoint of an abandoned run's later steps
            shutil.rmtree(folder)
        os.replace(partial, folder)
        _prune(run, total_limit)
    accelerator.wait_for_everyone()
    return folder


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prune(run: Path, total_limit: int | None) -> None:
    """Keep the newest ``total_limit`` complete checkpoints; clear partial folders."""
    for partial in (run / "checkpoints").glob(f".checkpoint_*{PARTIAL}"):
        shutil.rmtree(partial, ignore_errors=True)
    if not total_limit:
        return
    complete = [p for p in _checkpoints(run) if checkpoint_status(p) is None]
    for old in complete[max(1, total_limit) :]:
        shutil.rmtree(old, ignore_errors=True)
