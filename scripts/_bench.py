"""Helpers shared by the bench_* scripts: model building, timing, FLOPs, memory."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager

import torch

from perco.models.perco import PerCo


def build(kind: str, rate: str, device: torch.device, pretrained: str | None = None) -> PerCo:
    """``tiny`` (random tiny SD-shaped), ``sd21`` (SD 2.1's published architecture with
    random weights: speed does not depend on the weights), or a real checkpoint."""
    if pretrained:
        return PerCo.from_stable_diffusion(pretrained, rate).to(device)
    if kind == "tiny":
        from perco.testing import tiny_perco

        return tiny_perco(rate).to(device)
    from perco.testing import sd21_components

    with torch.device(device):
        c = sd21_components()
        return PerCo.from_components(
            c["vae"], c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"], rate
        )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device, out: dict, key: str = "s"):
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    out[key] = time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """The device's measured dense matmul rate in TFLOP/s (the share's denominator)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 20 if device.type == "cuda" else 5
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def count_flops(fn, module: str | None = None) -> int:
    """FLOPs of ``fn()``: all of them, or those inside modules of class ``module``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    if module is None:
        return counter.get_total_flops()
    return sum(counter.get_flop_counts().get(module, {}).values())


def print_table(title: str, rows: list[dict]) -> None:
    """A markdown table (pasteable into docs/benchmarks.md)."""
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n{title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
