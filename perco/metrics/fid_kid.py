"""FID and KID (torchmetrics) from features extracted where each image is decoded.

Features are computed per image, cached with the per-image results, and fed to
torchmetrics in image-id order at the end, so a score does not depend on the number of
processes and a resumed run needs no re-extraction. Two variants:

- ``whole``: one feature vector per image (COCO-30k);
- ``patches``: HiFiC's small-set variant (Mentzer et al. 2020) — 256-px patches on a
  regular grid plus a grid shifted by half a patch (Kodak: 24 × 8 = 192 patches).

The extractor is a setting: :class:`InceptionFeatures` is the standard one (torchmetrics'
FID Inception v3, weights fetched by torch-fidelity); :class:`AlexNetFeatures` runs
offline from an ImageNet AlexNet safetensors file, and its scores are *not* FID — label
them so.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionFeatures", "AlexNetFeatures", "hific_patches", "fid_kid", "load_extractor"]


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of torchmetrics' FID Inception v3, for ``[0, 1]`` input."""

    name = "inception-v3-compat (torchmetrics FID)"
    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8)).float()


class AlexNetFeatures(nn.Module):
    """Global-average-pooled ``features`` of an ImageNet AlexNet (256-d), for ``[0, 1]``
    input; ``weights`` is a safetensors file of torchvision ``features.*`` keys."""

    name = "alexnet-imagenet pool5 (not Inception: not comparable with FID)"
    num_features = 256

    def __init__(self, weights: str | os.PathLike):
        super().__init__()
        from safetensors.torch import load_file
        from torchvision.models import alexnet

        self.features = alexnet().features
        state = {k.removeprefix("features."): v.float() for k, v in load_file(weights).items()}
        self.features.load_state_dict(state)
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(224, 224), mode="bilinear", antialias=True)
        return self.features((x - self.mean) / self.std).mean(dim=(2, 3))


def load_extractor(name: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """``inception`` (default FID network) or ``alexnet`` (needs ``weights``)."""
    if name == "inception":
        return InceptionFeatures(weights).eval()
    if name == "alexnet":
        if weights is None:
            raise ValueError("the alexnet feature extractor needs a weights file")
        return AlexNetFeatures(weights)
    raise ValueError(f"unknown feature extractor {name!r} (inception, alexnet)")


def hific_patches(images: torch.Tensor, size: int = 256) -> torch.Tensor:
    """``(B, 3, H, W)`` → ``(N, 3, size, size)``: non-overlapping patches on the regular
    grid, then on the grid shifted by ``size // 2`` in both directions (HiFiC, App. A.7)."""
    out = []
    for offset in (0, size // 2):
        x = images[..., offset:, offset:]
        rows, cols = x.shape[-2] // size, x.shape[-1] // size
        if rows * cols == 0:
            continue
        x = x[..., : rows * size, : cols * size]
        x = x.unfold(2, size, size).unfold(3, size, size)  # B, 3, rows, cols, size, size
        out.append(x.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1], size, size))
    if not out:
        h, w = images.shape[-2:]
        raise ValueError(f"a {w}x{h} image holds no {size}-px FID patch (set the patch size)")
    return torch.cat(out)


class _Precomputed(nn.Module):
    """Hands torchmetrics features that were already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """FID, KID mean and std (×1, torchmetrics' scale) from ``(N, D)`` feature sets.

    KID's subset size is capped at the number of samples; the subsets are drawn from a
    fixed seed, so the same features always give the same score.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    dim = real.shape[1]
    n = min(len(real), len(fake))
    subset = min(kid_subset_size, n)
    # every feature is already here (gathered in image order): no cross-process sync
    local = {"sync_on_compute": False}
    fid = FrechetInceptionDistance(feature=_Precomputed(dim), reset_real_features=False, **local)
    with warnings.catch_warnings():  # "KID keeps all features": they are already in memory
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_Precomputed(dim), subsets=kid_subsets, subset_size=subset, **local
        )
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "fid_samples": n,
        "kid_subset_size": subset,
    }
