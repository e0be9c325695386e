"""The shard plan: disjoint, equal shares per rank and worker; exact mid-epoch resume."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils.data import DataLoader

from perco.data import ShardStream, collate, shard_dataset
from perco.io import save_image

SIZES = (5, 3, 6, 1, 4, 2, 3)  # unequal shards, more of them than ranks x workers


def write_unequal_shards(folder, sizes=SIZES, side=40):
    """Shards ``u-000.tar`` ... of ``sizes`` samples each; returns their brace pattern."""
    import webdataset as wds

    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"u-{shard:03d}.tar")) as sink:
            for i in range(size):
                png = folder / "tmp.png"
                save_image(torch.rand(3, side, side + 4, generator=g), png)
                sink.write({"__key__": f"s{shard}_{i}", "png": png.read_bytes(), "txt": "x"})
    (folder / "tmp.png").unlink()
    return f"{folder}/u-{{000..{len(sizes) - 1:03d}}}.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_unequal_shards(tmp_path_factory.mktemp("shards"))


def keys_of(dataset, workers=0, batch_size=2):
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, drop_last=True
    )
    return [batch["keys"] for batch in loader]


def test_counts_come_from_the_tar_headers(shards):
    assert ShardStream(shards, lambda s, e: s).counts == list(SIZES)


@pytest.mark.parametrize("world,workers,batch", [(2, 2, 2), (3, 1, 2), (2, 3, 1)])
def test_every_sample_once_per_epoch_in_equal_shares(shards, world, workers, batch):
    total = sum(SIZES)
    for epoch in (0, 1):
        seen, batches = [], []
        for rank in range(world):
            data = shard_dataset(shards, crop_size=32, shuffle=4, seed=7)
            data.distribute(rank, world, batch)
            data.set_epoch(epoch)
            rank_batches = keys_of(data, workers, batch)
            batches.append(len(rank_batches))
            seen += [k for b in rank_batches for k in b]
        assert len(set(batches)) == 1, batches  # lockstep: every rank the same count
        assert batches[0] == total // (world * batch)
        assert len(seen) == len(set(seen)) == batches[0] * world * batch
        if total % (world * batch) == 0:
            assert len(seen) == total


def test_epochs_are_reshuffled_and_reproducible(shards):
    def epoch_keys(epoch):
        data = shard_dataset(shards, crop_size=32, shuffle=4, seed=7)
        data.distribute(0, 2, 2)
        data.set_epoch(epoch)
        return keys_of(data, 2)

    assert epoch_keys(0) == epoch_keys(0)
    assert epoch_keys(0) != epoch_keys(1)


@pytest.mark.parametrize("done", [1, 2, 3])
def test_resume_mid_epoch_yields_the_rest_in_order(shards, done):
    data = shard_dataset(shards, crop_size=32, shuffle=4, seed=7)
    data.distribute(1, 2, 2)
    data.set_epoch(3)
    whole = keys_of(data, workers=2)
    data.skip(done)
    assert keys_of(data, workers=2) == whole[done:]


def test_an_unreadable_shard_becomes_skipped_slots(tmp_path):
    pattern = write_unequal_shards(tmp_path, sizes=(4, 4))
    data = shard_dataset(pattern, crop_size=32, shuffle=0)
    with open(tmp_path / "u-001.tar", "r+b") as f:  # cut the second shard short
        f.truncate(600)
    data.distribute(0, 1, 2)
    counts = collections.Counter()
    loader = DataLoader(data, batch_size=2, collate_fn=collate, drop_last=True)
    for batch in loader:
        counts["batches"] += 1
        counts["skipped"] += batch["skipped"]
    assert counts["batches"] == 4 and counts["skipped"] >= 3


def test_too_few_samples_for_one_batch_per_process_is_refused(shards):
    data = shard_dataset(shards, crop_size=32)
    with pytest.raises(ValueError, match="fewer than one batch per process"):
        data.distribute(0, 16, 2)


def test_remote_shards_are_refused_with_the_reason():
    with pytest.raises(FileNotFoundError, match="not a local file"):
        shard_dataset("pipe:cat /nowhere/a-{0..1}.tar")
