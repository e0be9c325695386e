"""Print parameter counts: the hyper-encoder per rung, SD 2.1's U-Net linear share, the
trainable share of a PerCo on SD 2.1 in each finetuning mode, and the backbones side by
side at 768×512 (SD 2.1's U-Net, SD 3.5 medium's MMDiT, FLUX.2 [klein] 4B): parameters as
widened for z_l, LoRA-trainable, FLOPs per denoiser call and per decode with the decoder.

Everything is built on the meta device (no weights, no download) from the published
configs shipped in perco/models/{sd21,sd35_medium,flux2_klein}/*.json.

    python scripts/count_params.py [--latent-channels 4] [--json counts.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _bench import count_flops
from diffusers import UNet2DConditionModel

from perco.models import HyperEncoder, VectorQuantizer, linear_parameter_share, widen_conv_in
from perco.rates import RATES
from perco.testing import published_config, sd21_config

HEIGHT, WIDTH = 768, 512  # the backbones' table: Kodak's landscape size
CODE_CHANNELS = 320  # z_l as PerCo (SD) conditions: the codes projected back to M = 320
LORA_RANK = 16


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--latent-channels", type=int, default=4, help="4: SD, 16: FLUX.1, 32: TAEF2"
    )
    parser.add_argument("--json", type=Path, help="also write the backbones' rows here")
    parser.add_argument("--table", type=Path, help="also write the backbones' table here")
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
    print()
    rows = backbone_rows()
    table = backbone_table(rows)
    print(table, end="")
    if args.table:
        args.table.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"size": [HEIGHT, WIDTH], "rows": rows}, indent=2) + "\n")


def _lora_params(module: torch.nn.Module, targets) -> int:
    from peft import LoraConfig

    before = count(module)
    module.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets))
    return count(module) - before


def backbone_rows(height: int = HEIGHT, width: int = WIDTH) -> list[dict]:
    """Per backbone at ``height × width`` (batch 1, on the meta device): the denoiser's
    parameters widened for ``z_l`` (``CODE_CHANNELS`` channels), its rank-16 LoRA adapters,
    the FLOPs of one call (text at the family's usual length) and of a decode: ``steps``
    guided calls (text CFG: two branches) or one unguided call (a one-step student), plus
    the decoder's FLOPs."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLFlux2,
        Flux2Transformer2DModel,
        SD3Transformer2DModel,
    )

    from perco.models.backbones import widened
    from perco.models.backbones.flux2 import FLUX2
    from perco.models.backbones.unet import UNET
    from perco.models.taesd import TinyAutoencoder

    h, w = height // 8, width // 8
    rows = []
    with torch.device("meta"):
        # SD 2.1: U-Net, CLIP ViT-H text (77 tokens, 1024), its VAE
        unet = UNet2DConditionModel.from_config(sd21_config("unet"))
        UNET.widen(unet, CODE_CHANNELS, "zero")
        x, z = torch.randn(1, 4, h, w), torch.randn(1, CODE_CHANNELS, h, w)
        text = torch.randn(1, 77, 1024)
        call = count_flops(lambda: UNET.predict(unet, x, z, torch.ones(1, dtype=torch.long), text))
        params = count(unet)
        vae = AutoencoderKL.from_config(sd21_config("vae"))
        decoders = {"SD VAE": count_flops(lambda: vae.decode(x))}
        rows.append(_row("SD 2.1 (U-Net)", params, _lora_params(unet, list(UNET.lora_targets)),
                         h * w, 77, call, decoders))  # fmt: skip

        # SD 3.5 medium: MMDiT (patch 2), CLIP-L + CLIP-G (77) + T5-XXL (256) text; no
        # backbone module yet: counted through diffusers' class, its patch embedding widened
        mmdit = SD3Transformer2DModel.from_config(published_config("sd35_medium", "transformer"))
        mmdit.pos_embed.proj = widened(mmdit.pos_embed.proj, CODE_CHANNELS, "zero")
        x16 = torch.randn(1, 16 + CODE_CHANNELS, h, w)
        seq, pooled = torch.randn(1, 77 + 256, 4096), torch.randn(1, 2048)
        call = count_flops(lambda: mmdit(x16, seq, pooled, torch.ones(1)))
        params = count(mmdit)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                   "add_v_proj", "to_add_out"]  # fmt: skip
        vae16 = AutoencoderKL.from_config(published_config("sd35_medium", "vae"))
        rows.append(_row("SD 3.5 medium (MMDiT)", params, _lora_params(mmdit, targets),
                         (h // 2) * (w // 2), 333, call,
                         {"SD3 VAE": count_flops(lambda: vae16.decode(torch.randn(1, 16, h, w)))}))

        # FLUX.2 [klein] 4B: Qwen3-4B text (512 tokens, 3 layers × 2560), its VAE or TAEF2
        flux = Flux2Transformer2DModel.from_config(published_config("flux2_klein", "transformer"))
        FLUX2.widen(flux, CODE_CHANNELS, "zero")
        x32, z = torch.randn(1, 32, h, w), torch.randn(1, CODE_CHANNELS, h, w)
        text = torch.randn(1, 512, 7680)
        call = count_flops(lambda: FLUX2.predict(flux, x32, z, torch.ones(1), text))
        params = count(flux)
        kl = AutoencoderKLFlux2.from_config(published_config("flux2_klein", "vae"))
        taef2 = TinyAutoencoder(latent_channels=32)
        decoders = {"FLUX.2 VAE": count_flops(lambda: kl.decode(x32)),
                    "TAEF2": count_flops(lambda: taef2.decoder(x32))}  # fmt: skip
        rows.append(_row("FLUX.2 [klein] 4B", params, _lora_params(flux, FLUX2.lora_targets),
                         (h // 2) * (w // 2), 512, call, decoders))  # fmt: skip
    return rows


def _row(name, params, lora, image_tokens, text_tokens, call, decoders) -> dict:
    row = {"backbone": name, "params": params, "lora_r16": lora,
           "image_positions": image_tokens, "text_tokens": text_tokens,
           "tflop_per_call": call / 1e12,
           "decoders_tflop": {k: v / 1e12 for k, v in decoders.items()}}  # fmt: skip
    for steps in (20, 4):
        row[f"tflop_decode_{steps}"] = 2 * steps * call / 1e12  # text CFG: two branches a step
    row["tflop_decode_1"] = call / 1e12  # a one-step student: no guidance pass
    return row


def backbone_table(rows: list[dict]) -> str:
    """The markdown table of :func:`backbone_rows` (decode columns: TFLOP with the decoder)."""
    lines = [f"Backbones at {HEIGHT}×{WIDTH}, batch 1 (meta device): denoiser widened for z_l "
             f"({CODE_CHANNELS} channels), rank-{LORA_RANK} LoRA adapters on the attention, "
             "TFLOP per call, and per decode: 20 and 4 guided steps (two branches each) or one "
             "unguided step, plus each decoder", "",
             "| backbone | parameters | LoRA r16 | image positions | text tokens | TFLOP/call "
             "| decoder | decoder TFLOP | decode 20 | decode 4 | decode 1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for decoder, d in r["decoders_tflop"].items():
            steps = " | ".join(f"{r[f'tflop_decode_{s}'] + d:.1f}" for s in (20, 4, 1))
            lines.append(f"| {r['backbone']} | {r['params'] / 1e9:.3f} B "
                         f"| {r['lora_r16'] / 1e6:.1f} M | {r['image_positions']:,} "
                         f"| {r['text_tokens']} | {r['tflop_per_call']:.2f} | {decoder} "
                         f"| {d:.2f} | {steps} |")  # fmt: skip
    return "\n".join(lines) + "\n"


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
