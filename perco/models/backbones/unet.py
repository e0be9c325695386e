"""The U-Net backbone: PerCo as the paper builds it, on Stable Diffusion 1.x/2.x.

``z_l`` (nearest-upsampled to the latent grid) is concatenated to ``x_t`` on channels and
enters through the widened ``conv_in`` (:func:`perco.models.unet_adapter.widen_conv_in`);
the caption's embedding is the cross-attention context; the scheduler is of the DDPM
family (SD 2.1: v-prediction, decoded with DDIM).
"""

from __future__ import annotations

import os

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ..unet_adapter import widen_conv_in
from . import Backbone

__all__ = ["UNetBackbone", "UNET", "stable_diffusion_parts"]


class UNetBackbone(Backbone):
    name = "unet"
    attribute = "unet"
    module_class = UNet2DConditionModel
    label = "U-Net"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    @property
    def settings(self):
        return {}  # U-Net models predate backbones: their fingerprints stay as they were

    def widen(self, module, extra, init):
        widen_conv_in(module, extra, init=init)

    def input_layer(self, module):
        return module.conv_in

    def in_channels(self, module):
        return module.config.in_channels

    def out_channels(self, module):
        return module.config.out_channels

    def context_dim(self, module):
        return module.config.cross_attention_dim

    def pad_factor(self, module):
        return 2 ** (len(module.config.block_out_channels) - 1)

    def predict(self, called, x, spatial, t, context):
        model_in = torch.cat([x, spatial.to(x.dtype)], dim=1)
        return called(model_in, t, context.to(x.dtype)).sample


UNET = UNetBackbone()


def stable_diffusion_parts(
    pretrained: str | os.PathLike,
    *,
    torch_dtype=None,
    timestep_spacing: str | None = None,
    unet: UNet2DConditionModel | None = None,
) -> dict:
    """A Stable Diffusion checkpoint's (hub id or local folder) ``autoencoder``, ``unet``,
    ``text_encoder``, ``tokenizer`` and DDIM ``scheduler`` from their subfolders, as
    :meth:`perco.PerCo.from_components` takes them. ``timestep_spacing`` replaces the
    scheduler config's; ``unet``: one to use instead of the checkpoint's."""
    from transformers import AutoTokenizer, CLIPTextModel

    from ..autoencoders import SDAutoencoder
    from ..text import check_tokenizer

    load = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    vae = SDAutoencoder.from_pretrained(pretrained, subfolder="vae", **load)
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **load)
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **load)
    tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    check_tokenizer(tokenizer, str(pretrained))
    spacing = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    scheduler = DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler", **spacing)
    return {"autoencoder": vae, "denoiser": unet, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "scheduler": scheduler}  # fmt: skip
