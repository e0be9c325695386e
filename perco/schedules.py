"""Noise schedule families: what training and the samplers ask of a model's scheduler.

The scheduler is part of the trained model (saved with it); its family decides how a
clean latent is noised, what the network learns to predict and which clean latent a
prediction implies. :func:`schedule_for` picks the family from the scheduler's class, so
the loss, the samplers and the students call one object instead of branching on
``prediction_type``:

* :class:`DDPMSchedule` — the DDPM family (DDIM and friends; SD 1.x/2.x, PerCo):
  ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``, integer ``t ∈ [0, 1000)``, the network predicts ε or
  ``v = √ᾱ_t·ε − √(1−ᾱ_t)·x0``;
* :class:`FlowSchedule` — rectified flow (SD 3, FLUX; ``FlowMatchEulerDiscreteScheduler``):
  ``x_t = (1 − σ)·x0 + σ·noise`` with ``t = 1000·σ``, the network predicts the velocity
  ``v = noise − x0``, so ``x0 = x_t − σ·v``; training draws σ logit-normally (or by the
  "mode" density) through diffusers' ``compute_density_for_timestep_sampling``, shifted
  for the resolution as the sampler will be, and weights the loss by
  ``compute_loss_weighting_for_sd3``.

Timesteps are the scheduler's: what ``scheduler.timesteps`` holds and ``scheduler.step``
takes (integers for DDPM, ``1000·σ`` floats for flow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .losses import diffusion_target, predicted_x0

__all__ = ["NoiseSchedule", "DDPMSchedule", "FlowSchedule", "FlowTimesteps", "schedule_for"]


@dataclass(frozen=True)
class FlowTimesteps:
    """How a flow model's training draws σ (SD 3, §3.1): ``weighting`` is diffusers'
    ``weighting_scheme`` — ``"logit_normal"`` (``sigmoid(N(logit_mean, logit_std))``, SD 3's
    default, m = 0, s = 1), ``"mode"`` (with ``mode_scale``) or ``"uniform"``; the same name
    picks the loss weight (:func:`~diffusers.training_utils.compute_loss_weighting_for_sd3`:
    one for all three)."""

    weighting: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


class NoiseSchedule:
    """One schedule family over a diffusers ``scheduler`` (the model's, never mutated)."""

    #: the family's name, as a model's description records it
    name = ""
    #: the timestep of a one-step student's single call from pure noise
    one_step_timestep: int = 999

    def __init__(self, scheduler: SchedulerMixin):
        self.scheduler = scheduler

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def draw_timesteps(self, n: int, generator=None, mu: float | None = None,
                       sampling: FlowTimesteps | None = None) -> torch.Tensor:  # fmt: skip
        """``n`` training timesteps (CPU)."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict at ``add_noise(x0, noise, t)``."""
        raise NotImplementedError

    def x0(self, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent (float32) a prediction at ``noisy`` and ``t`` implies."""
        raise NotImplementedError

    def loss_options(self, t: torch.Tensor, snr_gamma: float | None,
                     sampling: FlowTimesteps | None = None) -> dict:  # fmt: skip
        """Keyword arguments of :func:`perco.losses.diffusion_loss` for timesteps ``t``."""
        raise NotImplementedError

    def timesteps(self, t, n: int, device) -> torch.Tensor:
        """``t`` (a number or one per sample) as ``n`` timesteps of the family's dtype."""
        raise NotImplementedError

    def start(self, noise: torch.Tensor, scheduler: SchedulerMixin | None = None) -> torch.Tensor:
        """``x_T`` from unit noise, for ``scheduler`` (a copy set for sampling, whose
        starting scale may depend on its steps) or the model's."""
        raise NotImplementedError

    def sampler_copy(self) -> SchedulerMixin:
        return type(self.scheduler).from_config(self.scheduler.config)

    def set_timesteps(self, steps: int, device, mu: float | None = None) -> SchedulerMixin:
        """A fresh copy of the scheduler, set for ``steps`` sampler steps."""
        raise NotImplementedError

    def grid(self, steps: int) -> torch.Tensor:
        """The timesteps of a ``steps``-step sampler, to train on (``trainer.timestep_grid``)."""
        return self.set_timesteps(steps, "cpu").timesteps.cpu()

    @staticmethod
    def scale_input(scheduler: SchedulerMixin, x: torch.Tensor, t) -> torch.Tensor:
        return scheduler.scale_model_input(x, t)

    def describe(self, scheduler: SchedulerMixin | None = None) -> str:
        """The scheduler as a results protocol states it (``scheduler``: the one decoding
        uses, e.g. with another spacing; default: the model's)."""
        raise NotImplementedError


class DDPMSchedule(NoiseSchedule):
    """The DDPM family: ε- or v-prediction on ``alphas_cumprod`` (PerCo on SD 2.1)."""

    name = "ddpm"

    def draw_timesteps(self, n, generator=None, mu=None, sampling=None):
        if sampling is not None:
            raise ValueError("trainer.flow_timesteps is for flow models; this model's "
                             "scheduler is of the DDPM family")  # fmt: skip
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, x0, noise, t):
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        return diffusion_target(self.scheduler, x0, noise, t)

    def x0(self, noisy, pred, t):
        return predicted_x0(self.scheduler, noisy, pred, t)

    def loss_options(self, t, snr_gamma, sampling=None):
        snr = None
        if snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, t).float()
        v_prediction = self.scheduler.config.prediction_type == "v_prediction"
        return {"snr": snr, "snr_gamma": snr_gamma, "v_prediction": v_prediction}

    def timesteps(self, t, n, device):
        return torch.as_tensor(t, device=device, dtype=torch.long).expand(n)

    def start(self, noise, scheduler=None):
        return noise * (scheduler or self.scheduler).init_noise_sigma

    def set_timesteps(self, steps, device, mu=None):
        scheduler = self.sampler_copy()
        scheduler.set_timesteps(steps, device=device)
        return scheduler

    def describe(self, scheduler=None):
        config = (scheduler or self.scheduler).config
        return (f"{type(self.scheduler).__name__} ({config.prediction_type}, "
                f"{config.timestep_spacing} spacing)")  # fmt: skip


