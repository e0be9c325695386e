"""PerCo's training losses, each term in one place.

- :func:`diffusion_loss`: the per-sample diffusion loss (paper eq. 3 with v- or
  ε-prediction), optionally in a latent metric, with a low-pass term and Min-SNR-γ
  weighting (:class:`~perco.models.perco.PerCoConfig` explains the first two);
- :func:`predicted_x0`: the clean latent a prediction implies;
- :func:`x0_lpips` with :func:`load_lpips`: LPIPS (Zhang et al. 2018) between an image
  and the decoding of the U-Net's x0 estimate. The paper notes the diffusion loss "can be
  augmented with any image-level loss such as LPIPS" (§3.1): ``trainer.lpips_weight``.

The quantizer's commitment loss (eq. 4) lives with the quantizer.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "diffusion_loss", "diffusion_target", "metric_factor", "predicted_x0", "x0_lpips",
    "load_lpips",
]  # fmt: skip


def metric_factor(latent_metric: list[list[float]]) -> torch.Tensor:
    """``A = Λ^½ Qᵀ`` (float32) of a positive semi-definite ``G = Q Λ Qᵀ``, so that
    ``eᵀ G e = |A e|²``; negative eigenvalues from rounding are clamped to zero."""
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.tensor(latent_metric, dtype=torch.float64))
    return (eigenvalues.clamp(min=0).sqrt()[:, None] * eigenvectors.T).float()


def diffusion_loss(
    error: torch.Tensor,
    *,
    factor: torch.Tensor | None = None,
    lowpass_weight: float = 0.0,
    lowpass_size: int = 4,
    snr: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    v_prediction: bool = True,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss of a prediction ``error`` (``(B, C, h, w)``, prediction − target).

    ``factor``: :func:`metric_factor` of the latent metric (``None``: plain MSE).
    ``lowpass_weight``: weight of the same loss on the error averaged over
    ``lowpass_size²`` windows. ``snr`` with ``snr_gamma``: Min-SNR-γ weighting (Hang et
    al. 2023), ``min(SNR, γ)`` in x0 terms. ``weights``: a weight per sample (a flow
    model's, :func:`~diffusers.training_utils.compute_loss_weighting_for_sd3`).
    """
    if factor is not None:
        error = torch.einsum("cd,bdhw->bchw", factor.to(error.device), error)
    per_sample = error.pow(2).mean(dim=(1, 2, 3))
    if lowpass_weight:
        regional = F.avg_pool2d(error, lowpass_size, ceil_mode=True)
        per_sample = per_sample + lowpass_weight * regional.pow(2).mean(dim=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * snr.clamp(max=snr_gamma) / (snr + 1 if v_prediction else snr)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample


def diffusion_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What a U-Net learns to predict at ``add_noise(latents, noise, timesteps)``: the
    velocity (v-prediction) or the noise (ε-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "epsilon":
        return noise
    raise ValueError(f"unsupported prediction_type {kind!r}")


def predicted_x0(
    scheduler, noisy: torch.Tensor, pred: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latent implied by a prediction at ``timesteps`` (fp32).

    v-prediction: ``x0 = √ᾱ·x_t − √(1−ᾱ)·v``; ε-prediction: ``x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ``.
    """
    alpha = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    noisy, pred = noisy.float(), pred.float()
    if scheduler.config.prediction_type == "v_prediction":
        return alpha.sqrt() * noisy - (1 - alpha).sqrt() * pred
    return (noisy - (1 - alpha).sqrt() * pred) / alpha.sqrt()


def x0_lpips(lpips: nn.Module, autoencoder, x0: torch.Tensor, images: torch.Tensor):
    """Mean LPIPS between ``images`` (``[0, 1]``) and the frozen decoder's decoding of the
    x0 estimate (clamped to ``[-1, 1]``, the range :func:`load_lpips` modules take)."""
    decoded = autoencoder.decode(x0).float().clamp(-1, 1)
    return lpips(decoded, images * 2 - 1).mean()


def load_lpips(net: str = "alex", backbone: str | os.PathLike | None = None) -> nn.Module:
    """An ``lpips.LPIPS`` module (inputs in ``[-1, 1]``), frozen, in eval mode.

    The v0.1 linear heads come with the ``lpips`` package. The ImageNet backbone is
    torchvision's pretrained ``alexnet``/``vgg16`` (downloaded by torchvision) unless
    ``backbone`` names a safetensors file of torchvision ``features.*`` weights, e.g.
    ``$PERCO_ASSETS/lpips/alexnet_features.safetensors`` for offline use.
    """
    import lpips
    from safetensors.torch import load_file

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=backbone is not None, verbose=False)
    if backbone is not None:
        # lpips splits torchvision's `features` into slices that keep the layer indices
        where = {
            index: slice_name
            for slice_name, block in model.net.named_children()
            for index, _ in block.named_children()
        }
        weights = load_file(backbone)
        mapped = {}
        for key, tensor in weights.items():
            _, index, param = key.split(".")
            if index not in where:
                raise ValueError(f"{backbone}: {key} does not belong to an lpips {net} slice")
            mapped[f"net.{where[index]}.{index}.{param}"] = tensor
        missing, unexpected = model.load_state_dict(mapped, strict=False)
        backbone_missing = [k for k in missing if k.startswith("net.")]
        if backbone_missing or unexpected:
            raise ValueError(f"{backbone}: missing {backbone_missing}, unexpected {unexpected}")
    return model.eval().requires_grad_(False)
