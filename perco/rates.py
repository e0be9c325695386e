"""The rate ladder: one table, the single place where a rung is defined.

PerCo fixes its rate by construction (paper §3.2): the hyper-latent has ``h×w`` vectors,
each coded uniformly with ``log2 V`` bits, so ``z_l`` costs ``h·w·log2 V`` bits. The
spatial size follows the autoencoder latent: a rung downsamples the latent by 1, 2, 4 or
8, so a 512×512 image (latent 64×64 for an 8× autoencoder) gets 64², 32², 16² or 8²
vectors, and Kodak's 768×512 gets 96×64 … 12×8.

=========  ==========  ======  ========  ===============  =====
name       downsample  V       bits/idx  index bpp @512²  steps
=========  ==========  ======  ========  ===============  =====
r0.0019    8 (8×8)     256     8         0.00195          20
r0.0024    8 (8×8)     1024    10        0.00244          20
r0.0059    4 (16×16)   64      6         0.00586          20
r0.0098    4 (16×16)   1024    10        0.00977          20
r0.0313    2 (32×32)   256     8         0.03125          20
r0.0508    2 (32×32)   8192    13        0.05078          5
r0.0938    1 (64×64)   64      6         0.09375          5
r0.1250    1 (64×64)   256     8         0.12500          5
=========  ==========  ======  ========  ===============  =====

Default steps: 20 below 0.05 bpp (PerCo (SD) decodes with 20 DDIM steps), 5 above
(the paper uses 5 steps above 0.05 bpp; Fig. 8).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

__all__ = [
    "Rate",
    "RATES",
    "get_rate",
    "index_bits",
    "hyper_latent_size",
    "packed_bits",
    "chunk_length",
]


@dataclass(frozen=True)
class Rate:
    """One rung of the ladder.

    Args:
        name: identifier, e.g. ``"r0.0019"`` (the index bpp at 512², rounded).
        downsample: hyper-encoder downsampling of the autoencoder latent (1, 2, 4 or 8).
        codebook_size: ``V``, the number of codebook entries.
        steps: default number of sampler steps for this rung.
    """

    name: str
    downsample: int
    codebook_size: int
    steps: int

    @property
    def bits_per_index(self) -> float:
        return math.log2(self.codebook_size)

    def bpp(self, height: int = 512, width: int = 512, latent_factor: int = 8) -> float:
        """Index bits per pixel of the original ``height × width`` image."""
        return index_bits(self, height, width, latent_factor) / (height * width)


_TABLE = [
    # name       downsample  V     steps
    ("r0.0019", 8, 256, 20),
    ("r0.0024", 8, 1024, 20),
    ("r0.0059", 4, 64, 20),
    ("r0.0098", 4, 1024, 20),
    ("r0.0313", 2, 256, 20),
    ("r0.0508", 2, 8192, 5),
    ("r0.0938", 1, 64, 5),
    ("r0.1250", 1, 256, 5),
]

RATES: dict[str, Rate] = {row[0]: Rate(*row) for row in _TABLE}


def get_rate(rate: str | Rate) -> Rate:
    """Look a rung up by name (``"r0.0019"``; ``"0.0019"`` also accepted)."""
    if isinstance(rate, Rate):
        return rate
    key = rate if rate.startswith("r") else f"r{rate}"
    if key not in RATES:
        raise KeyError(f"unknown rate {rate!r}; known rates: {', '.join(RATES)}")
    return RATES[key]


def hyper_latent_size(
    rate: str | Rate, height: int, width: int, latent_factor: int = 8
) -> tuple[int, int]:
    """``(h, w)`` of the hyper-latent for an image of ``height × width`` pixels.

    The image is padded up to a multiple of ``latent_factor · downsample`` before encoding,
    so partial cells count as whole ones.
    """
    cell = latent_factor * get_rate(rate).downsample
    return math.ceil(height / cell), math.ceil(width / cell)


def index_bits(rate: str | Rate, height: int, width: int, latent_factor: int = 8) -> int:
    """Exact number of bits the indices of one ``height × width`` image take in a file.

    ``ceil(h·w·log2 V)``, the information content of ``h·w`` uniform symbols, whenever
    ``V`` is a power of two or ``h·w·log2 V`` fits in one mixed-radix chunk of
    :data:`CHUNK_BITS` bits (every rung of the ladder at any realistic size). Beyond that
    the indices are coded in chunks of :func:`chunk_length` indices, each losing under one
    bit. Computed with integers, so it is exact.
    """
    r = get_rate(rate)
    h, w = hyper_latent_size(r, height, width, latent_factor)
    return packed_bits(h * w, r.codebook_size)


# Indices are packed in mixed radix, chunk by chunk, so that packing and unpacking stay
# linear in the image size; a chunk is the largest run of indices that fits these bits.
CHUNK_BITS = 65536


def chunk_length(codebook_size: int) -> int:
    """Indices per mixed-radix chunk for a codebook of ``codebook_size`` entries."""
    return CHUNK_BITS // codebook_size.bit_length()


@functools.lru_cache(maxsize=64)
def _run_bits(count: int, codebook_size: int) -> int:
    """``ceil(count · log2 V)``: bits of ``count`` indices in one mixed-radix number."""
    return (codebook_size**count - 1).bit_length()


def packed_bits(count: int, codebook_size: int) -> int:
    """Bits of ``count`` indices of a ``codebook_size``-entry codebook, packed."""
    if codebook_size < 1 or count < 0:
        raise ValueError(f"need codebook_size >= 1 and count >= 0, got {codebook_size}, {count}")
    if codebook_size & (codebook_size - 1) == 0:  # a power of two: log2 V bits each
        return count * (codebook_size.bit_length() - 1)
    k = chunk_length(codebook_size)
    full, rest = divmod(count, k)
    return full * _run_bits(k, codebook_size) + (_run_bits(rest, codebook_size) if rest else 0)
