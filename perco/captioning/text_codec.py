"""Lossless coding of the caption ``z_g`` (PerCo §3.2: "losslessly coded").

At the lowest rung the caption is more than half of a file, so every bit counts. Codecs,
by the id the bitstream header stores (ids 0-2 fit the header's 2-bit field, the others
take one extra byte):

====  ==========  =================================================================
id    name        what is coded
====  ==========  =================================================================
1     zlib        the UTF-8 text with zlib (the paper's reference; ≈ 450 bits on COCO)
2     deflate     the UTF-8 text with raw DEFLATE (zlib without its 6-byte wrapper)
4     exact       the UTF-8 bytes under a byte n-gram model fitted on COCO captions,
                  arithmetic-coded: ``decode(encode(s)) == s`` for any string
5     tokens      the token ids the text encoder consumes (its tokenizer's output,
                  truncated to what the encoder reads) under a token n-gram model
                  fitted on COCO captions, arithmetic-coded
====  ==========  =================================================================

The decoder of a diffusion model needs only the token ids its text encoder reads, not the
string: ``tokens`` codes exactly those ids and hands them back as a
:class:`TokenCaption` (a ``str`` — the tokenizer's decoding, for display — carrying the
ids), which :func:`perco.models.text.encode_captions` feeds to the text encoder unchanged.
The fitted model of ``tokens`` records the fingerprint of the tokenizer it was fitted
for; a model whose tokenizer differs refuses such a file instead of reading another
caption. Codec ids name the shipped fitted models; a refit model gets a new id.

The statistical models are interpolated Kneser-Ney n-grams (:class:`NGramModel`); the
arithmetic coder is ``constriction``'s range coder. The coder writes 32-bit words; the
encoder drops the trailing bytes that the decoder does not need (it pads with zeros, and
the encoder checks that the shorter stream decodes to the same symbols).
"""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..range_coding import decoder as range_decoder
from ..range_coding import shortest_prefix, to_bytes

__all__ = [
    "CaptionCodingError",
    "TokenCaption",
    "NGramModel",
    "CaptionCodec",
    "ZlibCodec",
    "DeflateCodec",
    "ExactTextCodec",
    "TokenCodec",
    "NONE",
    "ZLIB",
    "DEFLATE",
    "EXTENDED",
    "EXACT",
    "TOKENS",
    "CODEC_NAMES",
    "RANGE_CODED",
    "tokenizer_fingerprint",
    "caption_codecs",
    "encode_caption",
    "decode_caption",
    "split_by_image",
]

NONE, ZLIB, DEFLATE, EXTENDED, EXACT, TOKENS = 0, 1, 2, 3, 4, 5
CODEC_NAMES = {NONE: "none", ZLIB: "zlib", DEFLATE: "deflate", EXACT: "exact", TOKENS: "tokens"}
# streams that end where their decoder stops, not where the data ends: a zero-padded cut
# or appended bytes still decode, so the container stores their length (format 3 and 4)
RANGE_CODED = frozenset({EXACT, TOKENS})
_MAX_TEXT_BYTES = 1 << 16  # zlib / DEFLATE
_MAX_EXACT_BYTES = 4096  # the exact-text coder (≈ 50 µs a byte to decode)


class CaptionCodingError(ValueError):
    """A caption stream that cannot be decoded (corrupt, or coded for another model)."""


class TokenCaption(str):
    """A caption known by its token ids: the ids the text encoder reads, and their text.

    The string value is the tokenizer's decoding (lower-cased, normalised spaces for
    CLIP), for display; ``ids`` are the exact token ids, without BOS/EOS/padding.
    """

    ids: tuple[int, ...]

    def __new__(cls, text: str, ids: Iterable[int]):
        obj = super().__new__(cls, text)
        obj.ids = tuple(int(i) for i in ids)
        return obj

    def __reduce__(self):
        return TokenCaption, (str(self), self.ids)


