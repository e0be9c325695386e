"""The benchmark scripts run at tiny size on the CPU (a smoke test; no timing targets)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def run_script(name: str, *args: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), "--model", "tiny", "--quick", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_bench_decode_counts_one_unet_call_per_step_with_cfg():
    rows = run_script("bench_decode.py", "--device", "cpu")
    assert len(rows) == 3
    for row in rows:
        assert float(row["U-Net calls/step"]) == 1
        assert float(row["calls vs naive"]) == 0.5
        assert float(row["loop TFLOP/s"]) > 0


def test_bench_train_reports_each_mode():
    rows = run_script("bench_train.py", "--device", "cpu")
    modes = {row["mode"] for row in rows}
    assert modes == {"linear", "full", "lora"} and len(rows) == 6
    state = {r["mode"]: float(r["AdamW state GB"]) for r in rows}
    assert state["lora"] < state["linear"] < state["full"]


def test_bench_tiny_control_gives_every_image_another_image_of_its_size():
    import runpy

    bench = runpy.run_path(str(ROOT / "scripts" / "bench_tiny.py"), run_name="bench_tiny")
    sizes = [(512, 768)] * 7 + [(768, 512)] + [(512, 768)] * 2 + [(768, 512)] * 3 + [(64, 64)]
    pairs = bench["shuffle_pairs"](sizes, seed=0)
    kept = [dst for dst, _ in pairs]
    assert kept == [i for i in range(len(sizes)) if i != 13]  # alone in its size: left out
    assert sorted(src for _, src in pairs) == kept  # a permutation of the kept images
    assert all(dst != src and sizes[dst] == sizes[src] for dst, src in pairs)
