"""The TAESD-style autoencoder with the real TAEF2 weights from the assets."""

from __future__ import annotations

import math

import pytest
import torch

from perco import CONFIG_DIR
from perco.io import load_image
from perco.metrics import psnr
from perco.models.perco import PerCo
from perco.models.taef2 import load_taef2, taef2_latent_crops, taef2_perco
from perco.models.taesd import TinyAutoencoder


def test_taef2_reconstructs_kodak_and_matches_the_published_state_dicts(assets):
    ae = load_taef2(assets / "taef2")
    assert sum(p.numel() for p in ae.encoder.parameters()) == 1_338_528  # "≈1.34M"
    x = load_image(assets / "kodak" / "kodim23.png")
    with torch.no_grad():
        z = ae.encode(x * 2 - 1)
        y = ((ae.decode(z) + 1) / 2).clamp(0, 1)
    assert z.shape == (1, 32, 64, 96)
    # the pretrained weights in the layout written here give a faithful reconstruction
    # (a wrong GroupNorm grouping or pool placement drops this below 31 dB)
    assert psnr(x, y).item() > 33


def test_latent_statistics_come_from_cached_whole_image_latents(assets, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((assets / "bsds500" / "train").glob("*.jpg"))[:3]:
        (photos / p.name).symlink_to(p.resolve())
    cache = tmp_path / "latents.safetensors"
    ae = load_taef2(assets / "taef2", [photos], cache)
    assert cache.is_file() and ae.latent_std.min() > 0.1 and ae.latent_mean.abs().max() < 3
    ae.save_pretrained(tmp_path / "ae")
    back = TinyAutoencoder.from_pretrained(tmp_path / "ae")
    assert back.config == ae.config
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back.encode(x), ae.encode(x))

    # training crops: windows of the cached latents, normalised like the model's latents
    crops = taef2_latent_crops(assets / "taef2", [photos], cache, crop_size=128, seed=1)
    assert len(crops) == 3
    sample = crops[0]["latent"]
    assert sample.shape == (32, 16, 16)
    with torch.no_grad():
        whole = ae.encode(
            load_image(photos / crops.names[0].split("/")[1])[..., :320, :480] * 2 - 1
        )
    # the window is somewhere in the normalised whole-image latent
    windows = whole[0].unfold(1, 16, 1).unfold(2, 16, 1)  # C, rows, cols, 16, 16
    err = (windows - sample[:, None, None]).abs().amax(dim=(0, 3, 4))
    assert err.min() < 1e-4
    crops.set_epoch(1)
    assert not torch.equal(crops[0]["latent"], sample)


def test_a_perco_on_taef2_saves_and_loads_with_its_autoencoder(assets, tmp_path):
    model = taef2_perco("r0.0019", assets / "taef2", block_out_channels=(16, 32)).eval()
    model.save_pretrained(tmp_path / "m")
    back = PerCo.from_pretrained(tmp_path / "m").eval()
    assert isinstance(back.autoencoder, TinyAutoencoder)
    assert back.fingerprint == model.fingerprint
    images = torch.rand(1, 3, 64, 64)
    assert torch.equal(back.encode(images).indices, model.encode(images).indices)


def test_tiny_taef2_experiment_composes_and_trains_on_latent_windows(assets, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from perco.data.folder import collate

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((assets / "bsds500" / "train").glob("*.jpg"))[:2]:
        (photos / p.name).symlink_to(p.resolve())
    overrides = [
        "experiment=tiny_taef2",
        "rate=r0.0019",
        f"paths.assets_dir={assets.resolve()}",
        f"model.folders=[{photos}]",
        f"model.latent_cache={tmp_path / 'cache.safetensors'}",
        "model.block_out_channels=[16,32]",
    ]
    configs = str(CONFIG_DIR)
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    model = instantiate(cfg.model, _convert_="all")
    data = instantiate(cfg.data)
    assert isinstance(model.autoencoder, TinyAutoencoder) and model.config.guidance == "none"
    batch = collate([data[0], data[1]])
    assert batch["latents"].shape == (2, 32, 16, 16) and "images" not in batch  # 128-px crops
    metric = torch.tensor(model.config.latent_metric)
    assert metric.shape == (32, 32) and model.config.lowpass_weight > 0
    assert torch.equal(data.mean.flatten(), model.autoencoder.latent_mean.flatten())
    # it trains: a few steps on a fixed batch, timesteps and noise lower that batch's loss
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 32, 16, 16, generator=g)
    fixed = {"timesteps": torch.tensor([300, 700]), "noise": noise}
    params = model.set_trainable("full")
    optimizer = torch.optim.Adam(params, lr=1e-3)
    before = model(None, batch["captions"], latents=batch["latents"], **fixed).loss.item()
    for _ in range(5):
        optimizer.zero_grad()
        model(None, batch["captions"], latents=batch["latents"], **fixed).loss.backward()
        optimizer.step()
    after = model(None, batch["captions"], latents=batch["latents"], **fixed).loss.item()
    assert after < 0.9 * before


