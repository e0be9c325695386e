import json

import pytest
import torch
from torch import nn

from perco import PerCo, get_rate, index_bits
from perco.io import load_image
from perco.testing import save_tiny_stable_diffusion, tiny_perco


def _photo_like(size=64, seed=0):
    """A structured image: smooth gradients plus a few rectangles (not white noise)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2])
    for _ in range(4):
        y0, x0 = torch.randint(0, size - 16, (2,), generator=g).tolist()
        img[:, y0 : y0 + 16, x0 : x0 + 16] = torch.rand(3, 1, 1, generator=g)
    return img[None]


def test_encode_shapes_and_padding(model):
    x = torch.rand(2, 3, 70, 100)
    enc = model.encode(x, ["a red barn", None])
    assert model.pad_multiple == 64
    assert enc.padded_size == (128, 128) and enc.sizes == [(70, 100)] * 2
    assert enc.indices.shape == (2, 2, 2) and enc.indices.dtype == torch.int64
    assert int(enc.indices.max()) < model.rate.codebook_size
    out = model.decode(enc, steps=2)
    assert [o.shape for o in out] == [(3, 70, 100)] * 2
    assert all(o.min() >= 0 and o.max() <= 1 for o in out)


def test_native_kodak_size_is_not_squashed(assets):
    x = load_image(assets / "kodak" / "kodim04.png")  # portrait, 512×768
    assert x.shape[-2:] == (768, 512)
    model = tiny_perco("r0.0019").eval()
    enc = model.encode(x)
    assert enc.indices.shape == (1, 12, 8) and enc.padded_size == (768, 512)
    assert index_bits(model.rate, 768, 512) == 12 * 8 * 8


def test_decode_is_deterministic_for_a_seed_and_independent_of_the_batch(model, images):
    enc = model.encode(images, ["a cat", "a dog"])
    a = model.decode(enc, steps=3, seed=5)
    b = model.decode(enc, steps=3, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = model.decode(enc, steps=3, seed=6)
    assert not torch.equal(a[0], c[0])
    first = model.encode(images[:1], ["a cat"])
    torch.testing.assert_close(model.decode(first, steps=3, seed=5)[0], a[0], atol=1e-4, rtol=0)


def test_encode_is_deterministic_and_leaves_the_model_alone(model, images):
    model.train()
    state = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    a, b = model.encode(images), model.encode(images)
    assert torch.equal(a.indices, b.indices)
    for k, v in model.quantizer.state_dict().items():
        assert torch.equal(v, state[k])


def test_save_and_load_round_trip(model, images, tmp_path):
    enc = model.encode(images, ["a cat", None])
    before = model.decode(enc, steps=2)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "perco.json").read_text())
    assert config["rate"] == {"name": "r0.0019", "downsample": 8, "codebook_size": 256, "steps": 20}
    assert config["scheduler_class"] == "DDIMScheduler"
    scheduler = json.loads((tmp_path / "ckpt" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["timestep_spacing"] == "leading"
    weights = list((tmp_path / "ckpt").rglob("*.safetensors"))
    assert len(weights) >= 6 and not list((tmp_path / "ckpt").rglob("*.bin"))

    back = PerCo.from_pretrained(tmp_path / "ckpt").eval()
    assert back.rate == model.rate and back.config == model.config
    assert torch.equal(back.encode(images).indices, enc.indices)
    after = back.decode(enc, steps=2)
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


def test_load_models_shares_the_parts_several_rungs_hold_alike(images, tmp_path):
    """A sweep's rungs share their identical autoencoder and text encoder, not U-Nets that
    differ; and sharing changes no output."""
    from perco import load_models

    low, high = tiny_perco("r0.0019").eval(), tiny_perco("r0.0059").eval()
    with torch.no_grad():
        high.unet.conv_out.bias.add_(0.1)  # trained apart
    for model in (low, high):
        model.save_pretrained(tmp_path / model.rate.name / "model")
    models = load_models(str(tmp_path), ["r0.0019", "r0.0059"])
    a, b = models.values()
    assert a.autoencoder is b.autoencoder and a.text_encoder is b.text_encoder
    assert a.unet is not b.unet
    enc = low.encode(images)
    expected = low.decode(enc, steps=2)
    assert all(torch.equal(x, y) for x, y in zip(a.decode(enc, steps=2), expected, strict=True))

    high.unet.load_state_dict(low.unet.state_dict())  # one U-Net for both: held once
    high.save_pretrained(tmp_path / "r0.0059" / "model")
    a, b = load_models(str(tmp_path), ["r0.0019", "r0.0059"]).values()
    assert a.unet is b.unet


def test_save_replaces_an_existing_checkpoint_whole(model, tmp_path):
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    (target / "stale.txt").write_text("left from before")
    model.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folders left


def test_from_pretrained_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PerCo checkpoint"):
        PerCo.from_pretrained(tmp_path)


def test_from_stable_diffusion_loads_a_diffusers_folder(tmp_path):
    """The real loading path (`from_pretrained` per subfolder) on a tiny SD folder."""
    sd = save_tiny_stable_diffusion(tmp_path / "sd")
    model = PerCo.from_stable_diffusion(
        sd, rate="r0.0059", hyper_encoder={"channels": 16, "out_channels": 32}, condition="codes"
    ).eval()
    assert model.unet.config.in_channels == 4 + 32  # codebook_dim 32 concatenated
    assert model.hyper_encoder.config.in_channels == 4  # from the VAE's config
    assert model.scheduler.config.prediction_type == "v_prediction"
    out = model.decode(model.encode(torch.rand(1, 3, 64, 64), ["x"]), steps=1)
    assert out[0].shape == (3, 64, 64)


def test_inconsistent_parts_are_rejected(model):
    parts = dict(model.named_children())
    with pytest.raises(ValueError, match="rate r0.1250"):
        PerCo(
            **parts,
            tokenizer=model.tokenizer,
            scheduler=model.scheduler,
            config=type(model.config)(rate="r0.1250"),
        )
    enc = model.encode(torch.rand(1, 3, 64, 64))
    enc.rate = get_rate("r0.0024")
    with pytest.raises(ValueError, match="made at rate"):
        model.decode(enc)


@pytest.mark.parametrize("mode", ["linear", "full", "none"])
def test_set_trainable_always_trains_the_new_parts(model, mode):
    params = model.set_trainable(mode)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    for must in ("hyper_encoder.", "quantizer.project_in", "unet.conv_in.weight", "null_text."):
        assert any(n.startswith(must) for n in names), must
    assert not any(n.startswith(("autoencoder.", "text_encoder.")) for n in names)
    unet_linear = {
        f"unet.{m}.{p}"
        for m, mod in model.unet.named_modules()
        if isinstance(mod, nn.Linear)
        for p, _ in mod.named_parameters()
    }
    unet_trained = {n for n in names if n.startswith("unet.") and not n.startswith("unet.conv_in")}
    if mode == "linear":
        assert unet_trained == unet_linear
    elif mode == "full":
        assert unet_trained == {n for n, _ in model.named_parameters() if n.startswith("unet.")} - {
            "unet.conv_in.weight",
            "unet.conv_in.bias",
        }
    else:
        assert not unet_trained


def test_training_lowers_the_loss_on_fixed_noise():
    torch.manual_seed(0)
    model = tiny_perco("r0.0059")
    image, caption = _photo_like(), ["a few coloured squares on a gradient"]
    g = torch.Generator().manual_seed(1)
    fixed = [
        (torch.randint(0, 1000, (1,), generator=g), torch.randn(1, 4, 8, 8, generator=g))
        for _ in range(8)
    ]

    def fixed_loss():
        model.eval()
        with torch.no_grad():
            return sum(
                model(image, caption, timesteps=t, noise=n).diffusion.item() for t, n in fixed
            ) / len(fixed)

    model.train()
    model(image, caption)  # k-means initialisation of the codebook on the first batch
    start = fixed_loss()
    optimizer = torch.optim.AdamW(model.set_trainable("linear"), lr=1e-3)
    model.train()
    for step in range(60):
        loss = model(image, caption, generator=torch.Generator().manual_seed(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = fixed_loss()
    print(f"fixed-noise loss {start:.4f} -> {end:.4f}")
    assert end <= 0.7 * start


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_forward_process(prediction_type):
    from diffusers import DDIMScheduler

    from perco.losses import predicted_x0
    from perco.testing import SD21_SCHEDULER

    sched = DDIMScheduler(**{**SD21_SCHEDULER, "prediction_type": prediction_type})
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    noisy = sched.add_noise(x0, noise, t)
    target = sched.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
    torch.testing.assert_close(predicted_x0(sched, noisy, target, t), x0, atol=2e-4, rtol=1e-4)


def test_min_snr_weighting_is_min_snr_over_snr_plus_one_for_v_prediction():
    torch.manual_seed(0)
    model = tiny_perco("r0.0059").eval()
    image, caption = _photo_like(), [None]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    for t in (10, 500, 990):
        timesteps = torch.tensor([t])
        with torch.no_grad():
            plain = model(image, caption, timesteps=timesteps, noise=noise).diffusion
            weighted = model(image, caption, timesteps=timesteps, noise=noise, snr_gamma=5.0)
        alpha_bar = model.scheduler.alphas_cumprod[t]
        snr = alpha_bar / (1 - alpha_bar)
        expected = plain * min(snr, 5.0) / (snr + 1)
        assert weighted.diffusion == pytest.approx(expected.item(), rel=1e-5)


def test_latent_metric_makes_the_loss_a_quadratic_form_of_the_error():
    from dataclasses import replace

    torch.manual_seed(0)
    model = tiny_perco("r0.0059").eval()
    image, t = _photo_like(), torch.tensor([400])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def loss(metric):
        model.config = replace(model.config, latent_metric=metric)
        with torch.no_grad():
            return model(image, [None], timesteps=t, noise=noise).diffusion.item()

    plain = loss(None)
    assert loss(torch.eye(4).tolist()) == pytest.approx(plain, rel=1e-5)
    parts = [loss(torch.diag(torch.eye(4)[c]).tolist()) for c in range(4)]  # one channel each
    assert sum(parts) == pytest.approx(plain, rel=1e-5) and len({round(p, 6) for p in parts}) == 4
    m1, m2 = torch.randn(4, 4), torch.randn(4, 2)
    g1, g2 = m1 @ m1.T, m2 @ m2.T  # full rank and rank 2, not diagonal
    both = loss((g1 + g2).tolist())
    assert both == pytest.approx(loss(g1.tolist()) + loss(g2.tolist()), rel=1e-4)


def test_lowpass_term_adds_the_loss_of_the_window_averaged_error():
    from dataclasses import replace

    torch.manual_seed(0)
    model = tiny_perco("r0.0059").eval()
    image, t = _photo_like(), torch.tensor([400])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(image, [None], timesteps=t, noise=noise).diffusion.item()
        model.config = replace(model.config, lowpass_weight=2.0, lowpass_size=8)  # whole latent
        both = model(image, [None], timesteps=t, noise=noise).diffusion.item()
        model.config = replace(model.config, lowpass_size=1)  # windows of one: the error itself
        single = model(image, [None], timesteps=t, noise=noise).diffusion.item()
    assert plain < both < 3 * plain  # the mean error of the latent counts, but less than all
    assert single == pytest.approx(3 * plain, rel=1e-5)


def test_timestep_spacing_is_a_model_setting_and_a_decode_option(model, images, tmp_path):
    """SD 2.1's "leading" spacing with steps_offset 1 starts a 5-step decode at t=801,
    "trailing" at t=999 (pure noise, as in training); the model's own spacing is the
    default, so files of old checkpoints decode as before."""
    assert model.scheduler.config.timestep_spacing == "leading"
    firsts = {}
    for spacing in ("leading", "trailing", "linspace"):
        sampler = model.sampler(spacing)
        sampler.set_timesteps(5)
        firsts[spacing] = int(sampler.timesteps[0])
    assert firsts == {"leading": 801, "trailing": 999, "linspace": 999}
    assert model.sampler() is model.sampler("leading") is model.scheduler
    with pytest.raises(ValueError, match="leading, trailing or linspace"):
        model.sampler("uniform")

    enc = model.encode(images[:1])
    default = model.decode(enc, steps=3)[0]
    assert torch.equal(default, model.decode(enc, steps=3, timestep_spacing="leading")[0])
    assert not torch.equal(default, model.decode(enc, steps=3, timestep_spacing="trailing")[0])

    sd = save_tiny_stable_diffusion(tmp_path / "sd")
    trailing = PerCo.from_stable_diffusion(sd, rate="r0.0059", timestep_spacing="trailing")
    trailing.save_pretrained(tmp_path / "ckpt")
    back = PerCo.from_pretrained(tmp_path / "ckpt")
    assert back.scheduler.config.timestep_spacing == "trailing"
    assert (
        back.fingerprint
        == trailing.fingerprint
        != PerCo.from_stable_diffusion(sd, rate="r0.0059").fingerprint
    )


@pytest.mark.parametrize("local", ["continuous", "none"])
def test_ablations_condition_on_continuous_or_no_local_context(images, local):
    quantized = tiny_perco("r0.0059").eval()
    model = tiny_perco("r0.0059", local=local).eval()
    assert model.fingerprint != quantized.fingerprint
    losses = model.train()(images, ["a", None], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses.loss) and losses.vq == 0
    model.eval()
    enc = model.encode(images)
    if local == "continuous":  # the hyper-latent itself: changing it changes the decode
        assert enc.features is not None and enc.features.shape[1] == 8
        out = model.decode(enc, steps=1)[0]
        enc.features = enc.features + 1
        assert not torch.equal(out, model.decode(enc, steps=1)[0])
    else:  # no z_l: without captions, two different images decode to the same picture
        assert enc.features is None
        a, b = model.decode(enc, steps=1)
        assert torch.equal(a, b)
    from perco import codec

    with pytest.raises(ValueError, match="ablation without a bitstream"):
        codec.compress(model, images)
    with pytest.raises(ValueError, match="local must be"):
        tiny_perco("r0.0059", local="zero")


def test_posterior_sample_draws_from_the_vae_posterior_reproducibly(images):
    mode = tiny_perco("r0.1250").eval()
    sample = tiny_perco("r0.1250", posterior="sample").eval()
    assert sample.autoencoder.posterior == "sample" and mode.autoencoder.posterior == "mode"
    x = images[:2]
    padded = sample._pad(x)
    drawn, mean = sample._latents(padded), mode._latents(padded)
    assert not torch.equal(drawn, mean)  # a draw, not the mean
    dist = sample.autoencoder.vae.encode(padded * 2 - 1).latent_dist
    scale = sample.autoencoder.scaling_factor
    # within a few posterior standard deviations of the mean, everywhere
    assert ((drawn / scale - dist.mean).abs() <= 6 * dist.std).all()
    # the same image gets the same draw, alone or in a batch (up to batched-conv rounding)
    torch.testing.assert_close(sample._latents(padded[1:]), drawn[1:], atol=1e-5, rtol=1e-5)
    assert torch.equal(sample.encode(x).indices, sample.encode(x).indices)
    # a training step draws afresh from its own generator
    fresh = [sample._latents(padded, torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[0], drawn)
    # a setting that changes outputs: it enters the fingerprint (only when set)
    assert mode.fingerprint != sample.fingerprint
    assert "posterior" not in mode._settings() and sample._settings()["posterior"] == "sample"


def test_posterior_sample_needs_a_vae():
    from perco.models.config import PerCoConfig
    from perco.models.taesd import TinyAutoencoder

    m = tiny_perco("r0.1250")
    with pytest.raises(ValueError, match="encodes deterministically"):
        PerCo(
            TinyAutoencoder(latent_channels=4), m.hyper_encoder, m.quantizer, m.unet,
            m.text_encoder, m.tokenizer, m.null_text, m.scheduler,
            PerCoConfig(rate="r0.1250", posterior="sample"),
        )  # fmt: skip
