"""Training data: image folders, webdataset shards, crops."""

from .folder import ImageFolder, collate
from .latents import latent_shard_dataset, write_latent_shards
from .shards import ShardStream, shard_dataset, write_shards
from .transforms import crop

__all__ = [
    "ImageFolder",
    "collate",
    "shard_dataset",
    "ShardStream",
    "write_shards",
    "latent_shard_dataset",
    "write_latent_shards",
    "crop",
]
