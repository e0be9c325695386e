"""Colour fidelity: per-channel mean/std shift and mean CIEDE2000 colour difference.

Users of PerCo-like decoders report washed-out colours; these numbers make that visible
per image. The sRGB → CIELAB (D65) conversion and ΔE2000 (Sharma, Wu & Dalal 2005)
follow their standard definitions.
"""

from __future__ import annotations

import torch

__all__ = ["rgb_to_lab", "delta_e2000", "colour_stats"]

_RGB_TO_XYZ = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_WHITE_D65 = torch.tensor([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` sRGB in ``[0, 1]`` → CIELAB ``(L, a, b)`` under D65."""
    rgb = rgb.double().clamp(0, 1)
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,...jhw->...ihw", _RGB_TO_XYZ.double(), linear)
    xyz = xyz / _WHITE_D65.double().view(3, 1, 1)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def delta_e2000(lab1: torch.Tensor, lab2: torch.Tensor) -> torch.Tensor:
    """CIEDE2000 difference of two CIELAB tensors ``(..., 3, ...)`` on dim -3 (kL=kC=kH=1)."""
    l1, a1, b1 = lab1.double().unbind(-3)
    l2, a2, b2 = lab2.double().unbind(-3)
    c_bar = (torch.hypot(a1, b1) + torch.hypot(a2, b2)) / 2
    g = 0.5 * (1 - torch.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = torch.hypot(a1p, b1), torch.hypot(a2p, b2)
    h1p = torch.rad2deg(torch.atan2(b1, a1p)) % 360
    h2p = torch.rad2deg(torch.atan2(b2, a2p)) % 360

    dl, dc = l2 - l1, c2p - c1p
    dh = h2p - h1p
    dh = torch.where(dh > 180, dh - 360, torch.where(dh < -180, dh + 360, dh))
    dh = torch.where(c1p * c2p == 0, torch.zeros_like(dh), dh)
    dhh = 2 * torch.sqrt(c1p * c2p) * torch.sin(torch.deg2rad(dh) / 2)

    l_bar, cp_bar = (l1 + l2) / 2, (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_bar = torch.where(
        (h1p - h2p).abs() > 180,
        torch.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2),
        h_sum / 2,
    )
    h_bar = torch.where(c1p * c2p == 0, h_sum, h_bar)
    t = (
        1
        - 0.17 * torch.cos(torch.deg2rad(h_bar - 30))
        + 0.24 * torch.cos(torch.deg2rad(2 * h_bar))
        + 0.32 * torch.cos(torch.deg2rad(3 * h_bar + 6))
        - 0.20 * torch.cos(torch.deg2rad(4 * h_bar - 63))
    )
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / torch.sqrt(20 + (l_bar - 50) ** 2)
    s_c = 1 + 0.045 * cp_bar
    s_h = 1 + 0.015 * cp_bar * t
    r_c = 2 * torch.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    r_t = -torch.sin(torch.deg2rad(60 * torch.exp(-(((h_bar - 275) / 25) ** 2)))) * r_c
    return torch.sqrt(
        (dl / s_l) ** 2 + (dc / s_c) ** 2 + (dhh / s_h) ** 2 + r_t * (dc / s_c) * (dhh / s_h)
    )


def colour_stats(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image of ``(B, 3, H, W)``: reconstruction minus original mean and std per RGB
    channel (``mean_shift_r`` …, on a 0–1 scale) and the mean ΔE2000 over pixels."""
    out = {}
    shift_mean = y.mean(dim=(2, 3)) - x.mean(dim=(2, 3))
    shift_std = y.std(dim=(2, 3)) - x.std(dim=(2, 3))
    for i, channel in enumerate("rgb"):
        out[f"mean_shift_{channel}"] = shift_mean[:, i]
        out[f"std_shift_{channel}"] = shift_std[:, i]
    out["delta_e2000"] = delta_e2000(rgb_to_lab(x), rgb_to_lab(y)).mean(dim=(1, 2)).float()
    return out
