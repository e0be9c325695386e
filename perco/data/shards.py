"""webdataset shards: write them from an image folder, read them for training.

A sample holds the original encoded image bytes under its extension (``jpg``, ``png``,
...) and, when known, the caption under ``txt``. Reading decodes, crops (random
position and flip, seeded per sample key) and skips undecodable samples, logging them.

Resuming on shards skips to the sample offset: the stream of an epoch is a function of
the seed and the epoch, and the trainer fast-forwards it by the batches already seen
(they are read and decoded again, not trained on).
"""

from __future__ import annotations

import io
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import IMAGE_SUFFIXES, read_captions
from .transforms import crop

__all__ = ["write_shards", "shard_dataset"]

log = logging.getLogger(__name__)


def write_shards(
    folder: str | os.PathLike,
    pattern: str,
    captions: str | os.PathLike | None = None,
    max_count: int = 1000,
) -> int:
    """Pack every image under ``folder`` into shards named by ``pattern`` (e.g.
    ``out/train-%06d.tar``); returns the number of samples written.

    Captions come from a captions file (JSON or ``name<TAB>caption`` lines).
    """
    import webdataset as wds

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    names = read_captions(captions) if captions else {}
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0) as sink:
        for path in files:
            rel = path.relative_to(folder).with_suffix("")
            sample = {
                "__key__": str(rel).replace(".", "_"),
                path.suffix.lower().lstrip("."): path.read_bytes(),
            }
            caption = names.get(path.name, names.get(path.stem))
            if caption is not None:
                sample["txt"] = caption
            sink.write(sample)
    return len(files)


def _decoder(crop_size: int, seed: int, random_crop: bool, flip: bool):
    def decode(sample: dict) -> dict | None:
        key = sample["__key__"]
        data = next((sample[k] for k in sample if "." + k in IMAGE_SUFFIXES), None)
        try:
            if data is None:
                raise ValueError("no image field")
            with Image.open(io.BytesIO(data)) as img:
                array = np.array(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:
            log.warning("skipping undecodable sample %s: %s", key, e)
            return None
        image = torch.from_numpy(array).permute(2, 0, 1).float() / 255
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())]) if random_crop else None
        caption = sample.get("txt")
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        return {"image": crop(image, crop_size, rng, flip), "caption": caption, "key": key}

    return decode


def shard_dataset(
    urls: str | list[str],
    crop_size: int = 512,
    random_crop: bool = True,
    flip: bool = True,
    shuffle: int = 1000,
    seed: int = 0,
):
    """An iterable dataset over shards (brace patterns such as ``shard-{000..099}.tar``)."""
    return sample_stream(urls, shuffle, seed).map(_decoder(crop_size, seed, random_crop, flip))


def sample_stream(urls: str | list[str], shuffle: int, seed: int):
    """The raw samples of shards, split across ranks and dataloader workers.

    Unreadable shards and samples are skipped with a warning. With ``shuffle`` the shard
    order and a buffer of that many samples are shuffled with ``seed``.
    """
    import random

    import webdataset as wds

    dataset = wds.WebDataset(
        urls,
        handler=wds.warn_and_continue,
        shardshuffle=100 if shuffle else False,
        nodesplitter=wds.split_by_node,
        seed=seed,
        empty_check=False,
    )
    if shuffle:
        dataset = dataset.shuffle(shuffle, rng=random.Random(seed))
    return dataset
