"""webdataset shards: write them from an image folder, read them for training.

A sample holds the original encoded image bytes under its extension (``jpg``, ``png``,
...) and, when known, the caption under ``txt``. Reading decodes, crops (random
position and flip, seeded per epoch and sample key) and skips undecodable samples,
logging them.

**How shards are split across processes** (:class:`ShardStream`). webdataset's own
``split_by_node`` hands whole shards to ranks, so ranks whose shards hold fewer samples
run out first and the others wait forever in a collective. Here every epoch is planned
from the sample count of each shard (read once from the tar headers):

1. the shard order is shuffled with ``(seed, epoch)``;
2. the concatenated samples are cut into one contiguous, equal range per rank, a whole
   number of (batch × grad_accum) units long; the fewer than ``world × unit`` samples
   left over are not used that epoch (a different remainder each epoch, as the order is
   reshuffled);
3. each rank's range is cut into whole batches per DataLoader worker.

A shard that straddles a cut is read by both sides, each keeping its own samples, so at
most ``world × workers − 1`` shards are read twice per epoch. Every sample is trained on
exactly once per epoch across all ranks, and every rank yields exactly the same number of
batches, whatever the shard sizes: ranks stay in lockstep. A sample that cannot be read
(a truncated or unreadable shard) becomes a skipped slot, never a missing one.

Within a worker, samples pass a shuffle buffer seeded with ``(seed, epoch, rank,
worker)``. Resuming mid-epoch skips the batches already trained on before decoding
(the tar members are read again, not decoded), so a resumed run sees what an
uninterrupted one would.
"""

from __future__ import annotations

import io
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import IMAGE_SUFFIXES, read_captions
from .transforms import crop

__all__ = ["write_shards", "shard_dataset", "ShardStream", "shard_sample_counts"]

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


def shard_sample_counts(urls: list[str]) -> list[int]:
    """Samples per shard, from the tar headers (members grouped by key as webdataset
    does); the shards must be local files (or on a mounted filesystem)."""
    from webdataset.tariterators import base_plus_ext

    counts = []
    for url in urls:
        path = url.removeprefix("file:")
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"shard {url} is not a local file: the shard plan needs each shard's sample "
                "count (mount remote storage, or list the local shards)"
            )
        keys, previous = 0, None
        try:
            with tarfile.open(path, "r:") as tar:  # headers only: members are seeked over
                for member in tar:
                    key = base_plus_ext(member.name)[0] if member.isreg() else None
                    if key is not None and key != previous and not key.startswith("__"):
                        keys, previous = keys + 1, key
        except (OSError, tarfile.TarError) as e:
            log.warning("shard %s is unreadable (%s): its samples count as skipped", url, e)
        counts.append(keys)
    return counts


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of one shard."""

    url: str
    start: int
    stop: int


class ShardStream(torch.utils.data.IterableDataset):
    """The samples of webdataset shards, planned per epoch so that ranks and workers read
    disjoint, equal shares (see the module docstring).

    ``decode(sample, epoch)`` turns a raw webdataset sample into a training sample, or
    ``None`` for an unreadable one. Alone (no :meth:`distribute`), one process reads every
    sample once per epoch.
    """

    def __init__(self, urls: str | list[str], decode: Callable, shuffle: int = 1000, seed: int = 0):
        from webdataset.shardlists import expand_urls

        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards match {urls!r}")
        self.decode, self.shuffle, self.seed = decode, shuffle, seed
        self.counts = shard_sample_counts(self.urls)
        self.epoch, self.skip_batches = 0, 0
        self.rank, self.world, self.batch_size, self.multiple = 0, 1, 1, 1

    def distribute(self, rank: int, world: int, batch_size: int, multiple: int = 1) -> None:
        """Plan for ``world`` ranks of which this is ``rank``; each rank yields a whole
        number of ``batch_size × multiple`` units (``multiple``: gradient accumulation)."""
        self.rank, self.world, self.batch_size, self.multiple = rank, world, batch_size, multiple
        if self.batches_per_rank() == 0:
            raise ValueError(
                f"the shards hold {sum(self.counts)} samples: fewer than one batch per "
                f"process ({world} × {batch_size} × {multiple})"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, batches: int) -> None:
        """Start the epoch after ``batches`` batches of this rank (resuming mid-epoch)."""
        self.skip_batches = batches

    def batches_per_rank(self) -> int:
        unit = self.batch_size * self.multiple
        return sum(self.counts) // (self.world * unit) * self.multiple

    def plan(self, worker: int = 0, workers: int = 1) -> list[Segment]:
        """The segments one worker of this rank reads this epoch."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        batches = self.batches_per_rank()
        mine = batches // workers + (worker < batches % workers)
        first = self.rank * batches + worker * (batches // workers) + min(worker, batches % workers)
        start, stop = first * self.batch_size, (first + mine) * self.batch_size
        segments, offset = [], 0
        for i in order:
            lo, hi = max(start, offset), min(stop, offset + self.counts[i])
            if lo < hi:
                segments.append(Segment(self.urls[i], lo - offset, hi - offset))
            offset += self.counts[i]
        return segments

    def _raw(self, segments: list[Segment]) -> Iterator[dict | None]:
        import webdataset as wds
        from webdataset.tariterators import tarfile_samples

        for seg in segments:
            n = 0
            samples = tarfile_samples([{"url": seg.url}], handler=wds.warn_and_continue)
            for index, sample in enumerate(samples):
                if index >= seg.stop:
                    break
                if index >= seg.start:
                    n += 1
                    yield sample
            yield from [None] * (seg.stop - seg.start - n)  # unreadable: skipped slots

    def _shuffled(self, items: Iterator, rng: random.Random) -> Iterator:
        if not self.shuffle:
            yield from items
            return
        buffer = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= self.shuffle:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict | None]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # batch j of an epoch comes from the worker that plans share j % workers (the
        # DataLoader asks its workers in turn); a loader restarted after n batches asks
        # its worker 0 first, so that worker takes share n % workers
        share = (worker + self.skip_batches) % workers
        segments = self.plan(share, workers)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{share}")
        skip = max(0, -(-(self.skip_batches - share) // workers)) * self.batch_size
        for i, sample in enumerate(self._shuffled(self._raw(segments), rng)):
            if i >= skip:
                yield None if sample is None else self.decode(sample, self.epoch)


def _image_decoder(crop_size: int, seed: int, random_crop: bool, flip: bool):
    def decode(sample: dict, epoch: int) -> dict | None:
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
        rng = None
        if random_crop:
            rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
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
) -> ShardStream:
    """Image shards (brace patterns such as ``shard-{000..099}.tar``) as training crops."""
    return ShardStream(urls, _image_decoder(crop_size, seed, random_crop, flip), shuffle, seed)
