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
  loss in the decoder's pixel space (L1 + LPIPS-VGG through the frozen autoencoder), and
  with ``dmd_weight`` a distribution-matching term against the frozen multi-step teacher
  (:func:`dmd_loss`), whose critic trains beside it with its own optimizer, and with
  ``adversarial_weight`` a feature discriminator's hinge loss
  (:mod:`perco.train.adversarial`), the discriminator trained beside it likewise;
* :class:`MultiRateStudentObjective` — one student U-Net for every rung of a teacher
  sweep, each rung at its own fixed timestep, the rungs stacked in each U-Net call.

An objective that trains modules of its own (a critic, a discriminator) puts them and
their optimizers through ``accelerator.prepare`` in :meth:`Objective.prepare`: they are
then DDP-wrapped and saved and restored with every checkpoint, as the model is.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..fingerprint import fingerprint
from ..losses import load_lpips, x0_lpips
from ..models.backbones import predict
from ..models.perco import PerCo
from ..sampling import guided_x0, one_step_x0, sample
from ..schedules import FlowTimesteps
from .adversarial import FeatureDiscriminator, backbone_features, discriminator_loss, generator_loss

__all__ = [
    "Objective",
    "PerCoObjective",
    "StudentObjective",
    "MultiRateStudentObjective",
    "regression_loss",
    "dmd_loss",
]

Terms = dict[str, torch.Tensor]
log = logging.getLogger("perco.train")


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

    def prepare(self, accelerator) -> None:
        """Prepare the objective's own trained modules and optimizers, after the model's."""

    def modules(self) -> list[nn.Module]:
        """The objective's own trained modules (prepared), e.g. for the ranks' sync check."""
        return []

    def export(self, model: PerCo, out: Path) -> None:
        """Write the trained model(s) at the end of the run ``out`` (its ``model/``)."""
        model.save_pretrained(out / "model")

    def __call__(
        self, trained: nn.Module, model: PerCo, batch: dict, generator, timesteps
    ) -> tuple[torch.Tensor, Terms]:
        """``(loss, {name: scalar})`` of a batch; ``trained`` is the prepared module."""
        raise NotImplementedError


class PerCoObjective(Objective):
    """PerCo's training loss (paper eq. 3–4) through the prepared PerCo, plus
    ``trainer.lpips_weight`` × LPIPS between each image and the decoded x0 estimate."""

    def __init__(self):
        self.perceptual, self.tc, self.flow_timesteps = None, None, None

    def trainable(self, model: PerCo, mode: str, **options) -> tuple[nn.Module, list]:
        return model, model.set_trainable(mode, **options)

    def setup(self, trainer, device: torch.device) -> None:
        self.tc = trainer
        if trainer.get("flow_timesteps"):
            self.flow_timesteps = FlowTimesteps(**trainer.flow_timesteps)
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
            flow_timesteps=self.flow_timesteps,
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


