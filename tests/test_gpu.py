"""The GPU group (``pytest -m gpu``): SD 2.1-sized PerCo on CUDA. Skipped without a device.

Random weights from SD 2.1's published configs (``perco.testing.sd21_components``): the
real architecture, nothing downloaded. ``scripts/gpu_check.sh`` runs this group first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from perco import codec
from perco.io import load_image, save_image
from perco.models.perco import PerCo
from perco.testing import save_sd21, sd21_components
from perco.timing import CallCounter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def sd21_perco():
    with torch.device(CUDA):
        c = sd21_components()
        model = PerCo.from_components(
            c["vae"], c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"], "r0.0019"
        )
    return model.eval()


def test_bf16_autocast_training_step_at_256(sd21_perco, assets):
    model = sd21_perco
    params = model.set_trainable("linear")
    model.train()
    image = load_image(assets / "kodak" / "kodim23.png")[..., :256, :256].to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(image, ["a photo of two parrots"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in params if p.requires_grad)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, frozen[:3]
    model.zero_grad(set_to_none=True)
    model.set_trainable("none")
    model.eval()


@pytest.mark.parametrize("steps", [20, 1])
def test_decode_768x512_counts_unet_calls(sd21_perco, assets, steps):
    model = sd21_perco
    image = load_image(assets / "kodak" / "kodim23.png").to(CUDA)
    assert image.shape[-2:] == (512, 768)
    with torch.no_grad():
        ((data, _),) = codec.compress(model, image, ["two parrots"])
        parsed = codec.parse(model, data)[0]
        counter = CallCounter(model.unet)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = codec.decompress(model, [parsed], steps=steps)[0]
    assert y.shape == image[0].shape and torch.isfinite(y).all()
    assert counter.calls == steps  # CFG batched: one U-Net call per step


def test_index_prior_codes_the_same_bytes_on_the_gpu_as_on_the_cpu():
    from perco.models.index_prior import ContextPrior

    torch.manual_seed(0)
    prior = ContextPrior(256, 8, 16, 5).eval()
    maps = np.random.default_rng(0).integers(0, 256, (4, 8, 12))
    cpu = prior.encode(maps)
    gpu_prior = prior.to(CUDA)
    assert gpu_prior.encode(maps) == cpu
    for m, s in zip(maps, cpu, strict=True):
        back, code = gpu_prior.decode(s, (8, 12))
        assert code == 0 and np.array_equal(back, m)


def test_compress_and_decompress_commands_with_the_full_size_model(tmp_path, assets):
    with torch.device(CUDA):
        model = PerCo.from_stable_diffusion(save_sd21(tmp_path / "sd21"), "r0.0019")
    model.save_pretrained(tmp_path / "model")
    del model
    save_image(load_image(assets / "kodak" / "kodim23.png")[0], tmp_path / "in" / "k.png")
    perco = [sys.executable, "-m", "perco"]
    common = ["--model", str(tmp_path / "model"), "--device", "cuda"]
    for cmd in (["compress", str(tmp_path / "in"), "-o", str(tmp_path / "bits")],
                ["decompress", str(tmp_path / "bits"), "-o", str(tmp_path / "out"),
                 "--steps", "2"]):  # fmt: skip
        done = subprocess.run([*perco, *cmd, *common], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    (png,) = (tmp_path / "out").glob("*.png")
    assert load_image(png).shape[-2:] == (512, 768)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_process_nccl_training(photo_folder, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny_overrides

    overrides = tiny_overrides(photo_folder, tmp_path, "trainer.max_steps=4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "perco.train.cli", *overrides]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout + done.stderr


def test_an_8bit_adamw_step_on_the_full_size_u_net(sd21_perco):
    pytest.importorskip("bitsandbytes", reason="trainer.optimizer=adamw8bit: perco[gpu]")
    from omegaconf import OmegaConf

    from perco.train.loop import make_optimizer

    model = sd21_perco
    params = model.set_trainable("full")
    tc = OmegaConf.create({"lr": 1e-5, "betas": [0.9, 0.999], "weight_decay": 0.01,
                           "optimizer": "adamw8bit"})  # fmt: skip
    optimizer = make_optimizer(params, tc, CUDA)
    model.train()
    images = torch.rand(2, 3, 256, 256, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(images, ["a cat", "a dog"]).loss
    loss.backward()
    before = model.unet.conv_out.weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.unet.conv_out.weight)
    del optimizer
    model.zero_grad(set_to_none=True)
    model.set_trainable("none")
    model.eval()


def test_a_compiled_u_net_decodes_like_the_eager_one(sd21_perco):
    import copy

    model = sd21_perco
    image = torch.rand(1, 3, 256, 256, device=CUDA)
    with torch.no_grad():
        ((data, _),) = codec.compress(model, image, ["noise"])
        parsed = codec.parse(model, data)[0]
        eager = codec.decompress(model, [parsed], steps=2)[0]
        compiled = copy.deepcopy(model)
        compiled.unet.compile()
        again = codec.decompress(compiled, [parsed], steps=2)[0]
    assert (eager - again).abs().max() < 2e-2
