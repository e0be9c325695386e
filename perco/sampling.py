"""The samplers a model decodes with: multi-step DDIM with classifier-free guidance, and
the one-step decoding of a distilled student. A model's ``perco.json`` names its sampler
(:attr:`perco.models.config.PerCoConfig.sampler`); :func:`sampler_for` turns that and a
call's options into a :class:`Sampler`, so the model holds no branch per sampler.

Reverse diffusion with classifier-free guidance, one batched U-Net call per step.

Guidance modes (paper eq. 5 and Table 1):

* ``"text"`` (default) — contrast ``(z_l, z_g)`` with ``(z_l, ∅)``:
  ``ε̂ = ε(x_t, z_l, ∅) + λ·(ε(x_t, z_l, z_g) − ε(x_t, z_l, ∅))``, ``λ = 3``;
* ``"text+spatial"`` — contrast with ``(0, ∅)``: the unconditional branch also gets an
  all-zero ``z_l``;
* ``"none"`` — the conditional branch alone.

The two branches are stacked on the batch axis and go through the denoiser together, so
a step costs one denoiser call whatever the mode. Guidance is linear, so it applies alike
to ε-, v- and flow-velocity predictions; the scheduler's family
(:func:`perco.schedules.schedule_for`) takes care of the rest: DDIM steps on a DDPM
schedule, Euler steps (``FlowMatchEulerDiscreteScheduler``) on a flow one. The denoiser
is called through its backbone (:func:`perco.models.backbones.predict`): a U-Net or a
transformer, plain or wrapped (DDP).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .models.backbones import backbone_of, predict, unwrap
from .schedules import schedule_for

__all__ = [
    "GuidanceMode",
    "GUIDANCE_MODES",
    "SAMPLERS",
    "Sampler",
    "GuidedSampler",
    "OneStepSampler",
    "sampler_for",
    "with_spacing",
    "sample",
    "one_step",
    "one_step_x0",
    "guided_x0",
]

GuidanceMode = Literal["none", "text", "text+spatial"]
GUIDANCE_MODES: tuple[str, ...] = ("none", "text", "text+spatial")
SAMPLERS: tuple[str, ...] = ("ddim", "one-step")


class Sampler:
    """Latents from the U-Net's conditions: ``sampler(unet, scheduler, spatial, text,
    null_text, generator)``."""

    def __call__(self, unet, scheduler, spatial, text, null_text, generator) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class GuidedSampler(Sampler):
    """:func:`sample`: ``steps`` scheduler steps, one batched U-Net call each."""

    steps: int
    guidance: GuidanceMode = "text"
    guidance_scale: float = 3.0

    def __call__(self, unet, scheduler, spatial, text, null_text, generator) -> torch.Tensor:
        return sample(unet, scheduler, spatial, text, null_text, steps=self.steps,
                      guidance=self.guidance, guidance_scale=self.guidance_scale,
                      generator=generator)  # fmt: skip


@dataclass(frozen=True)
class OneStepSampler(Sampler):
    """:func:`one_step` at the student's ``timestep``: one unbatched U-Net call."""

    timestep: int

    def __call__(self, unet, scheduler, spatial, text, null_text, generator) -> torch.Tensor:
        return one_step(unet, scheduler, spatial, text, timestep=self.timestep,
                        generator=generator)  # fmt: skip


def with_spacing(scheduler: SchedulerMixin, timestep_spacing: str | None) -> SchedulerMixin:
    """``scheduler``, or a copy with another timestep spacing (None: its own)."""
    if timestep_spacing in (None, scheduler.config.get("timestep_spacing")):
        return scheduler
    if "timestep_spacing" not in scheduler.config:
        raise ValueError(f"timestep_spacing is a setting of DDPM-family schedulers, not of "
                         f"{type(scheduler).__name__}")  # fmt: skip
    if timestep_spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(
            f"timestep_spacing must be leading, trailing or linspace, not {timestep_spacing!r}"
        )
    return type(scheduler).from_config(scheduler.config, timestep_spacing=timestep_spacing)


def sampler_for(
    config,
    *,
    steps: int | None = None,
    guidance: GuidanceMode | None = None,
    guidance_scale: float | None = None,
    default_steps: int,
) -> Sampler:
    """The sampler of a model's ``config`` (a :class:`~perco.models.config.PerCoConfig`)
    with a call's options. A one-step student refuses options it has no use for: it was
    trained for one step, with the teacher's guidance distilled into it."""
    if config.sampler == "one-step":
        if steps not in (None, 1) or guidance not in (None, "none") or guidance_scale:
            raise ValueError(
                "this model is a one-step student: it decodes in one U-Net call without "
                "guidance (steps, guidance and scale do not apply)"
            )
        return OneStepSampler(config.one_step_timestep)
    scale = config.guidance_scale if guidance_scale is None else guidance_scale
    return GuidedSampler(steps or default_steps, guidance or config.guidance, scale)


