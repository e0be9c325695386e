"""One-step students of a PerCo model: the teacher's encoder, a decoder that samples in one
U-Net call (:class:`perco.sampling.OneStepSampler`).

A student starts as a copy of its teacher. What makes the bitstream stays the teacher's
and stays frozen (autoencoder, hyper-encoder, quantizer, index prior), so every ``.perco``
file the teacher wrote decodes with the student and the other way round: the student's
files carry the teacher's fingerprint (``PerCoConfig.file_fingerprint``). Its
``perco.json`` says that it decodes in one step (``sampler: one-step``, ``steps: 1``), so
``perco decompress``, ``perco-eval`` and the API use it without a flag.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

from torch import nn

from .perco import PerCo

__all__ = ["one_step_student", "ENCODER_PARTS", "freeze_encoder"]

# what the indices depend on: frozen in a student, or its teacher's files would not decode
ENCODER_PARTS = ("autoencoder", "hyper_encoder", "quantizer", "index_prior")


def one_step_student(
    teacher: PerCo, timestep: int = 999, parts: Mapping[str, nn.Module] | None = None
) -> PerCo:
    """A copy of ``teacher`` that decodes in one U-Net call at ``timestep``, from noise,
    without a guidance pass; its files are the teacher's. ``parts`` (name → module): what
    the student holds instead of a copy of the teacher's part, uncopied (a multi-rate
    student's U-Net and autoencoder, shared by its rungs)."""
    from ..codec import file_fingerprint

    memo = {id(getattr(teacher, name)): part for name, part in (parts or {}).items()}
    student = copy.deepcopy(teacher, memo)
    student.config = dataclasses.replace(
        teacher.config,
        sampler="one-step",
        one_step_timestep=timestep,
        steps=1,
        file_fingerprint=file_fingerprint(teacher).hex(),
    )
    student.forget_fingerprint()
    freeze_encoder(student)
    return student


def freeze_encoder(student: PerCo) -> None:
    """Stop gradients into the parts the bitstream depends on (after ``set_trainable``,
    which trains the hyper-encoder and quantizer in every mode)."""
    for name in ENCODER_PARTS:
        part = getattr(student, name, None)
        if isinstance(part, nn.Module):
            part.requires_grad_(False)
