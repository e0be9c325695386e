"""Training data: image folders, webdataset shards, crops."""

from .folder import ImageFolder, collate
from .shards import shard_dataset, write_shards
from .transforms import crop

__all__ = ["ImageFolder", "collate", "shard_dataset", "write_shards", "crop"]
