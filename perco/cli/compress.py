"""Compress images to .perco files.

    perco compress photos/ more.png -o out/ --model runs/paper --rate r0.0019 --caption "a red barn"
    perco compress photos/ -o out/ --model runs/paper --rate r0.0019 --captioner blip2

Each image becomes ``<output-dir>/<stem>.perco`` (written to a temp name, then renamed).
Images that pad to the same size are encoded together. A file that fails is reported in
one line and the others go on; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from .. import bitstream, codec
from ..captioning import text_codec
from ..captioning.captioners import load_captioner
from ..io import IMAGE_SUFFIXES, read_captions, read_image, save_image, to_pil, write_bytes
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
    parser.add_argument("inputs", nargs="+", type=Path, help="images or folders of images")
    parser.add_argument("-o", "--output-dir", type=Path, help="default: beside each image")
    add_model_arguments(parser)
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--caption", help="one caption for every image")
    text.add_argument(
        "--captions-file",
        type=Path,
        help="JSON {file name or stem: caption}, perco-caption's JSONL or name<TAB>caption lines",
    )
    text.add_argument(
        "--captioner",
        help="caption each image now: blip2[:name] (BLIP-2, PerCo's) or vlm:name (any "
        "image-to-text model); perco-caption does this once for a whole dataset",
    )
    parser.add_argument(
        "--caption-codec",
        nargs="+",
        choices=["zlib", "deflate", "exact", "tokens"],
        help="caption codecs to choose from, the shortest is written (default: every one "
        "that applies; 'exact' keeps the text verbatim, 'tokens' codes the text encoder's "
        "token ids)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=bitstream.DEFAULT_SEED,
        help="sampler seed stored in the file (default 0 costs no bytes)",
    )
    parser.add_argument(
        "--crc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end each file with a CRC-16 of its bytes (2 bytes, default): a decoder "
        "refuses a file with a changed bit instead of decoding it into another realistic "
        "image; --no-crc for the smallest files (cut or extended files are refused either "
        "way)",
    )
    parser.add_argument(
        "--keep",
        type=float,
        default=1.0,
        help="hybrid mode: transmit this share of the indices (in 64ths; the decoder draws "
        "the others from the model's learned index prior with the file's seed)",
    )
    parser.add_argument(
        "--uniform",
        action="store_true",
        help="pack the indices uniformly (log2 V bits each) even if the model has a prior",
    )
    parser.add_argument(
        "--verify", action="store_true", help="read each file back, decode it and report PSNR"
    )
    parser.add_argument("--steps", type=int, help="sampler steps for --verify")
    parser.add_argument("--guidance", choices=GUIDANCE_MODES, help="CFG mode for --verify")
    parser.add_argument(
        "--save-verify", action="store_true", help="with --verify, also write <stem>.verify.png"
    )


def run(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    captions = read_captions(args.captions_file) if args.captions_file else {}
    model = model_from_arguments(args)
    if not model.config.text and (args.caption or captions or args.captioner):
        raise ValueError(
            "this model has no text conditioning (trained without captions): --caption, "
            "--captions-file and --captioner would only add bytes; leave them out"
        )
    # a codec that does not apply to this model (tokens, another tokenizer) fails up front
    text_codec.caption_codecs(model.tokenizer, args.caption_codec)
    captioner = load_captioner(args.captioner) if args.captioner else None
    report, timer = Report(), StageTimer()
    if not args.crc:
        report.note(None, "--no-crc: a changed bit inside a file decodes into another image")
    if args.caption is None and not captions and captioner is None:
        report.note(None, "no captions given: files carry no caption (null text)")

    # read every image first, so bad files are reported before any work
    groups: dict[tuple[int, int], list[tuple[Path, torch.Tensor, str | None]]] = defaultdict(list)
    for path in collect(args.inputs, IMAGE_SUFFIXES):
        try:
            if not path.is_file():
                raise FileNotFoundError("no such file")
            image, note = read_image(path)
            codec.check_image_size(model, *image.shape[-2:])
        except (ValueError, OSError) as e:
            report.fail("compress", path, e)
            continue
        if note:
            report.note(path, note)
        caption = args.caption or captions.get(path.name, captions.get(path.stem))
        groups[tuple(image.shape[-2:])].append((path, image, caption))

    total = sum(len(g) for g in groups.values())
    with progress(total, "compress") as bar:
        for items in groups.values():
            for start in range(0, len(items), args.batch_size):
                batch = items[start : start + args.batch_size]
                images = torch.cat([img for _, img, _ in batch])
                if captioner is not None:
                    with timer("caption"):
                        pils = [to_pil(img) for _, img, _ in batch]
                        made = captioner(pils, [p.name for p, *_ in batch])
                    batch = [(p, img, c) for (p, img, _), c in zip(batch, made, strict=True)]
                results = codec.compress(
                    model,
                    images,
                    [c for *_, c in batch],
                    seed=args.seed,
                    crc=args.crc,
                    caption_codecs=args.caption_codec,
                    timer=timer,
                    keep=args.keep,
                    uniform=args.uniform,
                )
                for (path, image, caption), (data, breakdown) in zip(batch, results, strict=True):
                    out = output_path(path, args.output_dir, ".perco")
                    if not report.write("compress", path, lambda o=out, d=data: write_bytes(o, d)):
                        continue
                    entry = {
                        "file": str(path),
                        "output": str(out),
                        "caption": caption,
                        **breakdown.to_dict(),
                    }
                    if args.verify:
                        entry["verify"] = verify(model, out, image, args, timer)
                    report.files.append(entry)
                bar.update(len(batch))
    # the "caption" stage appears only when --captioner ran a captioning model
    report.timings = timer.as_dict()
    return report.finish(args.json, print_table)


def verify(model, path: Path, original: torch.Tensor, args, timer: StageTimer) -> dict:
    """Read the written file back, check it parses to the same content, decode it."""
    parsed, _ = codec.parse(model, path.read_bytes())
    (decoded,) = codec.decompress(
        model, [parsed], steps=args.steps, guidance=args.guidance, timer=timer
    )
    mse = torch.mean((decoded.cpu() - original[0]) ** 2).item()
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
    if args.save_verify:
        save_image(decoded, path.with_suffix(".verify.png"))
    return {"parsed": True, "psnr": psnr, "steps": args.steps or model.default_steps}


def print_table(files: list[dict]) -> None:
    if not files:
        return
    crc = sum(f["crc"] for f in files)
    print(f"{crc} of {len(files)} files carry a CRC-16 (2 bytes: in bytes and bpp_file, "
          "not in bpp_payload)")  # fmt: skip
    print(
        f"{'file':<28}{'bytes':>7}{'bpp_file':>10}{'bpp_payload':>13}{'header B':>10}"
        f"{'index b':>9}{'uniform b':>11}{'ratio':>7}{'caption b':>11}  codec"
    )
    for f in files:
        name = Path(f["file"]).name
        uniform = f["uniform_index_bits"]
        line = (
            f"{name:<28}{f['file_bytes']:>7}{f['bpp_file']:>10.5f}{f['bpp_payload']:>13.5f}"
            f"{f['header_bytes']:>10}{f['index_bits']:>9}{uniform:>11}"
            f"{f['index_bits'] / max(uniform, 1):>7.3f}{f['caption_bits']:>11}  "
            f"{f['caption_codec']}"
        )
        if "verify" in f:
            line += f"  PSNR {f['verify']['psnr']:.2f} dB"
        print(line)
