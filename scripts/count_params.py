"""Print parameter counts: the hyper-encoder per rung, SD 2.1's U-Net linear share, and
the trainable share of a PerCo on SD 2.1 in each finetuning mode.

Everything is built on the meta device (no weights, no download) from SD 2.1's published
configs (perco/models/sd21/*.json, through perco.testing.sd21_components).

    python scripts/count_params.py [--latent-channels 4]
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel

from perco.models import HyperEncoder, VectorQuantizer, linear_parameter_share, widen_conv_in
from perco.rates import RATES
from perco.testing import sd21_config


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

        unet = UNet2DConditionModel.from_config(sd21_config("unet"))
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
    print()
    trainable_shares()


def meta_perco(rate: str = "r0.0019"):
    """PerCo on SD 2.1 (VAE, ViT-H text encoder, U-Net widened for z_l) at ``rate``, on
    the meta device: the parameter counts without the weights."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from perco import PerCo, PerCoConfig
    from perco.models import NullTextEmbedding, SDAutoencoder
    from perco.testing import SD21_SCHEDULER, clip_tokenizer

    cfg = PerCoConfig(rate=rate)
    with torch.device("meta"):
        return PerCo(
            autoencoder=SDAutoencoder(AutoencoderKL.from_config(sd21_config("vae"))),
            hyper_encoder=HyperEncoder(downsample=cfg.rate.downsample),
            quantizer=VectorQuantizer(codebook_size=cfg.rate.codebook_size),
            unet=widen_conv_in(UNet2DConditionModel.from_config(sd21_config("unet")), 320),
            text_encoder=CLIPTextModel(CLIPTextConfig(**sd21_config("text_encoder"))),
            tokenizer=clip_tokenizer(),
            null_text=NullTextEmbedding(77, 1024),
            scheduler=DDIMScheduler(**SD21_SCHEDULER),
            config=cfg,
        )


def trainable_counts(rate: str = "r0.0019", modes=("linear", "full", "none", "lora")) -> dict:
    """``{mode: trainable_report}`` of :func:`meta_perco` (``lora`` last: its adapters stay)."""
    from perco.train import trainable_report

    model, out = meta_perco(rate), {}
    for mode in modes:
        with torch.device("meta"):
            model.set_trainable(mode)  # lora: rank-16 adapters on the attention projections
        out[mode] = trainable_report(model)
    return out


def trainable_shares(rate: str = "r0.0019") -> None:
    print(f"PerCo on SD 2.1 at {rate}: trainable parameters per mode")
    print("| mode | trainable | of all | share | U-Net share trained |")
    print("|---|---|---|---|---|")
    for mode, r in trainable_counts(rate).items():
        print(
            f"| {mode} | {r['trainable_params']:,} | {r['total_params']:,} "
            f"| {r['trainable_share']:.1%} | {r['unet_trainable_share']:.1%} |"
        )


if __name__ == "__main__":
    main()
