"""The ``.perco`` file format: everything a decoder needs, in as few bytes as possible.

At 0.002 bpp a 512×512 image costs about 64 bytes, so one header byte is ≈2% of the
file; the default header is 8 bytes. Format version 1, byte by byte (big-endian)::

    byte 0      magic 0xA7
    byte 1      bits 7-5  format version (1; 0 is never valid)
                bit  4    a sampler seed follows (absent: the default seed, 0)
                bit  3    a CRC-16 follows
                bit  2    large image: sizes take 22 bits each instead of 14
                bits 1-0  caption codec: 0 none, 1 zlib, 2 raw DEFLATE, 3 extended
                          (a codec id byte follows)
    bytes 2-3   model fingerprint: the first two bytes of the checkpoint's SHA-256
                fingerprint (config and weights), so a file is never decoded by the
                wrong model
    bytes 4-7   rate id (4 bits) | height − 1 (14 bits) | width − 1 (14 bits)
                (large image: bytes 4-9, rate id (4) | height − 1 (22) | width − 1 (22))

    then, only where byte 1 says so, in this order:
      seed      unsigned LEB128 varint (1 byte below 128, 2 below 16384, ...)
      codec id  1 byte: caption codec for ids beyond raw DEFLATE (4 exact text, 5 token
                ids; :mod:`perco.captioning.text_codec`), or 6: the global context is
                not a caption but the product-quantizer codes of an image embedding
                (PerCo-Image)
      CRC-16    2 bytes: CRC-CCITT (``binascii.crc_hqx``, initial value 0) of every
                other byte of the file, header and payload

    payload:
      indices   the ``h×w`` hyper-latent indices in row-major order, packed in mixed
                radix (:func:`pack_indices`): ``ceil(h·w·log2 V)`` bits (chunks of
                :func:`perco.rates.chunk_length` indices for very large images, each
                losing under one bit), then zero bits up to the next byte, once
      caption   the rest of the file, in the caption codec; with codec id 6, the ``M``
                codes of the image embedding instead, packed like the indices
                (``ceil(M·log2 V)`` bits; ``M`` and ``V`` are the decoding model's)

Versions 2 to 4 change only the payload. The index coding and whether the file's end is
checked follow from the version::

    version  indices                    stream lengths stored
    1        packed (as above)          none: every stream ends where its decoder sees
                                        (a zlib/DEFLATE caption, image codes or nothing)
    2        learned prior (legacy)     the index stream's, only when a caption follows
    3        packed                     the range-coded caption's (exact text, token ids)
    4        learned prior              the index stream's, always; a range-coded caption's

    version 4 payload:
      length    unsigned LEB128 varint: bytes of the index stream
      indices   the prior's range-coded stream (:class:`perco.models.index_prior.ContextPrior`):
                the kept share of the hybrid mode first, then the indices in the prior's
                coding order
      caption   as in version 1, except that a range-coded caption (codec id 4 or 5) is
                preceded by its byte length (varint); version 3 is version 1 with that
                length

A range coder's stream has no end of its own: its decoder pads with zero bytes, so a cut
stream or one with bytes appended still decodes, to other symbols and so to a realistic
image of something else. Every stream of a version 3 or 4 file therefore ends where the
file says: either its decoder checks its own end (packed indices have a fixed length,
zlib and DEFLATE check theirs) or its length is stored, and the streams must end exactly
at the end of the file. A cut or extended file is refused, whatever its length, with or
without a CRC. The cost is the length field: one byte for a stream under 128 bytes, two
under 16 KiB. Writers use version 1 when no stream needs a length (so those files are
byte for byte what they always were), 3 for packed indices with a range-coded caption,
and 4 for every prior-coded file. Versions 1 and 2 with a range-coded last stream are
still read, as written before (the reader cannot check their end:
:func:`end_checked`).

Rate ids index :data:`perco.rates.RATES` in table order (0 = r0.0019 ... 7 = r0.1250);
rungs added later get the next ids; 15 means "the decoding model's own custom rate".
The hyper-latent size follows from the image size, the rate and the model's autoencoder
factor, so it is not stored. The caption is written with the shortest of the codecs the
writer offers (:mod:`perco.captioning.text_codec`): zlib (the paper's reference), raw
DEFLATE, an exact-text arithmetic coder, and — for a model whose tokenizer the shipped
token model was fitted for — the token ids its text encoder reads (≈ 70 bits on COCO
captions against zlib's ≈ 450).

Integrity: the header, the length of every stream and the end of the file are checked on
every read, but a flipped bit inside a payload, or one in the image size that leaves the
hyper-latent grid as it was, still decodes (to other indices, or another crop) unless the
file carries the CRC-16 (2 bytes, ≈0.00004 bpp at 768×512). ``perco compress`` adds it
by default (``--no-crc`` leaves it out); :func:`write` and :func:`perco.codec.compress`
add it only when asked, as the paper's protocol counts no check in the bpp.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .captioning.text_codec import (
    CODEC_NAMES,
    DEFLATE,
    EXTENDED,
    NONE,
    RANGE_CODED,
    ZLIB,
    CaptionCodec,
    CaptionCodingError,
    decode_caption,
    encode_caption,
)
from .rates import RATES, Rate, chunk_length, hyper_latent_size, packed_bits

__all__ = [
    "BitstreamError",
    "CompressedImage",
    "Breakdown",
    "Header",
    "MAGIC",
    "VERSION",
    "HEADER_BYTES",
    "pack_indices",
    "unpack_indices",
    "write",
    "read",
    "read_header",
    "check_model",
    "read_payload",
    "end_checked",
]

MAGIC = 0xA7
VERSION = 4  # the newest version this module reads and writes
UNIFORM_VERSION = 1  # packed indices, every stream self-delimiting
LEGACY_PRIOR_VERSION = 2  # learned prior, end unchecked without a caption (read only)
CHECKED_UNIFORM_VERSION = 3  # packed indices, then a length-prefixed range-coded caption
PRIOR_VERSION = 4  # learned prior, every range-coded stream length-prefixed
_PRIOR_VERSIONS = (LEGACY_PRIOR_VERSION, PRIOR_VERSION)
_CHECKED_VERSIONS = (CHECKED_UNIFORM_VERSION, PRIOR_VERSION)  # every stream's end is known
HEADER_BYTES = 8  # without optional fields
DEFAULT_SEED = 0
CUSTOM_RATE_ID = 15
_RATE_IDS = {name: i for i, name in enumerate(RATES)}
_SMALL_BITS, _LARGE_BITS = 14, 22

CAPTION_NONE, CAPTION_ZLIB, CAPTION_DEFLATE, CAPTION_EXTENDED = NONE, ZLIB, DEFLATE, EXTENDED
GLOBAL_PQ = 6  # extended codec id: product-quantized image embedding (PerCo-Image)
CAPTION_CODECS = {**CODEC_NAMES, GLOBAL_PQ: "image-pq"}


class BitstreamError(ValueError):
    """A file that this library cannot decode, with the reason."""


# -- indices ---------------------------------------------------------------------------
def pack_indices(indices: Sequence[int] | np.ndarray, codebook_size: int) -> bytes:
    """Pack indices in ``[0, V)`` into ``ceil(packed_bits / 8)`` bytes (mixed radix).

    Each chunk is the number ``Σ_i idx_i · V^(k−1−i)`` (first index most significant),
    written in exactly ``ceil(k·log2 V)`` bits; chunks follow each other without
    padding, and zero bits complete the last byte. For ``V = 2^b`` this is the plain
    concatenation of ``b``-bit fields.
    """
    flat = np.asarray(indices, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size})")
    total = packed_bits(flat.size, codebook_size)
    if codebook_size & (codebook_size - 1) == 0:
        b = codebook_size.bit_length() - 1
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        bits = ((flat[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
        return np.packbits(bits).tobytes()
    value, k = 0, chunk_length(codebook_size)
    for start in range(0, flat.size, k):
        chunk = flat[start : start + k].tolist()
        number = 0
        for i in chunk:
            number = number * codebook_size + i
        value = (value << packed_bits(len(chunk), codebook_size)) | number
    pad = -total % 8
    return (value << pad).to_bytes((total + pad) // 8, "big")


def unpack_indices(data: bytes, count: int, codebook_size: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`; ``data`` must be exactly the packed bytes."""
    total = packed_bits(count, codebook_size)
    if len(data) != (total + 7) // 8:
        raise BitstreamError(f"index payload is {len(data)} bytes, expected {(total + 7) // 8}")
    pad = -total % 8
    if pad and data[-1] & ((1 << pad) - 1):
        raise BitstreamError("index payload has non-zero padding bits")
    if codebook_size & (codebook_size - 1) == 0:
        b = codebook_size.bit_length() - 1
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * b]
        weights = 1 << np.arange(b - 1, -1, -1, dtype=np.int64)
        return bits.reshape(count, b).astype(np.int64) @ weights if b else np.zeros(count, np.int64)
    value = int.from_bytes(data, "big") >> pad
    k = chunk_length(codebook_size)
    sizes = [min(k, count - s) for s in range(0, count, k)]
    out = np.empty(count, dtype=np.int64)
    end = count
    for size in reversed(sizes):  # the last chunk sits in the least significant bits
        nbits = packed_bits(size, codebook_size)
        number = value & ((1 << nbits) - 1)
        value >>= nbits
        if number >= codebook_size**size:
            raise BitstreamError("index payload holds a value outside the codebook")
        for j in range(end - 1, end - size - 1, -1):
            number, out[j] = divmod(number, codebook_size)
        end -= size
    return out


