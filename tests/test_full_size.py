"""SD 2.1-sized PerCo, and FLUX.2 [klein] at its widths, run for real on the CPU (issues 29,
39): every real module class executes.

``scripts/full_size_check.py`` builds the real architecture with random weights from the
published configs shipped in the package, loads it through ``from_stable_diffusion``,
trains linear layers (with gradient checkpointing) and LoRA adapters, saves, resumes,
compresses a Kodak crop and decodes it. It runs in its own process, so its peak resident
memory is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sd21_sized_perco_trains_resumes_compresses_and_decodes_on_the_cpu(assets, tmp_path):
    out = tmp_path / "full_size.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "full_size_check.py"), "--assets", str(assets),
           "--workdir", str(tmp_path), "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["peak_rss_gb"] < 20  # this machine has 24 GB
    assert result["attention"] == ["AttnProcessor2_0"]  # SDPA
    for mode in ("linear", "lora"):  # counts equal to the meta device's, loss falls
        losses = result[f"train_{mode}"]["losses"]
        assert losses[-1] < losses[0]
    assert result["train_linear"]["trainable"] > 10 * result["train_lora"]["trainable"]
    assert result["resumed_tensors_equal"] > 1000
    assert result["unet_calls_1_steps"] == 1 and result["unet_calls_2_steps"] == 2
    assert 0 < result["file_bytes"] < 64  # 2×2 indices of 8 bits and a short caption


@pytest.mark.slow
def test_flux2_klein_wide_perco_trains_resumes_compresses_and_decodes_on_the_cpu(
    assets, tmp_path
):
    """FLUX.2 [klein] at its real widths, shallower (1 + 1 blocks of width 3072, the real
    VAE, a 4-layer Qwen3 of Qwen3-4B's width and vocabulary): every module class runs."""
    out = tmp_path / "full_size.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "full_size_check.py"), "--backbone", "flux2",
           "--assets", str(assets), "--workdir", str(tmp_path), "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["backbone"] == "flux2" and result["peak_rss_gb"] < 20
    assert result["attention"] == ["Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"]
    for mode in ("linear", "lora"):
        losses = result[f"train_{mode}"]["losses"]
        assert losses[-1] < losses[0]
    assert result["unet_calls_1_steps"] == 1 and result["unet_calls_2_steps"] == 2
    assert result["module_classes_run"] >= 15  # every computing class (15 in this build)


def test_gpu_check_says_no_cuda_device_and_fails_without_one():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: scripts/gpu_check.sh would run for minutes")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and done.stdout.strip() == "no CUDA device"
