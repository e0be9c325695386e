"""Classic image codecs as evaluation references, rate-matched per image.

    perco-eval ... eval.references=[jpeg,webp,avif,jxl,hevc]

Each codec is used through the library that implements it (Pillow, ``imagecodecs``,
``pillow-heif``) with its speed setting and chroma subsampling fixed and recorded.
:func:`rate_match` gives an image the highest quality whose real file, container
included, fits a target bpp; where even the lowest quality does not fit, the image
*cannot reach* the rate and is recorded with the smallest bpp it can reach, never at a
higher rate.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import torch

from ..io import to_pil

__all__ = [
    "ClassicCodec", "CodecUnavailable", "Match", "CODECS", "codec_label", "codec_series",
    "rate_matched", "get_codec", "rate_match",
]  # fmt: skip

EXTRA = "pip install 'perco[codecs]'"


class CodecUnavailable(ImportError):
    """A reference codec's library is not installed."""


@dataclass(frozen=True)
class ClassicCodec:
    """A lossy codec with an integer quality: a higher quality never makes a smaller file
    on the images it is used on (the rate search assumes it; :func:`rate_match` checks the
    step it stops at)."""

    name: str
    label: str
    package: str  # the distribution that encodes, for its version and the install hint
    qualities: range
    settings: dict
    container: str
    encode_array: Callable[[np.ndarray, int], bytes] = field(repr=False)
    decode_array: Callable[[bytes], np.ndarray] = field(repr=False)

    def encode(self, image: torch.Tensor, quality: int) -> bytes:
        """``image`` (3, H, W) in [0, 1] as 8-bit RGB, through the codec: the file's bytes."""
        return self.encode_array(np.asarray(to_pil(image)), quality)

    def decode(self, data: bytes) -> torch.Tensor:
        """A file's bytes back to a (3, H, W) float tensor in [0, 1]."""
        array = np.array(self.decode_array(data)[..., :3])
        return torch.from_numpy(array).permute(2, 0, 1).float() / 255

    def describe(self) -> dict:
        """What a result must say about the codec: library and version, settings, container."""
        return {
            "library": f"{self.package} {metadata.version(self.package)}",
            **self.settings,
            "quality range": f"{self.qualities.start}..{self.qualities.stop - 1}",
            "container": self.container,
        }


def _pillow(fmt: str, **options) -> tuple[Callable, Callable]:
    from PIL import Image

    def encode(array, quality):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, quality=quality, **options)
        return buffer.getvalue()

    def decode(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    return encode, decode


def _imagecodecs(kind: str, **options) -> tuple[Callable, Callable]:
    import imagecodecs

    encode = getattr(imagecodecs, f"{kind}_encode")
    return (lambda array, quality: bytes(encode(array, level=quality, **options)),
            getattr(imagecodecs, f"{kind}_decode"))  # fmt: skip


def _hevc(**options) -> tuple[Callable, Callable]:
    import pillow_heif

    def encode(array, quality):
        buffer = io.BytesIO()
        pillow_heif.from_bytes("RGB", array.shape[1::-1], array.tobytes()).save(
            buffer, quality=quality, **options
        )
        return buffer.getvalue()

    def decode(data):
        return np.asarray(pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True))

    return encode, decode


def _jpeg():
    return _pillow("JPEG", subsampling="4:2:0")


def _webp():
    return _imagecodecs("webp", lossless=False, method=4, numthreads=1)


def _avif():
    import imagecodecs

    formats = imagecodecs.AVIF.PIXEL_FORMAT
    return _imagecodecs("avif", speed=6, pixelformat=formats.YUV420, numthreads=1)


def _jxl():
    return _imagecodecs("jpegxl", effort=7, numthreads=1)


