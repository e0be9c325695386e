"""An adversarial realism term for one-step students: a feature discriminator and its
hinge losses.

The discriminator judges patches of a frozen ImageNet network's feature maps, as
projected GANs do (Sauer et al. 2021) and one-step codecs after them (StableCodec's
DINOv2 discriminator): the backbone stays frozen, and only one small convolutional head
per depth trains, so it learns in the few hundred steps a small student gets. perco uses
the LPIPS network's trunk it already loads (VGG16 from the assets, offline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureDiscriminator", "backbone_features", "discriminator_loss", "generator_loss"]


def backbone_features(lpips: nn.Module, images: torch.Tensor, depths: Sequence[int]) -> list:
    """The feature maps at ``depths`` of an ``lpips.LPIPS`` module's trunk (its input
    scaling first) for ``images`` in ``[-1, 1]``; VGG16's depths are relu1_2 … relu5_3."""
    features = lpips.net(lpips.scaling_layer(images))
    return [features[d] for d in depths]


class FeatureDiscriminator(nn.Module):
    """Patch logits from feature maps: per depth, a 1×1 projection to ``width`` channels,
    LeakyReLU, and a 3×3 convolution to one logit per position."""

    def __init__(self, channels: Sequence[int], width: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, width, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, 1, 3, padding=1)
            )
            for c in channels
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f.float()) for head, f in zip(self.heads, features, strict=True)]


def discriminator_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]):
    """Hinge loss (Lim & Ye 2017), averaged over the heads:
    ``mean(relu(1 − D(real))) + mean(relu(1 + D(fake)))``."""
    terms = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake, strict=True)]
    return torch.stack(terms).mean()


def generator_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """The generator's hinge loss, averaged over the heads: ``−mean(D(fake))``."""
    return -torch.stack([f.mean() for f in fake]).mean()
