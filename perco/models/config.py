"""The settings of a PerCo model that are not weights: :class:`PerCoConfig` (``perco.json``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..rates import Rate, get_rate
from ..sampling import GUIDANCE_MODES, SAMPLERS, GuidanceMode

__all__ = ["PerCoConfig", "Condition", "ADDED_LATER"]

Condition = Literal["codes", "projected"]


@dataclass
class PerCoConfig:
    """Settings that are not weights; saved as ``perco.json`` beside the components.

    Args:
        rate: the rung (its name, downsampling, ``V`` and default steps are all stored).
        condition: what is concatenated to the noisy latent: ``"projected"`` — the code
            vectors projected back up to the hyper-encoder width (the authors' design,
            PerCo (SD)); ``"codes"`` — the 32-dim code vectors themselves.
        guidance: classifier-free guidance mode, see :mod:`perco.sampling`.
        guidance_scale: ``λ`` of eq. 5 (the paper: 3).
        text_drop_prob: share of training samples whose caption is replaced by the null
            text (the paper: 10%).
        latent_metric: a ``C × C`` positive semi-definite matrix ``G``; the diffusion
            loss becomes ``eᵀ G e / C`` per latent position instead of ``|e|² / C``
            (``None``: ``G = I``, the paper). For a many-channel latent whose channels
            matter very unequally in pixels (TAEF2: two of 32 carry most of the
            luminance, colour is spread over several), the decoder's own metric
            (:func:`perco.models.autoencoders.latent_metric`) makes the loss a
            linearised pixel MSE, so the hyper-latent's few bits go where they show.
        lowpass_weight: ``w`` of an extra loss term on the error averaged over
            ``lowpass_size × lowpass_size`` latent windows (``0``: none, the paper). An
            error that is constant over a window then costs ``1 + w`` times as much as
            before, an error that averages out costs nothing more: the index bits go
            first to regional means (colour, brightness), as JPEG's DC coefficients do.
        lowpass_size: window of ``lowpass_weight``, in latent positions.
        local: the local context ``z_l``. ``"quantized"``: PerCo's vector-quantized
            hyper-latent. Two ablations of the paper: ``"continuous"`` — the
            hyper-encoder's output in the codebook space, not quantized ("PerCo w/o
            quantization", Table 1 right; float32, no bitstream, rate not applicable);
            ``"none"`` — no local context, the U-Net's ``z_l`` channels are zero (the
            text-only model of Fig. 7; only the caption is coded). Ablation models have
            no ``.perco`` files: :func:`perco.eval.evaluate` measures them directly.
        text: whether the model reads captions. ``False`` for a model trained without
            text (the small TAEF2 model): a caption would only add bytes to its files and
            nudge the decoder off what it learned, so :meth:`PerCo.encode` refuses one.
        steps: decoding steps when a call asks for none; ``None``: the rung's default
            (20 below 0.05 bpp, 5 above). The one rule every command follows.
        posterior: how a VAE's latent is read from its posterior. ``"mode"``: its mean
            (deterministic; perco's default). ``"sample"``: a draw, as PerCo (SD) encodes
            in training and in its compression script; when encoding, the draw is seeded
            per image (seed 0), so compressing an image twice gives the same file, and a
            training step draws afresh from its generator. Only for autoencoders with a
            posterior (SD's VAE).
        sampler: how the model decodes (:mod:`perco.sampling`). ``"ddim"``: the
            scheduler's steps with classifier-free guidance (PerCo). ``"one-step"``: a
            distilled student: one U-Net call from noise at ``one_step_timestep``, no
            guidance pass (the teacher's guidance is distilled into it).
        one_step_timestep: the timestep a one-step student is given (OSCAR's
            "pseudo-timestep").
        file_fingerprint: hex fingerprint that this model's files carry, when it is not
            the model's own: a student decodes (and writes) its teacher's files, whose
            indices come from the same frozen encoder.
    """

    rate: Rate
    condition: Condition = "projected"
    guidance: GuidanceMode = "text"
    guidance_scale: float = 3.0
    text_drop_prob: float = 0.1
    latent_metric: list[list[float]] | None = None
    lowpass_weight: float = 0.0
    lowpass_size: int = 4
    local: Literal["quantized", "continuous", "none"] = "quantized"
    text: bool = True
    steps: int | None = None
    posterior: Literal["mode", "sample"] = "mode"
    sampler: Literal["ddim", "one-step"] = "ddim"
    one_step_timestep: int = 999
    file_fingerprint: str | None = None

    def __post_init__(self):
        if isinstance(self.rate, dict):
            self.rate = Rate(**self.rate)
        self.rate = get_rate(self.rate)
        if self.condition not in ("codes", "projected"):
            raise ValueError(f"condition must be 'codes' or 'projected', got {self.condition!r}")
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        if self.local not in ("quantized", "continuous", "none"):
            raise ValueError(
                f"local must be 'quantized', 'continuous' or 'none', got {self.local!r}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.posterior not in ("mode", "sample"):
            raise ValueError(f"posterior must be 'mode' or 'sample', got {self.posterior!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# settings added after the first models were trained, with the value those models have:
# they enter the fingerprint only when set otherwise, so older models keep theirs (and
# their files still decode)
ADDED_LATER = {
    "local": "quantized",
    "text": True,
    "steps": None,
    "posterior": "mode",
    "sampler": "ddim",
    "one_step_timestep": 999,
    "file_fingerprint": None,
}
