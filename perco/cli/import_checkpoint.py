"""Import another implementation's trained weights as a perco model folder.

    perco import-checkpoint perco-sd perco_sd_weights --rate 0.1250 -o models/perco_sd_r0.1250

``perco-sd``: PerCo (SD)'s released or self-trained checkpoints (Nikolai10/PerCo): a
folder with ``unet/`` and ``hyper_enc/`` (or one up to three levels below it, picked by
the rung). The VAE, text encoder, tokenizer and scheduler come from ``--base``. The
output is an ordinary perco folder (``PerCo.from_pretrained``, ``perco compress``,
``perco-eval``); its ``perco.json`` records the import under ``imported_from``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..models.perco_sd import PERCO_SD_RATES, CheckpointError, import_perco_sd
from ..models.serialization import CONFIG_NAME

FORMATS = ("perco-sd",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=FORMATS, help="whose checkpoint it is")
    parser.add_argument("src", type=Path, help="the checkpoint folder (or a folder above it)")
    parser.add_argument(
        "--rate",
        required=True,
        help=f"PerCo (SD)'s rung: {', '.join(PERCO_SD_RATES)} (an r prefix is accepted)",
    )
    parser.add_argument(
        "--base",
        default="stabilityai/stable-diffusion-2-1",
        help="the Stable Diffusion it was finetuned from: hub id or local folder "
        "(default: %(default)s)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="perco model folder")
    parser.add_argument("--json", action="store_true", help="print the import record as JSON")


def run(args: argparse.Namespace) -> int:
    out = args.output
    if out.exists() and not (out / CONFIG_NAME).is_file() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not a perco model folder; not replacing it")
    model = import_perco_sd(args.src, args.rate, args.base)
    model.save_pretrained(out)
    record = {
        **model.provenance,
        "output": str(out),
        "perco_rate": model.rate.name,
        "fingerprint": model.fingerprint.hex()[:4],
    }
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    rate, spacing = model.rate, model.scheduler.config.timestep_spacing
    print(f"{out}: PerCo (SD) {record['rate']} from {record['source']}")
    print(f"  {record['tensors']} tensors mapped; VAE, text encoder, tokenizer, scheduler "
          f"from {record['base']}")  # fmt: skip
    print(f"  perco rung {rate.name}: downsample {rate.downsample}, V={rate.codebook_size}, "
          f"{model.default_steps} steps, {spacing} spacing")  # fmt: skip
    print(f"  fingerprint {record['fingerprint']}")
    return 0