def dmd_loss(x0: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """Distribution matching (Yin et al. 2024, DMD; CoD-Lite's stage 2), as a loss whose
    gradient with respect to the student's clean latent ``x0`` is the difference of the
    two scores at a noised copy of it: ``(fake_x0 − real_x0) / (mean |x0 − real_x0|)``
    per sample, over ``x0.numel()``. ``real_x0``: the frozen teacher's guided estimate of
    the clean latent (its distribution), ``fake_x0``: the critic's, trained on the
    student's outputs (the student's distribution). The step moves ``x0`` towards where
    the teacher would denoise it and away from where the student's own samples go."""
    with torch.no_grad():
        normaliser = (x0 - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        target = x0 - (fake_x0 - real_x0) / normaliser
    return 0.5 * F.mse_loss(x0.float(), target.float(), reduction="sum") / x0.numel()


def _own_adamw(module: nn.Module, lr: float | None, trainer) -> torch.optim.AdamW:
    """The AdamW of a module an objective trains beside the model (a critic, a
    discriminator): the trainer's betas and weight decay, ``lr`` or else the trainer's."""
    return torch.optim.AdamW(
        module.parameters(),
        lr=lr or trainer.lr,
        betas=tuple(trainer.betas),
        weight_decay=trainer.weight_decay,
    )


class StudentObjective(Objective):
    """Stage 1 of a one-step student (:mod:`perco.models.student`): from the noise ``x_T``
    at ``timestep``, one U-Net call on the frozen encoder's conditions (the conditional
    branch only: guidance is what the student learns to do without), the x0 its
    prediction implies, decoded by the frozen autoencoder and regressed on the image
    (on latent data: on the autoencoder's decoding of the latent, its ceiling).

    Only the U-Net trains (``trainable`` mode as for PerCo: ``full``, ``linear`` or
    ``lora``); of the model, it alone goes through ``accelerator.prepare``. The hyper-encoder,
    quantizer (in eval mode: no codebook updates), index prior and null text stay the
    teacher's, so the teacher's files decode with the student.
    """

    def __init__(
        self,
        timestep: int | None = None,
        l1_weight: float = 1.0,
        lpips_weight: float = 1.0,
        lpips_net: str = "vgg",
        lpips_backbone: str | os.PathLike | None = None,
        data_weight: float = 1.0,
        distill_weight: float = 0.0,
        dmd_weight: float = 0.0,
        teacher: str | os.PathLike | None = None,
        critic_lr: float | None = None,
        critic_updates: int = 1,
        dmd_timesteps: tuple[int, int] = (20, 980),
        adversarial_weight: float = 0.0,
        disc_lr: float | None = None,
        disc_depths: Sequence[int] = (1, 2, 3),
        disc_width: int = 64,
    ):
        self.timestep, self.l1_weight, self.lpips_weight = timestep, l1_weight, lpips_weight
        self.lpips_net, self.lpips_backbone, self.lpips = lpips_net, lpips_backbone, None
        self.data_weight, self.distill_weight = data_weight, distill_weight
        self.dmd_weight, self.teacher_path, self.critic_lr = dmd_weight, teacher, critic_lr
        self.dmd_timesteps, self.critic_updates = tuple(dmd_timesteps), critic_updates
        self.adversarial_weight, self.disc_lr = adversarial_weight, disc_lr
        self.disc_depths, self.disc_width = tuple(disc_depths), disc_width
        self.teacher = self.critic = self.critic_optimizer = self.accelerator = None
        self.features = self.discriminator = self.disc_optimizer = None

    def model(self, model: PerCo) -> PerCo:
        from ..models.student import one_step_student

        student = model if model.config.sampler == "one-step" else None
        if self.distill_weight or self.dmd_weight:  # the frozen teacher: the starting
            # model, or objective.teacher
            self.teacher = model if student is None else self._load_teacher(student)
            self.teacher.requires_grad_(False).eval()
        if student is not None:  # a student already: train it further
            return student.eval()
        timestep = model.schedule.one_step_timestep if self.timestep is None else self.timestep
        return one_step_student(model, timestep).eval()

    def _load_teacher(self, student: PerCo) -> PerCo:
        from ..codec import file_fingerprint
        from ..models.loading import load_model

        if self.teacher_path is None:
            raise ValueError("init= is a one-step student: the distillation terms need "
                             "its teacher, objective.teacher=<its folder>")  # fmt: skip
        teacher = load_model(str(self.teacher_path), student.rate.name)
        if file_fingerprint(teacher).hex() != student.config.file_fingerprint:
            raise ValueError(f"objective.teacher={self.teacher_path} is not this student's "
                             "teacher: their files differ")  # fmt: skip
        return teacher

    def trainable(self, model: PerCo, mode: str, **options) -> tuple[nn.Module, list]:
        from ..models.student import freeze_encoder

        model.set_trainable(mode, **options)  # the mode's U-Net layers, and more:
        freeze_encoder(model)  # what set_trainable trains in every mode but the U-Net
        model.null_text.requires_grad_(False)
        model.eval()
        return model.denoiser, [p for p in model.denoiser.parameters() if p.requires_grad]

    def setup(self, trainer, device: torch.device) -> None:
        if self.lpips_weight:
            self.lpips = load_lpips(self.lpips_net, self.lpips_backbone).to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        if (self.dmd_weight or self.adversarial_weight) and trainer.grad_accum != 1:
            raise ValueError("the distribution-matching and adversarial terms step their "
                             "critic or discriminator every batch: trainer.grad_accum "
                             "must be 1")  # fmt: skip
        if self.dmd_weight:
            # the critic: a score model of the student's outputs, from the teacher's U-Net
            self.critic = copy.deepcopy(self.teacher.denoiser).requires_grad_(True).train()
            self.critic_optimizer = _own_adamw(self.critic, self.critic_lr, trainer)
        if self.adversarial_weight:  # frozen trunk: the LPIPS network's, or one of its own
            self.features = self.lpips
            if self.features is None:
                self.features = load_lpips(self.lpips_net, self.lpips_backbone)
            self.features.to(device)
            probe = backbone_features(self.features, torch.zeros(1, 3, 64, 64, device=device),
                                      self.disc_depths)  # fmt: skip
            self.discriminator = FeatureDiscriminator([f.shape[1] for f in probe],
                                                      self.disc_width).to(device)  # fmt: skip
            self.disc_optimizer = _own_adamw(self.discriminator, self.disc_lr, trainer)

    def prepare(self, accelerator) -> None:
        self.accelerator = accelerator
        if self.critic is not None:
            self.critic, self.critic_optimizer = accelerator.prepare(
                self.critic, self.critic_optimizer
            )
        if self.discriminator is not None:
            self.discriminator, self.disc_optimizer = accelerator.prepare(
                self.discriminator, self.disc_optimizer
            )

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.critic, self.discriminator) if m is not None]

    def rungs(self, model: PerCo) -> list[tuple[PerCo, PerCo | None]]:
        """``(student, its frozen teacher)`` per rung the trained U-Net decodes: here the
        run's model alone (the teacher: None without a distillation term)."""
        return [(model, self.teacher)]

    @staticmethod
    @torch.no_grad()
    def targets(
        model: PerCo, batch: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(latents, target image in [-1, 1], padded images or None)`` of a batch under
        ``model``'s frozen autoencoder (on latent data the target is the autoencoder's
        decoding of the latent, the student's ceiling). The rungs of a multi-rate student
        share the autoencoder, so this runs once a batch, not once a rung."""
        images = batch.get("images")
        if images is None:
            latents = batch["latents"].to(model.device, model.denoiser.dtype)
            return latents, model.autoencoder.decode(latents).float().clamp(-1, 1), None
        padded = model._pad(images.to(model.device))
        return model._latents(padded), padded * 2 - 1, padded

    @staticmethod
    @torch.no_grad()
    def conditions(
        model: PerCo, batch: dict, latents: torch.Tensor, padded: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """``(spatial, text, null text)``: the U-Net's conditions of a batch's ``latents``
        (and ``padded`` images, from :meth:`targets`) under ``model``'s frozen encoder."""
        if padded is not None and model.padded_size(*padded.shape[-2:]) != padded.shape[-2:]:
            raise ValueError(f"{model.rate.name}'s cell does not divide the crops "
                             f"({tuple(padded.shape[-2:])}): give crops whose size every "
                             "rung's cell divides")  # fmt: skip
        codes = model._quantize(latents, padded).codes
        local = model._local(codes, latents.shape[-2:])
        images = batch.get("images")
        text, null = model._context(batch["captions"], model._global(images)[0])
        return local.spatial, model._append(text, local.tokens), model._append(null, local.tokens)

    def __call__(self, trained, model, batch, generator, timesteps):
        rungs = self.rungs(model)  # one U-Net call for all: the rungs stacked on the batch
        latents, target, padded = self.targets(model, batch)
        per_rung = [self.conditions(student, batch, latents, padded) for student, _ in rungs]
        spatial, text, null = (torch.cat(c) for c in zip(*per_rung, strict=True))
        size, schedule = len(latents), model.schedule
        steps = torch.tensor([student.config.one_step_timestep for student, _ in rungs])
        shape = (len(rungs) * size, *latents.shape[1:])
        noise = torch.randn(shape, generator=generator).to(latents.device, model.denoiser.dtype)
        x0 = one_step_x0(trained, model.scheduler, schedule.start(noise), spatial, text,
                         steps.repeat_interleave(size))  # fmt: skip
        decoded = model.autoencoder.decode(x0).float()
        loss, terms = regression_loss(decoded, target.repeat(len(rungs), 1, 1, 1), self.lpips,
                                      self.l1_weight, self.lpips_weight)  # fmt: skip
        loss = self.data_weight * loss
        if self.distill_weight:
            chunks = zip(rungs, *(t.split(size) for t in (noise, spatial, text, null)), strict=True)
            paired = torch.cat([self._teacher_sample(teacher, *rest)
                                for (_, teacher), *rest in chunks])  # fmt: skip
            distill, distill_terms = regression_loss(decoded, paired, self.lpips, self.l1_weight,
                                                     self.lpips_weight)  # fmt: skip
            loss = loss + self.distill_weight * distill
            terms.update({k.replace("train/", "train/distill_"): v
                          for k, v in distill_terms.items()})  # fmt: skip
        if self.critic is not None:
            dmd = self._distribution_matching(x0, spatial, text, null, generator, terms)
            loss = loss + self.dmd_weight * dmd
        if self.discriminator is not None:
            adversarial = self._adversarial(decoded, target, terms)
            loss = loss + self.adversarial_weight * adversarial
        return loss, terms

    @staticmethod
    @torch.no_grad()
    def _teacher_sample(teacher, noise, spatial, text, null) -> torch.Tensor:
        """The frozen teacher's decoded image from the student's own noise, sampled as the
        teacher decodes (its steps, guidance and scale): the target of paired distillation
        (Luhman & Luhman 2021), which keeps each noise's detail where the regression on the
        image alone averages it away."""
        cfg = teacher.config
        latents = sample(teacher.denoiser, teacher.scheduler, spatial, text, null,
                         steps=teacher.default_steps, guidance=cfg.guidance,
                         guidance_scale=cfg.guidance_scale, noise=noise)  # fmt: skip
        return teacher.autoencoder.decode(latents).float().clamp(-1, 1)

    def _draw(self, x0, generator):
        """A noised copy of ``x0`` at a timestep drawn from ``dmd_timesteps``."""
        lo, hi = self.dmd_timesteps
        t = torch.randint(lo, hi + 1, (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        return self.teacher.schedule.add_noise(x0, noise, t), noise, t

    def _distribution_matching(self, x0, spatial, text, null, generator, terms):
        """The student's DMD loss at a noised copy of its output, then ``critic_updates``
        steps of the critic's denoising loss on the (detached) output."""
        teacher, sched = self.teacher, self.teacher.scheduler
        cfg = teacher.config
        noisy, _, t = self._draw(x0.detach(), generator)
        with torch.no_grad():
            real = guided_x0(teacher.denoiser, sched, noisy, t, spatial, text, null, cfg.guidance,
                             cfg.guidance_scale)  # fmt: skip
            fake = guided_x0(self.critic, sched, noisy, t, spatial, text, None, "none", 1.0)
        dmd = dmd_loss(x0, real, fake)
        terms["train/dmd"] = dmd.detach()

        for _ in range(self.critic_updates):  # the critic follows the student's outputs
            noisy, noise, t = self._draw(x0.detach(), generator)
            target = teacher.schedule.target(x0.detach(), noise, t)
            pred = predict(self.critic, noisy, spatial, t, text)
            critic_loss = F.mse_loss(pred.float(), target.float())
            self.accelerator.backward(critic_loss)
            self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)
        terms["train/critic"] = critic_loss.detach()
        return dmd

    def _adversarial(self, decoded, target, terms):
        """One discriminator step on the image's and the (detached) student's features,
        then the student's hinge loss against the updated discriminator, whose weights it
        sees detached: its gradient reaches only the student. ``decoded`` holds each rung's
        decoding of the batch in turn, ``target`` the batch's images once."""
        fake = backbone_features(self.features, decoded, self.disc_depths)
        with torch.no_grad():
            real = backbone_features(self.features, target, self.disc_depths)
        rungs = len(decoded) // len(target)
        pairs = zip(real, fake, strict=True)
        both = self.discriminator([torch.cat([r.repeat(rungs, 1, 1, 1), f.detach()])
                                   for r, f in pairs])  # fmt: skip
        halves = [logits.chunk(2) for logits in both]
        disc_loss = discriminator_loss([r for r, _ in halves], [f for _, f in halves])
        self.accelerator.backward(disc_loss)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)

        heads = self.accelerator.unwrap_model(self.discriminator)
        frozen = {name: p.detach() for name, p in heads.named_parameters()}
        adversarial = generator_loss(torch.func.functional_call(heads, frozen, (fake,)))
        terms["train/discriminator"] = disc_loss.detach()
        terms["train/adversarial"] = adversarial.detach()
        return adversarial


class MultiRateStudentObjective(StudentObjective):
    """One student U-Net for every rung of a teacher sweep (OSCAR's multi-rate decoder):
    each rung keeps its teacher's frozen encoder, files and null text, and is told apart
    by its own fixed timestep (OSCAR's "pseudo-timestep", ``timesteps``: rate → t), the
    one conditioning input a one-step student has left free. Every batch goes through
    each rung's encoder and the U-Net's one call takes the rungs stacked, so a step
    costs what a step of each per-rung student would together.

    The run's rung (``rate=``, from ``init=``) is the model the loop trains, validates
    and checkpoints; its U-Net is the one the other rungs share, so a checkpoint holds all
    that trains, and the other rungs' frozen parts come back from ``sweep`` on resume.
    :meth:`export` writes each rung's student where a per-rung sweep would, so
    :func:`perco.models.loading.load_model` finds them and
    :func:`perco.models.loading.load_models` serves them with one U-Net. No distribution
    matching (its critic and teacher score are per rung). ``timesteps`` replaces the
    single ``timestep`` of a per-rung student.
    """

    def __init__(self, sweep: str | os.PathLike, timesteps: dict[str, int], **student):
        super().__init__(**student)
        if self.dmd_weight:
            raise ValueError("a multi-rate student has no distribution-matching term: "
                             "objective.dmd_weight must be 0")  # fmt: skip
        self.sweep, self.timesteps = str(sweep), {str(r): int(t) for r, t in timesteps.items()}
        self.others: list[tuple[PerCo, PerCo | None]] = []

    def model(self, model: PerCo) -> PerCo:
        from ..models.loading import load_model
        from ..models.student import one_step_student

        if model.config.sampler == "one-step":
            raise ValueError("init= is a one-step student: a multi-rate student starts "
                             "from a teacher sweep")  # fmt: skip
        own = model.rate.name
        if own not in self.timesteps:
            raise ValueError(f"rate={own} is not one of objective.timesteps "
                             f"({', '.join(self.timesteps)})")  # fmt: skip
        self.timestep = self.timesteps[own]
        student = super().model(model)
        shared = {student.backbone.attribute: student.denoiser,
                  "autoencoder": student.autoencoder}  # fmt: skip
        latent_space = fingerprint({"autoencoder": student.autoencoder}, {})
        for rate, timestep in self.timesteps.items():
            if rate == own:
                continue
            teacher = load_model(self.sweep, rate).requires_grad_(False)
            if fingerprint({"autoencoder": teacher.autoencoder}, {}) != latent_space:
                raise ValueError(f"{rate}'s autoencoder is not {own}'s: the rungs of a "
                                 "multi-rate student share one latent space")  # fmt: skip
            teacher.autoencoder = student.autoencoder
            other = one_step_student(teacher, timestep, parts=shared).eval()
            self.others.append((other, teacher if self.distill_weight else None))
        log.info("multi-rate student: one U-Net (from %s's) for %s", own,
                 ", ".join(f"{r} at t={t}" for r, t in self.timesteps.items()))  # fmt: skip
        return student

    def trainable(self, model: PerCo, mode: str, **options) -> tuple[nn.Module, list]:
        trained, params = super().trainable(model, mode, **options)
        for other, _ in self.others:  # the U-Net as set up for training (LoRA-wrapped)
            setattr(other, other.backbone.attribute, model.denoiser)
        return trained, params

    def setup(self, trainer, device: torch.device) -> None:
        super().setup(trainer, device)
        for other, teacher in self.others:
            other.to(device)
            if teacher is not None:
                teacher.to(device)

    def rungs(self, model: PerCo) -> list[tuple[PerCo, PerCo | None]]:
        return [(model, self.teacher), *self.others]

    def export(self, model: PerCo, out: Path) -> None:
        """Each rung's student in ``<run>/../<rate>/model``: the run's own in its folder,
        the others beside it, as ``perco-train -m`` lays out a sweep."""
        super().export(model, out)
        for other, _ in self.others:
            other.forget_fingerprint()
            other.save_pretrained(out.parent / other.rate.name / "model")
