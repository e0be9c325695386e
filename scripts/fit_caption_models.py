"""Fit the caption-coding models shipped in perco/captioning/ (see perco.captioning.corpus).

    python scripts/fit_caption_models.py        # COCO val2017 captions from $PERCO_ASSETS

Fits on the captions of 80 % of the images (split by image id) and prints the held-out
mean code length of each model; ``scripts/bench_captions.py`` measures the real codecs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from perco.captioning.corpus import fit_byte_model, fit_split, fit_token_model, load_coco_captions
from perco.testing import clip_tokenizer


def main() -> None:
    assets = Path(os.environ.get("PERCO_ASSETS", "../shared/assets"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--captions", type=Path, default=assets / "coco-mini/annotations/captions_val2017.json"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "perco/captioning")
    args = parser.parse_args()

    fit, held_out = fit_split(load_coco_captions(args.captions))
    source = f"{args.captions.name}, images with split_by_image hash >= 0.2"
    tokenizer = clip_tokenizer()
    models = {
        "coco_clip_tokens": fit_token_model(fit, tokenizer, source=source),
        "coco_bytes": fit_byte_model(fit, source=source),
    }
    token_ids = tokenizer(held_out, add_special_tokens=False).input_ids
    sequences = {"coco_clip_tokens": token_ids, "coco_bytes": [c.encode() for c in held_out]}
    print(f"fit on {len(fit)} captions, {len(held_out)} held out")
    for name, model in models.items():
        path = args.out / f"{name}.npz"
        model.save(path)
        bits = np.mean([model.bits(s) for s in sequences[name]])
        print(f"{name}: order {model.order}, {path.stat().st_size / 1e3:.0f} kB, "
              f"{bits:.1f} ideal bits per held-out caption")  # fmt: skip


if __name__ == "__main__":
    main()
