"""Memory of serving every rung of a sweep: per-rung one-step students, one U-Net each,
against a multi-rate student, whose rungs share one U-Net
(``experiment=tiny_taef2_onestep_multirate``). Both load through
:func:`perco.models.loading.load_models`, which also shares what every rung holds alike
(the frozen autoencoder and text encoder).

    python scripts/bench_multirate.py                        # SD 2.1 sizes (meta device)
    python scripts/bench_multirate.py --per-rung runs/tiny_taef2_onestep \\
        --multirate runs/tiny_taef2_onestep_multirate        # + the trained small models

The SD 2.1 rows are counted on the meta device (no weights, no download), in bf16 as the
SD experiments run: a multi-rate student's folders hold one U-Net's weights in every rung,
which ``load_models`` holds once; the rows build that sharing directly. The small-model
rows load the trained folders and count the tensors held (float32).
"""

from __future__ import annotations

import argparse

import torch
from _bench import build, print_table

from perco.models.loading import load_models
from perco.rates import RATES

RUNGS = ["r0.0019", "r0.0098", "r0.1250"]


def held(models) -> tuple[int, int, int]:
    """``(U-Nets, parameters and buffers, bytes)`` held by ``models`` together: each
    tensor once, however many models hold it."""
    tensors = {id(t): t for m in models for t in [*m.parameters(), *m.buffers()]}
    unets = len({id(m.unet) for m in models})
    count = sum(t.numel() for t in tensors.values())
    return unets, count, sum(t.numel() * t.element_size() for t in tensors.values())


def row(name: str, rungs: int, models) -> dict:
    unets, count, size = held(models)
    return {"models": name, "rungs": rungs, "U-Nets held": unets,
            "parameters held": f"{count / 1e6:,.1f}M", "GB": size / 2**30}  # fmt: skip


def sd21_rows(rates: list[str]) -> list[dict]:
    """Per-rung students without sharing, with the shared frozen parts, and multi-rate."""
    with torch.device("meta"):
        models = [build("sd21", rate, torch.device("meta")).to(torch.bfloat16) for rate in rates]
    rows = [row("SD 2.1, per-rung, nothing shared", len(rates), models)]
    for name in ("autoencoder", "text_encoder"):  # frozen, the same in every rung
        for model in models[1:]:
            setattr(model, name, getattr(models[0], name))
    rows.append(row("SD 2.1, per-rung (load_models)", len(rates), models))
    for model in models[1:]:
        model.unet = models[0].unet
    rows.append(row("SD 2.1, multi-rate (load_models)", len(rates), models))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-rung", help="a sweep of per-rung students (a run folder)")
    parser.add_argument("--multirate", help="a multi-rate student's run folder")
    parser.add_argument("--rates", nargs="+", default=RUNGS)
    parser.add_argument("--quick", action="store_true", help="SD 2.1 rows at --rates only")
    args = parser.parse_args(argv)

    rows = []
    for label, folder in (("per-rung", args.per_rung), ("multi-rate", args.multirate)):
        if folder:
            models = load_models(folder, args.rates).values()
            rows.append(row(f"{folder} ({label})", len(args.rates), models))
    for rates in [args.rates] if args.quick else [args.rates, list(RATES)]:
        rows += sd21_rows(rates)
    print_table("Serving every rung: what is held in memory", rows)
    saved = [r for r in rows if "load_models" in r["models"]]
    for per_rung, multi in zip(saved[::2], saved[1::2], strict=True):
        print(f"\nSD 2.1, {per_rung['rungs']} rungs: one U-Net saves "
              f"{per_rung['GB'] - multi['GB']:.2f} GB of {per_rung['GB']:.2f} GB")  # fmt: skip


if __name__ == "__main__":
    main()
