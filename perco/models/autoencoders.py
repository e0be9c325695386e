"""One interface over the frozen latent autoencoders PerCo can sit on.

PerCo needs four things from its autoencoder ``E``/``D``: the latent channel count (the
hyper-encoder's input width), the spatial factor (8 for SD's VAE), an ``encode`` from
images in ``[-1, 1]`` to the normalised latent the diffusion model works in, and the
matching ``decode``. :class:`Autoencoder` is that contract; :class:`SDAutoencoder`
implements it over diffusers' ``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3 and FLUX.1 VAEs),
:class:`Flux2Autoencoder` over FLUX.2's ``AutoencoderKLFlux2``.
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2
from torch import nn

from .packing import pack, unpack

__all__ = [
    "Autoencoder",
    "SDAutoencoder",
    "Flux2Autoencoder",
    "AUTOENCODERS",
    "load_autoencoder",
    "latent_metric",
]


class Autoencoder(nn.Module):
    """The contract: ``latent_channels``, ``factor``, ``encode``, ``decode``, saving.

    ``name`` is the key under which a PerCo checkpoint records which class to load.
    """

    name: str
    latent_channels: int
    factor: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in ``[-1, 1]`` → normalised latents."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → images in ``[-1, 1]`` (not clamped)."""
        raise NotImplementedError

    def encode_pixels(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        """Images in ``[0, 1]`` (the project's pixel range) → normalised latents."""
        return self.encode(images * 2 - 1, **kwargs)

    def decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → float32 images in ``[0, 1]`` (not clamped)."""
        return (self.decode(latents).float() + 1) / 2

    def save_pretrained(self, path: str | os.PathLike) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Autoencoder:
        raise NotImplementedError


class SDAutoencoder(Autoencoder):
    """diffusers ``AutoencoderKL`` with its scaling (and, where set, shift) factor applied.

    Encoding takes the mode of the posterior (``posterior="mode"``), or a draw from it
    (``"sample"``, as PerCo (SD) encodes) seeded per image with ``seed``, so that either
    way a compression is deterministic and does not depend on the rest of the batch; a
    training step passes its own generator for a fresh draw. :class:`~perco.PerCo` sets
    ``posterior`` from its config.
    """

    name = "sd"

    def __init__(self, vae: AutoencoderKL, posterior: str = "mode", seed: int = 0):
        super().__init__()
        self.vae = vae
        self.posterior = posterior
        self.seed = seed
        cfg = vae.config
        self.latent_channels = cfg.latent_channels
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = getattr(cfg, "shift_factor", None) or 0.0

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``generator``: draws the posterior sample (``posterior="sample"``) instead of the
        per-image seeded generators."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        if self.posterior == "sample":
            seeded = [torch.Generator().manual_seed(self.seed) for _ in range(len(images))]
            latents = posterior.sample(generator=generator or seeded)
        else:
            latents = posterior.mode()
        return (latents - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents).sample

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.vae.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> SDAutoencoder:
        return cls(AutoencoderKL.from_pretrained(path, **kwargs))


class Flux2Autoencoder(Autoencoder):
    """FLUX.2's VAE (``AutoencoderKLFlux2``: 32 channels, 8×), normalised as
    ``Flux2KleinPipeline`` normalises its latents: by the VAE's batch-norm statistics over
    the 2×2-packed latent (128 channels), then unpacked back to the 32-channel grid (the
    FLUX.2 backbone packs its input itself). Encoding takes the posterior's mode.

    ``tiny``: a TAEF2 (:class:`perco.models.taesd.TinyAutoencoder`, no statistics of its
    own) to decode with instead of the VAE's decoder (``decoder=taef2``: about 18× fewer
    decoder FLOPs, ``scripts/count_params.py``). TAEF2 decodes the VAE's raw latent, so the
    batch-norm normalisation is undone first.
    """

    name = "flux2"
    factor = 8
    latent_channels = 32

    def __init__(self, vae: AutoencoderKLFlux2, tiny: nn.Module | None = None):
        super().__init__()
        self.vae, self.tiny = vae, tiny
        self.latent_channels = vae.config.latent_channels
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        std = (bn.running_var + self.vae.config.batch_norm_eps).sqrt()
        return bn.running_mean.to(like), std.to(like)

    def _normalised(self, raw: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        tokens = pack(raw)  # the 2×2-packed layout its statistics are kept in
        mean, std = (s.view(1, 1, -1) for s in self._statistics(tokens))
        tokens = tokens * std + mean if inverse else (tokens - mean) / std
        return unpack(tokens, *raw.shape[-2:])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raw = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode()
        return self._normalised(raw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raw = self._normalised(latents.to(self.vae.dtype), inverse=True)
        if self.tiny is not None:
            return self.tiny.decode(raw.to(self.tiny.latent_mean.dtype))
        return self.vae.decode(raw).sample

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from pathlib import Path

        self.vae.save_pretrained(path)
        if self.tiny is not None:
            self.tiny.save_pretrained(Path(path) / "tiny")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> Flux2Autoencoder:
        from pathlib import Path

        tiny = Path(path) / "tiny"  # a TAEF2 (its class registers itself: perco.models.taesd)
        decoder = AUTOENCODERS["taesd"].from_pretrained(tiny) if tiny.is_dir() else None
        return cls(AutoencoderKLFlux2.from_pretrained(path, **kwargs), decoder)


AUTOENCODERS: dict[str, type[Autoencoder]] = {
    cls.name: cls for cls in (SDAutoencoder, Flux2Autoencoder)
}


def load_autoencoder(kind: str, path: str | os.PathLike, **kwargs) -> Autoencoder:
    if kind not in AUTOENCODERS:
        raise KeyError(f"unknown autoencoder {kind!r}; known: {', '.join(AUTOENCODERS)}")
    return AUTOENCODERS[kind].from_pretrained(path, **kwargs)


def latent_metric(
    autoencoder: Autoencoder, latents: list[torch.Tensor], probes: int = 8, seed: int = 0
) -> list[list[float]]:
    """The decoder's pixel metric on latent channels: a ``C × C`` matrix ``G``.

    ``eᵀ G e`` (summed over latent positions) is the linearised pixel MSE that a latent
    error ``e`` causes: ``G = Σ_p J_pᵀ J_p``, the per-position channel block of ``JᵀJ``
    (``J``, the decoder's Jacobian), averaged over ``latents`` (each ``(1, C, h, w)``,
    normalised as ``autoencoder.encode`` returns them) and scaled to a mean diagonal of 1.
    Estimated with ``probes`` random pixel-space directions ``u`` per latent: the
    vector–Jacobian products ``Jᵀu`` have exactly that covariance.
    """
    g = torch.Generator().manual_seed(seed)
    channels = latents[0].shape[1]
    total = torch.zeros(channels, channels, dtype=torch.float64)
    for z in latents:
        z = z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = autoencoder.decode(z).float()
            for k in range(probes):
                u = torch.randn(out.shape, generator=g).to(out)
                (vjp,) = torch.autograd.grad(out, z, u, retain_graph=k + 1 < probes)
                v = vjp[0].flatten(1).double()
                total += v @ v.T
    total = (total + total.T) / 2
    return (total / total.diagonal().mean()).tolist()
