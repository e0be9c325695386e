"""Noise schedule families (perco/schedules.py): rectified flow written out by hand on tiny
tensors, and the FLUX.2 backbone's packing and position ids against diffusers' pipeline."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from perco.models.backbones.flux2 import FLOW_SCHEDULER
from perco.sampling import one_step, one_step_x0, sample
from perco.schedules import DDPMSchedule, FlowSchedule, FlowTimesteps, schedule_for
from perco.testing import SD21_SCHEDULER, tiny_flux2_perco
from perco.timing import CallCounter


@pytest.fixture(scope="module")
def model():
    return tiny_flux2_perco("r0.0098").eval()


def reference_prediction(model, x, spatial, t, context):
    """The transformer called as diffusers' Flux2KleinPipeline calls it: latents patchified
    and packed by the pipeline's own helpers, its position ids, ``timestep / 1000``."""
    pipe = Flux2KleinPipeline
    tokens = torch.cat([pipe._pack_latents(pipe._patchify_latents(x)),
                        pipe._pack_latents(pipe._patchify_latents(spatial))], dim=-1)  # fmt: skip
    packed = pipe._patchify_latents(x)
    out = model.denoiser(
        hidden_states=tokens,
        encoder_hidden_states=context,
        timestep=t / 1000,
        img_ids=pipe._prepare_latent_ids(packed),
        txt_ids=pipe._prepare_text_ids(context),
        guidance=None,
        return_dict=False,
    )[0]
    h, w = packed.shape[-2:]
    unpacked = out.permute(0, 2, 1).reshape(len(x), -1, h, w)
    return pipe._unpatchify_latents(unpacked)


def test_the_schedule_family_follows_the_scheduler_class():
    assert isinstance(schedule_for(DDIMScheduler(**SD21_SCHEDULER)), DDPMSchedule)
    assert isinstance(schedule_for(FlowMatchEulerDiscreteScheduler()), FlowSchedule)


def test_the_flow_backbone_packs_and_calls_the_transformer_as_the_pipeline_does(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=g)
    spatial = torch.randn(2, model.local_channels, 8, 12, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([700.0, 120.0])
    with torch.no_grad():
        ours = model.backbone.predict(model.denoiser, x, spatial, t, context)
        theirs = reference_prediction(model, x, spatial, t, context)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_flow_loss_is_the_velocity_regression_written_out(model):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        out = model(None, [None, None], latents=latents, timesteps=t, noise=noise)
        # by hand: x_t = (1 − σ) x0 + σ ε, target ε − x0, MSE per sample, mean
        sigma = (t / 1000).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        codes = model.quantizer.lookup(model.quantizer.encode(model.hyper_encoder(latents)))
        spatial = model._spatial(codes, (8, 8))
        pred = reference_prediction(model, noisy, spatial, t, model.null_text(2))
        loss = (pred - (noise - latents)).pow(2).mean(dim=(1, 2, 3)).mean()
        x0 = noisy - sigma * pred
    torch.testing.assert_close(out.diffusion, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.x0, x0, rtol=1e-5, atol=1e-5)


def test_flow_timesteps_are_diffusers_logit_normal_draws_shifted_by_resolution(model):
    schedule = model.schedule
    mu = compute_empirical_mu(image_seq_len=16, num_steps=20)
    t = schedule.draw_timesteps(5, torch.Generator().manual_seed(3), mu=mu)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (5,), generator=torch.Generator().manual_seed(3)))
    shifted = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # exponential time shift, σ = 1
    torch.testing.assert_close(t, shifted * 1000)
    mode = schedule.draw_timesteps(4, torch.Generator().manual_seed(3), mu=mu,
                                   sampling=FlowTimesteps("mode"))  # fmt: skip
    assert mode.shape == (4,) and ((mode > 0) & (mode < 1000)).all()
    with pytest.raises(ValueError, match="Min-SNR"):
        schedule.loss_options(t, snr_gamma=5.0)


