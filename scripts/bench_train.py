"""One PerCo training step at 512² per ``trainable`` mode: speed, memory, FLOP rate.

    python scripts/bench_train.py --model sd21                 # GPU, SD 2.1 architecture
    python scripts/bench_train.py --model tiny --quick         # anywhere (CI smoke)

As the trainer does it: frozen autoencoder and text encoder cast to the mixed-precision
dtype, the step under autocast, AdamW over the trainable parameters only. For each mode
(linear — the paper; full — PerCo (SD); lora) with and without gradient checkpointing it
prints samples/s, peak memory, achieved TFLOP/s of forward + backward (FLOPs from
torch.utils.flop_counter) and its share of the device's measured matmul rate, the
trainable parameters and their AdamW state, and on a GPU the largest batch that fits.
"""

from __future__ import annotations

import argparse
import copy

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

MODES = ("linear", "full", "lora")


def step_fn(model, optimizer, batch, size, device, dtype):
    images = torch.rand(batch, 3, size, size, device=device)
    captions = ["a photo of a cat sitting on a windowsill"] * batch

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(images, captions).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def setup(base, mode, checkpointing, device, dtype):
    model = copy.deepcopy(base).train()
    params = model.set_trainable(mode)
    model.autoencoder.to(dtype=dtype)
    model.text_encoder.to(dtype=dtype)
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    return model, params, optimizer


def largest_batch(base, mode, checkpointing, size, device, dtype, limit: int = 512) -> int:
    """Doubling then bisection on CUDA out-of-memory errors."""
    good, bad = 0, None
    batch = 8
    while bad is None or bad - good > 1:
        model, _, opt = setup(base, mode, checkpointing, device, dtype)
        try:
            step_fn(model, opt, batch, size, device, dtype)()
            sync(device)
            good = batch
        except torch.OutOfMemoryError:
            bad = batch
        del model, opt
        torch.cuda.empty_cache()
        if good >= limit:
            return good
        batch = batch * 2 if bad is None else (good + bad) // 2
    return good


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "sd21"], default="sd21")
    parser.add_argument("--rate", default="r0.0019")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", action="store_true", help="search the largest batch")
    parser.add_argument("--quick", action="store_true", help="64², batch 2, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.repeats = 64, 2, 1
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    peak = matmul_tflops(device, dtype)
    base = build(args.model, args.rate, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; {dtype_name}; measured matmul rate {peak:.2f} TFLOP/s")
    rows = []
    for mode in args.modes:
        for checkpointing in (False, True):
            model, params, optimizer = setup(base, mode, checkpointing, device, dtype)
            step = step_fn(model, optimizer, args.batch, args.size, device, dtype)
            step()  # warm-up: optimizer state exists from here on
            reset_peak(device)
            times = {}
            with stopwatch(device, times):
                for _ in range(args.repeats):
                    step()
            seconds = times["s"] / args.repeats
            flops = count_flops(step)
            trainable = sum(p.numel() for p in params)
            state = sum(
                t.numel() * t.element_size()
                for s in optimizer.state.values()
                for t in s.values()
                if torch.is_tensor(t)
            )
            row = {
                "mode": mode,
                "grad ckpt": checkpointing,
                "batch": args.batch,
                "step s": seconds,
                "samples/s": args.batch / seconds,
                "peak GB": peak_memory_gb(device),
                "TFLOP/s": flops / seconds / 1e12,
                "share of matmul": flops / seconds / 1e12 / peak,
                "trainable M": trainable / 1e6,
                "AdamW state GB": state / 2**30,
            }
            del model, optimizer
            if args.max_batch and device.type == "cuda":
                row["max batch"] = largest_batch(
                    base, mode, checkpointing, args.size, device, dtype
                )
            rows.append(row)
    print_table(f"one training step at {args.size}², {args.model}, {args.rate}", rows)


if __name__ == "__main__":
    main()