def test_taef2_pixel_metric_is_concentrated_and_not_diagonal(assets):
    from perco.models.autoencoders import latent_metric

    ae = load_taef2(assets / "taef2")
    x = load_image(assets / "kodak" / "kodim23.png")[..., 192:320, 256:384]
    metric = torch.tensor(latent_metric(ae, [ae.encode(x * 2 - 1)], probes=4))
    assert torch.allclose(metric, metric.T) and torch.linalg.eigvalsh(metric).min() > -1e-6
    diagonal = metric.diagonal()
    assert diagonal.mean() == pytest.approx(1.0)
    top2 = diagonal.sort(descending=True).values[:2].sum() / diagonal.sum()
    assert top2 > 0.3  # 2 of 32 channels: a plain latent MSE would give them 1/16
    off = metric - torch.diag(diagonal)
    assert off.norm() > 0.1 * metric.norm()  # channels act together in pixels


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["tiny_taef2_noquant", "tiny_taef2_textonly"])
def test_the_ablations_train_and_evaluate_on_the_small_real_model(assets, tmp_path, experiment):
    """PerCo without quantization and the text-only model (paper Table 1 right, Fig. 7):
    selected by an experiment config, trained by perco-train, measured by perco-eval."""
    from hydra import compose, initialize_config_dir

    from perco.eval import run
    from perco.train import train

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((assets / "bsds500" / "train").glob("*.jpg"))[:2]:
        (photos / p.name).symlink_to(p.resolve())
    configs = str(CONFIG_DIR)
    overrides = [
        f"experiment={experiment}", "rate=r0.0098", f"paths.assets_dir={assets.resolve()}",
        f"paths.output_dir={tmp_path / 'runs'}", f"model.folders=[{photos}]",
        f"model.latent_cache={tmp_path / 'cache.safetensors'}", "model.block_out_channels=[16,32]",
        "trainer.max_steps=6", "trainer.batch_size=2", "trainer.val_every=3",
        "trainer.tensorboard=false", "trainer.sample_steps=1",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        summary = train(compose("train", overrides=overrides))
        assert summary["steps"] == 6 and summary["fixed_loss_end"] < summary["fixed_loss_start"]
        kodak = [
            "dataset=folder", f"dataset.root={photos}", "metrics=offline", "metrics.patch_size=64",
            f"paths.assets_dir={assets.resolve()}", f"output_dir={tmp_path / 'eval'}",
            f"checkpoint={tmp_path / 'runs' / experiment}", "rate=r0.0098", "eval.steps=[1]",
            "eval.ceiling=false",
        ]  # fmt: skip
        doc = run(compose("eval", overrides=kodak))
    model = PerCo.from_pretrained(tmp_path / "runs" / experiment / "r0.0098" / "model")
    local = {"tiny_taef2_noquant": "continuous", "tiny_taef2_textonly": "none"}[experiment]
    assert model.config.local == local
    assert doc["protocol"]["ablation"].startswith(("PerCo without quantization", "text-only"))
    assert doc["results"]["psnr"][0] > 5
    if local == "continuous":  # no bitstream: the rate is not applicable
        assert math.isnan(doc["results"]["bpp_payload"][0])
    else:  # no z_l, no captions here: nothing is coded
        assert doc["results"]["bpp_payload"][0] == 0


def test_the_transformer_experiment_trains_and_evaluates_on_the_small_real_model(assets, tmp_path):
    """experiment=tiny_taef2_flux2 (a FLUX.2 transformer, rectified flow) through
    perco-train and perco-eval, as the U-Net's; the protocol says what ran."""
    from hydra import compose, initialize_config_dir

    from perco.eval import run
    from perco.train import train

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((assets / "bsds500" / "train").glob("*.jpg"))[:2]:
        (photos / p.name).symlink_to(p.resolve())
    overrides = [
        "experiment=tiny_taef2_flux2", "rate=r0.0098", f"paths.assets_dir={assets.resolve()}",
        f"paths.output_dir={tmp_path / 'runs'}", f"model.folders=[{photos}]",
        f"model.latent_cache={tmp_path / 'cache.safetensors'}", "model.denoiser.width=32",
        "model.denoiser.head_dim=16", "model.denoiser.double_blocks=1",
        "model.denoiser.single_blocks=1", "trainer.max_steps=6", "trainer.batch_size=2",
        "trainer.val_every=3", "trainer.tensorboard=false", "trainer.sample_steps=2",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        summary = train(compose("train", overrides=overrides))
        assert summary["steps"] == 6 and summary["ranks_in_sync"]
        folder = [
            "dataset=folder", f"dataset.root={photos}", "metrics=offline", "metrics.patch_size=64",
            f"paths.assets_dir={assets.resolve()}", f"output_dir={tmp_path / 'eval'}",
            f"checkpoint={tmp_path / 'runs' / 'tiny_taef2_flux2'}", "rate=r0.0098",
            "eval.steps=[2]", "eval.ceiling=false",
        ]  # fmt: skip
        doc = run(compose("eval", overrides=folder))
    model = PerCo.from_pretrained(tmp_path / "runs" / "tiny_taef2_flux2" / "r0.0098" / "model")
    assert model.backbone.name == "flux2" and model.schedule.name == "flow"
    assert doc["protocol"]["backbone"] == "flux2"
    assert "rectified flow" in doc["protocol"]["scheduler"]
    assert doc["results"]["psnr"][0] > 5 and doc["results"]["bpp_file"][0] > 0
