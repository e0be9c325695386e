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

__all__ = ["StageTimer", "Timing", "repeat", "OtherLoad", "machine_load", "CallCounter"]


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


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux ``/proc/stat``:
    every state but idle and iowait), or ``None`` elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How many cores *other* processes kept busy during a ``with`` block: the machine's
    busy CPU time minus this process's own, per second of wall time. Unlike the load
    average, it does not count this process's own earlier work (a benchmark that follows
    training would otherwise always look loaded). ``cores`` is ``None`` where the machine's
    CPU time cannot be read (not Linux)."""

    def __init__(self) -> None:
        self.cores: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = (_busy_cpu_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        if busy is not None and self._start[0] is not None:
            elapsed = max(wall - self._start[2], 1e-9)
            others = (busy - self._start[0]) - (own - self._start[1])
            self.cores = max(others, 0.0) / elapsed

    def warning(self, threshold: float = 0.5) -> str | None:
        """A sentence when others used at least ``threshold`` cores, else ``None``."""
        if self.cores is None or self.cores < threshold:
            return None
        return (f"other processes kept {self.cores:.1f} of {os.cpu_count()} cores busy "
                "while timing")  # fmt: skip


def machine_load() -> str | None:
    """A warning when other work shares the CPU (1-minute load average at or above half
    the cores): timings taken then are not the machine's own. Call it before the caller's
    own work, which the load average would count too; where it can, prefer
    :class:`OtherLoad` around the timing itself."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cores / 2:
        return f"the machine was loaded (1-min load average {load:.1f} on {cores} cores)"
    return None


class CallCounter:
    """Counts a module's forward calls (e.g. a decode's U-Net calls); ``remove()`` unhooks."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self) -> None:
        self.handle.remove()
