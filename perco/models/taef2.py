"""The small real PerCo: a new U-Net in the pretrained TAEF2 latent space (8×, 32 channels).

What the README's main job trains on the CPU (``experiment=tiny_taef2``). Its autoencoder
is FLUX.2's tiny autoencoder (TAEF2, from ``$PERCO_ASSETS/taef2``), its latents are
normalised per channel with statistics measured on the training images, and its text
encoder is the tiny random CLIP of :mod:`perco.testing`, used only for the null-text
slot: the model has no text conditioning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ..data.latent_crops import LatentCrops, cached_latents, image_files, latent_statistics
from ..io import atomic_write
from ..rates import Rate
from ..testing import SD21_SCHEDULER, TEXT_DIM, tiny_components
from .autoencoders import latent_metric
from .perco import PerCo
from .serialization import variant_class
from .taesd import TinyAutoencoder

__all__ = ["load_taef2", "taef2_latent_metric", "taef2_perco", "taef2_latent_crops"]


def load_taef2(
    taef2_dir: str | os.PathLike,
    folders: list[str | os.PathLike] | None = None,
    latent_cache: str | os.PathLike | None = None,
):
    """The pretrained TAEF2 autoencoder from its ``.pth`` state dicts.

    With ``folders`` and ``latent_cache``, the per-channel latent statistics are measured
    on the whole-image latents of those training images (computed once and cached, see
    :mod:`perco.data.latent_crops`) and stored in the autoencoder's config.
    """
    taef2_dir = Path(taef2_dir)
    ae = TinyAutoencoder.from_state_dicts(
        taef2_dir / "taef2_encoder.pth", taef2_dir / "taef2_decoder.pth", latent_channels=32
    ).eval()
    if folders:
        if latent_cache is None:
            raise ValueError("measuring latent statistics needs a latent_cache path")
        ae.set_latent_stats(
            *latent_statistics(cached_latents(ae.raw_encode, folders, latent_cache))
        )
    return ae.requires_grad_(False)


def taef2_latent_metric(
    ae, folders: list[str | os.PathLike], latent_cache: str | os.PathLike, images: int = 4
) -> list[list[float]]:
    """The decoder's channel metric (:func:`~perco.models.autoencoders.latent_metric`)
    on central 128-px windows of the first training images, cached beside the latent
    cache (``<cache>.metric.json``)."""
    path = Path(f"{latent_cache}.metric.json")
    if path.is_file():
        return json.loads(path.read_text())
    latents = cached_latents(ae.raw_encode, folders, latent_cache)
    windows = []
    for name in sorted(latents)[:images]:
        z = latents[name][None]
        top, left = ((s - 16) // 2 for s in z.shape[-2:])
        raw = z[..., top : top + 16, left : left + 16]
        windows.append((raw - ae.latent_mean) / ae.latent_std)
    metric = latent_metric(ae, windows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(metric)))
    return metric


def taef2_perco(
    rate: str | Rate,
    taef2_dir: str | os.PathLike,
    folders: list[str | os.PathLike] | None = None,
    latent_cache: str | os.PathLike | None = None,
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    pixel_metric: bool = True,
    variant: str = "perco",
    denoiser: torch.nn.Module | None = None,
    scheduler=None,
    **kwargs,
) -> PerCo:
    """A small PerCo on the pretrained TAEF2 autoencoder (32-channel latents, 8×).

    ``pixel_metric``: measure the diffusion loss in the decoder's pixel metric on the
    latent channels (``PerCoConfig.latent_metric``), estimated on the training images'
    latents: two of TAEF2's 32 channels carry most of the luminance and colour is spread
    over several, so a plain latent MSE spends the hyper-latent's bits on channels that
    barely show.

    The U-Net is new (random init; attention only at its lowest resolution, 1/32 of the
    image); the text encoder is the tiny random CLIP of :func:`tiny_components`, used
    only for its null-text slot: with no captions (``guidance="none"``) the U-Net is
    conditioned on the hyper-latent alone. ``variant`` picks the model class
    (``perco_image``, ``sprdiff_style``); ``kwargs`` go to its ``from_components``.

    ``denoiser`` and ``scheduler``: another backbone's network for 32-channel latents and
    its scheduler instead of the U-Net and DDIM (``model=tiny_taef2_flux2``: a small
    FLUX.2 transformer with rectified flow, :func:`perco.models.backbones.flux2.new_transformer`).
    """
    c = tiny_components(seed)
    if denoiser is None:
        denoiser, scheduler = _unet(block_out_channels, seed), None
    if scheduler is None:
        scheduler = DDIMScheduler(**{**SD21_SCHEDULER, "timestep_spacing": "trailing"})
    kwargs.setdefault("hyper_encoder", {"channels": 64, "out_channels": 128})
    kwargs.setdefault("quantizer", {"codebook_dim": 16})
    kwargs.setdefault("guidance", "none")
    kwargs.setdefault("text_drop_prob", 0.0)
    kwargs.setdefault("text", False)  # no captions: it refuses them rather than store them
    ae = load_taef2(taef2_dir, folders, latent_cache)
    if pixel_metric and folders:
        kwargs.setdefault("latent_metric", taef2_latent_metric(ae, folders, latent_cache))
    return variant_class(variant).from_components(
        ae, denoiser, c["text_encoder"], c["tokenizer"], scheduler, rate, **kwargs
    )


def _unet(block_out_channels: tuple[int, ...], seed: int) -> UNet2DConditionModel:
    """The small U-Net of the embedded default: attention only at its lowest resolution."""
    torch.manual_seed(seed)
    depth = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=32,
        out_channels=32,
        down_block_types=("DownBlock2D",) * (depth - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (depth - 1),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=32,
        norm_num_groups=16,
    )


def taef2_latent_crops(
    taef2_dir: str | os.PathLike,
    folders: list[str | os.PathLike],
    cache: str | os.PathLike,
    crop_size: int = 256,
    seed: int = 0,
    repeats: int = 1,
    images: bool = False,
):
    """TAEF2 latent crops of ``crop_size``-px windows, normalised as :func:`taef2_perco`
    normalises its latents (same cache, same statistics); ``images``: with the pixels of
    each window."""
    ae = load_taef2(taef2_dir)
    latents = cached_latents(ae.raw_encode, folders, cache)
    files = image_files(folders) if images else None
    crop = crop_size // ae.factor
    return LatentCrops(latents, crop, *latent_statistics(latents), seed, repeats, files, ae.factor)
