"""Numeric parity of an imported PerCo (SD) model with PerCo (SD)'s own pipeline.

Two steps, in two environments (PerCo (SD) pins diffusers 0.27 and transformers 4.37,
perco needs newer ones), both pointed at the model ``perco import-checkpoint`` wrote
(its ``perco.json`` names the PerCo (SD) folder and the base model it came from):

    # 1. in PerCo (SD)'s environment (its requirements.txt), with its source checked out:
    python scripts/perco_sd_parity.py reference --perco-sd-src PerCo/src \
        --model models/perco_sd/r0.0019 --image data/kodak/kodim23.png
    # 2. in perco's environment:
    python scripts/perco_sd_parity.py compare --model models/perco_sd/r0.0019

Step 1 runs PerCo (SD)'s ``HyperEncoder`` and ``StableDiffusionPipelinePerco`` as its
compression script does (512×512 bicubic resize, VAE posterior draw, indices, ``z_hat``,
CFG 3.0 against the empty prompt, DDIM at the rung's steps) with a CPU generator of a
fixed seed, and saves what went in and what came out (``--out``). Step 2 gives perco the
same latent, caption and seed, and prints how far apart the two are: the indices must be
identical and the PSNR between the two decoded images at least ``--min-psnr`` dB
(different diffusers versions and GPU kernels may change the last bits, nothing more).
Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def reference(args: argparse.Namespace) -> None:
    """PerCo (SD)'s own code on one image (needs its environment and source)."""
    import torch
    from PIL import Image
    from torchvision.transforms import functional as TF

    sys.path.insert(0, str(args.perco_sd_src))
    from diffusers import AutoencoderKL, DDIMScheduler
    from hyper_encoder import HyperEncoder
    from pipeline_sd_perco import StableDiffusionPipelinePerco
    from transformers import CLIPTextModel, CLIPTokenizer
    from unet_2d_perco import UNet2DConditionModel

    config = json.loads((args.model / "perco.json").read_text())
    record = config.get("imported_from")
    if not record or record.get("format") != "perco-sd":
        sys.exit(f"{args.model} was not imported from PerCo (SD) (no imported_from record)")
    ckpt, base = record["source"], record["base"]
    steps = args.steps or config["rate"]["steps"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipelinePerco(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        hyper_enc=HyperEncoder.from_pretrained(ckpt, subfolder="hyper_enc"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(ckpt, subfolder="unet"),
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device)
    image = Image.open(args.image).convert("RGB")
    bicubic = TF.InterpolationMode.BICUBIC  # on a PIL image: PIL's, as its read_png
    image = TF.to_tensor(TF.resize(image, [args.size, args.size], interpolation=bicubic))
    with torch.no_grad():
        draw = torch.Generator().manual_seed(args.seed)
        posterior = pipe.vae.encode((image * 2 - 1)[None].to(device)).latent_dist
        latents = posterior.sample(generator=draw) * pipe.vae.config.scaling_factor
        pipe.hyper_enc.quantizer.eval()
        hyper = pipe.hyper_enc(latents)
        decoded = pipe(
            args.caption,
            hyper.z_hat,
            height=args.size,
            width=args.size,
            num_inference_steps=steps,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(args.seed),
            output_type="pt",
        ).images
    torch.save(
        {
            "image": image,
            "latents": latents.cpu(),
            "indices": hyper.indices.cpu(),
            "z_hat": hyper.z_hat.cpu(),
            "decoded": decoded.cpu().float(),
            "caption": args.caption,
            "steps": steps,
            "seed": args.seed,
        },
        args.out,
    )
    print(f"{args.out}: PerCo (SD)'s indices {tuple(hyper.indices.shape)} and decoded image")


def compare(args: argparse.Namespace) -> int:
    """perco on the same latent, caption and seed; prints the gaps, 1 if out of bounds."""
    import torch

    from perco.models.loading import load_model

    ref = torch.load(args.out, weights_only=True)
    model = load_model(str(args.model))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    image = ref["image"][None].to(device)
    with torch.no_grad():
        encoded = model.encode(image, [ref["caption"]], latents=ref["latents"].to(device))
        z_hat = model._z_l(model.quantizer.lookup(encoded.indices))
        [decoded] = model.decode(
            encoded, steps=ref["steps"], generator=torch.Generator().manual_seed(ref["seed"])
        )
    same = (encoded.indices.cpu() == ref["indices"]).float().mean().item()
    z_gap = (z_hat.cpu() - ref["z_hat"]).abs().max().item()
    mse = (decoded.cpu().float() - ref["decoded"][0]).pow(2).mean().item()
    psnr = float("inf") if mse == 0 else -10 * torch.log10(torch.tensor(mse)).item()
    print(f"{'indices equal':<28}{same:.4f} of {encoded.indices.numel()}")
    print(f"{'z_hat max |difference|':<28}{z_gap:.2e}")
    print(f"{'decoded images, PSNR apart':<28}{psnr:.1f} dB ({ref['steps']} steps, seed "
          f"{ref['seed']})")  # fmt: skip
    ok = same == 1.0 and psnr >= args.min_psnr
    print("parity" if ok else f"NO parity (need identical indices and >= {args.min_psnr} dB)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["reference", "compare"])
    parser.add_argument("--model", type=Path, required=True,
                        help="the model `perco import-checkpoint perco-sd` wrote")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("parity.pt"), help="the record")
    parser.add_argument("--perco-sd-src", type=Path, help="reference: PerCo (SD)'s src/")
    parser.add_argument("--image", type=Path, help="reference: an image file")
    parser.add_argument("--caption", default="a photo", help="reference: the caption")
    parser.add_argument("--size", type=int, default=512, help="reference: resize to this")
    parser.add_argument("--steps", type=int, help="reference: DDIM steps (the rung's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-psnr", type=float, default=40.0, help="compare: bound (dB)")
    args = parser.parse_args(argv)
    need = ("perco_sd_src", "image") if args.step == "reference" else ()
    missing = [f"--{n.replace('_', '-')}" for n in need if getattr(args, n) is None]
    if missing:
        parser.error(f"{args.step} needs {', '.join(missing)}")
    if args.step == "reference":
        reference(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
