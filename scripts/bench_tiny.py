"""The small real PerCo (experiment=tiny_taef2) on Kodak: quality, bits and speed.

    perco-train -m experiment=tiny_taef2       # writes runs/tiny_taef2/<rate>/model
    python scripts/bench_tiny.py                # this table, outputs/bench_tiny/

Each rung is evaluated with ``perco.evaluate`` on the 24 Kodak images at native size
(real bitstreams; the TAEF2 latents of each image are computed once and shared by the
rungs). Reference rows: the TAEF2 autoencoder alone (ceiling), JPEG (Pillow) at quality
1, and a control decoded by the top rung from shuffled z_l (index grids permuted across
images of the same size). LPIPS uses the real AlexNet weights; "patch FID/KID" is on
ImageNet AlexNet features over HiFiC patches (no Inception offline: not standard FID).
Also prints encode and decode time per image, and writes a reconstruction grid.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from perco import codec
from perco.cli._common import load_model
from perco.data.eval_sets import kodak
from perco.evaluate import Backbones, EvalSettings, evaluate
from perco.io import load_image, save_image, to_pil
from perco.metrics import (
    AlexNetFeatures,
    LPIPSDistance,
    colour_stats,
    fid_kid,
    hific_patches,
    ms_ssim,
    psnr,
)
from perco.plot import reconstruction_grid
from perco.timing import machine_load, repeat

COLUMNS = ["bpp_file", "bpp_payload", "psnr", "ms_ssim", "lpips", "delta_e2000", "fid", "kid"]


def score(originals, recons, backbones) -> dict:
    """Mean per-image metrics and patch FID/KID of paired image lists."""
    rows, real, fake = [], [], []
    for x, y in zip(originals, recons, strict=True):
        x, y = x[None], y[None].clamp(0, 1).mul(255).round().div(255)
        row = {"psnr": psnr(x, y), "ms_ssim": ms_ssim(x, y), "lpips": backbones.lpips(x, y)}
        row["delta_e2000"] = colour_stats(x, y)["delta_e2000"]
        rows.append({k: float(v) for k, v in row.items()})
        real.append(backbones.features(hific_patches(x)))
        fake.append(backbones.features(hific_patches(y)))
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out.update(fid_kid(torch.cat(real), torch.cat(fake)))
    return out


def print_table(table: dict[str, dict], columns: list[str]) -> None:
    """A markdown table: one row per entry of ``table``, ``-`` where a value is missing."""
    print("| row | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in table.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else "-" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def jpeg(image: torch.Tensor, quality: int) -> tuple[torch.Tensor, int]:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=quality)
    return load_image(io.BytesIO(buffer.getvalue()))[0], len(buffer.getvalue())


def shuffle_pairs(sizes: list[tuple[int, int]], seed: int = 0) -> list[tuple[int, int]]:
    """``(image, donor)`` pairs: within each size a random order shifted by one, so no
    image is its own donor; an image alone in its size has no partner and is left out."""
    g = torch.Generator().manual_seed(seed)
    by_size = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    pairs = []
    for group in by_size.values():
        if len(group) > 1:
            order = [group[k] for k in torch.randperm(len(group), generator=g).tolist()]
            pairs += zip(order, order[1:] + order[:1], strict=True)
    return sorted(pairs)


def shuffled_control(model, data, steps: int, latent_cache: dict, seed: int = 0):
    """Decode images from another image's z_l of the same size (see :func:`shuffle_pairs`).

    ``latent_cache``: the autoencoder latents the evaluation computed, keyed by
    ``(image id, padded height, padded width)``. Returns the indices of the images kept,
    those images and their decodings.
    """
    images = [data[i]["image"] for i in range(len(data))]
    parsed = []
    for item, x in zip(data.items, images, strict=True):
        z = latent_cache.get((item.id, *model.padded_size(*x.shape[-2:])))
        ((data_bytes, _),) = codec.compress(model, x[None], latents=z)
        parsed.append(codec.parse(model, data_bytes)[0])
    pairs = shuffle_pairs([p.size for p in parsed], seed)
    shuffled = [replace(parsed[dst], indices=parsed[src].indices) for dst, src in pairs]
    kept = [dst for dst, _ in pairs]
    return kept, [images[i] for i in kept], codec.decompress(model, shuffled, steps=steps)


def timing(model, image: torch.Tensor, steps: int, repeats: int) -> dict:
    """Encode and decode one image: median (fastest–slowest) of ``repeats`` runs after a
    warm-up; with and without CFG only for a model that has text to guide with."""
    with torch.no_grad():
        encoded = model.encode(image)
        out = {"encode s": repeat(lambda: model.encode(image), repeats)}
        modes = ("none", "text") if model.config.text else ("none",)
        for guidance in modes:
            key = f"decode s ({steps} steps{', cfg ' + guidance if len(modes) > 1 else ''})"
            out[key] = repeat(lambda g=guidance: model.decode(encoded, steps=steps, guidance=g),
                              repeats)  # fmt: skip
    return out


def main(argv=None) -> None:
    assets = Path(os.environ.get("PERCO_ASSETS", "../shared/assets"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/tiny_taef2"))
    parser.add_argument("--rates", nargs="+", default=["r0.0019", "r0.0098", "r0.1250"])
    parser.add_argument("--kodak", type=Path, default=assets / "kodak")
    parser.add_argument(
        "--lpips", type=Path, default=assets / "lpips" / "alexnet_features.safetensors"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--limit", type=int, help="first N Kodak images only")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after a warm-up")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_tiny"))
    args = parser.parse_args(argv)

    loaded = machine_load()  # before this script loads the machine itself
    start = time.perf_counter()
    data = kodak(args.kodak, args.limit)
    backbones = Backbones(LPIPSDistance("alex", args.lpips), AlexNetFeatures(args.lpips))
    models = {rate: load_model(str(args.runs), rate) for rate in args.rates}
    first = next(iter(models.values())).autoencoder.state_dict()
    for rate, m in models.items():  # the rungs may share latents only with one autoencoder
        same = all(torch.equal(v, m.autoencoder.state_dict()[k]) for k, v in first.items())
        assert same, f"{rate} has another autoencoder"
    latent_cache, table = {}, {}
    for i, (rate, model) in enumerate(models.items()):
        settings = EvalSettings(
            steps=[args.steps], ceiling=i == 0, fid_variant="patches", batch_size=6, grid_images=4
        )
        doc = evaluate(
            model, data, settings, backbones, args.out / rate, "tiny_taef2", latent_cache
        )
        table[f"PerCo tiny_taef2 {rate}"] = {k: v[0] for k, v in doc["results"].items()}
        if i == 0:
            table["TAEF2 alone (ceiling)"] = doc["autoencoder_ceiling"]

    originals = [data[i]["image"] for i in range(len(data))]
    recons, sizes = zip(*(jpeg(x, 1) for x in originals), strict=True)
    bpp = [8 * n / (x.shape[-1] * x.shape[-2]) for n, x in zip(sizes, originals, strict=True)]
    row = score(originals, recons, backbones)
    row["bpp_file"] = row["bpp_payload"] = sum(bpp) / len(bpp)
    table["JPEG quality 1 (Pillow)"] = row

    top = args.rates[-1]
    kept, images, control = shuffled_control(models[top], data, args.steps, latent_cache)
    if kept:  # (an image alone in its size has no donor: --limit 1 gives no control)
        table[f"control: {top} from shuffled z_l ({len(kept)} images)"] = score(
            images, control, backbones
        )
    for i, recon in zip(kept, control, strict=True):
        if i < 4:
            save_image(recon, args.out / "control" / f"{data.items[i].id}_0.png")
    eval_s = time.perf_counter() - start

    print(f"\nKodak ({len(data)} images, native size), {args.steps} steps, guidance none\n")
    print_table(table, COLUMNS)

    speed = {r: timing(m, originals[0][None], args.steps, args.repeats) for r, m in models.items()}
    print(f"\ntime per 768×512 image on {torch.get_num_threads()} CPU threads: median "
          f"(fastest–slowest) of {args.repeats} runs after a warm-up")  # fmt: skip
    if loaded:
        print(f"warning: {loaded}; these times are not the machine's own")
    cols = list(next(iter(speed.values())))
    print("| rate | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for rate, t in speed.items():
        print(f"| {rate} | " + " | ".join(str(t[c]) for c in cols) + " |")

    # grid: original, each rung, the control (first images)
    for rate in args.rates:
        src = args.out / rate / "reconstructions" / f"steps={args.steps}"
        dst = args.out / "grid" / "reconstructions" / rate
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*_0.png"):
            (dst / f.name).write_bytes(f.read_bytes())
    (args.out / "grid" / "reconstructions" / "control").mkdir(parents=True, exist_ok=True)
    for f in (args.out / "control").glob("*.png"):
        (args.out / "grid" / "reconstructions" / "control" / f.name).write_bytes(f.read_bytes())
    columns = ["original"]
    columns += [f"{r}\n{table[f'PerCo tiny_taef2 {r}']['bpp_file']:.4f} bpp" for r in args.rates]
    columns += [f"control: {top}\nwith shuffled z_l"]
    grid = reconstruction_grid(data, args.out / "grid", [*args.rates, "control"],
                               [it.id for it in data.items[:4]], height=160,
                               columns=columns)  # fmt: skip
    save_image(grid, args.out / "grid.png")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nevaluation wall-clock {eval_s / 60:.1f} min; peak memory {peak:.2f} GB")
    columns = ", ".join(["original", *args.rates, "control"])
    print(f"grid: {args.out / 'grid.png'} (rows: images; columns: {columns})")


if __name__ == "__main__":
    main()
