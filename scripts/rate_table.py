"""Compress one photo at every rung and compare the formula's bits with the file's.

Each rung uses the tiny random model (the bit counts depend only on the rate and the
image size, not on the weights); the caption is coded for real.

    python scripts/rate_table.py [--image ../shared/assets/kodak/kodim23.png] [--caption ...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from perco import codec
from perco.io import load_image
from perco.rates import RATES, index_bits
from perco.testing import tiny_perco

CAPTION = "two parrots standing next to each other."  # 40 characters


def main(argv=None) -> None:
    assets = Path(os.environ.get("PERCO_ASSETS", "../shared/assets"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=assets / "kodak" / "kodim23.png")
    parser.add_argument("--caption", default=CAPTION)
    args = parser.parse_args(argv)

    image = load_image(args.image)
    height, width = image.shape[-2:]
    print(f"{args.image.name} {width}x{height}, caption {len(args.caption)} characters")
    print(
        "| rate | indices | formula index bits | padding bits | caption bits | file B "
        "| file bits − formula − padding − caption | header B | bpp_file | bpp_payload |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rate in RATES.values():
        model = tiny_perco(rate).eval()
        ((data, info),) = codec.compress(model, image, [args.caption])
        formula = index_bits(rate, height, width)
        grid = model.index_grid(height, width)
        rest = 8 * len(data) - formula - info.padding_bits - info.caption_bits
        print(
            f"| {rate.name} | {grid[1]}×{grid[0]} | {formula} | {info.padding_bits} "
            f"| {info.caption_bits} | {len(data)} | {rest} | {info.header_bytes} "
            f"| {info.bpp_file:.5f} | {info.bpp_payload:.5f} |"
        )


if __name__ == "__main__":
    main()
