"""PerCo, PerCo-Image and SPRDiff-style on the same Kodak images at the same rate.

    perco-train -m experiment=tiny_taef2                     # runs/tiny_taef2/<rate>
    perco-train experiment=tiny_taef2_image rate=r0.0019     # runs/tiny_taef2_image/r0.0019
    perco-train experiment=tiny_taef2_sprdiff rate=r0.0019   # runs/tiny_taef2_sprdiff/r0.0019
    python scripts/bench_variants.py --rate r0.0019 --limit 8

The three small real models share the TAEF2 autoencoder, the training data (BSDS500),
the steps and the schedule; each is evaluated with ``perco.eval.evaluate`` (real bitstreams,
the same images and seeds). Extra rows: the SPRDiff-style model's coarse reconstruction
(one forward pass, no diffusion). LPIPS is given with both AlexNet (the evaluation's
default) and VGG (a metric this script registers), because the small PerCo-Image and
SPRDiff-style models use the same ImageNet AlexNet as their semantic encoder. Patch
FID/KID is on AlexNet features (no Inception offline: not standard FID).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from perco import codec, load_model
from perco.data.eval_sets import kodak
from perco.eval import Backbones, EvalSettings, LatentCache, Metric, evaluate, register
from perco.eval.family import markdown_table
from perco.eval.metrics import score
from perco.metrics import AlexNetFeatures, LPIPSDistance

COLUMNS = ["bpp_file", "bpp_payload", "psnr", "ms_ssim", "lpips", "lpips_vgg", "delta_e2000",
           "fid", "kid"]  # fmt: skip
MODELS = {
    "PerCo": "tiny_taef2",
    "PerCo-Image": "tiny_taef2_image",
    "SPRDiff-style": "tiny_taef2_sprdiff",
}


def coarse_row(model, originals, backbones) -> dict:
    """Metrics of the SPRDiff-style coarse reconstructions, decoded from real files."""
    parsed, bpp = [], []
    for x in originals:
        ((data_bytes, breakdown),) = codec.compress(model, x[None])
        parsed.append(codec.parse(model, data_bytes)[0])
        bpp.append((breakdown.bpp_file, breakdown.bpp_payload))
    coarse = codec.decompress(model, parsed, coarse=True)
    row = score(originals, coarse, backbones)
    row["bpp_file"], row["bpp_payload"] = (sum(b[i] for b in bpp) / len(bpp) for i in (0, 1))
    return row


def main(argv=None) -> None:
    assets = Path(os.environ.get("PERCO_ASSETS", "../shared/assets"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--rate", default="r0.0019")
    parser.add_argument("--kodak", type=Path, default=assets / "kodak")
    parser.add_argument("--lpips-dir", type=Path, default=assets / "lpips")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--limit", type=int, help="first N Kodak images only")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_variants"))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = kodak(args.kodak, args.limit)
    originals = [data[i]["image"] for i in range(len(data))]
    alex = args.lpips_dir / "alexnet_features.safetensors"
    backbones = Backbones(LPIPSDistance("alex", alex), AlexNetFeatures(alex))
    vgg = LPIPSDistance("vgg", args.lpips_dir / "vgg16_features.safetensors")
    register(Metric("lpips_vgg", lambda b: {"lpips_vgg": vgg(b.x, b.y)}))
    models = {name: load_model(str(args.runs / MODELS[name]), args.rate) for name in args.models}

    latent_cache, table = LatentCache(), {}
    settings = EvalSettings(steps=[args.steps], ceiling=False, fid_variant="patches",
                            batch_size=4, grid_images=4, save_reconstructions=True)  # fmt: skip
    run_dir = args.out / f"{args.rate}_{len(data)}img_{args.steps}steps"  # one resumable cache each
    for name, model in models.items():
        out = run_dir / MODELS[name]
        doc = evaluate(model, data, settings, backbones, out, name, latent_cache)
        table[f"{name} {args.rate}"] = {k: v[0] for k, v in doc["results"].items()}

    if "SPRDiff-style" in models:
        table[f"SPRDiff-style {args.rate}, coarse image (one pass)"] = coarse_row(
            models["SPRDiff-style"], originals, backbones
        )

    print(f"\nKodak ({len(data)} images, native size), {args.steps} steps, guidance none\n")
    print(markdown_table(table, COLUMNS))
    print(f"\nwall-clock {(time.perf_counter() - start) / 60:.1f} min; outputs in {run_dir}")


if __name__ == "__main__":
    main()
