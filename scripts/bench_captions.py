"""Caption bits per codec on held-out COCO captions, and their share of a lowest-rung file.

    python scripts/bench_captions.py            # COCO val2017 captions from $PERCO_ASSETS

The corpus is COCO val2017's ground-truth captions (25,014 captions of 5,000 images). The
token and exact-text models shipped in perco/captioning/ were fitted on the captions of
80 % of the images (split by image id, ``perco.captioning.corpus.fit_split``); every
number here is on the other 20 %, whose images the models never saw. Each caption is
really coded (bytes, as written to a file) and decoded back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from perco.bitstream import HEADER_BYTES
from perco.captioning import text_codec
from perco.captioning.corpus import fit_split, load_coco_captions
from perco.rates import RATES, index_bits
from perco.testing import clip_tokenizer


def main() -> None:
    assets = Path(os.environ.get("PERCO_ASSETS", "../shared/assets"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--captions", type=Path, default=assets / "coco-mini/annotations/captions_val2017.json"
    )
    parser.add_argument("--limit", type=int, help="first N held-out captions (default: all)")
    args = parser.parse_args()

    fit, held_out = fit_split(load_coco_captions(args.captions))
    total = len(fit) + len(held_out)
    held_out = held_out[: args.limit]
    codecs = text_codec.caption_codecs(clip_tokenizer())
    rung = RATES["r0.0019"]
    kodak_index_bytes = -(-index_bits(rung, 512, 768) // 8)
    print(
        f"{len(held_out)} held-out captions (of {total}; the models were fit on {len(fit)}),"
        f" mean {statistics.mean(len(c) for c in held_out):.1f} characters\n"
    )
    print(
        "| codec | mean bits | median bits | bpp @512² | bpp @768×512 "
        "| r0.0019 file @768×512 (B) | caption share | µs/caption (enc+dec) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for cid, codec in codecs.items():
        start = time.perf_counter()
        bits = []
        for caption in held_out:
            data = codec.encode(caption)
            back = codec.decode(data)
            expected = codec.ids(caption) if cid == text_codec.TOKENS else caption
            got = list(back.ids) if cid == text_codec.TOKENS else back
            if got != expected:
                raise AssertionError(f"{codec.name} does not round-trip {caption!r}")
            bits.append(8 * len(data))
        per = (time.perf_counter() - start) / len(held_out) * 1e6
        mean = float(np.mean(bits))
        # + the codec id byte, and a range-coded caption's length byte (format version 3)
        header = HEADER_BYTES + (cid >= text_codec.EXTENDED) + (cid in text_codec.RANGE_CODED)
        file_bytes = header + kodak_index_bytes + mean / 8
        print(
            f"| {codec.name} | {mean:.1f} | {statistics.median(bits):.0f} "
            f"| {mean / 512**2:.5f} | {mean / (768 * 512):.5f} | {file_bytes:.1f} "
            f"| {mean / 8 / file_bytes:.0%} | {per:.0f} |"
        )
    print(
        f"\nr0.0019 at 768×512: {HEADER_BYTES}-byte header (+1 codec id byte and +1 length "
        f"byte for exact and tokens), {kodak_index_bytes} bytes of indices; the paper's Kodak "
        "files at 0.003 bpp are 153 bytes."
    )


if __name__ == "__main__":
    main()