class FlowSchedule(NoiseSchedule):
    """Rectified flow with velocity prediction (SD 3, FLUX), on a
    ``FlowMatchEulerDiscreteScheduler``. ``mu``: the resolution-dependent shift of a
    scheduler with ``use_dynamic_shifting`` (the backbone computes it from the token
    count, as its pipeline does); a scheduler without it shifts by its static ``shift``."""

    name = "flow"
    one_step_timestep = 1000  # σ = 1: pure noise, x0 = x_1 − v

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def shift(self, sigma: torch.Tensor, mu: float | None) -> torch.Tensor:
        """σ shifted as the sampler's grid is (diffusers' ``time_shift`` or static shift)."""
        config = self.scheduler.config
        if config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("this flow scheduler shifts by resolution: give mu")
            return self.scheduler.time_shift(mu, 1.0, sigma)
        s = config.shift
        return s * sigma / (1 + (s - 1) * sigma)

    def draw_timesteps(self, n, generator=None, mu=None, sampling=None):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        sampling = sampling or FlowTimesteps()
        u = compute_density_for_timestep_sampling(
            sampling.weighting, n, sampling.logit_mean, sampling.logit_std, sampling.mode_scale,
            generator=generator,
        )  # fmt: skip
        return self.shift(u, mu) * self.num_train_timesteps

    def _broadcast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigma(t).to(like.device).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0, noise, t):
        sigma = self._broadcast(t, x0).to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0, noise, t):
        return noise - x0

    def x0(self, noisy, pred, t):
        return noisy.float() - self._broadcast(t, noisy) * pred.float()

    def loss_options(self, t, snr_gamma, sampling=None):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if snr_gamma:
            raise ValueError("Min-SNR-γ weights DDPM timesteps; a flow model's loss is "
                             "weighted by trainer.flow_timesteps.weighting")  # fmt: skip
        scheme = (sampling or FlowTimesteps()).weighting
        return {"weights": compute_loss_weighting_for_sd3(scheme, self.sigma(t))}

    def timesteps(self, t, n, device):
        return torch.as_tensor(t, device=device, dtype=torch.float32).expand(n)

    def start(self, noise, scheduler=None):
        return noise  # σ_max = 1: x_1 is the noise itself

    def set_timesteps(self, steps, device, mu=None):
        # the FLUX pipelines' grid: σ from 1 to 1/steps, then shifted
        scheduler = self.sampler_copy()
        sigmas = [1.0 - i / steps for i in range(steps)]
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        return scheduler

    def describe(self, scheduler=None):
        config = self.scheduler.config
        shift = ("shifted by resolution (the backbone's mu)" if config.use_dynamic_shifting
                 else f"shift {config.shift}")  # fmt: skip
        return (f"{type(self.scheduler).__name__} (rectified flow, velocity prediction, "
                f"Euler steps from sigma 1, {shift})")  # fmt: skip

    def grid(self, steps):
        raise ValueError(
            "trainer.timestep_grid is for DDPM-family models: a flow model draws "
            "σ by trainer.flow_timesteps, shifted for each batch's resolution"
        )

    @staticmethod
    def scale_input(scheduler, x, t):
        return x  # the flow input is x_t itself


def schedule_for(scheduler: SchedulerMixin) -> NoiseSchedule:
    """The schedule family of a diffusers scheduler."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowSchedule(scheduler)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{type(scheduler).__name__} is neither of the DDPM family nor a "
                         "flow-matching Euler scheduler")  # fmt: skip
    return DDPMSchedule(scheduler)
