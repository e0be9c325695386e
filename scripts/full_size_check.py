"""PerCo at Stable Diffusion 2.1's real size, run for real: every phase a user runs, once.

    python scripts/full_size_check.py                               # CPU, 128² crop
    python scripts/full_size_check.py --device cuda --size 256 --dtype bf16
    python scripts/full_size_check.py --backbone flux2              # FLUX.2 [klein]'s widths

``--backbone flux2``: FLUX.2 [klein] 4B at its real widths but shallower (its 4B do not
train in 24 GB on a CPU with a 4B text encoder beside them): one double-stream and one
single-stream block of width 3072 (of 5 + 20), the real VAE, a four-layer Qwen3 of
Qwen3-4B's width and vocabulary, read back through ``PerCo.from_flux2``; the meta-device
comparison of step 1 is the U-Net's only.

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
from perco.testing import flux2_klein_components, save_sd21, save_tiny_flux2
from perco.timing import CallCounter
from perco.train import trainable_report

ASSETS_IMAGE = "kodak/kodim23.png"

# per backbone: what it is called, how its folder is written and loaded, its SDPA processors
FAMILIES = {
    "unet": ("SD 2.1-sized", lambda p: save_sd21(p), PerCo.from_stable_diffusion,
             {"AttnProcessor2_0"}),
    "flux2": ("FLUX.2 [klein]-wide (1 + 1 blocks, 4 text layers)",
              lambda p: save_tiny_flux2(p, components=flux2_klein_components()),
              PerCo.from_flux2, {"Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"}),
}  # fmt: skip


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


# modules a model reads but never runs, and why
READ_NOT_RUN = {
    "BatchNorm2d": "FLUX.2's VAE keeps its latent statistics in a batch norm, read by the "
    "pipeline's normalisation (and Flux2Autoencoder's), never called",
}


class RanClasses:
    """The module classes whose forward ran (training, compression, decoding): with
    :meth:`report`, the model's classes that never did (a real part left unexercised)."""

    def __init__(self, model: torch.nn.Module):
        self.ran: set[str] = set()
        self.watch(model)

    def watch(self, model: torch.nn.Module) -> None:
        for module in model.modules():
            module.register_forward_pre_hook(lambda m, _: self.ran.add(type(m).__name__))

    def report(self, model: torch.nn.Module) -> tuple[int, list[str]]:
        """``(classes run, classes never run)`` among the model's computing modules: the
        leaves and those with parameters of their own (a wrapper such as a VAE is used
        through ``encode``/``decode``, not ``forward``; its leaves ran or did not)."""
        present = {type(m).__name__ for m in model.modules()
                   if not any(m.children()) or any(m.parameters(recurse=False))}  # fmt: skip
        return len(present & self.ran), sorted(present - self.ran - set(READ_NOT_RUN))


def train_steps(
    model: PerCo, mode: str, images, steps: int, autocast, expected: dict, checkpointing: bool
) -> dict:
    """``steps`` AdamW steps of ``mode`` on one batch with fixed timestep and noise, the
    U-Net's activations recomputed in backward with ``checkpointing``."""
    params = model.set_trainable(mode)
    if checkpointing:
        model.denoiser.enable_gradient_checkpointing()
    else:
        model.denoiser.disable_gradient_checkpointing()
    report = trainable_report(model)
    for key in ("trainable_params", "total_params") if expected else ():
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
    parser.add_argument("--backbone", choices=sorted(FAMILIES), default="unet")
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
    label, write, load, sdpa = FAMILIES[args.backbone]
    out["backbone"] = args.backbone
    unet = args.backbone == "unet"  # the meta-device counts are SD 2.1's
    expected = trainable_counts(args.rate, ("linear", "lora")) if unet else {}

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        with phases(f"write {label} components (random weights)"):
            write(tmp / "pipeline")
        with phases(f"PerCo.{load.__name__}"):
            model = load(tmp / "pipeline", args.rate).to(device)
        processors = {type(p).__name__ for p in model.denoiser.attn_processors.values()}
        out["attention"] = sorted(processors)
        if processors != sdpa:
            raise AssertionError(f"attention processors {processors}, not SDPA")
        ran = RanClasses(model)
        images = images.to(device)
        for mode in ("linear", "lora"):  # lora last: its adapters stay
            checkpointing = mode == "linear"  # each knob once: checkpointing with linear
            phase = f"train {args.steps} steps, {mode}" + (", checkpointing" * checkpointing)
            with phases(phase):
                out[f"train_{mode}"] = train_steps(
                    model, mode, images, args.steps, autocast, expected.get(mode), checkpointing
                )
        model.eval()
        with phases("save"):
            model.save_pretrained(tmp / "perco")
        with phases("resume (PerCo.from_pretrained)"):
            resumed = PerCo.from_pretrained(tmp / "perco").to(device).eval()
        model.denoiser.fuse_lora()  # what the saved denoiser holds: the adapters merged in
        model.denoiser.unload_lora()
        saved, loaded = model.state_dict(), resumed.state_dict()
        differ = [k for k in saved if k not in loaded or not torch.equal(saved[k], loaded[k])]
        if differ or saved.keys() != loaded.keys():
            raise AssertionError(f"resumed weights differ from the trained ones: {differ[:5]}")
        out["resumed_tensors_equal"] = len(saved)
        del model, saved, loaded
        ran.watch(resumed)
        with phases("compress"), torch.no_grad():
            ((data, _),) = codec.compress(resumed, images, ["a photo of a parrot"])
            parsed = codec.parse(resumed, data)[0]
        out["file_bytes"] = len(data)
        counter = CallCounter(resumed.denoiser)
        for steps in (1, 2):
            counter.calls = 0
            with phases(f"decode {steps} step(s)"), torch.no_grad(), autocast:
                decoded = codec.decompress(resumed, [parsed], steps=steps)[0].float()
            out[f"unet_calls_{steps}_steps"] = counter.calls
            if not torch.isfinite(decoded).all() or decoded.shape != images[0].shape:
                raise AssertionError(f"decode at {steps} steps: bad output {decoded.shape}")
        out["module_classes_run"], never = ran.report(resumed)
        if never:
            raise AssertionError(f"module classes that never ran: {never}")

    out["phases"] = phases.rows
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    print(f"\n{label} PerCo at {args.rate}, {args.size}² crop, {device} {args.dtype}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print(phases.table())
    print(f"\npeak resident memory {out['peak_rss_gb']} GB; file {len(data)} B; "
          f"denoiser calls 1 step: {out['unet_calls_1_steps']}, 2 steps: "
          f"{out['unet_calls_2_steps']}; module classes run: {out['module_classes_run']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
