"""Index bits under the learned index prior against uniform coding and a frequency table.

    for r in r0.0019 r0.0098 r0.1250; do
      perco fit-prior runs/tiny_taef2 --rate $r -o runs/tiny_taef2_prior/$r \\
        --images $PERCO_ASSETS/bsds500/train $PERCO_ASSETS/bsds500/val \\
        --latent-cache runs/tiny_taef2/bsds500_taef2_latents.safetensors
    done
    python scripts/bench_entropy.py --models runs/tiny_taef2_prior

Per rung and evaluation set (Kodak, and BSDS500 test, which no choice was tuned on):
uniform bits (PerCo's ``ceil(n·log2 V)``), a frequency table of the training indices
(the same maps the prior was fitted on, add-½ smoothing), the prior's ideal cross-entropy,
the real index bits of the written files, and the codebook perplexity of the evaluated
indices (``2^H`` of their empirical distribution: what uneven usage alone could save).
Every file is read back and must give the encoder's indices. Decode time: one 768×512
Kodak image at the rung's step count, file → image, with the prior and with uniform
packing (medians; their gap is within run-to-run noise), and the index decoding alone,
whose difference is what the prior adds. Then the hybrid mode on the middle rung: LPIPS
(AlexNet, real weights) and bits at several kept shares.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from perco import codec
from perco.cli.fit_prior import folder_latents, split_maps
from perco.io import load_image
from perco.losses import load_lpips
from perco.models.index_prior import unigram_bits
from perco.models.loading import load_model
from perco.timing import OtherLoad, repeat

RATES = ("r0.0019", "r0.0098", "r0.1250")


def _images(folder: Path, limit: int | None) -> dict[str, torch.Tensor]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    return {p.stem: load_image(p) for p in files[:limit]}


def _perplexity(maps: list[np.ndarray], v: int) -> float:
    counts = np.bincount(np.concatenate([m.reshape(-1) for m in maps]), minlength=v)
    p = counts[counts > 0] / counts.sum()
    return float(2 ** -(p * np.log2(p)).sum())


def _training_maps(model, folders: list[Path], cache: Path) -> list[np.ndarray]:
    """The maps ``perco fit-prior`` fitted on (every tenth image held out)."""
    return split_maps(model, *folder_latents(model, folders, cache))[0]


def measure(model, images: dict[str, torch.Tensor], train_maps, latents: dict) -> dict:
    """Bits of every image's indices four ways; checks each file decodes to them."""
    v = model.rate.codebook_size
    row = dict(uniform=0.0, unigram=0.0, ideal=0.0, actual=0.0, images=len(images))
    maps = []
    for name, x in images.items():
        padded = model._pad(x)
        key = (name, tuple(padded.shape[-2:]))
        if key not in latents:
            latents[key] = model._latents(padded)
        indices = model.encode(x, latents=latents[key]).indices[0].numpy()
        (data, info), = codec.compress(model, x, latents=latents[key])  # fmt: skip
        parsed, _ = codec.parse(model, data)
        if not np.array_equal(parsed.indices, indices):
            raise AssertionError(f"{name}: the file does not decode to the encoder's indices")
        maps.append(indices)
        row["uniform"] += info.uniform_index_bits
        row["actual"] += info.index_bits
        row["ideal"] += float(model.index_prior.ideal_bits(indices[None])[0])
    row["unigram"] = float(unigram_bits(train_maps, maps, v).sum())
    row["perplexity"] = _perplexity(maps, v)
    return row


def decode_time(model, x: torch.Tensor, repeats: int) -> tuple[float, float, float, float]:
    """Seconds file → image with the prior and with uniform packing, and the index
    decoding alone (parse) in each case."""
    out = []
    for uniform in (False, True):
        (data, _), = codec.compress(model, x, uniform=uniform)  # fmt: skip

        def run(data=data):
            parsed, _ = codec.parse(model, data)
            codec.decompress(model, [parsed])

        out.append(repeat(run, repeats, warmup=1).median)
        out.append(repeat(lambda data=data: codec.parse(model, data), 5, warmup=1).median)
    return out[0], out[2], out[1], out[3]


