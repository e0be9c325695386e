"""Encode a photo, count its bits and decode it with a tiny PerCo (offline, CPU).

The tiny model has random weights: the run exercises the whole codec on a real photo at
its native size (autoencoder, hyper-encoder, quantizer, bit count, CFG sampling,
autoencoder decode) but the reconstruction carries no learned content.
"""

from __future__ import annotations

import argparse
import os
import time
import zlib
from pathlib import Path

import torch

from ..io import load_image, save_image
from ..rates import RATES, get_rate, hyper_latent_size, index_bits

DEFAULT_IMAGE = "kodak/kodim23.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    assets = os.environ.get("PERCO_ASSETS", "../shared/assets")
    parser.add_argument(
        "--image",
        type=Path,
        default=Path(assets) / DEFAULT_IMAGE,
        help="photo to compress (default: $PERCO_ASSETS/%(default)s)",
    )
    parser.add_argument("--rate", default="r0.0019", choices=list(RATES))
    parser.add_argument(
        "--caption", default=None, help="global context z_g (default: none, the null text)"
    )
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: rate's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))


def run(args: argparse.Namespace) -> int:
    from ..testing import tiny_perco

    if not args.image.is_file():
        raise FileNotFoundError(f"no image at {args.image} (set --image or PERCO_ASSETS)")
    rate = get_rate(args.rate)
    image = load_image(args.image)
    height, width = image.shape[-2:]
    torch.manual_seed(args.seed)
    model = tiny_perco(rate, seed=args.seed).eval()

    t0 = time.perf_counter()
    encoded = model.encode(image, [args.caption])
    t1 = time.perf_counter()
    (reconstruction,) = model.decode(encoded, steps=args.steps, seed=args.seed)
    t2 = time.perf_counter()

    h, w = hyper_latent_size(rate, height, width, model.autoencoder.factor)
    assert encoded.indices.shape[-2:] == (h, w)
    idx_bits = index_bits(rate, height, width, model.autoencoder.factor)
    # the paper's reference caption coding: zlib (Lempel-Ziv)
    cap_bits = 8 * len(zlib.compress(args.caption.encode("utf-8"), 9)) if args.caption else 0
    out = args.out / f"{args.image.stem}_{rate.name}.png"
    save_image(reconstruction, out)

    pixels = height * width
    print(
        f"image          {args.image} ({width}x{height}, padded to "
        f"{encoded.padded_size[1]}x{encoded.padded_size[0]})"
    )
    print(f"rate           {rate.name}: {w}x{h} indices, V={rate.codebook_size}")
    print(f"index bits     {idx_bits} ({idx_bits / pixels:.5f} bpp)")
    print(f"caption bits   {cap_bits} (zlib){'' if args.caption else ' - no caption'}")
    print(f"payload        {idx_bits + cap_bits} bits = {(idx_bits + cap_bits) / pixels:.5f} bpp")
    print(f"encode         {t1 - t0:.2f} s")
    print(
        f"decode         {t2 - t1:.2f} s ({args.steps or model.default_steps} steps, CFG "
        f"{model.config.guidance} x{model.config.guidance_scale})"
    )
    print(f"reconstruction {out}  (tiny model, random weights)")
    return 0
