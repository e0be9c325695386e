"""The training loss terms of perco.losses, against their definitions."""

import pytest
import torch

from perco.losses import diffusion_loss, metric_factor


def test_metric_factor_gives_the_quadratic_form():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    metric = b @ b.T  # positive semi-definite
    error = torch.randn(2, 6, 3, 5, generator=g)
    per_position = torch.einsum("bchw,cd,bdhw->bhw", error.double(), metric, error.double())
    expected = per_position.mean(dim=(1, 2)) / 6  # eᵀGe / C, averaged over positions
    got = diffusion_loss(error, factor=metric_factor(metric.tolist()))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_identity_metric_is_plain_mse():
    error = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    identity = torch.eye(4).tolist()
    torch.testing.assert_close(
        diffusion_loss(error, factor=metric_factor(identity)), error.pow(2).mean(dim=(1, 2, 3))
    )


@pytest.mark.parametrize("weight", [0.0, 8.0])
def test_lowpass_term_charges_regional_error_only(weight):
    constant = torch.full((1, 2, 8, 8), 0.5)  # the same error over every 4×4 window
    checker = 0.5 * (-1.0) ** (torch.arange(8)[:, None] + torch.arange(8)[None])
    checker = checker.expand(1, 2, 8, 8)  # averages to zero over every window
    plain = 0.25
    loss = lambda e: diffusion_loss(e, lowpass_weight=weight, lowpass_size=4).item()  # noqa: E731
    assert loss(constant) == pytest.approx((1 + weight) * plain)
    assert loss(checker) == pytest.approx(plain)


@pytest.mark.parametrize("v_prediction", [True, False])
def test_min_snr_weighting(v_prediction):
    error = torch.ones(3, 1, 2, 2)
    snr = torch.tensor([0.5, 5.0, 50.0])
    got = diffusion_loss(error, snr=snr, snr_gamma=5.0, v_prediction=v_prediction)
    expected = snr.clamp(max=5.0) / (snr + 1 if v_prediction else snr)
    torch.testing.assert_close(got, expected)
