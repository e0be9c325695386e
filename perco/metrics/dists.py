"""DISTS: Ding, Ma, Wang, Simoncelli, *Image quality assessment: unifying structure and
texture similarity*, TPAMI 2020 — the full-reference metric the one-step diffusion codecs
of 2025 (OSCAR, StableCodec) report beside LPIPS.

The computation and its learned weights are the ``dists-pytorch`` package's (its wheel
ships ``weights.pt``, the α/β of every VGG16 channel, and its ``L2pooling``). Its
``DISTS`` class builds VGG16 by downloading torchvision's ImageNet weights inside its
constructor; here the same network is built with the backbone injected::

    x, y ─ ImageNet normalisation ─ VGG16 conv stages, max pools replaced by L2 pooling
         ─► 6 feature sets (the image itself, relu1_2 … relu5_3)
    per channel:  S1 = (2 μx μy + c) / (μx² + μy² + c)          (texture: mean)
                  S2 = (2 σxy + c) / (σx² + σy² + c)            (structure: covariance)
    DISTS = 1 − Σ_channels (α S1 + β S2) / Σ(α + β)

Backbone: torchvision's ImageNet VGG16 (downloaded, the default) or a safetensors file of
its ``features.*`` weights (offline: ``$PERCO_ASSETS/lpips/vgg16_features.safetensors``).
Images are scored at their own resolution (the package's ``prepare_image`` without its
optional resize to 256 px). A test checks this module against the package's own class.
"""

from __future__ import annotations

import os
from importlib import resources

import torch
from torch import nn

__all__ = ["DISTS"]

_POOLS = (4, 9, 16, 23)  # VGG16's max pools before relu2_2 … relu5_3: L2 pooling instead
_LAST = 30  # features[:30] ends at relu5_3
_C = 1e-6


class DISTS(nn.Module):
    """DISTS between ``(B, 3, H, W)`` images in ``[0, 1]``; one value per image (lower is
    more similar)."""

    name = "DISTS (dists-pytorch weights, VGG16)"

    def __init__(self, backbone: str | os.PathLike | None = None):
        super().__init__()
        try:
            from DISTS_pytorch.DISTS_pt import L2pooling
        except ImportError:
            raise ImportError(
                "DISTS needs the dists-pytorch package: pip install 'perco[eval]'"
            ) from None
        from torchvision.models import VGG16_Weights, vgg16

        features = vgg16(weights=None if backbone else VGG16_Weights.IMAGENET1K_V1).features
        if backbone is not None:
            from safetensors.torch import load_file

            prefix = "features."
            state = {k[len(prefix) :]: v for k, v in load_file(backbone).items()}
            features.load_state_dict(state)  # strict: every conv of VGG16's features
        stages, stage = [], nn.Sequential()
        for i in range(_LAST):
            if i in _POOLS:
                stages.append(stage)
                channels = features[i - 2].out_channels
                stage = nn.Sequential()
                stage.add_module(str(i), L2pooling(channels=channels))
            else:
                stage.add_module(str(i), features[i])
        self.stages = nn.ModuleList([*stages, stage])
        weights = torch.load(
            resources.files("DISTS_pytorch") / "weights.pt", map_location="cpu", weights_only=True
        )
        total = weights["alpha"].sum() + weights["beta"].sum()
        self.register_buffer("alpha", weights["alpha"].flatten() / total)
        self.register_buffer("beta", weights["beta"].flatten() / total)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1))
        self.requires_grad_(False).eval()
        # an evaluation scores several reconstructions (rungs, steps, references) of one
        # batch of originals: the originals' features are computed once per batch
        self._reference: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (x - self.mean) / self.std, [x]
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def _reference_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        cached = self._reference
        if cached is None or cached[0].shape != x.shape or not torch.equal(cached[0], x):
            self._reference = cached = (x.clone(), self.features(x))
        return cached[1]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DISTS of each reconstruction ``y`` against its original ``x``."""
        texture, structure = [], []
        pairs = zip(self._reference_features(x.float()), self.features(y.float()), strict=True)
        for fx, fy in pairs:
            mx, my = fx.mean((2, 3)), fy.mean((2, 3))
            vx = (fx - mx[..., None, None]).square().mean((2, 3))
            vy = (fy - my[..., None, None]).square().mean((2, 3))
            cov = (fx * fy).mean((2, 3)) - mx * my
            texture.append((2 * mx * my + _C) / (mx.square() + my.square() + _C))
            structure.append((2 * cov + _C) / (vx + vy + _C))
        similarity = torch.cat(texture, 1) @ self.alpha + torch.cat(structure, 1) @ self.beta
        return 1 - similarity
