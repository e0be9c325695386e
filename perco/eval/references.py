"""Reference rows beside a model's: JPEG at a quality, and the shuffled-index control.

Classic codecs rate-matched per image are in :mod:`perco.eval.codecs`; the third
reference, the autoencoder alone (the ceiling), decodes the evaluation's own latents and
lives in the runner.
"""

from __future__ import annotations

import torch

from .codecs import get_codec

__all__ = ["jpeg", "shuffle_pairs", "CONTROL"]

CONTROL = "control"  # the series name of the shuffled-index control


def jpeg(image: torch.Tensor, quality: int) -> tuple[torch.Tensor, int]:
    """``image`` (3, H, W) through Pillow's JPEG at ``quality``: (decoded, file bytes)."""
    codec = get_codec("jpeg")
    data = codec.encode(image, quality)
    return codec.decode(data), len(data)


def shuffle_pairs(sizes: list[tuple[int, int]], seed: int = 0) -> list[tuple[int, int]]:
    """``(image, donor)`` index pairs for the control: within each size a random order
    shifted by one, so no image is its own donor; an image alone in its size has no donor
    and is left out. The control decodes each image's file with its donor's indices: the
    text, size and seed stay the image's own, so what it measures is how much of the
    reconstruction the indices carry."""
    g = torch.Generator().manual_seed(seed)
    by_size = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(tuple(size), []).append(i)
    pairs = []
    for group in by_size.values():
        if len(group) > 1:
            order = [group[k] for k in torch.randperm(len(group), generator=g).tolist()]
            pairs += zip(order, order[1:] + order[:1], strict=True)
    return sorted(pairs)
