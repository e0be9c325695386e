"""PerCo at Stable Diffusion 2.1's real size, run for real: every phase a user runs, once.

    python scripts/full_size_check.py                               # CPU, 128² crop
    python scripts/full_size_check.py --device cuda --size 256 --dtype bf16

Random weights from SD 2.1's published configs (``perco/models/sd21/``): the components
are written as a diffusers folder and read back through ``PerCo.from_stable_diffusion``
(865M-parameter U-Net widened for z_l, OpenCLIP ViT-H text encoder, 8× VAE, the default
192/320 hyper-encoder with a 32-d codebook). Then, on a Kodak crop:

1. the trainable parameter counts of ``linear`` and ``lora`` against the meta-device
   figures of ``scripts/count_params.py``, and SDPA attention in every attention layer;
2. three training steps on one repeated batch per mode (fixed timestep and noise;
   ``linear`` with gradient checkpointing): the loss must be finite and fall, and only
   trainable parameters get gradients;
3. save and resume: the resumed model decodes a file to the same pixels;
4. compress the crop to a real file and decode it in 1 and 2 steps, U-Net calls counted.

Prints one markdown table (seconds and peak resident memory per phase; on CUDA also the
peak allocated GPU memory); ``--json`` writes it too. Exits non-zero on a failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from _bench import peak_memory_gb, stopwatch
from count_params import trainable_counts

from perco import codec
from perco.io import load_image
from perco.models.perco import PerCo
from perco.testing import save_sd21
from perco.timing import CallCounter
from perco.train import trainable_report

ASSETS_IMAGE = "kodak/kodim23.png"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Phases:
    """Seconds and peak memory per phase, in order."""

    def __init__(self, device: torch.device):
        self.device, self.rows = device, {}

    @contextmanager
    def __call__(self, name: str):
        times = {}
        with stopwatch(self.device, times):  # synchronised on a GPU
            yield
        row = {"s": round(times["s"], 1), "peak_rss_gb": round(peak_rss_gb(), 2)}
        if self.device.type == "cuda":
            row["peak_gpu_gb"] = round(peak_memory_gb(self.device), 2)
        self.rows[name] = row
        print(f"{name}: {row}", flush=True)

    def table(self) -> str:
        cols = list(next(iter(self.rows.values())))
        lines = ["| phase | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {k} | " + " | ".join(str(v[c]) for c in cols) + " |"
                  for k, v in self.rows.items()]  # fmt: skip
        return "\n".join(lines)


def crop(assets: Path, size: int) -> torch.Tensor:
    image = load_image(assets / ASSETS_IMAGE)
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top : top + size, left : left + size]


def train_steps(
    model: PerCo, mode: str, images, steps: int, autocast, expected: dict, checkpointing: bool
) -> dict:
    """``steps`` AdamW steps of ``mode`` on one batch with fixed timestep and noise, the
    U-Net's activations recomputed in backward with ``checkpointing``."""
    params = model.set_trainable(mode)
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    report = trainable_report(model)
    for key in ("trainable_params", "total_params"):
        if report[key] != expected[key]:
            raise AssertionError(f"{mode}: {key} {report[key]:,} here, {expected[key]:,} on meta")
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    h, w = (side // model.autoencoder.factor for side in model.padded_size(*images.shape[-2:]))
    shape = (1, model.autoencoder.latent_channels, h, w)
    noise, t = torch.randn(shape, generator=g), torch.tensor([500])
    losses = []
    for _ in range(steps):
        with autocast:
            loss = model(images, ["a photo of a parrot"], timesteps=t, noise=noise,
                         generator=torch.Generator().manual_seed(1)).loss  # fmt: skip
        loss.backward()
        stray = [n for n, p in model.named_parameters()
                 if p.grad is not None and not p.requires_grad]  # fmt: skip
        if stray:
            raise AssertionError(f"{mode}: gradients on frozen parameters {stray[:3]}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    del optimizer
    if not all(torch.isfinite(torch.tensor(losses))) or not losses[-1] < losses[0]:
        raise AssertionError(f"{mode}: loss {losses} is not finite and falling")
    return {"trainable": report["trainable_params"], "losses": [round(x, 5) for x in losses],
            "gradient_checkpointing": checkpointing}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast for training and decoding (weights stay fp32)")
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels")
    parser.add_argument("--rate", default="r0.0019")
    parser.add_argument("--steps", type=int, default=3, help="training steps per mode")
    parser.add_argument("--assets", type=Path, default=None, help="default: $PERCO_ASSETS")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    assets = args.assets or Path(os.environ.get("PERCO_ASSETS", "../shared/assets"))
    device = torch.device(args.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                else nullcontext())  # fmt: skip
    phases, out = Phases(device), {"device": str(device), "dtype": args.dtype, "size": args.size}
    images = crop(assets, args.size)
    expected = trainable_counts(args.rate, ("linear", "lora"))

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        with phases("write SD 2.1-sized components (random weights)"):
            save_sd21(tmp / "sd21")
        with phases("PerCo.from_stable_diffusion"):
            model = PerCo.from_stable_diffusion(tmp / "sd21", args.rate).to(device)
        processors = {type(p).__name__ for p in model.unet.attn_processors.values()}
        out["attention"] = sorted(processors)
        if processors != {"AttnProcessor2_0"}:
            raise AssertionError(f"attention processors {processors}, not SDPA")
        images = images.to(device)
        for mode in ("linear", "lora"):  # lora last: its adapters stay
            checkpointing = mode == "linear"  # each knob once: checkpointing with linear
            label = f"train {args.steps} steps, {mode}" + (", checkpointing" * checkpointing)
            with phases(label):
                out[f"train_{mode}"] = train_steps(
                    model, mode, images, args.steps, autocast, expected[mode], checkpointing
                )
        model.eval()
        with phases("save"):
            model.save_pretrained(tmp / "perco")
        with phases("resume (PerCo.from_pretrained)"):
            resumed = PerCo.from_pretrained(tmp / "perco").to(device).eval()
        model.unet.fuse_lora()  # what the saved U-Net holds: the adapters merged in
        model.unet.unload_lora()
        saved, loaded = model.state_dict(), resumed.state_dict()
        differ = [k for k in saved if k not in loaded or not torch.equal(saved[k], loaded[k])]
        if differ or saved.keys() != loaded.keys():
            raise AssertionError(f"resumed weights differ from the trained ones: {differ[:5]}")
        out["resumed_tensors_equal"] = len(saved)
        del model, saved, loaded
        with phases("compress"), torch.no_grad():
            ((data, _),) = codec.compress(resumed, images, ["a photo of a parrot"])
            parsed = codec.parse(resumed, data)[0]
        out["file_bytes"] = len(data)
        counter = CallCounter(resumed.unet)
        for steps in (1, 2):
            counter.calls = 0
            with phases(f"decode {steps} step(s)"), torch.no_grad(), autocast:
                decoded = codec.decompress(resumed, [parsed], steps=steps)[0].float()
            out[f"unet_calls_{steps}_steps"] = counter.calls
            if not torch.isfinite(decoded).all() or decoded.shape != images[0].shape:
                raise AssertionError(f"decode at {steps} steps: bad output {decoded.shape}")

    out["phases"] = phases.rows
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    print(f"\nSD 2.1-sized PerCo at {args.rate}, {args.size}² crop, {device} {args.dtype}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print(phases.table())
    print(f"\npeak resident memory {out['peak_rss_gb']} GB; file {len(data)} B; "
          f"U-Net calls 1 step: {out['unet_calls_1_steps']}, 2 steps: {out['unet_calls_2_steps']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
