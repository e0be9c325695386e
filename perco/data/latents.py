"""Latent pre-pass: store frozen-autoencoder latents of fixed crops in webdataset shards.

Big runs spend much of each step in the frozen autoencoder's encoder. When the crops are
fixed (centre crops, no flips), their latents never change, so they can be computed once:
``write_latent_shards`` stores them (``latent.npy``, float16) with the caption (``txt``)
and a ``json`` record of the autoencoder, and ``latent_shard_dataset`` reads them back.
It does not apply to random crops or flips, which need pixels at every step, nor to the
LPIPS term, which compares with the image.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import torch

from ..models.autoencoders import Autoencoder

__all__ = ["write_latent_shards", "latent_shard_dataset"]

log = logging.getLogger(__name__)


@torch.no_grad()
def write_latent_shards(
    autoencoder: Autoencoder,
    dataset,
    pattern: str,
    batch_size: int = 16,
    max_count: int = 1000,
) -> int:
    """Encode every sample of ``dataset`` (fixed crops) and write shards; returns the count.

    ``dataset`` yields ``{"image", "caption", "key"}`` like :class:`~perco.data.ImageFolder`
    with ``random_crop=False``; unreadable samples (``None``) are skipped.
    """
    import webdataset as wds

    if getattr(dataset, "random_crop", False):
        raise ValueError(
            "latent pre-pass needs fixed crops: build the dataset with random_crop=False"
        )
    from pathlib import Path

    from .folder import collate

    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    device = next(autoencoder.parameters()).device
    meta = {
        "autoencoder": autoencoder.name,
        "channels": autoencoder.latent_channels,
        "factor": autoencoder.factor,
    }
    written = 0
    samples = (dataset[i] for i in range(len(dataset)))
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0) as sink:
        while batch := [s for _, s in zip(range(batch_size), samples, strict=False)]:
            batch = collate(batch)
            if not batch["keys"]:
                continue
            latents = autoencoder.encode_pixels(batch["images"].to(device)).float().cpu()
            for key, caption, latent in zip(batch["keys"], batch["captions"], latents, strict=True):
                buffer = io.BytesIO()
                np.save(buffer, latent.numpy().astype(np.float16), allow_pickle=False)
                sample = {
                    "__key__": key.replace(".", "_"),
                    "latent.npy": buffer.getvalue(),
                    "json": json.dumps({**meta, "crop": list(batch["images"].shape[-2:])}),
                }
                if caption is not None:
                    sample["txt"] = caption
                sink.write(sample)
                written += 1
    return written


def _decode(sample: dict, epoch: int) -> dict | None:
    try:
        latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
    except (KeyError, ValueError, OSError) as e:
        log.warning("skipping undecodable latent sample %s: %s", sample.get("__key__"), e)
        return None
    caption = sample.get("txt")
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    return {
        "latent": torch.from_numpy(latent.astype(np.float32)),
        "caption": caption,
        "key": sample["__key__"],
    }


def latent_shard_dataset(urls: str | list[str], shuffle: int = 1000, seed: int = 0):
    """Read shards written by :func:`write_latent_shards`, split across ranks and workers
    as :class:`~perco.data.shards.ShardStream` plans them."""
    from .shards import ShardStream

    return ShardStream(urls, _decode, shuffle, seed)
