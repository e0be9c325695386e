"""A fixed validation set: the same samples, timesteps and noise at every evaluation.

The loss on fixed ``(timestep, noise)`` pairs is comparable across steps and runs, unlike
the training loss whose noise changes every batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import IterableDataset

from ..io import save_image
from ..models.perco import PerCo

__all__ = ["FixedValidation"]


@dataclass
class FixedValidation:
    """The first samples of the data, as pixels (``images``) or pre-computed ``latents``."""

    images: torch.Tensor | None  # (N, 3, S, S) in [0, 1]
    latents: torch.Tensor | None  # (N, C, s, s)
    captions: list[str | None]
    timesteps: torch.Tensor  # (P, N)
    sample_steps: int | None
    seed: int = 1234

    @classmethod
    def build(cls, cfg: DictConfig, seed: int = 1234) -> FixedValidation:
        """Centre crops of the first ``trainer.val_images`` samples, ``val_pairs`` pairs each."""
        from hydra.utils import instantiate

        from ..data import collate

        tc = cfg.trainer
        fixed = {"random_crop": False, "flip": False, "shuffle": 0}
        data = instantiate(cfg.data, **{k: v for k, v in fixed.items() if k in cfg.data})
        if isinstance(data, IterableDataset):
            items = iter(data)
        else:
            items = (data[i] for i in range(len(data)))
        readable = (s for s in items if s is not None)
        batch = collate(list(itertools.islice(readable, tc.val_images)))
        if not batch["captions"]:
            raise ValueError("no readable validation samples")
        g = torch.Generator().manual_seed(seed)
        timesteps = torch.randint(0, 1000, (tc.val_pairs, len(batch["captions"])), generator=g)
        return cls(
            batch.get("images"),
            batch.get("latents"),
            batch["captions"],
            timesteps,
            tc.sample_steps,
            seed,
        )

    def _noise(self, model: PerCo) -> torch.Tensor:
        """``(P, N, C, s, s)`` noise for the model's latent shape, the same at every call."""
        if self.latents is not None:
            shape = self.latents.shape
        else:
            side = self.images.shape[-1] // model.autoencoder.factor
            shape = (len(self.captions), model.autoencoder.latent_channels, side, side)
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(len(self.timesteps), *shape, generator=g)

    @torch.no_grad()
    def loss(self, model: PerCo) -> float:
        """Mean diffusion loss over the fixed pairs (eval mode: no caption drop, no EMA)."""
        was_training = model.training
        model.eval()
        images = None if self.images is None else self.images.to(model.device)
        total = 0.0
        for t, n in zip(self.timesteps, self._noise(model), strict=True):
            out = model(
                images, self.captions, latents=self.latents, timesteps=t, noise=n.to(model.device)
            )
            total += out.diffusion.item()
        model.train(was_training)
        return total / len(self.timesteps)

    @torch.no_grad()
    def reconstruct(self, model: PerCo, path: Path) -> None:
        """Save originals (top row) above their reconstructions (bottom row).

        With latent data the originals are the autoencoder's decodings of the latents.
        """
        was_training = model.training
        model.eval()
        if self.images is not None:
            originals = self.images.to(model.device)
        else:
            originals = model.autoencoder.decode_pixels(self.latents.to(model.device)).clamp(0, 1)
        encoded = model.encode(originals, self.captions)
        recon = torch.stack(model.decode(encoded, steps=self.sample_steps, seed=0))
        model.train(was_training)
        top, bottom = torch.cat(list(originals.cpu()), dim=-1), torch.cat(list(recon.cpu()), dim=-1)
        save_image(torch.cat([top, bottom], dim=-2), path)