# -- the statistical model ------------------------------------------------------------
@dataclass(frozen=True)
class NGramModel:
    """An interpolated Kneser-Ney n-gram model over symbols ``0 … vocab_size − 1``.

    ``counts[k]`` maps each ``(k+1)``-gram (a tuple) to its count: raw counts at the
    highest order, continuation counts (distinct left neighbours) below it. Sequences
    start with ``order − 1`` copies of ``start`` (a context-only symbol) and end with
    ``end``. ``meta`` describes the fit (corpus, split, tokenizer fingerprint).
    """

    order: int
    vocab_size: int
    start: int
    end: int
    counts: tuple[dict[tuple[int, ...], int], ...]
    discounts: tuple[float, ...]
    meta: dict

    @classmethod
    def fit(
        cls,
        sequences: Iterable[Sequence[int]],
        *,
        order: int,
        vocab_size: int,
        end: int,
        start: int | None = None,
        meta: dict | None = None,
    ) -> NGramModel:
        """Count the n-grams of ``sequences`` (each without its ``end`` symbol)."""
        start = vocab_size if start is None else start
        top: Counter = Counter()
        for seq in sequences:
            padded = [start] * (order - 1) + [int(s) for s in seq] + [end]
            for i in range(order - 1, len(padded)):
                top[tuple(padded[i - order + 1 : i + 1])] += 1
        counts = [top]
        for _ in range(order - 1):  # continuation counts: distinct left neighbours
            lower: Counter = Counter(gram[1:] for gram in counts[0])
            counts.insert(0, lower)
        discounts = []
        for c in counts:  # Ney et al.: D = n1 / (n1 + 2·n2)
            n1 = sum(1 for v in c.values() if v == 1)
            n2 = sum(1 for v in c.values() if v == 2)
            discounts.append(n1 / (n1 + 2 * n2) if n1 + n2 else 0.5)
        return cls(
            order, vocab_size, start, end, tuple(dict(c) for c in counts), tuple(discounts),
            meta or {},
        )  # fmt: skip

    # -- prediction ---------------------------------------------------------------------
    @functools.cached_property
    def _tables(self) -> tuple[dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]], ...]:
        """Per order: context → (next symbols, counts), for fast dense predictions."""
        tables = []
        for c in self.counts:
            grouped: dict[tuple[int, ...], list[tuple[int, int]]] = {}
            for gram, n in c.items():
                grouped.setdefault(gram[:-1], []).append((gram[-1], n))
            tables.append(
                {
                    ctx: (np.array([s for s, _ in v]), np.array([n for _, n in v], np.float64))
                    for ctx, v in grouped.items()
                }
            )
        return tuple(tables)

    def probabilities(self, context: Sequence[int]) -> np.ndarray:
        """``P(next | context)`` over the vocabulary, float64, summing to 1."""
        context = tuple(context)
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for k, (table, discount) in enumerate(zip(self._tables, self.discounts, strict=True)):
            hit = table.get(context[len(context) - k :] if k else ())
            if hit is None:
                continue
            symbols, counts = hit
            total = counts.sum()
            p *= discount * len(symbols) / total
            p[symbols] += np.maximum(counts - discount, 0.0) / total
        return p

    def contexts(self, symbols: Sequence[int]) -> Iterable[tuple[int, ...]]:
        """The context of each symbol of ``symbols`` (``end`` included by the caller)."""
        history = [self.start] * (self.order - 1) + list(symbols)
        for i in range(len(symbols)):
            yield tuple(history[i : i + self.order - 1])

    def bits(self, seq: Sequence[int]) -> float:
        """Ideal code length of ``seq`` plus its end symbol, in bits."""
        symbols = [*seq, self.end]
        return -sum(
            np.log2(self.probabilities(ctx)[s])
            for ctx, s in zip(self.contexts(symbols), symbols, strict=True)
        )

    # -- storage --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write a compressed ``.npz`` (n-grams as uint16/uint32 arrays, meta as JSON)."""
        dtype = np.uint16 if self.vocab_size < 1 << 16 else np.uint32
        arrays = {}
        for k, c in enumerate(self.counts):
            grams = sorted(c)
            arrays[f"grams{k}"] = np.array(grams, dtype).reshape(len(grams), k + 1)
            arrays[f"counts{k}"] = np.array([c[g] for g in grams], np.uint32)
        header = {
            "order": self.order,
            "vocab_size": self.vocab_size,
            "start": self.start,
            "end": self.end,
            "discounts": list(self.discounts),
            "meta": self.meta,
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> NGramModel:
        with np.load(path) as z:
            header = json.loads(z["header"].tobytes())
            counts = tuple(
                dict(
                    zip(map(tuple, z[f"grams{k}"].tolist()), z[f"counts{k}"].tolist(), strict=True)
                )
                for k in range(header["order"])
            )
        return cls(
            header["order"], header["vocab_size"], header["start"], header["end"], counts,
            tuple(header["discounts"]), header["meta"],
        )  # fmt: skip

    def digest(self) -> str:
        """SHA-256 of the model's content (hex), recorded by benchmarks and tests."""
        h = hashlib.sha256()
        for c in self.counts:
            for gram in sorted(c):
                h.update(repr((gram, c[gram])).encode())
        h.update(repr((self.order, self.vocab_size, self.start, self.end)).encode())
        return h.hexdigest()


# -- arithmetic coding ------------------------------------------------------------------
def _categorical(p: np.ndarray):
    import constriction  # a compiled module: submodules are attributes, not importable

    return constriction.stream.model.Categorical(p, perfect=False)


def _decode_symbols(data: bytes, model: NGramModel, max_symbols: int) -> list[int]:
    decoder = range_decoder(data)
    out: list[int] = []
    history = [model.start] * (model.order - 1)
    while True:
        try:
            symbol = int(decoder.decode(_categorical(model.probabilities(history[len(out) :]))))
        except (AssertionError, ValueError, RuntimeError):  # constriction: invalid data
            raise CaptionCodingError("caption stream is corrupt or for another model") from None
        if symbol == model.end:
            return out
        out.append(symbol)
        history.append(symbol)
        if len(out) > max_symbols:
            raise CaptionCodingError("caption stream does not end (corrupt or another model)")


def _encode_symbols(seq: Sequence[int], model: NGramModel) -> bytes:
    import constriction

    symbols = [*seq, model.end]
    if any(not 0 <= s < model.vocab_size for s in symbols):
        raise ValueError(f"symbols must lie in 0..{model.vocab_size - 1}")
    encoder = constriction.stream.queue.RangeEncoder()
    for ctx, s in zip(model.contexts(symbols), symbols, strict=True):
        encoder.encode(s, _categorical(model.probabilities(ctx)))
    seq = list(seq)
    return shortest_prefix(to_bytes(encoder), lambda d: _decodes_to(d, seq, model))


def _decodes_to(data: bytes, seq: list[int], model: NGramModel) -> bool:
    try:
        return _decode_symbols(data, model, len(seq)) == seq
    except CaptionCodingError:
        return False


# -- codecs ------------------------------------------------------------------------------
class CaptionCodec:
    """Caption ↔ bytes. ``id`` is what the bitstream header stores."""

    id: int
    name: str

    def encode(self, caption: str) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> str:
        raise NotImplementedError


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CaptionCodingError("caption is not valid UTF-8") from None


class ZlibCodec(CaptionCodec):
    """zlib at level 9, the paper's reference ("Lempel-Ziv coding", §4.4)."""

    id, name, _wbits = ZLIB, "zlib", zlib.MAX_WBITS

    def encode(self, caption: str) -> bytes:
        deflater = zlib.compressobj(9, zlib.DEFLATED, self._wbits)
        return deflater.compress(caption.encode("utf-8")) + deflater.flush()

    def decode(self, data: bytes) -> str:
        inflater = zlib.decompressobj(self._wbits)
        try:
            text = inflater.decompress(data, _MAX_TEXT_BYTES)
        except zlib.error as e:
            raise CaptionCodingError(f"caption bytes do not inflate: {e}") from None
        if not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
            raise CaptionCodingError("caption stream is truncated or has trailing bytes")
        return _utf8(text)


class DeflateCodec(ZlibCodec):
    """Raw DEFLATE: zlib's stream without its 2-byte header and 4-byte checksum."""

    id, name, _wbits = DEFLATE, "deflate", -15


class ExactTextCodec(CaptionCodec):
    """The UTF-8 bytes of any string under a byte n-gram model; exact round trip."""

    id, name = EXACT, "exact"

    def __init__(self, model: NGramModel | None = None):
        self.model = model or _shipped("coco_bytes")

    def encode(self, caption: str) -> bytes:
        data = caption.encode("utf-8")
        if len(data) > _MAX_EXACT_BYTES:
            raise ValueError(f"caption of {len(data)} bytes is over {_MAX_EXACT_BYTES}")
        return _encode_symbols(data, self.model)

    def decode(self, data: bytes) -> str:
        return _utf8(bytes(_decode_symbols(data, self.model, _MAX_EXACT_BYTES)))


def tokenizer_fingerprint(tokenizer) -> str:
    """First 16 hex digits of the SHA-256 of the tokenizer's vocabulary (token → id)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in vocab).encode()).hexdigest()[:16]


class TokenCodec(CaptionCodec):
    """The token ids a text encoder reads, under a token n-gram model.

    ``encode`` tokenizes without special tokens and keeps the first
    ``model_max_length − 2`` ids (what the encoder reads between BOS and EOS);
    ``decode`` returns those ids as a :class:`TokenCaption`.
    """

    id, name = TOKENS, "tokens"

    def __init__(self, tokenizer, model: NGramModel | None = None):
        self.model = model or _shipped("coco_clip_tokens")
        fitted_for = self.model.meta.get("tokenizer")
        if fitted_for != tokenizer_fingerprint(tokenizer):
            raise CaptionCodingError(
                f"the token model was fitted for tokenizer {fitted_for}; this model's "
                f"tokenizer is {tokenizer_fingerprint(tokenizer)}"
            )
        self.tokenizer = tokenizer
        self.max_tokens = tokenizer.model_max_length - 2

    def ids(self, caption: str) -> list[int]:
        return self.tokenizer(
            caption, add_special_tokens=False, truncation=True, max_length=self.max_tokens
        ).input_ids

    def encode(self, caption: str) -> bytes:
        return _encode_symbols(self.ids(caption), self.model)

    def decode(self, data: bytes) -> TokenCaption:
        ids = _decode_symbols(data, self.model, self.max_tokens)
        return TokenCaption(self.tokenizer.decode(ids).strip(), ids)


@functools.cache
def _shipped(name: str) -> NGramModel:
    with resources.as_file(resources.files(__package__) / f"{name}.npz") as path:
        return NGramModel.load(path)


@functools.lru_cache(maxsize=8)
def _token_codec(tokenizer) -> TokenCodec | None:
    try:
        return TokenCodec(tokenizer)
    except CaptionCodingError:
        return None


def caption_codecs(tokenizer=None, use: Sequence[str] | None = None) -> dict[int, CaptionCodec]:
    """The codecs available to a model with ``tokenizer``, by id.

    ``tokens`` is included when the shipped token model was fitted for ``tokenizer``.
    ``use`` keeps only the named codecs (e.g. ``["exact"]`` for verbatim captions).
    """
    codecs: list[CaptionCodec] = [ZlibCodec(), DeflateCodec(), ExactTextCodec()]
    if tokenizer is not None and (tok := _token_codec(tokenizer)) is not None:
        codecs.append(tok)
    if use is not None:
        unknown = set(use) - set(CODEC_NAMES.values())
        if unknown:
            raise ValueError(f"unknown caption codec(s) {sorted(unknown)}")
        missing = set(use) - {c.name for c in codecs}
        if missing:
            raise ValueError(f"caption codec(s) {sorted(missing)} do not apply to this model")
        codecs = [c for c in codecs if c.name in use]
    return {c.id: c for c in codecs}


def encode_caption(
    caption: str | None, codecs: dict[int, CaptionCodec] | None = None
) -> tuple[int, bytes]:
    """``(codec id, bytes)``: the shortest of ``codecs`` (default: zlib, deflate, exact)."""
    if caption is None:
        return NONE, b""
    codecs = codecs if codecs is not None else caption_codecs()
    coded, errors = [], []
    for cid, codec in codecs.items():
        try:
            coded.append((codec.encode(caption), cid))
        except ValueError as e:  # e.g. too long for the exact-text coder
            errors.append(f"{codec.name}: {e}")
    if not coded:
        raise ValueError(f"no caption codec could code the caption ({'; '.join(errors)})")
    data, cid = min(coded, key=lambda dc: (len(dc[0]), dc[1]))
    return cid, data


def decode_caption(
    codec_id: int, data: bytes, codecs: dict[int, CaptionCodec] | None = None
) -> str | None:
    """The caption of a stream coded with codec ``codec_id``."""
    if codec_id == NONE:
        if data:
            raise CaptionCodingError(f"{len(data)} trailing bytes after the indices")
        return None
    codecs = codecs if codecs is not None else caption_codecs()
    if codec_id not in codecs:
        if codec_id == TOKENS:
            raise CaptionCodingError(
                "the caption was coded as token ids of a tokenizer this model does not have"
            )
        raise CaptionCodingError(f"caption codec {codec_id} is unknown to this perco")
    return codecs[codec_id].decode(data)


def split_by_image(image_ids: Iterable[int], held_out: float = 0.2) -> set[int]:
    """The held-out image ids: a fixed hash of each id, so every caption of an image
    falls on the same side and the split never depends on the corpus order."""
    cut = int(held_out * 2**32)
    return {
        i
        for i in set(image_ids)
        if int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:4], "big") < cut
    }
