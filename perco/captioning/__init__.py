"""The global context ``z_g``: captioners, the caption pre-pass and caption coding.

* :mod:`.captioners` — BLIP-2 (PerCo's), any transformers image-to-text model, captions
  from a file or COCO ground truth, or none; heavy models load lazily.
* :mod:`.prepass` — ``perco-caption``: caption a folder or webdataset shards once.
* :mod:`.text_codec` — lossless caption codecs (zlib, raw DEFLATE, an exact-text coder,
  and a token-id coder for the text encoder's tokenizer) with their header ids.
"""

from .captioners import (
    DEFAULT_BLIP2,
    Blip2Captioner,
    Captioner,
    FileCaptions,
    GroundTruthCaptions,
    NoCaptions,
    VisionLanguageCaptioner,
    load_captioner,
)
from .text_codec import TokenCaption, caption_codecs, decode_caption, encode_caption

__all__ = [
    "DEFAULT_BLIP2",
    "Blip2Captioner",
    "Captioner",
    "FileCaptions",
    "GroundTruthCaptions",
    "NoCaptions",
    "VisionLanguageCaptioner",
    "load_captioner",
    "TokenCaption",
    "caption_codecs",
    "decode_caption",
    "encode_caption",
]