@torch.no_grad()
def sample(
    unet: nn.Module,
    scheduler: SchedulerMixin,
    spatial: torch.Tensor,
    text: torch.Tensor,
    null_text: torch.Tensor,
    *,
    steps: int,
    guidance: GuidanceMode = "text",
    guidance_scale: float = 3.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample latents conditioned on ``spatial`` (``z_l`` on the latent grid) and text.

    Args:
        unet: the denoiser (a U-Net, a transformer of a known backbone) whose input layer
            takes ``latent + spatial`` channels.
        scheduler: a DDPM-family or flow-matching Euler scheduler; a fresh copy is made
            from its config, so the caller's instance is never mutated.
        spatial: ``(B, C_z, H, W)`` local conditioning already upsampled to the latent grid.
        text: ``(B, L, D)`` caption embeddings.
        null_text: ``(B, L, D)`` null-text embeddings.
        steps: number of sampler steps.
        guidance: ``"none"``, ``"text"`` or ``"text+spatial"``.
        guidance_scale: ``λ`` of eq. 5.
        generator: one generator, or one per sample (a sample then does not depend on
            what else is in the batch).
        noise: the starting ``x_T`` (unscaled, as drawn), instead of drawing it from
            ``generator``: a one-step student's paired-distillation target starts where
            the student does.

    Returns:
        Latents ``(B, C_latent, H, W)``.
    """
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
    batch, _, height, width = spatial.shape
    core, schedule = unwrap(unet), schedule_for(scheduler)
    backbone, dtype = backbone_of(core), core.dtype
    mu = backbone.mu(core, (height, width), steps)
    scheduler = schedule.set_timesteps(steps, spatial.device, mu=mu)
    if noise is None:
        noise = randn_tensor((batch, backbone.out_channels(core), height, width),
                             generator=generator, device=spatial.device, dtype=dtype)  # fmt: skip
    latents = schedule.start(noise.to(spatial.device, dtype), scheduler)

    branches = _Branches(spatial, text, null_text, guidance, guidance_scale, dtype)
    step_kwargs = {"generator": generator} if _accepts(scheduler.step, "generator") else {}
    for t in scheduler.timesteps:
        pred = branches.predict(unet, schedule.scale_input(scheduler, latents, t), t)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


class _Branches:
    """The conditional and (with guidance) unconditional inputs of one batched denoiser
    call, and the guided prediction ``uncond + λ (cond − uncond)`` (eq. 5)."""

    def __init__(self, spatial, text, null_text, guidance, scale, dtype):
        spatial = spatial.to(dtype)
        self.scale, self.n = scale, 1 if guidance == "none" else 2
        if guidance == "none":
            self.spatial, self.context = spatial, text.to(dtype)
        else:
            uncond = torch.zeros_like(spatial) if guidance == "text+spatial" else spatial
            self.spatial = torch.cat([uncond, spatial])
            self.context = torch.cat([null_text, text]).to(dtype)

    def predict(self, unet, latents: torch.Tensor, t) -> torch.Tensor:
        model_in = latents.to(self.spatial.dtype).repeat(self.n, 1, 1, 1)
        pred = predict(unet, model_in, self.spatial, t, self.context)
        if self.n == 1:
            return pred
        uncond, cond = pred.chunk(2)
        return uncond + self.scale * (cond - uncond)


def guided_x0(
    unet, scheduler, noisy, timesteps, spatial, text, null_text, guidance, guidance_scale
) -> torch.Tensor:
    """The clean latent (float32) that a model's guided prediction at ``noisy`` and
    ``timesteps`` implies: what its sampler steps towards there. A one-step student's
    distribution-matching loss asks it of the frozen teacher (the real score) and of the
    trained critic (the fake one)."""
    branches = _Branches(spatial, text, null_text, guidance, guidance_scale, noisy.dtype)
    t = timesteps.repeat(branches.n)
    return schedule_for(scheduler).x0(noisy, branches.predict(unet, noisy, t), timesteps)


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


@torch.no_grad()
def one_step(
    unet: nn.Module,
    scheduler: SchedulerMixin,
    spatial: torch.Tensor,
    text: torch.Tensor,
    *,
    timestep: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """A student's decoding: noise ``x_T`` (seeded per image, as :func:`sample` draws it)
    and :func:`one_step_x0`."""
    batch, _, height, width = spatial.shape
    core = unwrap(unet)
    dtype, channels = core.dtype, backbone_of(core).out_channels(core)
    noise = randn_tensor((batch, channels, height, width), generator=generator,
                         device=spatial.device, dtype=dtype)  # fmt: skip
    noise = schedule_for(scheduler).start(noise)
    return one_step_x0(unet, scheduler, noise, spatial, text, timestep).to(dtype)


def one_step_x0(
    unet, scheduler, noise, spatial, text, timestep: int | torch.Tensor
) -> torch.Tensor:
    """One denoiser call on the conditional branch at the fixed ``timestep`` (or one per
    sample: a multi-rate student's batch mixes rungs) from ``noise`` (whose dtype the
    inputs take), and the clean latent its prediction implies (float32; on a flow schedule
    at ``t = 1000``: ``x0 = x_1 − v``). With gradients: a student's decoding and its
    training step (where ``unet`` may be the DDP-wrapped denoiser) both call it."""
    schedule = schedule_for(scheduler)
    t = schedule.timesteps(timestep, len(noise), noise.device)
    return schedule.x0(noise, predict(unet, noise, spatial, t, text), t)
