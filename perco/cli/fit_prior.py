"""Fit a learned index prior for a trained model and store it in the model's folder.

    perco fit-prior runs/tiny_taef2 --rate r0.0019 \\
        --images ../shared/assets/bsds500/train ../shared/assets/bsds500/val \\
        --latent-cache runs/tiny_taef2/bsds500_taef2_latents.safetensors
    perco fit-prior runs/paper/r0.0019 --shards 'shards/train-{000000..000099}.tar' \\
        --max-images 5000

Fit on training images, never on the images you evaluate on. Every tenth image (in name
order) is held out to pick the fitting step. The model folder (or ``-o``) is written whole
(temp folder, then rename) with ``index_prior/`` and an ``index_prior`` entry in
``perco.json``; its fingerprint changes, so files made before with it no longer decode
with it (they say so in one line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..data.latent_crops import cached_latents, image_files
from ..io import load_image
from ..models.index_prior import fit_context_prior, index_maps, unigram_bits
from ..models.loading import load_model, model_folder
from ..rates import RATES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a saved model folder, or a run/sweep folder with --rate")
    parser.add_argument("--rate", choices=list(RATES), help="rung of a sweep folder")
    parser.add_argument(
        "-o", "--output", type=Path, help="write the model with its prior here (default: in place)"
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", nargs="+", type=Path, help="folders of training images")
    data.add_argument("--shards", help="webdataset training shards (brace pattern)")
    parser.add_argument(
        "--latent-cache",
        type=Path,
        help="with --images: the training data's latent cache (read if it exists, else "
        "written), so the autoencoder runs once per photo",
    )
    parser.add_argument("--max-images", type=int, help="use at most this many images")
    parser.add_argument("--crop", type=int, default=512, help="side of the shard crops (px)")
    parser.add_argument("--phases", type=int, default=4, help="window offsets per axis")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the fitting record as JSON")


def _latents(model, args) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """``{name: normalised latent}``, ``{name: pixels}`` and a description of the data."""
    ae = model.autoencoder
    if args.images:
        files = image_files(args.images)
        names = sorted(files)[: args.max_images]
        if not names:
            raise ValueError("no images in " + ", ".join(map(str, args.images)))
        if args.latent_cache is not None and hasattr(ae, "raw_encode"):
            # the training data's cache holds raw latents (see perco.models.taef2)
            raw = cached_latents(ae.raw_encode, args.images, args.latent_cache)
            latents = {n: ((raw[n][None] - ae.latent_mean) / ae.latent_std)[0] for n in names}
        elif args.latent_cache is not None:
            latents = cached_latents(ae.encode_pixels, args.images, args.latent_cache)
        else:
            latents = None
        pixels = {}
        for n in names:
            x = load_image(files[n])
            h, w = (s - s % 8 for s in x.shape[-2:])
            pixels[n] = x[0, :, :h, :w]
        if latents is None:
            with torch.no_grad():
                latents = {n: ae.encode_pixels(pixels[n][None].to(model.device))[0].cpu()
                           for n in names}  # fmt: skip
        source = "images: " + ", ".join(str(f) for f in args.images)
        return {n: latents[n] for n in names}, pixels, source
    from ..data.shards import shard_dataset

    stream = shard_dataset(args.shards, crop_size=args.crop, random_crop=False, flip=False)
    latents, pixels = {}, {}
    with torch.no_grad():
        for sample in stream:
            if sample is None:
                continue
            key, x = sample["key"], sample["image"]
            latents[key] = ae.encode_pixels(x[None].to(model.device))[0].cpu()
            pixels[key] = x
            if args.max_images and len(latents) >= args.max_images:
                break
    if not latents:
        raise ValueError(f"no readable images in {args.shards}")
    return latents, pixels, f"shards: {args.shards} ({args.crop}-px centre crops)"


def run(args: argparse.Namespace) -> int:
    folder = model_folder(args.model, args.rate)
    model = load_model(str(folder), args.rate)
    if model.config.local != "quantized":
        raise ValueError("this model is an ablation without indices; there is nothing to code")
    start = time.perf_counter()
    latents, pixels, source = _latents(model, args)
    names = sorted(latents)
    valid_names = set(names[::10]) if len(names) >= 2 else set()
    train, valid = [], []
    for n in names:
        maps = index_maps(model, latents[n], pixels[n], args.phases)
        (valid if n in valid_names else train).extend(maps[:1] if n in valid_names else maps)
    if not train or not valid:
        raise ValueError(f"{len(names)} images are too few to fit and check a prior")
    v = model.rate.codebook_size

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    prior, record = fit_context_prior(
        train,
        valid,
        model.quantizer.embed.detach().cpu(),
        steps=args.steps,
        seed=args.seed,
        log=log,
    )
    count = sum(m.size for m in valid)
    record = {
        "fitted_on": source,
        "images": len(names) - len(valid_names),
        "valid_images": len(valid_names),
        "maps_per_image": len(index_maps(model, latents[names[0]], pixels[names[0]], args.phases)),
        "steps": args.steps,
        "best_step": record["step"],
        "valid_bits_per_index": round(record["valid_bits_per_index"], 4),
        "valid_unigram_bits_per_index": round(
            float(unigram_bits(train, valid, v).sum() / count), 4
        ),
        "uniform_bits_per_index": round(float(np.log2(v)), 4),
        "seed": args.seed,
    }
    model.set_index_prior(prior, record)
    folder = args.output or folder
    model.save_pretrained(folder)
    record["fit_seconds"] = round(time.perf_counter() - start, 1)
    record["model"] = str(folder)
    record["fingerprint"] = model.fingerprint.hex()[:4]
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        u = record["uniform_bits_per_index"]
        print(f"{folder}: index prior fitted on {record['images']} images "
              f"({record['valid_images']} held out), {record['fit_seconds']} s")  # fmt: skip
        for name in ("uniform", "valid_unigram", "valid"):
            bits = record[f"{name}_bits_per_index"]
            print(f"  {name.replace('valid_', '') if name != 'valid' else 'context prior':<14}"
                  f"{bits:7.3f} bits/index  {bits / u:6.3f} of uniform")  # fmt: skip
        print(f"  new fingerprint {record['fingerprint']}")
    return 0
