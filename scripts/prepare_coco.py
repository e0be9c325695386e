"""Prepare a COCO evaluation folder for ``perco-eval dataset=coco30k``.

COCO-30k at 512² (PerCo (SD)'s protocol: the packaged train2017 list, bicubic resize):

    python scripts/prepare_coco.py --images coco/train2017 \
        --captions coco/annotations/captions_train2017.json \
        --instances coco/annotations/instances_train2017.json --out data/coco30k

Any other selection: ``--files list.txt`` (one file name per line) or ``--files all``;
``--size 256 --transform center-crop`` for 256² sets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perco.data.coco import prepare_coco


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of COCO images")
    parser.add_argument("--captions", type=Path, required=True, help="captions_*.json")
    parser.add_argument("--instances", type=Path, help="instances_*.json (label maps for mIoU)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--files", default=None, help="file list, or 'all' (default: packaged COCO-30k list)"
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--transform", choices=["resize", "center-crop"], default="resize")
    parser.add_argument("--allow-missing", action="store_true")
    args = parser.parse_args(argv)
    if args.files == "all":
        files = sorted(p.name for p in args.images.iterdir() if p.suffix.lower() == ".jpg")
    elif args.files:
        files = Path(args.files).read_text().split()
    else:
        files = None
    try:
        n = prepare_coco(
            args.images,
            args.captions,
            args.out,
            files=files,
            instances_json=args.instances,
            size=args.size,
            transform=args.transform,
            allow_missing=args.allow_missing,
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"prepare_coco: error: {e}", file=sys.stderr)
        return 1
    print(f"{n} images written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
