"""Print parameter counts: the hyper-encoder per rung, and SD 2.1's U-Net linear share.

Everything is built on the meta device (no weights, no download). The U-Net comes from
SD 2.1's published config (tests/fixtures/sd21_unet_config.json).

    python scripts/count_params.py [--latent-channels 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from perco.models import HyperEncoder, VectorQuantizer, linear_parameter_share, widen_conv_in
from perco.rates import RATES

SD21_UNET = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sd21_unet_config.json"


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--latent-channels", type=int, default=4, help="4: SD, 16: FLUX.1, 32: TAEF2"
    )
    args = parser.parse_args(argv)

    with torch.device("meta"):
        projections = count(VectorQuantizer(dim=320, codebook_dim=32))
        print(f"hyper-encoder on a {args.latent_channels}-channel latent (N=192, M=320)")
        print("| rate | downsample | h×w at 512² | V | hyper-encoder | + quantizer projections |")
        print("|---|---|---|---|---|---|")
        for rate in RATES.values():
            n = count(HyperEncoder(in_channels=args.latent_channels, downsample=rate.downsample))
            side = 64 // rate.downsample
            print(
                f"| {rate.name} | ×{rate.downsample} | {side}×{side} | {rate.codebook_size} "
                f"| {n:,} | {n + projections:,} |"
            )

        unet = UNet2DConditionModel.from_config(json.loads(SD21_UNET.read_text()))
        linear, total = linear_parameter_share(unet)
        widen_conv_in(unet, 320)
        added = count(unet) - total
    print()
    share = f"{linear:,} ({linear / total:.1%})"
    print(f"SD 2.1 U-Net: {total:,} parameters; nn.Linear layers: {share}")
    codes_only = 32 * 320 * 9
    print(
        f"widening conv_in for z_l adds {added:,} (320 projected channels; "
        f"32 codes: {codes_only:,})"
    )


if __name__ == "__main__":
    main()
