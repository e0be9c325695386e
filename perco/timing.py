"""Wall-clock timing (CUDA-synchronised): per stage for the codec's report, and repeated
measurements with their spread for benchmark tables."""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["StageTimer", "Timing", "repeat", "machine_load"]


class StageTimer:
    """Accumulates seconds per named stage: ``with timer("autoencoder encode"): ...``.

    On CUDA the device is synchronised at both ends of a stage, so kernels launched
    inside it are counted in it.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds[stage] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)


@contextmanager
def _untimed(stage: str):
    yield


def stage(timer: StageTimer | None, name: str):
    """``timer(name)`` if a timer is given, else a no-op context."""
    return timer(name) if timer is not None else _untimed(name)


@dataclass(frozen=True)
class Timing:
    """Seconds of repeated runs: the median and the fastest and slowest."""

    median: float
    low: float
    high: float
    repeats: int

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}–{self.high:.2f})"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def repeat(fn, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls (allocator, caches,
    lazy initialisation), synchronising CUDA around each call."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        seconds.append(time.perf_counter() - start)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), repeats)


def machine_load() -> str | None:
    """A warning when other work shares the CPU (1-minute load average at or above half
    the cores): timings taken then are not the machine's own. Call it before the caller's
    own work, which the load average would count too."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cores / 2:
        return f"the machine was loaded (1-min load average {load:.1f} on {cores} cores)"
    return None
