"""Tiny TAESD-style autoencoders (Ollin Boer Bohan's TAESD family), e.g. TAEF2.

TAEF2 is a tiny encoder/decoder for the FLUX.2 latent space (32 channels, 8×
downsampling, ≈1.34M parameters each), fast enough to train a small PerCo on a CPU. The
layout is written here from its description and matched to the published state dicts
(plain ``nn.Sequential`` keys):

- a block is three 3×3 convs with ReLUs between them, a skip (1×1 conv when widths
  differ), a ReLU after the sum, and — in the innermost blocks — a "pool" branch
  (1×1 conv to 4× width, GroupNorm, ReLU, 1×1 conv back) added to its input first;
- the encoder: conv, block, then three stages of (stride-2 conv, three blocks), then a
  conv to the latent; the decoder mirrors it with ×2 nearest upsampling and starts with
  a soft clamp ``tanh(x / 3) · 3``.

Images are ``[0, 1]`` inside the TAESD modules; :class:`TinyAutoencoder` speaks the
project's ``[-1, 1]`` contract and normalises latents with per-channel statistics
measured on training images (:func:`perco.data.latent_crops.latent_statistics`), stored
in its config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .autoencoders import AUTOENCODERS, Autoencoder

__all__ = ["TinyAutoencoder", "taesd_encoder", "taesd_decoder"]

CONFIG_NAME = "taesd.json"
WEIGHTS_NAME = "taesd.safetensors"


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, pool: bool = False, groups: int = 4):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if pool:
            wide = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, wide, 1, bias=False),
                nn.GroupNorm(groups, wide),
                nn.ReLU(),
                nn.Conv2d(wide, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels: int, width: int = 64, pool: bool = True) -> nn.Sequential:
    def stage(inner: bool) -> list[nn.Module]:
        return [_conv(width, width, stride=2, bias=False)] + [
            _Block(width, width, pool=inner and pool) for _ in range(3)
        ]

    return nn.Sequential(
        _conv(3, width),
        _Block(width, width),
        *stage(False),
        *stage(False),
        *stage(True),
        _conv(width, latent_channels),
    )


def taesd_decoder(latent_channels: int, width: int = 64, pool: bool = True) -> nn.Sequential:
    def up() -> list[nn.Module]:
        return [nn.Upsample(scale_factor=2), _conv(width, width, bias=False)]

    return nn.Sequential(
        _Clamp(),
        _conv(latent_channels, width),
        nn.ReLU(),
        *[_Block(width, width, pool=pool) for _ in range(3)],
        *up(),
        *[_Block(width, width) for _ in range(3)],
        *up(),
        *[_Block(width, width) for _ in range(3)],
        *up(),
        _Block(width, width),
        _conv(width, 3),
    )


class TinyAutoencoder(Autoencoder):
    """A TAESD-style encoder/decoder behind the :class:`Autoencoder` contract.

    ``latent_mean``/``latent_std`` (per channel) make the diffusion latents roughly unit
    Gaussian: ``encode`` returns ``(z - mean) / std``, ``decode`` undoes it.
    """

    name = "taesd"
    factor = 8

    def __init__(
        self,
        latent_channels: int = 32,
        latent_mean: Iterable[float] | None = None,
        latent_std: Iterable[float] | None = None,
        source: str = "",
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.source = source
        self.encoder = taesd_encoder(latent_channels)
        self.decoder = taesd_decoder(latent_channels)
        mean = torch.zeros(latent_channels) if latent_mean is None else torch.tensor(latent_mean)
        std = torch.ones(latent_channels) if latent_std is None else torch.tensor(latent_std)
        self.register_buffer("latent_mean", mean.float().view(1, -1, 1, 1))
        self.register_buffer("latent_std", std.float().view(1, -1, 1, 1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder((images + 1) / 2)
        return (z - self.latent_mean) / self.latent_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents * self.latent_std + self.latent_mean
        return self.decoder(z) * 2 - 1

    def raw_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised latents of images in ``[0, 1]`` (for measuring statistics)."""
        return self.encoder(images)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.latent_mean.copy_(mean.view(1, -1, 1, 1))
        self.latent_std.copy_(std.view(1, -1, 1, 1))

    @property
    def config(self) -> dict:
        return {
            "latent_channels": self.latent_channels,
            "latent_mean": self.latent_mean.flatten().tolist(),
            "latent_std": self.latent_std.flatten().tolist(),
            "source": self.source,
        }

    @classmethod
    def from_state_dicts(
        cls,
        encoder: str | os.PathLike,
        decoder: str | os.PathLike,
        latent_channels: int = 32,
    ) -> TinyAutoencoder:
        """Load the published ``.pth`` state dicts (``torch.load(weights_only=True)``)."""
        model = cls(latent_channels, source=f"{Path(encoder).name}, {Path(decoder).name}")
        for part, path in ((model.encoder, encoder), (model.decoder, decoder)):
            state = torch.load(path, map_location="cpu", weights_only=True)
            part.load_state_dict({k: v.float() for k, v in state.items()})
        return model

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, path / WEIGHTS_NAME)
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=1))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype=None, **_) -> TinyAutoencoder:
        path = Path(path)
        model = cls(**json.loads((path / CONFIG_NAME).read_text()))
        model.load_state_dict(load_file(path / WEIGHTS_NAME))
        return model if torch_dtype is None else model.to(torch_dtype)


AUTOENCODERS[TinyAutoencoder.name] = TinyAutoencoder