@dataclass
class CompressedImage:
    """The content of one ``.perco`` file.

    Attributes:
        indices: ``(h, w)`` hyper-latent indices.
        caption: the global context (``None``: no caption; a
            :class:`~perco.captioning.text_codec.TokenCaption` when read from token ids).
        size: original ``(height, width)``.
        rate: the rung.
        seed: the sampler seed the decoder should use.
        global_codes: ``(M,)`` product-quantizer codes of the image embedding that
            replaces the caption (PerCo-Image), or ``None``.
        keep: share of the indices transmitted (hybrid mode, learned prior only; 64ths);
            the decoder draws the others from the prior with ``seed``.
    """

    indices: np.ndarray
    caption: str | None
    size: tuple[int, int]
    rate: Rate
    seed: int = DEFAULT_SEED
    global_codes: np.ndarray | None = None
    keep: float = 1.0


@dataclass(frozen=True)
class Header:
    """The fixed header plus the optional fields, as read from a file."""

    version: int
    fingerprint: bytes
    rate_id: int
    size: tuple[int, int]
    seed: int
    caption_codec: int
    crc: int | None
    length: int  # bytes from the start of the file to the payload


@dataclass(frozen=True)
class Breakdown:
    """Where the bytes of a file go. All bit counts are exact.

    ``bpp_file`` = 8 · file bytes / (H·W); ``bpp_payload`` = (index + caption bits) /
    (H·W), the paper's definition. ``bpp_uniform``: what the file would weigh with its
    indices packed uniformly (version 1), the rate curves of the paper are drawn with.
    """

    size: tuple[int, int]
    file_bytes: int
    header_bytes: int
    index_bits: int
    padding_bits: int
    caption_bits: int
    caption_codec: str
    index_coding: str = "uniform"
    uniform_file_bytes: int | None = None  # None: the file is uniformly coded
    uniform_index_bits: int | None = None  # log2 V bits per index (None: = index_bits)
    version: int = UNIFORM_VERSION
    crc: bool = False  # the file carries a CRC-16 (counted in file_bytes, not the payload)

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def bpp_file(self) -> float:
        return 8 * self.file_bytes / self.pixels

    @property
    def bpp_payload(self) -> float:
        return (self.index_bits + self.caption_bits) / self.pixels

    @property
    def bpp_uniform(self) -> float:
        uniform = self.file_bytes if self.uniform_file_bytes is None else self.uniform_file_bytes
        return 8 * uniform / self.pixels

    def to_dict(self) -> dict:
        return {
            "height": self.size[0],
            "width": self.size[1],
            "file_bytes": self.file_bytes,
            "bpp_file": self.bpp_file,
            "bpp_payload": self.bpp_payload,
            "header_bytes": self.header_bytes,
            "index_bits": self.index_bits,
            "padding_bits": self.padding_bits,
            "caption_bits": self.caption_bits,
            "caption_codec": self.caption_codec,
            "index_coding": self.index_coding,
            "uniform_index_bits": self.index_bits
            if self.uniform_index_bits is None
            else self.uniform_index_bits,
            "bpp_uniform": self.bpp_uniform,
            "format_version": self.version,
            "crc": self.crc,
        }


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int, field: str = "seed") -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise BitstreamError(f"truncated file: it ends inside the {field}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise BitstreamError(f"{field} field is too long")


def _rate_id(rate: Rate) -> int:
    return _RATE_IDS[rate.name] if RATES.get(rate.name) == rate else CUSTOM_RATE_ID


def write(
    image: CompressedImage,
    *,
    fingerprint: bytes,
    latent_factor: int = 8,
    crc: bool = False,
    caption_codecs: dict[int, CaptionCodec] | None = None,
    global_codebook_size: int | None = None,
    prior=None,
    index_stream: bytes | None = None,
) -> tuple[bytes, Breakdown]:
    """Serialise ``image``; returns the file bytes and their breakdown.

    The caption is written with the shortest of ``caption_codecs`` (see
    :func:`perco.captioning.text_codec.caption_codecs`; default: zlib, raw DEFLATE and
    the exact-text coder, which need no tokenizer). An image with ``global_codes``
    (PerCo-Image) has no caption; ``global_codebook_size`` is ``V`` of those codes.
    ``prior``: the :class:`~perco.models.index_prior.IndexPrior` that codes the indices
    (``None``: uniform packing); ``index_stream``: its output for these indices, when the
    caller already coded a batch.
    """
    height, width = image.size
    h, w = hyper_latent_size(image.rate, height, width, latent_factor)
    indices = np.asarray(image.indices)
    if indices.shape != (h, w):
        raise ValueError(f"expected {h}x{w} indices for {height}x{width}, got {indices.shape}")
    if not (1 <= height <= 1 << _LARGE_BITS and 1 <= width <= 1 << _LARGE_BITS):
        raise ValueError(f"image size {height}x{width} is outside 1..{1 << _LARGE_BITS}")
    if image.seed < 0:
        raise ValueError(f"seed must be non-negative, got {image.seed}")
    if len(fingerprint) < 2:
        raise ValueError("fingerprint needs at least 2 bytes")

    if image.global_codes is not None:
        if image.caption is not None:
            raise ValueError("an image with global embedding codes carries no caption")
        if global_codebook_size is None:
            raise ValueError("writing global embedding codes needs their codebook size")
        codec, caption = GLOBAL_PQ, pack_indices(image.global_codes, global_codebook_size)
    else:
        codec, caption = encode_caption(image.caption, caption_codecs)
    learned = prior is not None and prior.coding != 0
    if image.keep != 1 and not learned:
        raise ValueError("the hybrid mode (keep < 1) needs a model with a fitted index prior")
    if index_stream is None:
        index_stream = (
            prior.encode(indices[None], image.keep)[0]
            if prior is not None
            else pack_indices(indices, image.rate.codebook_size)
        )
    large = max(height, width) > 1 << _SMALL_BITS
    has_seed = image.seed != DEFAULT_SEED
    extended = codec >= CAPTION_EXTENDED
    caption_length = codec in RANGE_CODED
    if learned:
        version = PRIOR_VERSION
    else:
        version = CHECKED_UNIFORM_VERSION if caption_length else UNIFORM_VERSION
    flags = (version << 5) | (has_seed << 4) | (crc << 3) | (large << 2)
    flags |= CAPTION_EXTENDED if extended else codec
    bits = _LARGE_BITS if large else _SMALL_BITS
    fields = (_rate_id(image.rate) << 2 * bits) | ((height - 1) << bits) | (width - 1)
    header = bytes([MAGIC, flags]) + fingerprint[:2] + fields.to_bytes(6 if large else 4, "big")
    if has_seed:
        header += _varint(image.seed)
    if extended:
        header += bytes([codec])
    payload = (_varint(len(index_stream)) if learned else b"") + index_stream
    payload += (_varint(len(caption)) if caption_length else b"") + caption
    if crc:
        header += binascii.crc_hqx(header + payload, 0).to_bytes(2, "big")
    data = header + payload
    return data, _breakdown(data, image.size, version, crc, index_stream, caption, codec,
                            h * w, image.rate.codebook_size)  # fmt: skip


def _index_length(version: int, codec: int) -> bool:
    """Whether a prior-coded file stores its index stream's length: always in version 4,
    in version 2 only when a caption or image codes follow."""
    return version == PRIOR_VERSION or codec != CAPTION_NONE


def _breakdown(data, size, version, crc, stream, caption, codec, count, v) -> Breakdown:
    uniform_bits = packed_bits(count, v)
    learned = version in _PRIOR_VERSIONS
    index_bits = 8 * len(stream) if learned else uniform_bits
    uniform_bytes = None
    if learned:  # the same file with packed indices (version 1 or 3): no index length
        uniform_bytes = len(data) - len(stream) + (uniform_bits + 7) // 8
        uniform_bytes -= len(_varint(len(stream))) if _index_length(version, codec) else 0
    return Breakdown(
        size=size,
        file_bytes=len(data),
        header_bytes=len(data) - len(stream) - len(caption),
        index_bits=index_bits,
        padding_bits=0 if learned else -uniform_bits % 8,
        caption_bits=8 * len(caption),
        caption_codec=CAPTION_CODECS.get(codec, str(codec)),
        index_coding="learned prior" if learned else "uniform",
        uniform_file_bytes=uniform_bytes,
        uniform_index_bits=uniform_bits if learned else None,
        version=version,
        crc=crc,
    )


def read_header(data: bytes) -> Header:
    """Parse and check the header (magic, version, optional fields); no model needed."""
    if not data:
        raise BitstreamError("empty file")
    if data[0] != MAGIC:
        raise BitstreamError(f"not a perco file (magic 0x{data[0]:02X}, expected 0x{MAGIC:02X})")
    if len(data) < HEADER_BYTES:
        raise BitstreamError(f"truncated header ({len(data)} of {HEADER_BYTES} bytes)")
    flags = data[1]
    version = flags >> 5
    if version == 0:
        raise BitstreamError("format version 0 is not valid")
    if version > VERSION:
        raise BitstreamError(f"format version {version} is newer than this perco reads ({VERSION})")
    has_seed, has_crc, large, codec = flags >> 4 & 1, flags >> 3 & 1, flags >> 2 & 1, flags & 3
    bits = _LARGE_BITS if large else _SMALL_BITS
    end = 4 + (6 if large else 4)
    if len(data) < end:
        raise BitstreamError(f"truncated header ({len(data)} of {end} bytes)")
    fields = int.from_bytes(data[4:end], "big")
    mask = (1 << bits) - 1
    size = ((fields >> bits & mask) + 1, (fields & mask) + 1)
    rate_id = fields >> 2 * bits
    pos, seed = end, DEFAULT_SEED
    if has_seed:
        seed, pos = _read_varint(data, pos)
    if codec == CAPTION_EXTENDED:
        if pos >= len(data):
            raise BitstreamError("truncated header (caption codec id)")
        codec, pos = data[pos], pos + 1
        if codec <= CAPTION_EXTENDED:
            raise BitstreamError(f"extended caption codec id {codec} is reserved")
    crc = None
    if has_crc:
        if pos + 2 > len(data):
            raise BitstreamError("truncated header (CRC)")
        crc, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
    return Header(version, bytes(data[2:4]), rate_id, size, seed, codec, crc, pos)


def read(
    data: bytes,
    *,
    fingerprint: bytes,
    rate: Rate,
    latent_factor: int = 8,
    caption_codecs: dict[int, CaptionCodec] | None = None,
    global_pq: tuple[int, int] | None = None,
    prior=None,
) -> tuple[CompressedImage, Breakdown]:
    """Parse a file for the model with this ``fingerprint``, ``rate`` and latent factor.

    ``caption_codecs``: the decoding model's (the ``tokens`` codec needs its tokenizer).
    ``global_pq``: ``(M, V)`` of the model's product quantizer (PerCo-Image).
    ``prior``: the model's learned index prior, if it has one (version 2 files).
    Raises :class:`BitstreamError` for anything that is not a valid file for this model.
    """
    header = read_header(data)
    check_model(header, fingerprint=fingerprint, rate=rate)
    return read_payload(
        data,
        header,
        rate=rate,
        latent_factor=latent_factor,
        caption_codecs=caption_codecs,
        global_pq=global_pq,
        prior=prior,
    )


def check_model(header: Header, *, fingerprint: bytes, rate: Rate) -> None:
    """Check that a file's fingerprint and rate id are those of the decoding model."""
    if header.fingerprint != fingerprint[:2]:
        raise BitstreamError(
            f"made by model {header.fingerprint.hex()}, this model is {fingerprint[:2].hex()}"
        )
    if header.rate_id != _rate_id(rate):
        known = {i: n for n, i in _RATE_IDS.items()}
        name = known.get(header.rate_id, "a custom rate" if header.rate_id == 15 else None)
        if name is None:
            raise BitstreamError(f"rate id {header.rate_id} is unknown")
        raise BitstreamError(f"file is at {name}, this model decodes {rate.name}")


def read_payload(
    data: bytes,
    header: Header,
    *,
    rate: Rate,
    latent_factor: int = 8,
    caption_codecs: dict[int, CaptionCodec] | None = None,
    global_pq: tuple[int, int] | None = None,
    prior=None,
) -> tuple[CompressedImage, Breakdown]:
    """Check the CRC (if any) and parse the indices and caption (or, for PerCo-Image, the
    ``global_pq = (M, V)`` product-quantizer codes) that follow the header; a version 2
    file's indices are decoded with ``prior``."""
    height, width = header.size
    h, w = hyper_latent_size(rate, height, width, latent_factor)
    codec, version = header.caption_codec, header.version
    if version == CHECKED_UNIFORM_VERSION and codec not in RANGE_CODED:
        raise BitstreamError(f"format version 3 carries a range-coded caption, this file's "
                             f"is {CAPTION_CODECS.get(codec, codec)}")  # fmt: skip
    # the layout first: a cut or extended file is refused before any decoding
    learned = version in _PRIOR_VERSIONS
    if learned and (prior is None or prior.coding == 0):
        raise BitstreamError("the file's indices are coded with a learned index prior; "
                             "this model has none")  # fmt: skip
    start = header.length
    if learned and _index_length(version, codec):
        size, start = _read_varint(data, start, "index stream length")
        end = start + size
        if end > len(data):
            raise BitstreamError(f"truncated index stream ({len(data) - start} of {size} bytes)")
    elif learned:  # version 2 without a caption: the stream is the rest of the file
        end = len(data)
    else:
        end = start + (packed_bits(h * w, rate.codebook_size) + 7) // 8
        if len(data) < end:
            raise BitstreamError(f"truncated index payload ({len(data) - start} of "
                                 f"{end - start} bytes)")  # fmt: skip
    stream, caption_start = data[start:end], end
    if codec in RANGE_CODED and version in _CHECKED_VERSIONS:
        size, caption_start = _read_varint(data, end, "caption length")
        if caption_start + size != len(data):
            raise BitstreamError(f"the file is {len(data)} bytes, its streams end at byte "
                                 f"{caption_start + size}: cut or extended")  # fmt: skip
    caption_bytes = data[caption_start:]
    if header.crc is not None:  # after the layout: a cut file is reported as cut
        covered = data[: header.length - 2] + data[header.length :]
        if binascii.crc_hqx(covered, 0) != header.crc:
            raise BitstreamError("CRC mismatch: the file is corrupted")

    keep = 1.0
    if learned:
        flat, code = prior.decode(stream, (h, w), header.seed)
        indices = flat.reshape(-1)
        keep = code / 64 if code else 1.0
    else:
        indices = unpack_indices(stream, h * w, rate.codebook_size)
    caption, codes = None, None
    if codec == GLOBAL_PQ:
        if global_pq is None:
            raise BitstreamError("the file carries an image embedding; this model takes captions")
        codes = unpack_indices(caption_bytes, *global_pq)
    elif global_pq is not None:
        raise BitstreamError("the file carries a caption; this model takes an image embedding")
    else:
        try:
            caption = decode_caption(codec, caption_bytes, caption_codecs)
        except CaptionCodingError as e:
            raise BitstreamError(str(e)) from None
    image = CompressedImage(
        indices.reshape(h, w), caption, (height, width), rate, header.seed, codes, keep
    )
    return image, _breakdown(data, (height, width), version, header.crc is not None, stream,
                             caption_bytes, codec, h * w, rate.codebook_size)  # fmt: skip


def end_checked(header: Header) -> bool:
    """Whether a cut or extended file with this header is always refused: false only for
    files written before version 3 whose last stream is range-coded (a version 2 file
    without a caption, or an exact-text / token-id caption in version 1 or 2)."""
    if header.version in _CHECKED_VERSIONS:
        return True
    if header.caption_codec in RANGE_CODED:
        return False
    return header.version == UNIFORM_VERSION or header.caption_codec != CAPTION_NONE