def test_one_guided_euler_step_is_the_written_out_update_in_one_call(model):
    g = torch.Generator().manual_seed(2)
    spatial = torch.randn(2, model.local_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    null = torch.randn(2, 77, 32, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    counter = CallCounter(model.denoiser)
    try:
        out = sample(model.denoiser, model.scheduler, spatial, text, null, steps=1,
                     guidance="text", guidance_scale=3.0, noise=noise)  # fmt: skip
    finally:
        counter.remove()
    assert counter.calls == 1  # both guidance branches in one batched call
    # by hand: σ from 1 to 0 in one Euler step; σ_1 = 1 stays 1 under the shift
    t = torch.full((2,), 1000.0)
    with torch.no_grad():
        v_c = reference_prediction(model, noise, spatial, t, text)
        v_u = reference_prediction(model, noise, spatial, t, null)
    v = v_u + 3.0 * (v_c - v_u)
    torch.testing.assert_close(out, noise + (0.0 - 1.0) * v, rtol=1e-5, atol=1e-5)


def test_a_two_step_flow_decode_walks_the_shifted_sigma_grid(model):
    g = torch.Generator().manual_seed(4)
    spatial = torch.randn(1, model.local_channels, 8, 8, generator=g)
    text = torch.randn(1, 77, 32, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    counter = CallCounter(model.denoiser)
    try:
        out = sample(model.denoiser, model.scheduler, spatial, text, text, steps=2,
                     guidance="none", noise=noise)  # fmt: skip
    finally:
        counter.remove()
    assert counter.calls == 2
    mu = compute_empirical_mu(image_seq_len=16, num_steps=2)  # 8×8 latent: 4×4 tokens
    half = math.exp(mu) / (math.exp(mu) + (1 / 0.5 - 1))
    x = noise
    with torch.no_grad():
        for sigma, nxt in ((1.0, half), (half, 0.0)):
            v = reference_prediction(model, x, spatial, torch.tensor([1000 * sigma]), text)
            x = x + (nxt - sigma) * v
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_a_flow_students_one_step_is_noise_minus_velocity(model):
    g = torch.Generator().manual_seed(5)
    spatial = torch.randn(2, model.local_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    assert model.schedule.one_step_timestep == 1000
    with torch.no_grad():
        x0 = one_step_x0(model.denoiser, model.scheduler, noise, spatial, text, 1000)
        v = reference_prediction(model, noise, spatial, torch.full((2,), 1000.0), text)
    torch.testing.assert_close(x0, noise - v, rtol=1e-6, atol=1e-6)
    drawn = one_step(model.denoiser, model.scheduler, spatial, text, timestep=1000,
                     generator=torch.Generator().manual_seed(9))  # fmt: skip
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = one_step_x0(model.denoiser, model.scheduler, start, spatial, text, 1000)
    torch.testing.assert_close(drawn, expected)


def test_a_flow_model_refuses_ddpm_only_settings(model):
    with pytest.raises(ValueError, match="timestep_spacing"):
        model.decode(model.encode(torch.rand(1, 3, 64, 64)), timestep_spacing="trailing")
    with pytest.raises(ValueError, match="timestep_grid"):
        model.schedule.grid(10)
    with pytest.raises(ValueError, match="flow models"):
        DDPMSchedule(DDIMScheduler(**SD21_SCHEDULER)).draw_timesteps(2, sampling=FlowTimesteps())


def test_the_flow_scheduler_is_dynamically_shifted():
    assert FLOW_SCHEDULER["use_dynamic_shifting"]
    schedule = FlowSchedule(FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER))
    with pytest.raises(ValueError, match="mu"):
        schedule.set_timesteps(4, "cpu")
    static = FlowSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0))
    torch.testing.assert_close(static.shift(torch.tensor([0.5]), None), torch.tensor([0.75]))
