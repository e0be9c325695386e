"""The benchmark scripts run at tiny size on the CPU (a smoke test; no timing targets)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
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


def test_bench_decode_puts_the_one_step_student_beside_the_sampler():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_decode.py"), "--model", "tiny",
         "--quick", "--device", "cpu", "--one-step"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("one-step student vs the sampler")[1]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, [c.strip() for c in x.strip("|").split("|")], strict=True))
            for x in lines[1:]]  # fmt: skip
    calls = {r["decoder"]: float(r["U-Net calls"]) for r in rows}
    assert calls == {"one-step student": 1, "2 steps, CFG": 2}
    assert all(float(r["student faster by"]) > 0 for r in rows)


def test_bench_train_reports_each_mode():
    rows = run_script("bench_train.py", "--device", "cpu")
    modes = {row["mode"] for row in rows}
    assert modes == {"linear", "full", "lora"} and len(rows) == 6
    state = {r["mode"]: float(r["AdamW state GB"]) for r in rows}
    assert state["lora"] < state["linear"] < state["full"]


def test_the_control_gives_every_image_another_image_of_its_size():
    from perco.eval.references import shuffle_pairs

    sizes = [(512, 768)] * 7 + [(768, 512)] + [(512, 768)] * 2 + [(768, 512)] * 3 + [(64, 64)]
    pairs = shuffle_pairs(sizes, seed=0)
    kept = [dst for dst, _ in pairs]
    assert kept == [i for i in range(len(sizes)) if i != 13]  # alone in its size: left out
    assert sorted(src for _, src in pairs) == kept  # a permutation of the kept images
    assert all(dst != src and sizes[dst] == sizes[src] for dst, src in pairs)


def test_repeated_timing_warms_up_and_reports_median_and_spread(monkeypatch):
    from perco import timing

    calls = []
    durations = iter([1.0, 3.0, 2.0])  # each timed call takes 1, 3, 2 s of a fake clock
    clock = {"now": 0.0}

    def fake_counter():
        return clock["now"]

    def work():
        calls.append(1)
        if len(calls) > 1:  # the first call is the untimed warm-up
            clock["now"] += next(durations)

    monkeypatch.setattr(timing.time, "perf_counter", fake_counter)
    result = timing.repeat(work, repeats=3, warmup=1)
    assert len(calls) == 4
    assert (result.median, result.low, result.high) == (2.0, 1.0, 3.0)
    assert str(result) == "2.00 (1.00–3.00)"
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    assert "loaded" in timing.machine_load()
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert timing.machine_load() is None


def test_other_load_counts_other_processes_not_this_one():
    from perco import timing

    with timing.OtherLoad() as alone:  # this process's own work is not "other load"
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            pass
    if alone.cores is None:
        pytest.skip("the machine's CPU time is not readable here (/proc/stat)")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        with timing.OtherLoad() as shared:
            time.sleep(1.0)
    finally:
        busy.kill()
        busy.wait()
    assert shared.cores >= 0.5 and "cores busy while timing" in shared.warning()
    assert shared.cores >= alone.cores + 0.3


def test_bench_integrity_refuses_every_cut_and_extension(tmp_path, assets):
    """The damage table on tiny models with a (random) prior: cuts and appended bytes
    are refused in format version 4, everything with the CRC."""
    from perco.models.index_prior import ContextPrior
    from perco.testing import tiny_perco

    for rate in ("r0.0019", "r0.0098"):
        model = tiny_perco(rate)
        model.set_index_prior(ContextPrior(model.rate.codebook_size, 8, 8, 3), {"fitted_on": "-"})
        model.save_pretrained(tmp_path / rate)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_integrity.py"), "--models", str(tmp_path),
         "--assets", str(assets), "--limit", "2", "--damaged", "2",
         "--rates", "r0.0019", "r0.0098"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| r0")]
    damage = [[c.strip() for c in r] for r in rows if len(r) == 7]
    assert len(damage) == 4  # two rungs, two sets
    for _, _, _, v4, crc, _, per in damage:
        assert int(v4.split("/")[0]) >= 8 and crc == "12/12"  # cuts and appends: 4 x 2
        cut_half, cut_one, _, _, appended, _ = per.split()
        assert cut_half == cut_one == appended == "2/2"


def test_bench_multirate_counts_one_unet_for_a_multi_rate_students_rungs(tmp_path):
    """Two rungs' folders as per-rung students (U-Nets apart) and as a multi-rate student
    (one U-Net): the table holds two U-Nets and one, and the SD 2.1 rows save one U-Net."""
    from perco.models.student import one_step_student
    from perco.testing import tiny_perco

    shared = tiny_perco("r0.0019").unet.state_dict()
    for rate in ("r0.0019", "r0.0059"):
        student = one_step_student(tiny_perco(rate))
        student.unet.load_state_dict(shared)
        student.save_pretrained(tmp_path / "multi" / rate / "model")
        with torch.no_grad():
            student.unet.conv_out.bias.add_(float(rate[1:]))
        student.save_pretrained(tmp_path / "apart" / rate / "model")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_multirate.py"), "--quick",
         "--per-rung", str(tmp_path / "apart"), "--multirate", str(tmp_path / "multi"),
         "--rates", "r0.0019", "r0.0059"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in done.stdout.splitlines() if line.startswith("| ")][1:]  # fmt: skip
    assert [r[2] for r in rows] == ["2", "1", "2", "2", "1"]  # U-Nets held
    gb = [float(r[4]) for r in rows]
    assert gb[1] < gb[0] and gb[2] > gb[3] > gb[4]
    assert "SD 2.1, 2 rungs: one U-Net saves" in done.stdout


def test_bench_texture_finds_seams_at_the_cell_period_and_a_diagonal_hatch(tmp_path):
    """Errors made to order: seams every 64 px, a diagonal hatch of period ~5.7 px, and
    white noise, on the same smooth image; each is found where it is and nowhere else."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :384]
    x = 0.5 + 0.2 * np.sin(xx / 40) * np.cos(yy / 30)
    errors = {
        "seams": 0.05 * (((xx % 64) == 0) | ((yy % 64) == 0)),
        "hatch": 0.03 * np.sin(2 * np.pi * (xx + yy) / 8),
        "noise": 0.03 * rng.standard_normal(x.shape),
    }
    (tmp_path / "originals").mkdir()
    Image.fromarray((x * 255).round().astype(np.uint8)).convert("RGB").save(
        tmp_path / "originals" / "a.png"
    )
    series = []
    for name, e in errors.items():
        (tmp_path / name).mkdir()
        y = np.clip(x + e, 0, 1)
        Image.fromarray((y * 255).round().astype(np.uint8)).convert("RGB").save(
            tmp_path / name / "a_0.png"
        )
        series.append(f"{name}={tmp_path / name}")
    out = tmp_path / "texture.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_texture.py"), "--images",
         str(tmp_path / "originals"), "--cell", "64", "--series", *series, "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows["seams"]["cell_peak"] > 100 * rows["noise"]["cell_peak"]
    assert rows["hatch"]["off_axis_peak"] > 10 * rows["noise"]["off_axis_peak"]
    assert rows["noise"]["cell_peak"] < 10 and rows["hatch"]["cell_peak"] < 10
    assert abs(rows["hatch"]["off_axis_period_px"] - 8 / 2**0.5) < 0.5
    assert abs(rows["hatch"]["off_axis_angle_deg"] - 45) < 5
