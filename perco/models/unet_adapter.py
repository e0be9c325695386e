"""Widen a diffusers U-Net's first convolution to take the local context ``z_l``.

PerCo concatenates the (upsampled) quantized hyper-latent to the noisy latent ``x_t``
(paper §3.2, "Decoding with a diffusion model"), so ``conv_in`` needs more input
channels::

    conv_in: (C_latent + C_extra) → C_out
      weight[:, :C_latent] = pretrained weight     (the pretrained model is unchanged)
      weight[:, C_latent:] = random (paper) or zero (setting)
      bias                 = pretrained bias

``register_to_config(in_channels=...)`` records the new width, so ``save_pretrained`` /
``from_pretrained`` rebuild the widened layer.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .backbones import widened

__all__ = ["widen_conv_in", "linear_parameter_share"]


@torch.no_grad()
def widen_conv_in(
    unet: UNet2DConditionModel,
    extra_channels: int,
    init: Literal["random", "zero"] = "random",
    generator: torch.Generator | None = None,
) -> UNet2DConditionModel:
    """Add ``extra_channels`` input channels to ``unet.conv_in`` in place; returns ``unet``.

    ``init="random"`` draws the new weights like a fresh ``nn.Conv2d`` of the widened shape
    (Kaiming-uniform, PyTorch's default); ``init="zero"`` makes the widened U-Net compute
    exactly what the original did until training moves the new weights.
    """
    unet.conv_in = widened(unet.conv_in, extra_channels, init, generator)
    unet.register_to_config(in_channels=unet.conv_in.in_channels)
    return unet


def linear_parameter_share(module: nn.Module) -> tuple[int, int]:
    """``(parameters in nn.Linear layers, all parameters)`` of ``module``.

    The paper finetunes only the U-Net's linear layers ("around 15% of all weights" for its
    own U-Net); this measures the share for any architecture, on the meta device too.
    """
    linears = (m for m in module.modules() if isinstance(m, nn.Linear))
    linear = sum(p.numel() for m in linears for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in module.parameters())
    return linear, total