# name: (label, package, qualities, settings, container, codec factory)
_TABLE = {
    "jpeg": ("JPEG", "pillow", range(1, 96), {"chroma": "4:2:0", "encoder": "libjpeg (Pillow)"},
             "JFIF (headers and tables: a flat 16×16 image takes 629 B)", _jpeg),
    "webp": ("WebP", "imagecodecs", range(0, 101), {"chroma": "4:2:0 (lossy WebP)", "method": 4},
             "RIFF/WebP (a flat 16×16 image: 42 B)", _webp),
    "avif": ("AVIF", "imagecodecs", range(0, 101),
             {"encoder": "libavif (aom)", "speed": 6, "chroma": "4:2:0"},
             "HEIF/ISOBMFF (a flat 16×16 image: 306 B)", _avif),
    "jxl": ("JPEG-XL", "imagecodecs", range(0, 101),
            {"encoder": "libjxl", "effort": 7, "chroma": "none (XYB, no subsampling)"},
            "bare JPEG-XL codestream (a flat 16×16 image: 54 B)", _jxl),
    "hevc": ("HEVC intra (HEIF)", "pillow-heif", range(0, 101),
             {"encoder": "libheif x265 (BPG's HEVC intra core)", "preset": "x265 default",
              "chroma": "4:2:0"},
             "HEIF/ISOBMFF (a flat 16×16 image: 444 B)", _hevc),
}  # fmt: skip
CODECS = tuple(_TABLE)


def codec_label(name: str) -> str:
    """The codec's display name, without importing its library."""
    return _TABLE[name][0] if name in _TABLE else name


def codec_series(codec: str, target_bpp: float) -> str:
    return f"{codec}@{target_bpp:.4f}"


def rate_matched(doc: dict, complete: bool = False):
    """``(codec, target as named, series, summary)`` of a results document's rate-matched
    classic-codec rows (:func:`codec_series`); ``complete``: only the targets every image
    reached (a row over some of the images is biased as a curve point)."""
    for series, row in doc.get("references", {}).items():
        if "target_bpp" in row and (not complete or (row["images"] and not row["cannot_reach"])):
            codec, target = series.split("@")
            yield codec, target, series, row


def get_codec(name: str) -> ClassicCodec:
    """The codec called ``name`` (one of :data:`CODECS`); a one-line error naming the extra
    to install when its library is missing."""
    if name not in _TABLE:
        raise ValueError(f"unknown reference codec {name!r}; known: {', '.join(CODECS)}")
    label, package, qualities, settings, container, factory = _TABLE[name]
    try:
        encode, decode = factory()
    except ImportError as e:
        raise CodecUnavailable(f"{label} needs {package} ({e.name} is missing): {EXTRA}") from None
    return ClassicCodec(name, label, package, qualities, settings, container, encode, decode)


@dataclass
class Match:
    """The outcome of :func:`rate_match` for one image."""

    target_bpp: float
    quality: int  # the quality chosen; without a match, the lowest
    data: bytes  # the file at that quality
    bpp: float  # 8 × file bytes / pixels
    encodes: int  # files made to find it

    @property
    def reached(self) -> bool:
        return self.bpp <= self.target_bpp


def rate_match(codec: ClassicCodec, image: torch.Tensor, target_bpp: float) -> Match:
    """The highest quality whose file fits ``target_bpp``, by binary search over the codec's
    qualities; without one, the lowest quality's file (``reached`` is false).

    The quality found has a file at most ``target_bpp`` and the next quality up, when there
    is one, a file over it: the search encodes both."""
    array = np.asarray(to_pil(image))
    pixels = array.shape[0] * array.shape[1]
    files = {}

    def bpp(q):
        if q not in files:
            files[q] = codec.encode_array(array, q)
        return 8 * len(files[q]) / pixels

    lo, hi = codec.qualities.start, codec.qualities.stop  # bpp(lo) fits, bpp(hi) does not
    if bpp(lo) > target_bpp:
        return Match(target_bpp, lo, files[lo], bpp(lo), len(files))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bpp(mid) <= target_bpp else (lo, mid)
    return Match(target_bpp, lo, files[lo], bpp(lo), len(files))
