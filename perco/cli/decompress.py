"""Decompress .perco files to PNG images.

    perco decompress bits/ -o recon/ --model runs/tiny_taef2 --rate r0.0019

Steps: ``--steps``, else the model's default (``steps`` in its ``perco.json``, set by its
training config; else the rung's: 20 below 0.05 bpp, 5 above); each file's line says which.

Each file becomes ``<output-dir>/<stem>.png``. Files are checked against the model
(fingerprint, rate) before any decoding; a bad file is reported in one line and the
others go on; the exit status is 1 when any failed. ``--coarse`` (SPRDiff-style models)
writes the coarse reconstruction instead: a pixel-faithful preview in one forward pass,
no diffusion.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import codec
from ..bitstream import BitstreamError, end_checked, read_header
from ..io import save_image
from ..models.perco import Capability
from ..sampling import GUIDANCE_MODES
from ..timing import StageTimer
from ._common import (
    Report,
    add_model_arguments,
    collect,
    model_from_arguments,
    output_path,
    progress,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help=".perco files or folders")
    parser.add_argument("-o", "--output-dir", type=Path, help="default: beside each file")
    add_model_arguments(parser)
    parser.add_argument(
        "--steps",
        type=int,
        help="sampler steps (default: the model's, i.e. 'steps' in its perco.json, else "
        "the rung's: 20 below 0.05 bpp, 5 above)",
    )
    parser.add_argument("--guidance", choices=GUIDANCE_MODES, help="CFG mode (default: model's)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net first (pays off over many files of one size, on a GPU)",
    )
    parser.add_argument("--guidance-scale", type=float, help="CFG scale (default: model's)")
    parser.add_argument(
        "--timestep-spacing",
        choices=("leading", "trailing", "linspace"),
        help="sampler timestep spacing (default: the model's scheduler config)",
    )
    parser.add_argument(
        "--coarse",
        action="store_true",
        help="write the coarse reconstruction (one forward pass; SPRDiff-style models only)",
    )


def run(args: argparse.Namespace) -> int:
    model = model_from_arguments(args)
    if args.compile:  # in place: the module, its weights and the fingerprint stay the same
        model.denoiser.compile()
    if args.coarse and not model.capabilities & Capability.COARSE:
        raise ValueError(f"--coarse needs an SPRDiff-style model; this one is {model.variant}")
    report, timer = Report(), StageTimer()
    parsed = []
    for path in collect(args.inputs, (".perco",)):
        try:
            data = path.read_bytes()
            image, breakdown = codec.parse(model, data)
        except (BitstreamError, OSError) as e:
            report.fail("decompress", path, e.strerror if isinstance(e, OSError) else e)
            continue
        if not end_checked(read_header(data)):
            report.note(path, f"format version {breakdown.version}, written before perco "
                        "checked where files end: a cut or extended copy would decode too; "
                        "compress the image again for a checked file")  # fmt: skip
        parsed.append((path, image, breakdown))

    with progress(len(parsed), "decompress") as bar:
        decoded = codec.decompress(
            model,
            [image for _, image, _ in parsed],
            batch_size=args.batch_size,
            steps=args.steps,
            guidance=args.guidance,
            guidance_scale=args.guidance_scale,
            timestep_spacing=args.timestep_spacing,
            timer=timer,
            progress=bar,
            coarse=args.coarse,
        )
    for (path, image, breakdown), reconstruction in zip(parsed, decoded, strict=True):
        out = output_path(path, args.output_dir, ".png")
        if not report.write("decompress", path, lambda o=out, r=reconstruction: save_image(r, o)):
            continue
        report.files.append(
            {
                "file": str(path),
                "output": str(out),
                "caption": image.caption,
                "seed": image.seed,
                "steps": 0 if args.coarse else args.steps or model.default_steps,
                **breakdown.to_dict(),
            }
        )
    report.timings = timer.as_dict()
    return report.finish(args.json, print_table)


def print_table(files: list[dict]) -> None:
    for f in files:
        print(
            f"{Path(f['file']).name} -> {f['output']}  {f['width']}x{f['height']}  "
            f"bpp_file {f['bpp_file']:.5f}  bpp_payload {f['bpp_payload']:.5f}  "
            f"{f['steps']} steps"
        )
