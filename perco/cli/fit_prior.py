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


def folder_latents(
    model, folders: list[Path], cache: Path | None = None, max_images: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``{name: normalised latent}`` and ``{name: pixels}`` of the images in ``folders``.

    ``cache``: the training data's latent cache, read if it exists, else written. For an
    autoencoder with raw latents (TAEF2) it holds those, normalised here as
    :mod:`perco.models.taef2` normalises them."""
    ae = model.autoencoder
    files = image_files(folders)
    names = sorted(files)[:max_images]
    if not names:
        raise ValueError("no images in " + ", ".join(map(str, folders)))
    if cache is not None and hasattr(ae, "raw_encode"):
        raw = cached_latents(ae.raw_encode, folders, cache)
        latents = {n: ((raw[n][None] - ae.latent_mean) / ae.latent_std)[0] for n in names}
    elif cache is not None:
        latents = cached_latents(ae.encode_pixels, folders, cache)
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
    return {n: latents[n] for n in names}, pixels


def _shard_latents(model, args) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from ..data.shards import shard_dataset

    ae = model.autoencoder
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
    return latents, pixels


def split_maps(
    model, latents: dict[str, torch.Tensor], pixels: dict[str, torch.Tensor], phases: int = 4
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """The fitting maps (every window offset of each image) and the held-out maps (one
    unshifted window of every tenth image, in name order), and how many maps an image
    gives (the first image)."""
    names = sorted(latents)
    held_out = set(names[::10]) if len(names) >= 2 else set()
    train, valid, per_image = [], [], 0
    for n in names:
        maps = index_maps(model, latents[n], pixels[n], phases)
        per_image = per_image or len(maps)  # (the first image's: all share a size class)
        if n in held_out:
            valid.append(maps[0])
        else:
            train.extend(maps)
    return train, valid, per_image


def run(args: argparse.Namespace) -> int:
    folder = model_folder(args.model, args.rate)
    model = load_model(str(folder), args.rate)
    if model.config.local != "quantized":
        raise ValueError("this model is an ablation without indices; there is nothing to code")
    start = time.perf_counter()
    if args.images:
        latents, pixels = folder_latents(model, args.images, args.latent_cache, args.max_images)
        source = "images: " + ", ".join(str(f) for f in args.images)
    else:
        latents, pixels = _shard_latents(model, args)
        source = f"shards: {args.shards} ({args.crop}-px centre crops)"
    train, valid, per_image = split_maps(model, latents, pixels, args.phases)
    if not train or not valid:
        raise ValueError(f"{len(latents)} images are too few to fit and check a prior")
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
        "images": len(latents) - len(valid),
        "valid_images": len(valid),
        "maps_per_image": per_image,
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
