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
    if extra_channels <= 0:
        raise ValueError(f"extra_channels must be positive, got {extra_channels}")
    if init not in ("random", "zero"):
        raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    fan_in = new.weight[0].numel()
    bound = 1.0 / fan_in**0.5  # Kaiming-uniform with a=sqrt(5), as nn.Conv2d.reset_parameters
    extra = new.weight[:, old.in_channels :]
    if init == "zero":
        extra.zero_()
    else:
        extra.uniform_(-bound, bound, generator=generator)
    new.weight[:, : old.in_channels] = old.weight
    if old.bias is not None:
        new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
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
