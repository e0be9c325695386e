"""Reverse diffusion with classifier-free guidance, one batched U-Net call per step.

Guidance modes (paper eq. 5 and Table 1):

* ``"text"`` (default) — contrast ``(z_l, z_g)`` with ``(z_l, ∅)``:
  ``ε̂ = ε(x_t, z_l, ∅) + λ·(ε(x_t, z_l, z_g) − ε(x_t, z_l, ∅))``, ``λ = 3``;
* ``"text+spatial"`` — contrast with ``(0, ∅)``: the unconditional branch also gets an
  all-zero ``z_l``;
* ``"none"`` — the conditional branch alone.

The two branches are stacked on the batch axis and go through the U-Net together, so a
step costs one U-Net call whatever the mode. Guidance is linear, so it applies alike to
ε- and v-predictions; the scheduler's ``prediction_type`` takes care of the rest.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["GuidanceMode", "GUIDANCE_MODES", "sample"]

GuidanceMode = Literal["none", "text", "text+spatial"]
GUIDANCE_MODES: tuple[str, ...] = ("none", "text", "text+spatial")


@torch.no_grad()
def sample(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    spatial: torch.Tensor,
    text: torch.Tensor,
    null_text: torch.Tensor,
    *,
    steps: int,
    guidance: GuidanceMode = "text",
    guidance_scale: float = 3.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Sample latents conditioned on ``spatial`` (``z_l`` on the latent grid) and text.

    Args:
        unet: U-Net whose ``conv_in`` takes ``latent + spatial`` channels.
        scheduler: any diffusers scheduler; a fresh copy is made from its config, so the
            caller's instance is never mutated.
        spatial: ``(B, C_z, H, W)`` local conditioning already upsampled to the latent grid.
        text: ``(B, L, D)`` caption embeddings.
        null_text: ``(B, L, D)`` null-text embeddings.
        steps: number of sampler steps.
        guidance: ``"none"``, ``"text"`` or ``"text+spatial"``.
        guidance_scale: ``λ`` of eq. 5.
        generator: one generator, or one per sample (a sample then does not depend on
            what else is in the batch).

    Returns:
        Latents ``(B, C_latent, H, W)``.
    """
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
    batch, _, height, width = spatial.shape
    dtype = unet.dtype
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(steps, device=spatial.device)
    latents = randn_tensor(
        (batch, unet.config.out_channels, height, width),
        generator=generator,
        device=spatial.device,
        dtype=dtype,
    )
    latents = latents * scheduler.init_noise_sigma

    spatial = spatial.to(dtype)
    if guidance == "none":
        cond_spatial, context = spatial, text.to(dtype)
    else:
        uncond_spatial = torch.zeros_like(spatial) if guidance == "text+spatial" else spatial
        cond_spatial = torch.cat([uncond_spatial, spatial])
        context = torch.cat([null_text, text]).to(dtype)
    branches = 1 if guidance == "none" else 2
    step_kwargs = {"generator": generator} if _accepts(scheduler.step, "generator") else {}

    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t).repeat(branches, 1, 1, 1)
        pred = unet(torch.cat([model_in, cond_spatial], dim=1), t, context).sample
        if branches == 2:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters
