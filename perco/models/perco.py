"""PerCo: a latent diffusion decoder conditioned on a vector-quantized hyper-latent and a caption.

Careil, Muckley, Verbeek, Lathuilière. "Towards image compression with perfect realism
at ultra-low bitrates", ICLR 2024. Data flow (paper Fig. 2)::

    image ─ E ─► latent ─ hyper-encoder ─► H_s ─ VQ ─► indices z_l   (h·w·log2 V bits)
    caption z_g (≤ 32 tokens, coded losslessly)

    z_l ─ lookup ─ (project_out) ─ nearest upsample ─┐
    noise x_T ────────────────────────────────────── concat ─► U-Net (widened conv_in)
    z_g ─ text encoder ─► cross-attention ───────────────────►    × T steps, CFG on text
                                                               ─► latent ─ D ─► image

Training (eq. 3–4): the diffusion loss of the denoiser's prediction (ε or v on a DDPM
schedule, the velocity with rectified flow: :mod:`perco.schedules`) plus the quantizer's
commitment loss; the autoencoder is frozen. The denoiser is a U-Net (the paper) or a
transformer (:mod:`perco.models.backbones`); nothing here asks which.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..fingerprint import fingerprint
from ..losses import diffusion_loss, metric_factor
from ..rates import Rate, hyper_latent_size
from ..sampling import GuidanceMode, sampler_for, with_spacing
from ..schedules import FlowTimesteps, NoiseSchedule, schedule_for
from ..timing import StageTimer, stage
from ..types import Capability, EncodedImages, Local, PerCoLoss, QuantizerOutput
from .autoencoders import Autoencoder, SDAutoencoder
from .backbones import BACKBONES, Backbone, backbone_named, backbone_of
from .config import ADDED_LATER, PerCoConfig
from .hyper_encoder import HyperEncoder
from .index_prior import ContextPrior, IndexPrior, UniformPrior
from .quantizer import VectorQuantizer
from .serialization import load, save
from .text import NullTextEmbedding, drop_captions, encode_captions, text_shape

__all__ = ["PerCo", "PerCoConfig", "Local", "Capability"]

_DENOISER_NAMES = tuple(backbone_named(n).attribute for n in BACKBONES)  # unet=, transformer=

Trainable = Literal["linear", "full", "lora", "none"]


class PerCo(nn.Module):
    """The PerCo codec: ``encode`` → indices + caption, ``decode`` → images, ``forward`` → loss.

    Build one with :meth:`from_stable_diffusion` (pretrained SD weights, new hyper-encoder
    and quantizer), :meth:`from_components`, or load a saved one with
    :meth:`from_pretrained`. Images are ``(B, 3, H, W)`` in ``[0, 1]`` of any size: they
    are padded to :attr:`pad_multiple` and cropped back after decoding.

    The denoiser (4th argument, or ``unet=``/``transformer=``) is held under its backbone's
    name, as in a diffusers pipeline folder; :attr:`denoiser` is it whatever its family.
    """

    variant = "perco"
    capabilities = Capability.NONE

    def __init__(
        self,
        autoencoder: Autoencoder,
        hyper_encoder: HyperEncoder,
        quantizer: VectorQuantizer,
        denoiser: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer=None,
        null_text: NullTextEmbedding | None = None,
        scheduler=None,
        config: PerCoConfig | None = None,
        **components: nn.Module,
    ):
        super().__init__()
        denoisers = [components.pop(n) for n in _DENOISER_NAMES if n in components]
        denoisers += [] if denoiser is None else [denoiser]
        parts = (text_encoder, tokenizer, null_text, scheduler, config)
        if len(denoisers) != 1 or any(part is None for part in parts):
            raise TypeError(f"{type(self).__name__} takes one denoiser (unet=, transformer=), a "
                            "text encoder, tokenizer, null text, scheduler and config")  # fmt: skip
        own = set(self._MODULES) - set(PerCo._MODULES)
        if set(components) != own:
            raise TypeError(f"{type(self).__name__} takes components {sorted(own)}, "
                            f"got {sorted(components)}")  # fmt: skip
        for name, module in components.items():  # a variant's own, before the checks
            setattr(self, name, module)
        self.autoencoder = autoencoder
        self.hyper_encoder = hyper_encoder
        self.quantizer = quantizer
        self.backbone: Backbone = backbone_of(denoisers[0])
        setattr(self, self.backbone.attribute, denoisers[0])
        self.text_encoder = text_encoder
        self.null_text = null_text
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.config = config
        self._check_consistency()
        if isinstance(autoencoder, SDAutoencoder):
            autoencoder.posterior = config.posterior
        # frozen in every finetuning mode (paper §4.1)
        self.autoencoder.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.index_prior: ContextPrior | None = None  # fitted after training, if at all
        self.index_prior_record: dict | None = None  # how it was fitted (perco.json)
        self.provenance: dict | None = None  # where imported weights came from (perco.json)
        self._fingerprint: bytes | None = None

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_components(
        cls,
        autoencoder: Autoencoder,
        denoiser: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        scheduler,
        rate: str | Rate,
        *,
        hyper_encoder: dict | None = None,
        quantizer: dict | None = None,
        conv_in_init: Literal["random", "zero"] = "random",
        learned_null_text: bool = True,
        **config,
    ) -> PerCo:
        """Add a new hyper-encoder, quantizer and null text to pretrained parts.

        ``denoiser``: a U-Net or transformer of a known backbone, whose input layer is
        widened here to take ``z_l`` (``conv_in_init``: the new weights' init).
        ``hyper_encoder`` and ``quantizer`` override the defaults of
        :class:`HyperEncoder` and :class:`VectorQuantizer`; the input width and rate-given
        settings (``in_channels``, ``downsample``, ``codebook_size``, ``dim``) are filled
        in here. ``config`` holds :class:`PerCoConfig` fields.
        """
        cfg = PerCoConfig(rate=rate, **config)
        he = HyperEncoder(
            **{
                **(hyper_encoder or {}),
                "in_channels": autoencoder.latent_channels,
                "downsample": cfg.rate.downsample,
            }
        )
        vq = VectorQuantizer(
            **{
                **(quantizer or {}),
                "codebook_size": cfg.rate.codebook_size,
                "dim": he.config.out_channels,
            }
        )
        extra = vq.config.dim if cfg.condition == "projected" else vq.config.codebook_dim
        backbone_of(denoiser).widen(denoiser, extra, conv_in_init)

        length, width = text_shape(tokenizer, text_encoder)
        null = NullTextEmbedding(length, width, learned=learned_null_text)
        with torch.no_grad():
            null.initialise(encode_captions(tokenizer, text_encoder, [""]))
        return cls(autoencoder, he, vq, denoiser, text_encoder, tokenizer, null, scheduler, cfg)

    @classmethod
    def _extend(cls, base: PerCo, **components: nn.Module) -> PerCo:
        """A ``cls`` variant made of ``base``'s parts (from :meth:`PerCo.from_components`)
        plus the variant's own ``components``."""
        parts = {name: getattr(base, name) for name in PerCo._MODULES}
        parts[base.backbone.attribute] = base.denoiser
        return cls(
            autoencoder=base.autoencoder,
            tokenizer=base.tokenizer,
            scheduler=base.scheduler,
            config=base.config,
            **parts,
            **components,
        )

    @classmethod
    def from_stable_diffusion(
        cls,
        pretrained: str | os.PathLike = "stabilityai/stable-diffusion-2-1",
        rate: str | Rate = "r0.0019",
        *,
        torch_dtype: torch.dtype | None = None,
        timestep_spacing: str | None = None,
        unet: nn.Module | None = None,
        **kwargs,
    ) -> PerCo:
        """Start PerCo from a Stable Diffusion checkpoint (a hub id or a local folder).

        Loads ``vae``, ``unet``, ``text_encoder``, ``tokenizer`` and the ``scheduler``
        config (used with DDIM) from their subfolders; ``kwargs`` go to
        :meth:`from_components`. ``timestep_spacing`` (``leading``, ``trailing``,
        ``linspace``) replaces the scheduler config's; the model saves it with its
        scheduler, so its files decode with it. ``unet``: a U-Net to use instead of the
        checkpoint's (e.g. one whose weights come from elsewhere, built on the meta device).
        """
        from .backbones.unet import stable_diffusion_parts

        parts = stable_diffusion_parts(pretrained, torch_dtype=torch_dtype,
                                       timestep_spacing=timestep_spacing, unet=unet)  # fmt: skip
        return cls.from_components(**parts, rate=rate, **kwargs)

    @classmethod
    def from_flux2(cls, pretrained: str | os.PathLike = "black-forest-labs/FLUX.2-klein-4B",
                   rate: str | Rate = "r0.0019", **kwargs) -> PerCo:  # fmt: skip
        """Start PerCo from a FLUX.2 pipeline (a hub id or a local folder; [klein] 4B by
        default): ``torch_dtype``, ``decoder`` (``"taef2"`` with ``taef2_dir``) and
        ``transformer`` go to :func:`~perco.models.backbones.flux2.flux2_parts`, the rest
        to :meth:`from_components`."""
        from .backbones.flux2 import flux2_parts

        keys = ("torch_dtype", "decoder", "taef2_dir", "transformer")
        parts = flux2_parts(pretrained, **{k: kwargs.pop(k) for k in keys if k in kwargs})
        return cls.from_components(**parts, rate=rate, **kwargs)

    # -- properties -----------------------------------------------------------------
    @property
    def rate(self) -> Rate:
        return self.config.rate

    @property
    def default_steps(self) -> int:
        """Decoding steps when none are asked for: ``config.steps``, else the rung's."""
        return self.config.steps or self.rate.steps

    @property
    def denoiser(self) -> nn.Module:
        """The U-Net or transformer (held and saved under its backbone's ``attribute``)."""
        return getattr(self, self.backbone.attribute)

    @property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule family of the model's scheduler (:mod:`perco.schedules`)."""
        return schedule_for(self.scheduler)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def cell(self) -> int:
        """Pixels per hyper-latent cell: the autoencoder's factor × the rung's downsampling."""
        return self.autoencoder.factor * self.rate.downsample

    @property
    def _metric_factor(self) -> torch.Tensor | None:
        """:func:`~perco.losses.metric_factor` of ``config.latent_metric``, computed once
        per metric (not at every training step)."""
        metric = self.config.latent_metric
        if metric is None:
            return None
        cached = getattr(self, "_factor", None)
        if cached is None or cached[0] != metric:
            self._factor = (metric, metric_factor(metric))
        return self._factor[1]

    @property
    def pad_multiple(self) -> int:
        """Image sides are padded to a multiple of this (64 for SD at every rung)."""
        factor = self.backbone.pad_factor(self.denoiser)
        return self.autoencoder.factor * max(self.rate.downsample, factor)

    @property
    def has_lora(self) -> bool:
        """Whether the denoiser carries LoRA adapters (``set_trainable("lora")``)."""
        return bool(getattr(self.denoiser, "peft_config", None))

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """Size an image of ``height × width`` is padded to before encoding."""
        m = self.pad_multiple
        return -(-height // m) * m, -(-width // m) * m

    def index_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the coded indices: the hyper-latent cells that overlap the image."""
        return hyper_latent_size(self.rate, height, width, self.autoencoder.factor)

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the settings, tokenizer vocabulary, scheduler and all weights.

        Read from ``perco.json`` for a loaded checkpoint (so it names the checkpoint even
        when loaded in another dtype), else computed once; switching to training mode
        forgets it, and :meth:`save_pretrained` recomputes it.
        """
        if self._fingerprint is None:
            modules = {"autoencoder": self.autoencoder, **self.components()}
            if self.index_prior is not None:  # absent: the fingerprint it always had
                modules["index_prior"] = self.index_prior
            self._fingerprint = fingerprint(modules, self._settings())
        return self._fingerprint

    def _settings(self) -> dict:
        scheduler = {k: v for k, v in self.scheduler.config.items() if not k.startswith("_")}
        variant = {} if self.variant == "perco" else {"variant": self.variant}  # PerCo's as before
        variant.update(self.backbone.settings)
        settings = self.config.to_dict()
        for key, default in ADDED_LATER.items():  # older models keep their fingerprints
            if settings[key] == default:
                del settings[key]
        # options that change the outputs of the same weights (PerCo (SD)'s)
        if self.hyper_encoder.config.get("attention_relu"):
            settings["hyper_encoder_attention_relu"] = True
        if self.quantizer.config.get("distance", "euclidean") != "euclidean":
            settings["quantizer_distance"] = self.quantizer.config.distance
        return {
            **settings,
            **variant,
            "autoencoder": self.autoencoder.name,
            "scheduler_class": type(self.scheduler).__name__,
            "scheduler": scheduler,
            "vocabulary": sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        }

    @property
    def prior(self) -> IndexPrior:
        """How the indices are coded: the fitted :class:`ContextPrior`, else uniformly."""
        if self.index_prior is not None:
            return self.index_prior
        return UniformPrior(self.rate.codebook_size)

    def set_index_prior(self, prior: ContextPrior | None, record: dict | None = None) -> None:
        """Attach (or remove, with ``None``) a fitted index prior. The fingerprint changes:
        files coded before do not decode with the model after, and the other way round."""
        if prior is not None and prior.codebook_size != self.rate.codebook_size:
            raise ValueError(f"the prior codes {prior.codebook_size} symbols, the model's "
                             f"codebook has {self.rate.codebook_size}")  # fmt: skip
        if prior is not None:
            prior.requires_grad_(False).eval()
        self.index_prior = prior
        self.index_prior_record = record if prior is not None else None
        self.forget_fingerprint()

    def train(self, mode: bool = True) -> PerCo:
        if mode:
            self.forget_fingerprint()  # weights are about to change
        return super().train(mode)

    def forget_fingerprint(self) -> None:
        """Compute the fingerprint afresh at its next use: after weights changed outside
        training mode (a student's U-Net trains while the rest stays in eval)."""
        self._fingerprint = None

    def _check_consistency(self) -> None:
        he, vq, rate = self.hyper_encoder.config, self.quantizer.config, self.config.rate
        if he.downsample != rate.downsample or vq.codebook_size != rate.codebook_size:
            raise ValueError(
                f"rate {rate.name} wants downsample {rate.downsample} and V={rate.codebook_size}, "
                f"but the hyper-encoder downsamples by {he.downsample} and the codebook has "
                f"{vq.codebook_size} entries"
            )
        if self.config.posterior != "mode" and not isinstance(self.autoencoder, SDAutoencoder):
            raise ValueError(
                f"posterior={self.config.posterior!r} needs a VAE with a posterior (SD's); "
                f"the {self.autoencoder.name} autoencoder encodes deterministically"
            )
        if he.in_channels != self.autoencoder.latent_channels:
            raise ValueError(
                f"hyper-encoder takes {he.in_channels} channels, the autoencoder gives "
                f"{self.autoencoder.latent_channels}"
            )
        want = self.autoencoder.latent_channels + self.local_channels
        got = self.backbone.in_channels(self.denoiser)
        if got != want:
            raise ValueError(f"{self.backbone.label} takes {got} input channels, expected {want}")

    @property
    def global_pq(self) -> tuple[int, int] | None:
        """``(M, V)`` of the codes that replace the caption in the file (PerCo-Image's
        product quantizer); ``None``: the file carries a caption."""
        return None

    @property
    def local_channels(self) -> int:
        """Channels concatenated to ``x_t`` (the widening of the denoiser's input layer)."""
        vq = self.quantizer.config
        return vq.dim if self.config.condition == "projected" else vq.codebook_dim

    # -- what variants change -----------------------------------------------------------
    def _hyper_input(self, latents: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """What the hyper-encoder sees: the autoencoder latent (PerCo)."""
        return latents

    def _local(self, codes: torch.Tensor, latent_size: tuple[int, int]) -> Local:
        """The U-Net's conditions from the code vectors ``(B, codebook_dim, h, w)``."""
        return Local(self._spatial(codes, latent_size))

    def _global(
        self, images: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(global embedding, its codes)`` of the images (unpadded) besides the caption (none)."""
        return None, None

    def _global_from_codes(self, codes: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def _context(
        self, captions: Sequence[str | None], embedding: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context, null context)`` for cross-attention: the caption and the null text."""
        return self._text(captions), self.null_text(len(captions)).to(self.device)

    def _image_loss(self, local: Local, images: torch.Tensor | None) -> torch.Tensor | None:
        """A variant's own image loss on its conditions (none for PerCo)."""
        return None

    @staticmethod
    def _append(context: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        return context if tokens is None else torch.cat([context, tokens.to(context)], dim=1)

    # -- shared steps ---------------------------------------------------------------
    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        ph, pw = self.padded_size(h, w)
        if (ph, pw) != (h, w):
            images = F.pad(images, (0, pw - w, 0, ph - h), mode="replicate")
        return images

    def pad_indices(self, indices: torch.Tensor, padded_size: tuple[int, int]) -> torch.Tensor:
        """Extend coded indices ``(B, h, w)`` to the padded grid by repeating edge cells.

        Cells past the image's cells cover only padding, which is cropped away after
        decoding, so they are not coded; the decoder repeats the nearest coded cell there.
        """
        gh, gw = padded_size[0] // self.cell, padded_size[1] // self.cell
        h, w = indices.shape[-2:]
        if (h, w) == (gh, gw):
            return indices
        rows = torch.arange(gh, device=indices.device).clamp(max=h - 1)
        cols = torch.arange(gw, device=indices.device).clamp(max=w - 1)
        return indices[:, rows][:, :, cols]

    def _latents(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images in ``[0, 1]`` (already padded) → frozen-autoencoder latents. With
        ``posterior="sample"``, ``generator`` draws them (a training step's fresh draw);
        without it each image's draw is seeded (encoding is deterministic)."""
        with torch.no_grad():
            if generator is not None and self.config.posterior == "sample":
                return self.autoencoder.encode_pixels(images, generator=generator)
            return self.autoencoder.encode_pixels(images)

    def _z_l(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors → ``z_l`` as the U-Net is conditioned on it (projected to the
        quantizer's ``dim`` when ``condition="projected"``), on the hyper-latent grid;
        all zero for the text-only ablation (``local="none"``)."""
        projected = self.config.condition == "projected"
        if self.config.local == "none":
            width = self.quantizer.config.dim if projected else codes.shape[1]
            return codes.new_zeros(codes.shape[0], width, *codes.shape[-2:])
        return self.quantizer.project_out(codes) if projected else codes

    def _quantize(
        self, latents: torch.Tensor, padded: torch.Tensor | None, generator=None
    ) -> QuantizerOutput:
        """The local context of a training step: PerCo's quantized hyper-latent, or an
        ablation's (``config.local``), which has no indices, loss or code statistics."""
        local = self.config.local
        if local == "quantized":
            hyper = self.hyper_encoder(self._hyper_input(latents, padded))
            return self.quantizer(hyper, generator)
        if local == "continuous":
            z = self.quantizer.project(self.hyper_encoder(self._hyper_input(latents, padded)))
        else:
            h, w = (s // self.rate.downsample for s in latents.shape[-2:])
            z = latents.new_zeros(latents.shape[0], self.quantizer.config.codebook_dim, h, w)
        nan = z.new_full((), float("nan"))
        indices = torch.zeros(z.shape[0], *z.shape[-2:], dtype=torch.long, device=z.device)
        return QuantizerOutput(z, indices, z.new_zeros(()), nan, nan)

    def _spatial(self, codes: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Code vectors → the channels concatenated to ``x_t``, on the latent grid."""
        return F.interpolate(self._z_l(codes), size=latent_size, mode="nearest")

    def _text(self, captions: Sequence[str | None]) -> torch.Tensor:
        """Caption embeddings, with the null text where a caption is ``None``."""
        null = self.null_text(len(captions)).to(self.device)
        if all(c is None for c in captions):
            return null
        grad = any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            text = encode_captions(self.tokenizer, self.text_encoder, [c or "" for c in captions])
        has = torch.tensor([c is not None for c in captions], device=text.device)[:, None, None]
        return torch.where(has, text, null.to(text.dtype))

    # -- training -------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor | None,
        captions: Sequence[str | None],
        *,
        latents: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        snr_gamma: float | None = None,
        flow_timesteps: FlowTimesteps | None = None,
    ) -> PerCoLoss:
        """Training loss of a batch (paper eq. 3: ε, v or flow velocity; plus eq. 4).

        ``snr_gamma``: Min-SNR-γ loss weighting (Hang et al. 2023), ``min(SNR, γ)`` in
        x0 terms, which stops nearly clean timesteps from dominating; ``None``: the
        paper's unweighted loss. ``flow_timesteps``: how a flow model draws and weights
        σ (default: SD 3's logit-normal), shifted for the latent's size as its sampler is.

        ``timesteps`` and ``noise`` are drawn when not given; in training mode captions
        are dropped to the null text with probability ``config.text_drop_prob``. A CPU
        ``generator`` makes every random draw of the step (noise, timesteps, caption
        drop, codebook restarts) reproducible. ``latents`` (from the latent pre-pass of
        :mod:`perco.data.latents`, made with this model's autoencoder) replace ``images``.
        """
        images = None if images is None else images.to(self.device)
        padded = None if images is None else self._pad(images)
        if latents is None:
            latents = self._latents(padded, generator)
        else:
            if latents.shape[1] != self.autoencoder.latent_channels:
                raise ValueError(
                    f"latents have {latents.shape[1]} channels, this model's autoencoder "
                    f"gives {self.autoencoder.latent_channels}: pre-computed with another one?"
                )
            latents = latents.to(self.device, self.denoiser.dtype)
        q = self._quantize(latents, padded, generator)
        local = self._local(q.codes, latents.shape[-2:])
        text, null = self._context(captions, self._global(images)[0])
        p_drop = self.config.text_drop_prob
        if self.training and p_drop > 0:
            text = drop_captions(text, null, p_drop, generator)
        text = self._append(text, local.tokens)

        schedule, denoiser = self.schedule, self.denoiser
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator).to(latents)
        if timesteps is None:
            mu = self.backbone.mu(denoiser, latents.shape[-2:], self.default_steps)
            timesteps = schedule.draw_timesteps(len(latents), generator, mu, flow_timesteps)
        timesteps = timesteps.to(latents.device)
        noisy = schedule.add_noise(latents, noise, timesteps)
        target = schedule.target(latents, noise, timesteps)

        pred = self.backbone.predict(denoiser, noisy.to(denoiser.dtype), local.spatial,
                                     timesteps, text)  # fmt: skip
        cfg = self.config
        diffusion = diffusion_loss(
            pred.float() - target.float(),
            factor=self._metric_factor,
            lowpass_weight=cfg.lowpass_weight,
            lowpass_size=cfg.lowpass_size,
            **schedule.loss_options(timesteps, snr_gamma, flow_timesteps),
        ).mean()
        x0 = schedule.x0(noisy, pred, timesteps)
        image = self._image_loss(local, padded)
        loss = diffusion + q.loss
        return PerCoLoss(
            loss=loss if image is None else loss + image,
            diffusion=diffusion.detach(),
            vq=q.loss.detach(),
            perplexity=q.perplexity,
            usage=q.usage,
            x0=x0,
            image=None if image is None else image.detach(),
        )

    def set_trainable(self, unet: Trainable = "linear", lora_rank: int = 16) -> list[nn.Parameter]:
        """Freeze what the paper freezes and return the parameters to optimise.

        ``unet`` (the denoiser, U-Net or transformer): ``"linear"`` — its ``nn.Linear``
        layers (paper), ``"full"`` — all of it (PerCo (SD)), ``"lora"`` — rank-``lora_rank``
        adapters (peft) on the attention projections (the backbone's ``lora_targets``),
        merged into the weights when saved, ``"none"``. The autoencoder and text encoder
        are frozen. Always trained: the hyper-encoder, the quantizer's projections, the
        widened input layer (``conv_in``, ``x_embedder``) and a learned null text.
        """
        if unet not in ("linear", "full", "lora", "none"):
            raise ValueError(f"unet must be 'linear', 'full', 'lora' or 'none', got {unet!r}")
        denoiser = self.denoiser
        if unet == "lora" and not self.has_lora:
            self.backbone.add_lora(denoiser, lora_rank)
        self.requires_grad_(False)
        if unet == "full":
            denoiser.requires_grad_(True)
        elif unet == "linear":
            for m in denoiser.modules():
                if isinstance(m, nn.Linear):
                    m.requires_grad_(True)
        elif unet == "lora":
            for name, p in denoiser.named_parameters():
                p.requires_grad_("lora_" in name)
        input_layer = self.backbone.input_layer(denoiser)
        for m in (self.hyper_encoder, self.quantizer, input_layer, self.null_text):
            m.requires_grad_(True)
        for name in self._TRAINED:
            getattr(self, name).requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    # -- the codec --------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        captions: Sequence[str | None] | None = None,
        *,
        latents: torch.Tensor | None = None,
        timer: StageTimer | None = None,
    ) -> EncodedImages:
        """Images ``(B, 3, H, W)`` in ``[0, 1]`` → indices and captions (no EMA updates).

        ``captions``: the global context per image; ``None`` (or a ``None`` entry) means
        no caption. ``latents``: the autoencoder's latents of the padded images, when
        already computed (e.g. shared by the rungs of one autoencoder). ``timer``
        collects "autoencoder encode", "hyper-encoder" and "global embedding" seconds.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        b, _, h, w = images.shape
        captions = list(captions) if captions is not None else [None] * b
        if len(captions) != b:
            raise ValueError(f"{len(captions)} captions for {b} images")
        if not self.config.text and any(c is not None for c in captions):
            raise ValueError(
                "this model has no text conditioning (trained without captions): a caption "
                "would only add bytes to the file; leave it out"
            )
        images = images.to(self.device)
        padded = self._pad(images)
        if latents is None:
            with stage(timer, "autoencoder encode"):
                latents = self._latents(padded)
        else:
            latents = latents.to(self.device)
        features = None
        with stage(timer, "hyper-encoder"):
            if self.config.local == "quantized":
                hyper = self.hyper_encoder(self._hyper_input(latents, padded))
                indices = self.quantizer.encode(hyper)
            else:  # ablations: continuous codes, or no local context at all
                q = self._quantize(latents, padded)
                indices = q.indices
                features = q.codes if self.config.local == "continuous" else None
        with stage(timer, "global embedding"):
            global_codes = self._global(images)[1]
        gh, gw = self.index_grid(h, w)
        indices = indices[:, :gh, :gw]  # cells that cover only padding are not coded
        return EncodedImages(
            indices=indices,
            captions=captions,
            sizes=[(h, w)] * b,
            padded_size=tuple(padded.shape[-2:]),
            rate=self.rate,
            global_codes=global_codes,
            features=features,
        )

    @torch.no_grad()
    def decode(
        self,
        encoded: EncodedImages,
        *,
        steps: int | None = None,
        guidance: GuidanceMode | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        timer: StageTimer | None = None,
        timestep_spacing: str | None = None,
    ) -> list[torch.Tensor]:
        """Reconstruct images ``(3, H, W)`` in ``[0, 1]``, cropped to their original sizes.

        ``steps``, ``guidance`` and ``guidance_scale`` default to the rate's steps and the
        config; ``timestep_spacing`` to the model's scheduler config (which it replaces for
        this call: ``leading``, ``trailing`` or ``linspace``). Without ``generator`` each
        image's noise comes from its own generator seeded with ``seed``, so a
        reconstruction does not depend on the rest of the batch.
        ``timer`` collects "text encoding", "decode steps" and "autoencoder decode".
        """
        if encoded.rate.name != self.rate.name:
            raise ValueError(
                f"indices were made at rate {encoded.rate.name}, this model is {self.rate.name}"
            )
        cfg = self.config
        b = len(encoded)
        if generator is None:
            generator = [torch.Generator().manual_seed(seed) for _ in range(b)]
        with stage(timer, "conditions"):
            local = self._decode_local(encoded)
        with stage(timer, "text encoding"):
            codes = encoded.global_codes
            embedding = self._global_from_codes(None if codes is None else codes.to(self.device))
            text, null = self._context(encoded.captions, embedding)
        sampler = sampler_for(cfg, steps=steps, guidance=guidance, guidance_scale=guidance_scale,
                              default_steps=self.default_steps)  # fmt: skip
        with stage(timer, "decode steps"):
            latents = sampler(self.denoiser, self.sampler(timestep_spacing), local.spatial,
                              self._append(text, local.tokens), self._append(null, local.tokens),
                              generator)  # fmt: skip
        with stage(timer, "autoencoder decode"):
            images = self.autoencoder.decode_pixels(latents).clamp(0, 1)
        return self._crop(images, encoded.sizes)

    def sampler(self, timestep_spacing: str | None = None):
        """The scheduler decoding uses: the model's, or a copy with another spacing."""
        return with_spacing(self.scheduler, timestep_spacing)

    @staticmethod
    def _crop(images: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Padded images ``(B, 3, H', W')`` → each cropped back to its original size."""
        return [img[:, :h, :w] for img, (h, w) in zip(images, sizes, strict=True)]

    def _decode_local(self, encoded: EncodedImages) -> Local:
        """The U-Net's conditions from coded indices (padded to the padded grid)."""
        latent_size = tuple(s // self.autoencoder.factor for s in encoded.padded_size)
        if encoded.features is not None:  # PerCo without quantization: the codes themselves
            return self._local(encoded.features.to(self.device), latent_size)
        indices = self.pad_indices(encoded.indices.to(self.device), encoded.padded_size)
        return self._local(self.quantizer.lookup(indices), latent_size)

    # -- saving ---------------------------------------------------------------------
    # saved components (besides the autoencoder and the denoiser, which its backbone names),
    # each in its own subfolder; a variant adds its own. None: loaded with transformers'
    # AutoModel (the text encoder).
    _MODULES: dict[str, type | None] = {
        "hyper_encoder": HyperEncoder,
        "quantizer": VectorQuantizer,
        "text_encoder": None,
        "null_text": NullTextEmbedding,
    }
    # a variant's components trained in every mode (set_trainable)
    _TRAINED: tuple[str, ...] = ()

    def components(self) -> dict[str, nn.Module]:
        """The saved components but the autoencoder, by folder name (the denoiser's is its
        backbone's ``attribute``)."""
        return {self.backbone.attribute: self.denoiser,
                **{name: getattr(self, name) for name in self._MODULES}}  # fmt: skip

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a folder: one subfolder per component (safetensors) and ``perco.json``,
        replacing an existing one whole or not at all (see :func:`.serialization.save`)."""
        save(self, path)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None
    ) -> PerCo:
        """Load a folder written by :meth:`save_pretrained`, as the variant it records
        (``PerCo.from_pretrained`` returns a PerCo-Image or SPRDiff-style model too)."""
        return load(cls, path, torch_dtype=torch_dtype)
