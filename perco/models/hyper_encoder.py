"""Hyper-encoder: autoencoder latent → low-resolution hyper-latent (PerCo paper §3.2).

The paper describes nine residual convolutional blocks with a number of downsampling
layers set by the rate. The layout below is the one the authors supplied to PerCo (SD):
three groups of three residual bottleneck blocks, each group entered through a 1×1 conv,
or a stride-2 5×5 conv when that group downsamples, attention blocks (Cheng et al. 2020,
simplified) after the second group and at the output::

    latent (C_ae, H/8, W/8)
      ─ entry 1 ─ 3 × bottleneck ─ entry 2 ─ 3 × bottleneck ─ attention(N)
      ─ entry 3 ─ 3 × bottleneck ─ 1×1 conv N→M ─ attention(M) ─► (M, h, w)

    entry i = stride-2 5×5 conv if group i downsamples, else 1×1 conv.
    ×1: no group downsamples; ×2: group 3; ×4: groups 2–3; ×8: all three.

With N=192, M=320 on SD's 4-channel latent this gives 4,080,128 parameters at ×1 and
5,868,032 at ×8, the counts PerCo (SD) reports. The projection from M to the 32-dim
codebook space belongs to the quantizer (``VectorQuantizer.project_in``), as in PerCo (SD)
whose counts exclude it.

One difference in the attention blocks: PerCo (SD) builds them with CompressAI's
``AttentionBlock``, whose residual units end with a ReLU after the add; perco's models
were trained with linear units. ``attention_relu=True`` computes CompressAI's version
(same weights, same keys apart from the names), for checkpoints trained with it.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["HyperEncoder"]


class Bottleneck(nn.Module):
    """Residual bottleneck: 1×1 (C→C/2), 3×3, 1×1 (C/2→C), ReLU between, identity skip."""

    def __init__(self, channels: int, relu: bool = False):
        super().__init__()
        self.relu = relu  # a ReLU after the residual add (CompressAI's ResidualUnit)
        mid = channels // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, mid, 1),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(mid, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.body(x)
        return torch.relu(y) if self.relu else y


class AttentionBlock(nn.Module):
    """Simplified attention module of Cheng et al. (CVPR 2020): ``x + a(x) · σ(b(x))``.

    ``a`` is three bottlenecks; ``b`` is three bottlenecks and a 1×1 conv giving the mask.
    ``relu``: each of those bottlenecks ends with a ReLU after its residual add, as in
    CompressAI's ``AttentionBlock`` (its ``ResidualUnit``), which PerCo (SD)'s hyper-encoder
    uses; without it (the default, and every model trained before the option) they do not.
    """

    def __init__(self, channels: int, relu: bool = False):
        super().__init__()
        self.trunk = nn.Sequential(*(Bottleneck(channels, relu) for _ in range(3)))
        self.mask = nn.Sequential(
            *(Bottleneck(channels, relu) for _ in range(3)), nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.trunk(x) * torch.sigmoid(self.mask(x))


def _entry(in_channels: int, out_channels: int, downsample: bool) -> nn.Conv2d:
    if downsample:
        return nn.Conv2d(in_channels, out_channels, 5, stride=2, padding=2)
    return nn.Conv2d(in_channels, out_channels, 1)


class HyperEncoder(ModelMixin, ConfigMixin):
    """Map an autoencoder latent to the hyper-latent ``H_s`` that the quantizer codes.

    Args:
        in_channels: latent channels of the autoencoder (4 for SD 1.x/2.x, 16 for SD3 and
            FLUX.1, 32 for TAEF2); taken from the autoencoder's config by
            :class:`~perco.PerCo`, never hard-coded.
        downsample: spatial reduction of the latent: 1, 2, 4 or 8 (from the rate).
        channels: width ``N`` of the residual groups.
        out_channels: width ``M`` of the output, projected to the codebook space by the
            quantizer.
        blocks_per_group: residual bottlenecks per group (three groups: nine in total).
        attention_relu: a ReLU after each residual unit inside the two attention blocks,
            as CompressAI's ``AttentionBlock`` computes them (PerCo (SD)'s hyper-encoder);
            ``False`` (the default) keeps the units linear after the add, as every
            perco model trained so far. The weights are the same either way.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        downsample: int = 1,
        channels: int = 192,
        out_channels: int = 320,
        blocks_per_group: int = 3,
        attention_relu: bool = False,
    ):
        super().__init__()
        if downsample not in (1, 2, 4, 8):
            raise ValueError(f"downsample must be 1, 2, 4 or 8, got {downsample}")
        num_down = int(math.log2(downsample))
        layers: list[nn.Module] = []
        for group in range(3):
            # the last `num_down` groups enter with a stride-2 conv
            width = in_channels if group == 0 else channels
            layers.append(_entry(width, channels, downsample=group >= 3 - num_down))
            layers.extend(Bottleneck(channels) for _ in range(blocks_per_group))
            if group == 1:
                layers.append(AttentionBlock(channels, attention_relu))
        layers.append(nn.Conv2d(channels, out_channels, 1))
        layers.append(AttentionBlock(out_channels, attention_relu))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` → ``(B, out_channels, H/downsample, W/downsample)``.

        ``H`` and ``W`` must be multiples of ``downsample`` (:class:`~perco.PerCo` pads).
        """
        return self.layers(latents)
