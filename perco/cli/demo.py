"""Compress a photo to a ``.perco`` file and decode it with a tiny PerCo (offline, CPU).

The tiny model has random weights: the run exercises the whole codec on a real photo at
its native size (autoencoder, hyper-encoder, quantizer, the file ``perco compress``
writes, CFG sampling, autoencoder decode) but the reconstruction carries no learned
content. The bits printed are the file's own (:func:`perco.codec.compress`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from .. import codec
from ..io import atomic_write, load_image, save_image
from ..rates import RATES, get_rate

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
    model = tiny_perco(rate, seed=args.seed).eval()

    t0 = time.perf_counter()
    ((data, bits),) = codec.compress(model, image, [args.caption], seed=args.seed)
    t1 = time.perf_counter()
    parsed, _ = codec.parse(model, data)
    (reconstruction,) = codec.decompress(model, [parsed], steps=args.steps)
    t2 = time.perf_counter()

    stem = f"{args.image.stem}_{rate.name}"
    file, png = args.out / f"{stem}.perco", args.out / f"{stem}.png"
    atomic_write(file, lambda tmp: Path(tmp).write_bytes(data))
    save_image(reconstruction, png)
    h, w = model.index_grid(height, width)
    padded_h, padded_w = model.padded_size(height, width)
    pixels = height * width
    caption = f"({bits.caption_codec})" if args.caption else "- no caption"
    print(f"image          {args.image} ({width}x{height}, padded to {padded_w}x{padded_h})")
    print(f"rate           {rate.name}: {w}x{h} indices, V={rate.codebook_size}")
    print(f"index bits     {bits.index_bits} ({bits.index_bits / pixels:.5f} bpp)")
    print(f"caption bits   {bits.caption_bits} {caption}")
    print(f"payload        {bits.index_bits + bits.caption_bits} bits = "
          f"{bits.bpp_payload:.5f} bpp")  # fmt: skip
    print(f"file           {file}: {bits.file_bytes} bytes = "
          f"{bits.bpp_file:.5f} bpp ({bits.header_bytes}-byte header)")  # fmt: skip
    print(f"encode         {t1 - t0:.2f} s")
    print(
        f"decode         {t2 - t1:.2f} s ({args.steps or model.default_steps} steps, CFG "
        f"{model.config.guidance} x{model.config.guidance_scale})"
    )
    print(f"reconstruction {png}  (tiny model, random weights)")
    return 0
