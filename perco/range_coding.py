"""What the range-coded streams share (caption codecs, the learned index prior): byte
strings ↔ constriction's 32-bit words, and cutting a finished stream to its shortest
decodable prefix."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["decoder", "to_bytes", "shortest_prefix", "is_cut"]


def decoder(data: bytes):
    """A ``constriction`` range decoder over ``data``, padded with zero bytes to whole
    32-bit words (big-endian), as the encoders below cut them."""
    import constriction  # a compiled module: submodules are attributes, not importable

    padded = data + bytes(-len(data) % 4)
    return constriction.stream.queue.RangeDecoder(np.frombuffer(padded, ">u4").astype(np.uint32))


def to_bytes(encoder) -> bytes:
    """A finished ``constriction`` range encoder's words as big-endian bytes."""
    return encoder.get_compressed().astype(">u4").tobytes()


def shortest_prefix(data: bytes, decodes: Callable[[bytes], bool]) -> bytes:
    """The shortest prefix of ``data`` for which ``decodes`` holds (the decoder pads with
    zeros).

    The coder's final word pins a point near the low end of the final interval, so for
    each shorter length both the truncation and the truncation plus one unit in its last
    byte are tried; the search stops at the first length where neither decodes.
    """
    best = data
    for k in range(len(data) - 1, -1, -1):
        fits = next((c for c in _cuts(data, k) if decodes(c)), None)
        if fits is None:
            return best
        best = fits
    return best


def is_cut(core: bytes, full: bytes) -> bool:
    """Whether ``core`` is one of the cuts :func:`shortest_prefix` tries on the whole
    output ``full``: at its length, the prefix or the prefix plus one unit."""
    return len(core) <= len(full) and core in _cuts(full, len(core))


def _cuts(data: bytes, k: int) -> list[bytes]:
    """The ``k``-byte cuts of ``data``: its prefix, and the prefix plus one in its last
    byte when that does not carry out of ``k`` bytes."""
    prefix = data[:k]
    bumped = int.from_bytes(prefix, "big") + 1
    return [prefix, bumped.to_bytes(k, "big")] if k and bumped < 1 << 8 * k else [prefix]