def hybrid(model, images: dict[str, torch.Tensor], lpips, keeps) -> list[dict]:
    rows = []
    for keep in keeps:
        bits, scores = [], []
        for x in images.values():
            (data, info), = codec.compress(model, x, keep=keep)  # fmt: skip
            parsed, _ = codec.parse(model, data)
            (y,) = codec.decompress(model, [parsed])
            with torch.no_grad():
                scores.append(lpips(y[None].clamp(0, 1) * 2 - 1, x * 2 - 1).item())
            bits.append((info.index_bits, info.bpp_file))
        index_bits, bpp = np.mean(bits, axis=0)
        rows.append({"keep": keep, "index_bits": index_bits, "bpp_file": bpp,
                     "lpips": np.mean(scores)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="runs/tiny_taef2_prior", help="rungs with priors")
    parser.add_argument(
        "--assets", type=Path, default=Path(os.environ.get("PERCO_ASSETS", "../shared/assets"))
    )
    parser.add_argument(
        "--train-folders",
        type=Path,
        nargs="+",
        help="the images the priors were fitted on (default: BSDS500 train and val)",
    )
    parser.add_argument(
        "--latent-cache",
        type=Path,
        default=Path("runs/tiny_taef2/bsds500_taef2_latents.safetensors"),
        help="their latent cache (written by the main job's training)",
    )
    parser.add_argument("--kodak-images", type=int, default=24)
    parser.add_argument("--test-images", type=int, default=200, help="BSDS500 test images")
    parser.add_argument("--repeats", type=int, default=3, help="decode timing repeats")
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--hybrid-rate", default="r0.0098")
    parser.add_argument("--hybrid-images", type=int, default=24)
    args = parser.parse_args(argv)
    train_folders = args.train_folders or [args.assets / "bsds500" / s for s in ("train", "val")]
    torch.manual_seed(0)
    sets = {
        "kodak": _images(args.assets / "kodak", args.kodak_images),
        "bsds500-test": _images(args.assets / "bsds500" / "test", args.test_images),
    }
    print(f"# {len(sets['kodak'])} Kodak images, {len(sets['bsds500-test'])} BSDS500 test "
          f"images (held out: no choice was tuned on them); models {args.models}\n")  # fmt: skip
    latents: dict = {}
    rows, timing, models = {}, {}, {}
    others = OtherLoad()
    for rate in RATES:
        model = load_model(args.models, rate)
        if model.index_prior is None:
            print(
                f"{args.models} {rate} has no index prior: run perco fit-prior first",
                file=sys.stderr,
            )
            return 2
        models[rate] = model
        start = time.perf_counter()
        train = _training_maps(model, train_folders, args.latent_cache)
        for name, images in sets.items():
            rows[rate, name] = measure(model, images, train, latents)
        print(f"  {rate}: measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        with others:
            kodim = next(iter(sets["kodak"].values()))
            timing[rate] = decode_time(model, kodim, args.repeats)

    print(
        "| rung | set | uniform bits/img | unigram table | context ideal | file bits | "
        "file / uniform | file / ideal | perplexity (of V) | unigram share of saving |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (rate, name), r in rows.items():
        n, v = r["images"], models[rate].rate.codebook_size
        saving = r["uniform"] - r["actual"]
        unigram_share = (r["uniform"] - r["unigram"]) / saving if saving > 0 else float("nan")
        print(f"| {rate} | {name} | {r['uniform'] / n:.0f} | {r['unigram'] / n:.0f} "
              f"({r['unigram'] / r['uniform']:.3f}) | {r['ideal'] / n:.0f} "
              f"({r['ideal'] / r['uniform']:.3f}) | {r['actual'] / n:.0f} | "
              f"**{r['actual'] / r['uniform']:.3f}** | {r['actual'] / r['ideal']:.4f} "
              f"({(r['actual'] - r['ideal']) / n:+.1f} b) | {r['perplexity']:.0f} of {v} | "
              f"{unigram_share:.2f} |")  # fmt: skip
    for name in sets:
        mean = np.mean([rows[r, name]["actual"] / rows[r, name]["uniform"] for r in RATES])
        print(f"\n{name}: file bits / uniform, mean over the rungs: **{mean:.3f}**", end="")
    print(
        "\n\n| rung | steps | decode, learned prior (s) | decode, uniform (s) | "
        "index decoding: prior / uniform (ms) | added by the prior |"
    )
    print("|---|---|---|---|---|---|")
    for rate, (prior_s, uniform_s, parse_prior, parse_uniform) in timing.items():
        steps = models[rate].default_steps
        added = 100 * (parse_prior - parse_uniform) / uniform_s  # the end-to-end gap is noise
        ms = f"{1000 * parse_prior:.1f} / {1000 * parse_uniform:.2f}"
        print(f"| {rate} | {steps} | {prior_s:.2f} | {uniform_s:.2f} | {ms} | {added:+.2f}% |")
    if others.cores is not None and others.warning():
        print(f"\n{others.warning()}")

    lpips = load_lpips("alex", args.assets / "lpips" / "alexnet_features.safetensors")
    model = models[args.hybrid_rate]
    kodak = dict(list(sets["kodak"].items())[: args.hybrid_images])
    print(f"\nhybrid mode, {args.hybrid_rate}, {len(kodak)} Kodak images, "
          f"{model.default_steps} steps, missing indices drawn with seed 0:\n")  # fmt: skip
    print("| keep | index bits/img | bpp_file | LPIPS-Alex |")
    print("|---|---|---|---|")
    for r in hybrid(model, kodak, lpips, args.keeps):
        print(
            f"| {r['keep']:.2f} | {r['index_bits']:.0f} | {r['bpp_file']:.5f} | {r['lpips']:.4f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
