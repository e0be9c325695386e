"""Decode and encode speed of PerCo at 768×512: per step count, per stage, per variant.

    python scripts/bench_decode.py --model sd21                    # GPU: SD 2.1 architecture
    python scripts/bench_decode.py --model tiny --device cpu       # anywhere
    python scripts/bench_decode.py --model tiny --quick            # CI smoke (64×64, 2 steps)
    python scripts/bench_decode.py --model sd21 --device cpu --height 256 --width 384 \
        --steps 5 20 --variants "fp32 sdpa" --repeats 1 --one-step  # the one-step ratio

The SD 2.1 architecture is built from its published configs with random weights (speed
does not depend on the weights), or loaded with ``--pretrained``. For each variant
(dtype, attention kernel, memory format, torch.compile / CUDA graphs) the script reports
the time of a decode with CFG per step count, U-Net calls per step, time per stage, peak
memory, the sampling loop's achieved TFLOP/s (FLOPs from torch.utils.flop_counter) and
its share of the device's measured matmul rate in that dtype, and the encode time.
Against a naive loop that calls the U-Net once per CFG branch it prints the calls and
time ratios.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
from _bench import (
    build,
    count_flops,
    matmul_tflops,
    peak_memory_gb,
    print_table,
    reset_peak,
    stopwatch,
    sync,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.utils.torch_utils import randn_tensor

from perco.timing import CallCounter, StageTimer


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype = torch.float32
    sdpa: bool = True
    channels_last: bool = False
    compile: str | None = None  # None | "default" | "reduce-overhead" (CUDA graphs)


VARIANTS = {
    v.name: v
    for v in [
        Variant("fp32 eager-attn", sdpa=False),
        Variant("fp32 sdpa"),
        Variant("bf16 eager-attn", torch.bfloat16, sdpa=False),
        Variant("bf16 sdpa", torch.bfloat16),
        Variant("bf16 sdpa channels_last", torch.bfloat16, channels_last=True),
        Variant("bf16 sdpa compile", torch.bfloat16, channels_last=True, compile="default"),
        Variant("bf16 sdpa compile+cudagraphs", torch.bfloat16, True, True, "reduce-overhead"),
        Variant("fp32 sdpa channels_last", channels_last=True),
    ]
}
GPU_DEFAULT = [n for n in VARIANTS if n.startswith("bf16")] + ["fp32 sdpa"]
CPU_DEFAULT = ["fp32 eager-attn", "fp32 sdpa", "fp32 sdpa channels_last"]


def prepare(model, variant: Variant):
    model = copy.deepcopy(model)
    for part in (model.unet, model.autoencoder, model.text_encoder, model.hyper_encoder):
        part.to(variant.dtype)
    model.unet.set_attn_processor(AttnProcessor2_0() if variant.sdpa else AttnProcessor())
    if variant.channels_last:
        model.unet.to(memory_format=torch.channels_last)
        model.autoencoder.to(memory_format=torch.channels_last)
    if variant.compile:
        model.unet = torch.compile(model.unet, mode=variant.compile, fullgraph=True)
    return model.eval().requires_grad_(False)


def naive_sample(model, encoded, steps: int, generator) -> torch.Tensor:
    """Reference CFG loop with one U-Net call per branch (what PerCo's sampler avoids)."""
    unet, dtype = model.unet, model.unet.dtype
    cell = model.autoencoder.factor
    size = tuple(s // cell for s in encoded.padded_size)
    indices = model.pad_indices(encoded.indices.to(model.device), encoded.padded_size)
    spatial = model._spatial(model.quantizer.lookup(indices), size).to(dtype)
    text = model._text(encoded.captions).to(dtype)
    null = model.null_text(len(encoded)).to(model.device, dtype)
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(steps, device=model.device)
    shape = (len(encoded), unet.config.out_channels, *size)
    latents = randn_tensor(shape, generator=generator, device=model.device, dtype=dtype)
    scale = model.config.guidance_scale
    for t in scheduler.timesteps:
        x = torch.cat([scheduler.scale_model_input(latents, t), spatial], dim=1)
        cond = unet(x, t, text).sample
        uncond = unet(x, t, null).sample
        latents = scheduler.step(uncond + scale * (cond - uncond), t, latents).prev_sample
    return latents


def bench_variant(base, variant, args, device) -> list[dict]:
    model = prepare(base, variant)
    image = torch.rand(1, 3, args.height, args.width, device=device)
    caption = ["a red bicycle leaning against a brick wall next to a wooden door"]
    autocast = torch.autocast(
        device.type, dtype=variant.dtype, enabled=variant.dtype != torch.float32
    )
    rows = []
    with torch.no_grad(), autocast:
        encoded = model.encode(image, caption)  # warm-up (and compile)
        enc = StageTimer()
        for _ in range(args.repeats):
            model.encode(image, caption, timer=enc)
        encode_s = sum(enc.seconds.values()) / args.repeats
        counter = CallCounter(model.unet)
        for steps in args.steps:
            model.decode(encoded, steps=steps, guidance="text")  # warm-up
            counter.calls, timer = 0, StageTimer()
            reset_peak(device)
            times = {}
            with stopwatch(device, times):
                for _ in range(args.repeats):
                    model.decode(encoded, steps=steps, guidance="text", timer=timer)
            calls = counter.calls / (args.repeats * steps)
            loop_s = timer.seconds["decode steps"] / args.repeats
            # the sampling loop's FLOPs are the U-Net's (the scheduler's are negligible)
            loop_flops = count_flops(
                lambda s=steps: model.decode(encoded, steps=s, guidance="text"),
                type(base.unet).__name__,
            )
            naive = {}
            counter.calls = 0
            g = torch.Generator(device).manual_seed(0)
            with stopwatch(device, naive):
                for _ in range(args.repeats):
                    naive_sample(model, encoded, steps, g)
            naive_calls = counter.calls / (args.repeats * steps)
            tflops = loop_flops / loop_s / 1e12 if loop_s else 0.0
            rows.append(
                {
                    "variant": variant.name,
                    "steps": steps,
                    "decode s": times["s"] / args.repeats,
                    "U-Net calls/step": calls,
                    "text s": timer.seconds["text encoding"] / args.repeats,
                    "loop s": loop_s,
                    "VAE decode s": timer.seconds["autoencoder decode"] / args.repeats,
                    "peak GB": peak_memory_gb(device),
                    "loop TFLOP/s": tflops,
                    "share of matmul": tflops / args.peak[variant.dtype],
                    "calls vs naive": calls / naive_calls,
                    "time vs naive": loop_s / (naive["s"] / args.repeats),
                    "encode s": encode_s,
                }
            )
        counter.remove()
        if args.one_step:
            args.student_rows += student_rows(model, encoded, variant, rows, args, device)
    sync(device)
    return rows


def student_rows(model, encoded, variant, rows, args, device) -> list[dict]:
    """The one-step student of ``model`` (its frozen encoder, one U-Net call, no CFG pass)
    decoding the same encoding, side by side with the rows just measured: how many times
    faster it decodes than the sampler at each step count, in this run."""
    from perco.models.student import one_step_student

    student = one_step_student(model).eval()
    counter = CallCounter(student.unet)
    student.decode(encoded)  # warm-up
    counter.calls, times = 0, {}
    with stopwatch(device, times):
        for _ in range(args.repeats):
            student.decode(encoded)
    seconds = times["s"] / args.repeats
    counter.remove()
    out = [{"variant": variant.name, "decoder": "one-step student", "decode s": seconds,
            "U-Net calls": counter.calls / args.repeats, "student faster by": 1.0}]  # fmt: skip
    out += [{"variant": variant.name, "decoder": f"{r['steps']} steps, CFG",
             "decode s": r["decode s"], "U-Net calls": r["U-Net calls/step"] * r["steps"],
             "student faster by": r["decode s"] / seconds} for r in rows]  # fmt: skip
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd21"], default="sd21")
    parser.add_argument("--pretrained", help="a Stable Diffusion checkpoint instead")
    parser.add_argument("--rate", default="r0.0019")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64×64, 2 steps, 1 repeat")
    parser.add_argument(
        "--one-step", action="store_true", help="also the model's one-step student, side by side"
    )
    args = parser.parse_args(argv)
    args.student_rows = []
    if args.quick:
        args.height = args.width = 64
        args.steps, args.repeats = [2], 1
    device = torch.device(args.device)
    variants = args.variants or (GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)
    dtypes = {VARIANTS[v].dtype for v in variants}
    args.peak = {d: matmul_tflops(device, d) for d in dtypes}
    base = build(args.model, args.rate, device, args.pretrained).eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; threads: {torch.get_num_threads()}; torch {torch.__version__}")
    for d, rate in args.peak.items():
        print(f"measured {str(d).removeprefix('torch.')} matmul rate: {rate:.2f} TFLOP/s")
    rows = []
    for v in variants:
        rows += bench_variant(base, VARIANTS[v], args, device)
    print_table(
        f"decode of one {args.width}×{args.height} image, {args.model}, {args.rate}, CFG text",
        rows,
    )
    print_table(
        f"one-step student vs the sampler, same image and run ({args.repeats} repeats)",
        args.student_rows,
    )


if __name__ == "__main__":
    main()
