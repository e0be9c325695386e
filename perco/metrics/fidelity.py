"""Per-image fidelity: PSNR, MS-SSIM (pytorch-msssim) and LPIPS (the ``lpips`` package).

All take ``(B, 3, H, W)`` images in ``[0, 1]`` and return one value per image.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..losses import load_lpips

__all__ = ["psnr", "ms_ssim", "MS_SSIM_MIN_SIDE", "LPIPSDistance"]

# pytorch-msssim's 5-scale MS-SSIM with its 11-px window needs sides over (11 - 1) * 2**4
MS_SSIM_MIN_SIDE = 161


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB with data range 1."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """5-scale MS-SSIM with data range 1; NaN for images with a side under 161 px."""
    from pytorch_msssim import ms_ssim as _ms_ssim

    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return torch.full((x.shape[0],), float("nan"))
    return _ms_ssim(x.float(), y.float(), data_range=1.0, size_average=False)


class LPIPSDistance(nn.Module):
    """LPIPS v0.1 (``net`` alex or vgg); ``backbone`` as in :func:`perco.losses.load_lpips`."""

    def __init__(self, net: str = "alex", backbone: str | os.PathLike | None = None):
        super().__init__()
        self.net = net
        self.model = load_lpips(net, backbone)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x * 2 - 1, y * 2 - 1).flatten()
