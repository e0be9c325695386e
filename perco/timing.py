"""Per-stage wall-clock timing (CUDA-synchronised) for the codec's report."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

__all__ = ["StageTimer"]


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
