"""A fixed validation set: the same images, timesteps and noise at every evaluation.

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
    images: torch.Tensor  # (N, 3, S, S)
    captions: list[str | None]
    timesteps: torch.Tensor  # (P, N)
    noise: torch.Tensor  # (P, N, C, s, s)
    sample_steps: int | None

    @classmethod
    def build(cls, cfg: DictConfig, dataset, seed: int = 1234) -> FixedValidation:
        """Centre crops of the first ``trainer.val_images`` images, ``val_pairs`` pairs each."""
        from hydra.utils import instantiate

        from ..data import collate

        tc = cfg.trainer
        overrides = {"random_crop": False, "flip": False}
        if "shuffle" in cfg.data:
            overrides["shuffle"] = 0
        data = instantiate(cfg.data, **overrides)
        items = (
            iter(data) if isinstance(data, IterableDataset) else (data[i] for i in range(len(data)))
        )
        batch = collate(list(itertools.islice((s for s in items if s is not None), tc.val_images)))
        if not batch["captions"]:
            raise ValueError("no readable validation images")
        n, size = len(batch["captions"]), batch["images"].shape[-1]
        g = torch.Generator().manual_seed(seed)
        latent = size // 8  # refined on first use for other autoencoder factors
        timesteps = torch.randint(0, 1000, (tc.val_pairs, n), generator=g)
        noise = torch.randn(tc.val_pairs, n, 4, latent, latent, generator=g)
        return cls(batch["images"], batch["captions"], timesteps, noise, tc.sample_steps)

    def _noise_for(self, model: PerCo) -> torch.Tensor:
        channels = model.autoencoder.latent_channels
        side = self.images.shape[-1] // model.autoencoder.factor
        if self.noise.shape[-3:] != (channels, side, side):
            g = torch.Generator().manual_seed(1234)
            self.noise = torch.randn(*self.noise.shape[:2], channels, side, side, generator=g)
        return self.noise

    @torch.no_grad()
    def loss(self, model: PerCo) -> float:
        """Mean diffusion loss over the fixed pairs (eval mode: no caption drop, no EMA)."""
        was_training = model.training
        model.eval()
        noise = self._noise_for(model)
        images = self.images.to(model.device)
        total = 0.0
        for t, n in zip(self.timesteps, noise, strict=True):
            total += model(
                images, self.captions, timesteps=t, noise=n.to(model.device)
            ).diffusion.item()
        model.train(was_training)
        return total / len(self.timesteps)

    @torch.no_grad()
    def reconstruct(self, model: PerCo, path: Path) -> None:
        """Save originals (top row) above their reconstructions (bottom row)."""
        was_training = model.training
        model.eval()
        encoded = model.encode(self.images.to(model.device), self.captions)
        recon = torch.stack(model.decode(encoded, steps=self.sample_steps, seed=0)).cpu()
        model.train(was_training)
        grid = torch.cat(
            [torch.cat(list(self.images), dim=-1), torch.cat(list(recon), dim=-1)], dim=-2
        )
        save_image(grid, path)
