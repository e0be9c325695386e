"""Caption corpora and the fitting of the caption-coding models of :mod:`.text_codec`.

The shipped models are fitted on COCO val2017's ground-truth captions (25,014 captions of
5,000 images) minus a held-out 20 % of the *images* (:func:`split_by_image`), on which
``scripts/bench_captions.py`` measures them::

    python scripts/fit_caption_models.py      # rewrites perco/captioning/*.npz
"""

from __future__ import annotations

import json
import os

from .text_codec import NGramModel, split_by_image, tokenizer_fingerprint

__all__ = ["load_coco_captions", "fit_token_model", "fit_byte_model", "fit_split"]

TOKEN_ORDER = 2  # bigram: 70 bits per held-out caption in 180 kB; trigram saves 3 bits in 570
BYTE_ORDER = 5  # 83 bits in 320 kB; order 4: 98 bits, order 6: 76 bits in 670 kB


def load_coco_captions(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``(image id, caption)`` pairs of a COCO ``captions_*.json``, in file order."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [(a["image_id"], a["caption"].strip()) for a in data["annotations"]]


def fit_split(
    captions: list[tuple[int, str]], held_out: float = 0.2
) -> tuple[list[str], list[str]]:
    """``(fit, held-out)`` captions, split by image id (never by caption)."""
    held = split_by_image((i for i, _ in captions), held_out)
    fit = [c for i, c in captions if i not in held]
    test = [c for i, c in captions if i in held]
    return fit, test


def fit_token_model(
    captions: list[str], tokenizer, order: int = TOKEN_ORDER, source: str = ""
) -> NGramModel:
    """An n-gram over ``tokenizer``'s ids (no BOS/EOS), ending with its EOS id."""
    max_tokens = tokenizer.model_max_length - 2
    ids = [i[:max_tokens] for i in tokenizer(captions, add_special_tokens=False).input_ids]
    return NGramModel.fit(
        ids,
        order=order,
        vocab_size=len(tokenizer),
        end=tokenizer.eos_token_id,
        start=tokenizer.bos_token_id,
        meta={
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "captions": len(captions),
            "source": source,
        },
    )


def fit_byte_model(captions: list[str], order: int = BYTE_ORDER, source: str = "") -> NGramModel:
    """An n-gram over UTF-8 bytes (0-255), ending with symbol 256."""
    return NGramModel.fit(
        (c.encode("utf-8") for c in captions),
        order=order,
        vocab_size=257,
        end=256,
        meta={"captions": len(captions), "source": source},
    )
