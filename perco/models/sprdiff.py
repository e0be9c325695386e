"""An SPRDiff-style PerCo: triple encoder and distortion-aware reconstruction.

After the ideas of Wei et al., "Exploiting semantic and pixel representations for
ultra-low bitrate image compression" (SPRDiff). Only a summary of that paper is
available and it has no public code, so this is a concrete design of our own in its
spirit, called "SPRDiff-style"; none of SPRDiff's numbers are claimed for it::

    triple encoder (before quantization)
      (a) image ─ frozen autoencoder E ─────────────► latent (C_ae, H/8, W/8)
      (b) image ─ frozen CompressAI g_a (mbt2018-mean) ─ resize ─┤ concat ─ 1×1 conv ─►
      (c) image ─ frozen semantic encoder patch tokens ─ resize ─┘   hyper-encoder ─ VQ ─► z_l

    distortion-aware reconstruction (decoder side, from z_l alone)
      z_l codes ─ coarse decoder ─► coarse RGB image (one forward pass: `--coarse`)
      coarse ─ strided convs ─► pixel features on the latent grid ─┐ concat to x_t
      coarse ─ frozen semantic encoder ─ embedding ─► K tokens ─────┼ cross-attention
      z_l codes ─ nearest upsample (PerCo's z_l) ───────────────────┘ (beside the caption)

    loss = diffusion (PerCo eq. 3) + VQ + λ·MSE(coarse, image) [+ μ·LPIPS(coarse, image)]

The 1×1 fusion starts as the identity on (a) and zero on (b) and (c), so training starts
from PerCo's hyper-encoder input and learns how much of the other encoders to use. The
semantic tokens of the coarse image come from ``z_l``, so classifier-free guidance keeps
them in both branches (only the caption is contrasted). Encoders (b) and (c) are frozen;
their weights are saved with the checkpoint.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..rates import Rate
from ..types import EncodedImages
from .perco import Capability, Local, PerCo
from .perco_image import EmbeddingTokens
from .vision import VisionEncoder, load_vision_encoder

__all__ = [
    "SPRDiffStyle",
    "DistortionEncoder",
    "TripleFusion",
    "Reconstruction",
    "load_distortion_encoder",
]


def _compressai_class(arch: str):
    from compressai.zoo.image import model_architectures

    if arch not in model_architectures:
        raise ValueError(
            f"unknown CompressAI architecture {arch!r}; known: {sorted(model_architectures)}"
        )
    return model_architectures[arch]


class DistortionEncoder(ModelMixin, ConfigMixin):
    """The analysis transform ``g_a`` of a CompressAI model, frozen: ``[0, 1]`` images →
    ``(B, M, H/16, W/16)``.

    Args:
        arch: a CompressAI zoo architecture (``"mbt2018-mean"``, ``"bmshj2018-hyperprior"``...).
        N, M: its widths (mbt2018-mean at quality 1: 128, 192).
        source: where the weights came from, for the record.
    """

    @register_to_config
    def __init__(self, arch: str = "mbt2018-mean", N: int = 128, M: int = 192, source: str = ""):
        super().__init__()
        self.g_a = _compressai_class(arch)(N=N, M=M).g_a
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> DistortionEncoder:
        return super().train(False)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> DistortionEncoder:
        # CompressAI's entropy models assign `.data` in __init__, which the meta device
        # of diffusers' low-memory loading refuses: build on the CPU, then load
        return super().from_pretrained(path, low_cpu_mem_usage=False, **kwargs)

    @property
    def out_channels(self) -> int:
        return self.config.M

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.g_a(images.float())


def load_distortion_encoder(
    spec: str = "mbt2018-mean:1", pretrained: bool = True
) -> DistortionEncoder:
    """``g_a`` of a CompressAI model through CompressAI's own loaders.

    ``spec``: ``"<arch>:<quality>"`` — the zoo model (``compressai.zoo``; downloads its
    weights unless ``pretrained=False``, which builds the architecture at that quality with
    random weights); or ``"<arch>:<checkpoint file>"`` — a CompressAI checkpoint (a state
    dict, read with ``torch.load(weights_only=True)`` and
    ``compressai.zoo.load_state_dict``, built with the architecture's ``from_state_dict``).
    """
    import compressai.zoo

    arch, sep, source = spec.partition(":")
    if not sep or not source:
        raise ValueError(f"distortion encoder spec {spec!r} is not '<arch>:<quality or file>'")
    if source.isdigit():
        zoo = getattr(compressai.zoo, arch.replace("-", "_"), None)
        if zoo is None:
            raise ValueError(f"compressai.zoo has no model {arch!r}")
        model = zoo(quality=int(source), pretrained=pretrained)
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"CompressAI checkpoint {source} does not exist")
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = compressai.zoo.load_state_dict(state.get("state_dict", state))
        model = _compressai_class(arch).from_state_dict(state)
    first, last = model.g_a[0], model.g_a[-1]
    encoder = DistortionEncoder(
        arch, N=first.out_channels, M=last.out_channels, source=f"compressai:{spec}"
    )
    encoder.g_a.load_state_dict(model.g_a.state_dict())
    return encoder


class TripleFusion(ModelMixin, ConfigMixin):
    """``[latent; norm(distortion); norm(semantic)]`` → a 1×1 conv → the hyper-encoder input.

    The distortion and semantic features are resized to the latent grid and normalised
    per image (no affine); the conv starts as the identity on the latent and zero
    elsewhere.
    """

    @register_to_config
    def __init__(self, latent_channels: int = 4, distortion_channels: int = 192,
                 semantic_channels: int = 768):  # fmt: skip
        super().__init__()
        total = latent_channels + distortion_channels + semantic_channels
        self.norm_distortion = nn.GroupNorm(1, distortion_channels, affine=False)
        self.norm_semantic = nn.GroupNorm(1, semantic_channels, affine=False)
        self.fuse = nn.Conv2d(total, latent_channels, 1)
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.bias.zero_()
            self.fuse.weight[:, :latent_channels, 0, 0] = torch.eye(latent_channels)

    def forward(
        self, latents: torch.Tensor, distortion: torch.Tensor, semantic: torch.Tensor
    ) -> torch.Tensor:
        size = latents.shape[-2:]
        b = F.interpolate(self.norm_distortion(distortion.float()), size=size, mode="bilinear")
        c = F.interpolate(self.norm_semantic(semantic.float()), size=size, mode="bilinear")
        return self.fuse(torch.cat([latents.float(), b, c], dim=1)).to(latents.dtype)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout),
                         nn.SiLU())  # fmt: skip


class Reconstruction(ModelMixin, ConfigMixin):
    """Distortion-aware reconstruction: the coarse image and its two kinds of features.

    Args:
        code_channels: channels of the code vectors fed to the U-Net (PerCo's ``z_l``).
        upscale: image pixels per hyper-latent cell (autoencoder factor × downsampling).
        latent_factor: image pixels per latent cell (the autoencoder's factor).
        channels: width of the coarse decoder at the hyper-latent resolution; halved at
            every upsampling, down to 16.
        pixel_channels: pixel-level features concatenated to ``x_t``.
        semantic_dim: width of the semantic encoder's embedding.
        context_width: the U-Net's cross-attention width.
        num_tokens: semantic tokens appended to the context.
        mse_weight: ``λ`` of the coarse image's MSE (images in ``[0, 1]``).
        lpips_weight: weight of an LPIPS term on the coarse image (0: none).
        lpips_backbone: a safetensors file of the LPIPS AlexNet weights (offline use);
            ``None``: torchvision's download.
    """

    @register_to_config
    def __init__(
        self,
        code_channels: int = 320,
        upscale: int = 64,
        latent_factor: int = 8,
        channels: int = 128,
        pixel_channels: int = 16,
        semantic_dim: int = 512,
        context_width: int = 1024,
        num_tokens: int = 4,
        mse_weight: float = 1.0,
        lpips_weight: float = 0.0,
        lpips_backbone: str | None = None,
    ):
        super().__init__()
        layers, width = [_block(code_channels, channels)], channels
        for _ in range(int(math.log2(upscale))):
            nxt = max(16, width // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _block(width, nxt)]
            width = nxt
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.decoder = nn.Sequential(*layers)
        pixel, width = [], 3
        for _ in range(int(math.log2(latent_factor))):
            pixel += [nn.Conv2d(width, pixel_channels, 3, stride=2, padding=1), nn.SiLU()]
            width = pixel_channels
        pixel.append(nn.Conv2d(width, pixel_channels, 1))
        self.pixel = nn.Sequential(*pixel)
        self.tokens = EmbeddingTokens(semantic_dim, context_width, num_tokens)
        self._lpips = None  # loaded on first use, not saved (frozen, pretrained)

    def coarse(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors ``(B, code_channels, h, w)`` → ``(B, 3, h·upscale, w·upscale)`` in
        ``[0, 1]``."""
        return torch.sigmoid(self.decoder(codes.float()))

    def loss(self, coarse: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        loss = cfg.mse_weight * F.mse_loss(coarse, images.float())
        if cfg.lpips_weight:
            if self._lpips is None:
                from ..losses import load_lpips

                self._lpips = load_lpips("alex", cfg.lpips_backbone)
            lpips = self._lpips.to(coarse.device)
            loss = loss + cfg.lpips_weight * lpips(coarse * 2 - 1, images * 2 - 1).mean()
        return loss


class SPRDiffStyle(PerCo):
    """PerCo with a triple encoder and a distortion-aware reconstruction module.

    Build one with :meth:`from_components` or load one with :meth:`PerCo.from_pretrained`.
    :meth:`coarse` gives the pixel-faithful preview in one forward pass.
    """

    variant = "sprdiff_style"
    capabilities = Capability.COARSE
    _MODULES = {
        **PerCo._MODULES,
        "distortion_encoder": DistortionEncoder,
        "semantic_encoder": VisionEncoder,
        "fusion": TripleFusion,
        "reconstruction": Reconstruction,
    }
    _TRAINED = ("fusion", "reconstruction")

    @classmethod
    def from_components(
        cls,
        autoencoder,
        denoiser,
        text_encoder,
        tokenizer,
        scheduler,
        rate: str | Rate,
        *,
        distortion: str | DistortionEncoder = "mbt2018-mean:1",
        semantic: str | VisionEncoder = "open_clip:ViT-B-16/openai",
        reconstruction: dict | None = None,
        pretrained_encoders: bool = True,
        **kwargs,
    ) -> SPRDiffStyle:
        """PerCo parts (see :meth:`PerCo.from_components`) plus the frozen distortion
        encoder (a :func:`load_distortion_encoder` spec; ``pretrained_encoders=False``
        builds the zoo architecture with random weights) and semantic encoder (a
        :func:`~perco.models.vision.load_vision_encoder` spec), a new fusion conv and a
        reconstruction module (``reconstruction`` overrides the defaults of
        :class:`Reconstruction`)."""
        base = PerCo.from_components(
            autoencoder, denoiser, text_encoder, tokenizer, scheduler, rate, **kwargs
        )
        if isinstance(distortion, str):
            distortion = load_distortion_encoder(distortion, pretrained=pretrained_encoders)
        if isinstance(semantic, str):
            semantic = load_vision_encoder(semantic)
        fusion = TripleFusion(
            autoencoder.latent_channels, distortion.out_channels, semantic.grid_dim
        )
        settings = {
            **(reconstruction or {}),
            "code_channels": base.local_channels,
            "upscale": base.cell,
            "latent_factor": autoencoder.factor,
            "semantic_dim": semantic.embed_dim,
            "context_width": base.backbone.context_dim(denoiser),
        }
        recon = Reconstruction(**settings)
        init = kwargs.get("conv_in_init", "random")
        base.backbone.widen(base.denoiser, recon.config.pixel_channels, init)
        return cls._extend(
            base,
            distortion_encoder=distortion,
            semantic_encoder=semantic,
            fusion=fusion,
            reconstruction=recon,
        )

    @property
    def local_channels(self) -> int:
        return super().local_channels + self.reconstruction.config.pixel_channels

    # -- triple encoder ---------------------------------------------------------------
    def _hyper_input(self, latents: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        if images is None:
            raise ValueError("the SPRDiff-style encoder needs the images (pixels) besides latents")
        with torch.no_grad():
            distortion = self.distortion_encoder(images)
            semantic = self.semantic_encoder(images)[1]
        return self.fusion(latents, distortion, semantic)

    # -- distortion-aware reconstruction ---------------------------------------------
    def _local(self, codes: torch.Tensor, latent_size: tuple[int, int]) -> Local:
        z = self._z_l(codes)
        coarse = self.reconstruction.coarse(z)
        pixel = self.reconstruction.pixel(coarse)
        spatial = F.interpolate(z, size=latent_size, mode="nearest")
        with torch.no_grad():
            embedding = self.semantic_encoder(coarse.detach())[0]
        tokens = self.reconstruction.tokens(embedding)
        return Local(torch.cat([spatial, pixel.to(spatial)], dim=1), tokens, coarse)

    def _image_loss(self, local: Local, images: torch.Tensor | None) -> torch.Tensor:
        if images is None:
            raise ValueError("the coarse reconstruction loss needs the images (pixels)")
        return self.reconstruction.loss(local.coarse, images)

    @torch.no_grad()
    def coarse(self, encoded: EncodedImages) -> list[torch.Tensor]:
        """The coarse reconstructions ``(3, H, W)`` in ``[0, 1]``: one forward pass of the
        reconstruction module from the coded indices, no diffusion."""
        return self._crop(self._decode_local(encoded).coarse, encoded.sizes)
