"""Training objectives: what the loop optimises, as a callable it is handed.

The loop (:func:`perco.train.loop.train`) keeps accumulation, clipping, checkpoints,
preemption, validation and logging; an objective says which model the run trains
(:meth:`Objective.model`), which module goes through ``accelerator.prepare`` with which
parameters (:meth:`Objective.trainable`), and the loss of a batch with the scalars to log
(:meth:`Objective.__call__`). ``trainer.objective`` picks one (``_target_``):

* :class:`PerCoObjective` — the paper's loss (eq. 3–4), with the trainer's options (an
  LPIPS term on the decoded x0 estimate, Min-SNR-γ);
* :class:`StudentObjective` — a one-step student of the starting model (``init=``): the
  teacher's encoder frozen, one U-Net call from noise at a fixed timestep, a regression
  loss in the decoder's pixel space (L1 + LPIPS-VGG through the frozen autoencoder).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..losses import load_lpips, x0_lpips
from ..models.perco import PerCo
from ..sampling import one_step_x0

__all__ = ["Objective", "PerCoObjective", "StudentObjective", "regression_loss"]

Terms = dict[str, torch.Tensor]


class Objective:
    """The seam between the loop and what it optimises."""

    def model(self, model: PerCo) -> PerCo:
        """The model this objective trains, made from the run's starting model."""
        return model

    def trainable(self, model: PerCo, mode: str, **options) -> tuple[nn.Module, list]:
        """``(module for accelerator.prepare, parameters to optimise)``."""
        raise NotImplementedError

    def setup(self, trainer, device: torch.device) -> None:
        """Load what the loss needs (e.g. a perceptual network) once the run starts."""

    def __call__(
        self, trained: nn.Module, model: PerCo, batch: dict, generator, timesteps
    ) -> tuple[torch.Tensor, Terms]:
        """``(loss, {name: scalar})`` of a batch; ``trained`` is the prepared module."""
        raise NotImplementedError


class PerCoObjective(Objective):
    """PerCo's training loss (paper eq. 3–4) through the prepared PerCo, plus
    ``trainer.lpips_weight`` × LPIPS between each image and the decoded x0 estimate."""

    def __init__(self):
        self.perceptual, self.tc = None, None

    def trainable(self, model: PerCo, mode: str, **options) -> tuple[nn.Module, list]:
        return model, model.set_trainable(mode, **options)

    def setup(self, trainer, device: torch.device) -> None:
        self.tc = trainer
        if trainer.lpips_weight:
            self.perceptual = load_lpips(trainer.lpips_net, trainer.lpips_backbone).to(device)

    def __call__(self, trained, model, batch, generator, timesteps):
        losses = trained(
            batch.get("images"),
            batch["captions"],
            latents=batch.get("latents"),
            timesteps=timesteps,
            generator=generator,
            snr_gamma=self.tc.get("snr_gamma"),
        )
        terms = {
            "train/diffusion": losses.diffusion,
            "train/vq": losses.vq,
            "codebook/usage": losses.usage,
            "codebook/perplexity": losses.perplexity,
        }
        loss = losses.loss
        if self.perceptual is not None:
            if "images" not in batch:
                raise ValueError("the LPIPS term needs pixels; latent shards have none")
            lpips = x0_lpips(self.perceptual, model.autoencoder, losses.x0, batch["images"])
            loss = loss + self.tc.lpips_weight * lpips
            terms["train/lpips"] = lpips.detach()
        if losses.image is not None:
            terms["train/image"] = losses.image
        return loss, terms


def regression_loss(
    decoded: torch.Tensor,
    target: torch.Tensor,
    lpips: nn.Module | None,
    l1_weight: float,
    lpips_weight: float,
) -> tuple[torch.Tensor, Terms]:
    """``l1_weight``·mean|decoded − target| + ``lpips_weight``·mean LPIPS(decoded, target),
    both images in ``[-1, 1]`` (the stage-1 loss of one-step codecs: StableCodec, CoD-Lite)."""
    l1 = (decoded - target).abs().mean()
    terms = {"train/l1": l1.detach()}
    loss = l1_weight * l1
    if lpips is not None and lpips_weight:
        perceptual = lpips(decoded, target).mean()
        loss = loss + lpips_weight * perceptual
        terms["train/lpips"] = perceptual.detach()
    return loss, terms


class StudentObjective(Objective):
    """Stage 1 of a one-step student (:mod:`perco.models.student`): from the noise ``x_T``
    at ``timestep``, one U-Net call on the frozen encoder's conditions (the conditional
    branch only: guidance is what the student learns to do without), the x0 its
    prediction implies, decoded by the frozen autoencoder and regressed on the image
    (on latent data: on the autoencoder's decoding of the latent, its ceiling).

    Only the U-Net trains (``trainable`` mode as for PerCo: ``full``, ``linear`` or
    ``lora``); it alone goes through ``accelerator.prepare``. The hyper-encoder,
    quantizer (in eval mode: no codebook updates), index prior and null text stay the
    teacher's, so the teacher's files decode with the student.
    """

    def __init__(
        self,
        timestep: int = 999,
        l1_weight: float = 1.0,
        lpips_weight: float = 1.0,
        lpips_net: str = "vgg",
        lpips_backbone: str | os.PathLike | None = None,
    ):
        self.timestep, self.l1_weight, self.lpips_weight = timestep, l1_weight, lpips_weight
        self.lpips_net, self.lpips_backbone, self.lpips = lpips_net, lpips_backbone, None

    def model(self, model: PerCo) -> PerCo:
        from ..models.student import one_step_student

        if model.config.sampler == "one-step":  # a student already: train it further
            return model.eval()
        return one_step_student(model, self.timestep).eval()

    def trainable(self, model: PerCo, mode: str, **options) -> tuple[nn.Module, list]:
        from ..models.student import freeze_encoder

        model.set_trainable(mode, **options)  # the mode's U-Net layers, and more:
        freeze_encoder(model)  # what set_trainable trains in every mode but the U-Net
        model.null_text.requires_grad_(False)
        model.eval()
        return model.unet, [p for p in model.unet.parameters() if p.requires_grad]

    def setup(self, trainer, device: torch.device) -> None:
        if self.lpips_weight:
            self.lpips = load_lpips(self.lpips_net, self.lpips_backbone).to(device)

    def __call__(self, trained, model, batch, generator, timesteps):
        images = batch.get("images")
        with torch.no_grad():
            if images is not None:
                images = images.to(model.device)
                padded = model._pad(images)
                latents = model._latents(padded)
                target = padded * 2 - 1
            else:
                latents = batch["latents"].to(model.device, model.unet.dtype)
                padded = None
                target = model.autoencoder.decode(latents).float().clamp(-1, 1)
            codes = model._quantize(latents, padded).codes
            local = model._local(codes, latents.shape[-2:])
            text, _ = model._context(batch["captions"], model._global(images)[0])
            text = model._append(text, local.tokens)
        sched = model.scheduler
        noise = torch.randn(latents.shape, generator=generator)
        noise = noise.to(latents.device, model.unet.dtype) * sched.init_noise_sigma
        x0 = one_step_x0(trained, sched, noise, local.spatial, text, model.config.one_step_timestep)
        decoded = model.autoencoder.decode(x0).float()
        return regression_loss(decoded, target, self.lpips, self.l1_weight, self.lpips_weight)
