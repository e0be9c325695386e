"""Images ↔ ``.perco`` files with a PerCo model (the bitstream of :mod:`perco.bitstream`).

``compress`` encodes a batch of same-size images and writes one file per image;
``decompress`` parses any number of files, groups them by padded size and decodes each
group in batches. bpp comes from the real byte count of each file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import bitstream
from .bitstream import Breakdown, CompressedImage
from .captioning import text_codec
from .models.index_prior import UniformPrior
from .models.perco import Capability, PerCo
from .timing import StageTimer, stage
from .types import EncodedImages

__all__ = [
    "compress",
    "decompress",
    "parse",
    "file_fingerprint",
    "min_image_size",
    "check_image_size",
]


def file_fingerprint(model: PerCo) -> bytes:
    """The fingerprint a model's files carry: its own, or for a one-step student its
    teacher's (the same frozen encoder made the indices; see ``PerCoConfig``)."""
    fp = model.config.file_fingerprint
    return bytes.fromhex(fp) if fp else model.fingerprint


def min_image_size(model: PerCo) -> int:
    """Smallest side a rate accepts: one hyper-latent cell (e.g. 64 px at ×8 on SD)."""
    return model.cell


def check_image_size(model: PerCo, height: int, width: int) -> None:
    side = min_image_size(model)
    if height < side or width < side:
        raise ValueError(
            f"image {width}x{height} is smaller than rate {model.rate.name}'s minimum of "
            f"{side}x{side}"
        )


def compress(
    model: PerCo,
    images: torch.Tensor,
    captions: Sequence[str | None] | None = None,
    *,
    seed: int = bitstream.DEFAULT_SEED,
    crc: bool = False,
    latents: torch.Tensor | None = None,
    caption_codecs: Sequence[str] | None = None,
    timer: StageTimer | None = None,
    keep: float = 1.0,
    uniform: bool = False,
) -> list[tuple[bytes, Breakdown]]:
    """Encode ``(B, 3, H, W)`` images in ``[0, 1]``; returns each file's bytes and breakdown.

    ``latents``: precomputed autoencoder latents of the padded images (see
    :meth:`PerCo.encode`). ``caption_codecs``: names of the caption codecs to choose from
    (the shortest is written; default: all that apply to the model, see
    :func:`~perco.captioning.text_codec.caption_codecs`); ``["exact"]`` keeps the caption
    text verbatim. The indices are coded with the model's :attr:`~PerCo.prior`
    (``uniform``: packed uniformly even when it has a learned one); ``keep < 1``
    transmits that share of them only (hybrid mode, learned prior only)."""
    check_image_size(model, *images.shape[-2:])
    if model.config.local != "quantized":
        raise ValueError(
            f"this model is an ablation without a bitstream (local={model.config.local!r}); "
            "perco-eval measures it directly"
        )
    encoded = model.encode(images, captions, latents=latents, timer=timer)
    codecs = text_codec.caption_codecs(model.tokenizer, caption_codecs)
    pq = model.global_pq
    prior = UniformPrior(model.rate.codebook_size) if uniform else model.prior
    if keep != 1 and prior.coding == 0:
        raise ValueError("the hybrid mode (keep < 1) needs a model with a fitted index prior")
    indices = encoded.indices.cpu().numpy()
    with stage(timer, "index coding"):
        streams = prior.encode(indices, keep)  # the whole batch through the prior at once
    out = []
    for i, (caption, size) in enumerate(zip(encoded.captions, encoded.sizes, strict=True)):
        codes = None if encoded.global_codes is None else encoded.global_codes[i].cpu().numpy()
        image = CompressedImage(
            indices[i], caption, size, model.rate, seed, global_codes=codes, keep=keep
        )
        out.append(
            bitstream.write(
                image,
                fingerprint=file_fingerprint(model),
                latent_factor=model.autoencoder.factor,
                crc=crc,
                caption_codecs=codecs,
                global_codebook_size=None if pq is None else pq[1],
                prior=prior,
                index_stream=streams[i],
            )
        )
    return out


def parse(model: PerCo, data: bytes) -> tuple[CompressedImage, Breakdown]:
    """Read one file for ``model``; raises :class:`~perco.bitstream.BitstreamError`."""
    return bitstream.read(
        data,
        fingerprint=file_fingerprint(model),
        rate=model.rate,
        latent_factor=model.autoencoder.factor,
        caption_codecs=text_codec.caption_codecs(model.tokenizer),
        global_pq=model.global_pq,
        prior=model.index_prior,
    )


@dataclass
class _Item:
    position: int
    image: CompressedImage


def decompress(
    model: PerCo,
    images: Sequence[CompressedImage],
    *,
    batch_size: int = 8,
    steps: int | None = None,
    guidance: str | None = None,
    guidance_scale: float | None = None,
    timer: StageTimer | None = None,
    progress=None,
    coarse: bool = False,
    timestep_spacing: str | None = None,
) -> list[torch.Tensor]:
    """Decode parsed files; returns ``(3, H, W)`` images in ``[0, 1]`` in input order.

    Images that pad to the same size are decoded together, ``batch_size`` at a time; each
    uses its own file's seed, so a result does not depend on how files were batched.
    ``coarse``: the SPRDiff-style model's coarse reconstructions instead (no diffusion).
    ``timestep_spacing`` replaces the model's for this decode (see :meth:`PerCo.decode`).
    """
    if coarse and not model.capabilities & Capability.COARSE:
        raise ValueError(f"a {model.variant} model has no coarse reconstruction")
    groups: dict[tuple[int, int], list[_Item]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[model.padded_size(*image.size)].append(_Item(i, image))
    results: list[torch.Tensor | None] = [None] * len(images)
    for padded, items in groups.items():
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            # files of one group may code different grids: bring each to the padded grid
            indices = [
                model.pad_indices(torch.from_numpy(it.image.indices)[None], padded)[0]
                for it in batch
            ]
            codes = [it.image.global_codes for it in batch]
            encoded = EncodedImages(
                indices=torch.stack(indices),
                captions=[it.image.caption for it in batch],
                sizes=[it.image.size for it in batch],
                padded_size=padded,
                rate=model.rate,
                global_codes=None if codes[0] is None else torch.as_tensor(np.stack(codes)),
            )
            generators = [torch.Generator().manual_seed(it.image.seed) for it in batch]
            decoded = (
                model.coarse(encoded)
                if coarse
                else model.decode(
                    encoded,
                    steps=steps,
                    guidance=guidance,
                    guidance_scale=guidance_scale,
                    generator=generators,
                    timestep_spacing=timestep_spacing,
                    timer=timer,
                )
            )
            for it, img in zip(batch, decoded, strict=True):
                results[it.position] = img
            if progress is not None:
                progress.update(len(batch))
    return results
