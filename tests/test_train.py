import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_COMPRESSAI, NEEDS_COMPRESSAI
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from perco import CONFIG_DIR, PerCo
from perco.data import (
    ImageFolder,
    collate,
    latent_shard_dataset,
    shard_dataset,
    write_latent_shards,
    write_shards,
)
from perco.io import save_image
from perco.rates import get_rate
from perco.testing import save_tiny_stable_diffusion, tiny_perco
from perco.train import train, trainable_report

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = CONFIG_DIR


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def tiny_overrides(folder, out, *extra, data=None):
    """The tiny experiment on ``folder`` (or on ``data``: a list of data overrides)."""
    data = data or [
        f"data.root={folder}",
        f"data.captions={folder / 'captions.tsv'}",
        "data.crop_size=64",
    ]
    return [
        "experiment=tiny",
        *data,
        f"paths.output_dir={out}",
        "trainer.batch_size=2",
        "trainer.log_every=1",
        "trainer.val_every=100",
        "trainer.val_images=2",
        "trainer.val_pairs=2",
        "trainer.sample_steps=1",
        "trainer.tensorboard=false",
        *extra,
    ]


# -- configs -------------------------------------------------------------------------------
def _options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.sprdiff
def test_sprdiff_config_instantiates(tmp_path):
    pytest.importorskip("compressai", reason=NEEDS_COMPRESSAI)
    from compressai.models import MeanScaleHyperprior

    from perco.testing import save_tiny_open_clip

    torch.save(MeanScaleHyperprior(N=8, M=12).state_dict(), tmp_path / "g_a.pth")
    cfg = compose_train("model=sprdiff_style", "rate=r0.0059")
    cfg.model.pretrained = str(save_tiny_stable_diffusion(tmp_path / "sd"))
    cfg.model.hyper_encoder = {"channels": 16, "out_channels": 32}
    cfg.model.semantic = f"open_clip:local-dir:{save_tiny_open_clip(tmp_path / 'clip')}"
    cfg.model.distortion = f"mbt2018-mean:{tmp_path}/g_a.pth"
    model = instantiate(cfg.model, _convert_="all")
    assert model.variant == "sprdiff_style" and model.rate.name == "r0.0059"


def test_every_config_group_composes_and_instantiates(tmp_path, photo_folder):
    from perco.testing import save_tiny_flux2

    sd = save_tiny_stable_diffusion(tmp_path / "sd")
    small = {"hyper_encoder": {"channels": 16, "out_channels": 32}}
    # tiny_taef2* (real TAEF2 weights from the assets) are covered in test_taesd.py
    variants = ["perco_image", "sprdiff_style", "tiny_taef2_image", "tiny_taef2_sprdiff"]
    transformers = ["flux2_klein", "tiny_flux2", "tiny_taef2_flux2"]
    assert _options("model") == sorted(
        ["sd15", "sd21", "sd21-base", "tiny", "tiny_taef2", *variants, *transformers]
    )
    from perco.testing import save_tiny_open_clip

    clip = f"open_clip:local-dir:{save_tiny_open_clip(tmp_path / 'clip')}"
    stand_ins = {  # pretrained encoders are not reachable offline
        "perco_image": {"vision": clip, "image_quantizer": {"codebook_size": 16}},
    }
    if HAS_COMPRESSAI:  # else test_sprdiff_config_instantiates skips with the reason
        from compressai.models import MeanScaleHyperprior

        torch.save(MeanScaleHyperprior(N=8, M=12).state_dict(), tmp_path / "g_a.pth")
        g_a = f"mbt2018-mean:{tmp_path}/g_a.pth"
        stand_ins["sprdiff_style"] = {"semantic": clip, "distortion": g_a}
    for name in ["sd15", "sd21", "sd21-base", "tiny", "tiny_flux2", *stand_ins]:
        cfg = compose_train(f"model={name}", "rate=r0.0059")
        if not name.startswith("tiny"):  # the real loader, on a tiny local SD folder
            assert cfg.model.pretrained.count("/") == 1
            cfg.model.pretrained = str(sd)
            cfg.model.hyper_encoder = small["hyper_encoder"]
            for key, value in stand_ins.get(name, {}).items():
                cfg.model[key] = value
        model = instantiate(cfg.model, _convert_="all")
        assert isinstance(model, PerCo) and model.rate.name == "r0.0059"
    cfg = compose_train("model=flux2_klein", "rate=r0.0059")  # the real loader, tiny folder
    assert cfg.model.pretrained.startswith("black-forest-labs/FLUX.2-klein")
    cfg.model.pretrained = str(save_tiny_flux2(tmp_path / "klein"))
    cfg.model.hyper_encoder = small["hyper_encoder"]
    model = instantiate(cfg.model, _convert_="all")
    assert model.backbone.name == "flux2" and model.rate.name == "r0.0059"

    assert len(_options("rate")) == 8
    for name in _options("rate"):
        assert get_rate(compose_train(f"rate={name}").rate.name).name == name

    write_shards(photo_folder, str(tmp_path / "shards" / "s-%03d.tar"), max_count=3)
    fixed = ImageFolder(photo_folder, crop_size=64, random_crop=False)
    write_latent_shards(tiny_perco().autoencoder, fixed, str(tmp_path / "lat" / "l-%03d.tar"))
    data_overrides = {
        "latents": [f"data.urls='{tmp_path}/lat/l-000.tar'"],
        "folder": [f"data.root={photo_folder}"],
        "tiny": [f"paths.assets_dir={photo_folder.parent}", "data.root=" + str(photo_folder)],
        "openimages": [f"data.urls='{tmp_path}/shards/s-{{000..001}}.tar'"],
    }
    assert _options("data") == sorted([*data_overrides, "taef2_latents"])
    for name, extra in data_overrides.items():
        extra = [*extra, "data.crop_size=64"] if name != "latents" else extra
        batch = collate([next(iter(instantiate(compose_train(f"data={name}", *extra).data)))])
        if name == "latents":
            assert batch["latents"].shape == (1, 4, 8, 8) and "images" not in batch
        else:
            assert batch["images"].shape == (1, 3, 64, 64)

    for name in _options("trainable"):
        cfg = compose_train(f"trainable={name}")
        tiny_perco().set_trainable(cfg.trainable.mode)

    for name in _options("experiment"):
        cfg = compose_train(f"experiment={name}")
        assert cfg.trainer.run_name == name and cfg.trainer.max_steps > 0
    tiny = compose_train("experiment=tiny")
    assert tiny.model._target_ == "perco.testing.tiny_perco"
    assert tiny.trainer.mixed_precision == "no"
    sd = compose_train("experiment=perco_sd").model  # PerCo (SD)'s settings, as imported
    assert sd.quantizer.commitment_weight == 0.0 and sd.quantizer.distance == "cosine"
    assert sd.hyper_encoder.attention_relu and sd.posterior == "sample"
    assert (sd.timestep_spacing, sd.learned_null_text) == ("leading", False)


def test_train_yaml_holds_only_a_defaults_list():
    from omegaconf import OmegaConf

    raw = OmegaConf.load(CONFIGS / "train.yaml")
    assert list(raw.keys()) == ["defaults"]


# -- trainable modes -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["linear", "full", "lora", "none"])
def test_exactly_the_trainable_parameters_receive_gradients(mode):
    model = tiny_perco("r0.0059").train()
    model.set_trainable(mode, lora_rank=4)
    model(torch.rand(2, 3, 64, 64), ["a caption", None]).loss.backward()  # None: null text
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    report = trainable_report(model)
    assert report["trainable_params"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert 0 < report["trainable_share"] < 1


# -- data ----------------------------------------------------------------------------------
def test_unreadable_images_are_skipped_and_counted(photo_folder):
    (photo_folder / "broken.png").write_bytes(b"not an image")
    data = ImageFolder(photo_folder, crop_size=64, captions=photo_folder / "captions.tsv")
    batch = collate([data[i] for i in range(len(data))])
    assert batch["skipped"] == 1 and len(batch["captions"]) == 5
    assert batch["captions"][0] == "a red square" and batch["captions"][3] == "blue noise"


def test_small_images_are_resized_up_never_squashed(tmp_path):
    save_image(torch.rand(3, 30, 60), tmp_path / "small.png")
    sample = ImageFolder(tmp_path, crop_size=64, random_crop=False)[0]
    assert sample["image"].shape == (3, 64, 64)  # 30x60 -> 64x128, then a centre crop


def test_augmentation_depends_only_on_seed_epoch_and_index(photo_folder):
    a, b = ImageFolder(photo_folder, crop_size=48), ImageFolder(photo_folder, crop_size=48)
    assert torch.equal(a[2]["image"], b[2]["image"])
    b.set_epoch(1)
    assert not torch.equal(a[2]["image"], b[2]["image"])


def test_shards_round_trip_with_captions(photo_folder, tmp_path):
    n = write_shards(photo_folder, str(tmp_path / "s-%03d.tar"), photo_folder / "captions.tsv", 2)
    assert n == 5 and len(list(tmp_path.glob("s-*.tar"))) == 3
    samples = list(shard_dataset(str(tmp_path / "s-{000..002}.tar"), crop_size=32, shuffle=0))
    assert len(samples) == 5
    captions = {s["key"]: s["caption"] for s in samples}
    assert captions["img0"] == "a red square" and captions["img1"] is None


# -- the loop ------------------------------------------------------------------------------
def _weights(path):
    model = PerCo.from_pretrained(path)
    return {k: v.float() for k, v in model.state_dict().items()}


def test_resumed_run_matches_an_uninterrupted_run(photo_folder, tmp_path):
    common = ("trainer.checkpoint_every=3", "trainer.max_steps=6")
    whole = train(compose_train(*tiny_overrides(photo_folder, tmp_path / "a"), *common))
    train(
        compose_train(
            *tiny_overrides(photo_folder, tmp_path / "b"),
            "trainer.checkpoint_every=3",
            "trainer.max_steps=3",
        )
    )
    resumed = train(
        compose_train(
            *tiny_overrides(photo_folder, tmp_path / "b"), *common, "trainer.resume=latest"
        )
    )
    assert whole["steps"] == resumed["steps"] == 6
    a = _weights(tmp_path / "a" / "tiny" / "r0.0059" / "model")
    b = _weights(tmp_path / "b" / "tiny" / "r0.0059" / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    run = tmp_path / "a" / "tiny" / "r0.0059"
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint_0",
        "checkpoint_1",
    ]
    assert (run / "checkpoints" / "checkpoint_1" / "perco" / "perco.json").is_file()


def test_training_on_shards_lowers_the_fixed_loss_and_writes_a_usable_model(
    photo_folder, tmp_path, capsys
):
    write_shards(photo_folder, str(tmp_path / "s-%03d.tar"), photo_folder / "captions.tsv", 2)
    shards = [
        "data=openimages",
        f"data.urls='{tmp_path}/s-{{000..002}}.tar'",
        "data.shuffle=4",
        "data.crop_size=64",
    ]
    summary = train(
        compose_train(
            *tiny_overrides(
                photo_folder,
                tmp_path / "runs",
                "trainer.max_steps=25",
                "trainer.checkpoint_every=100",
                data=shards,
            ),
        )
    )
    assert summary["fixed_loss_end"] < summary["fixed_loss_start"]
    assert summary["ranks_in_sync"] and summary["samples_per_s"] > 0
    run = tmp_path / "runs" / "tiny" / "r0.0059"
    assert json.loads((run / "summary.json").read_text())["steps"] == 25
    assert (run / "samples" / "step_0000025.png").is_file()

    from perco.cli import main

    bits = tmp_path / "bits"
    assert (
        main(
            [
                "compress",
                str(photo_folder / "img0.png"),
                "-o",
                str(bits),
                "--model",
                str(tmp_path / "runs" / "tiny"),
                "--rate",
                "r0.0059",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "decompress",
                str(bits),
                "-o",
                str(tmp_path / "rec"),
                "--steps",
                "2",
                "--model",
                str(run / "model"),
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_two_processes_end_with_identical_weights_and_codebooks(photo_folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "perco.train.cli",
        *tiny_overrides(
            photo_folder, tmp_path / "runs", "trainer.max_steps=4", "trainer.checkpoint_every=100"
        ),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "r0.0059" / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == 4
    assert "2 process(es)" in done.stdout + done.stderr


@pytest.mark.slow
def test_sweep_runs_one_job_per_rate(photo_folder, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "perco.train.cli",
        "-m",
        "rate=r0.0059,r0.0098",
        *tiny_overrides(photo_folder, tmp_path / "runs", "trainer.max_steps=1"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for rate in ("r0.0059", "r0.0098"):
        assert (tmp_path / "runs" / "tiny" / rate / "model" / "perco.json").is_file()


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs perco[slurm]")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "experiment=paper"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8


def test_lpips_loads_offline_from_the_assets(assets):
    from perco.losses import load_lpips

    x = torch.rand(2, 3, 64, 64) * 2 - 1
    for net, file in [("alex", "alexnet_features"), ("vgg", "vgg16_features")]:
        model = load_lpips(net, assets / "lpips" / f"{file}.safetensors")
        assert model(x, x).abs().max() < 1e-6
        near = model(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)).mean()
        far = model(x, (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)).mean()
        assert 0 < near < far
        assert not any(p.requires_grad for p in model.parameters())


def test_resume_with_ema_and_export_of_the_averaged_weights(photo_folder, tmp_path):
    extra = ("trainer.checkpoint_every=2", "trainer.max_steps=4", "trainer.ema_decay=0.5")
    train(compose_train(*tiny_overrides(photo_folder, tmp_path / "a"), *extra))
    train(
        compose_train(
            *tiny_overrides(photo_folder, tmp_path / "b"),
            "trainer.checkpoint_every=2",
            "trainer.max_steps=2",
            "trainer.ema_decay=0.5",
        )
    )
    summary = train(
        compose_train(
            *tiny_overrides(photo_folder, tmp_path / "b"), *extra, "trainer.resume=latest"
        )
    )
    assert summary["ema_decay"] == 0.5
    a = _weights(tmp_path / "a" / "tiny" / "r0.0059" / "model")
    b = _weights(tmp_path / "b" / "tiny" / "r0.0059" / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the exported model carries the EMA weights, not the last raw step
    run = tmp_path / "a" / "tiny" / "r0.0059"
    raw = _weights(run / "checkpoints" / "checkpoint_1" / "perco")
    from safetensors.torch import load_file

    shadow = load_file(run / "checkpoints" / "checkpoint_1" / "ema.safetensors")
    assert len(shadow) > 0
    differs = [k for k in a if k.startswith("unet.") and not torch.equal(a[k], raw[k])]
    assert differs, "EMA weights should differ from the raw weights"


def test_lpips_term_on_the_x0_estimate(photo_folder, tmp_path, assets, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="perco.train")
    backbone = assets / "lpips" / "alexnet_features.safetensors"
    summary = train(
        compose_train(
            *tiny_overrides(
                photo_folder,
                tmp_path,
                "trainer.max_steps=2",
                "trainer.lpips_weight=0.5",
                f"trainer.lpips_backbone={backbone}",
            ),
        )
    )
    assert summary["steps"] == 2
    assert "train/lpips=" in caplog.text


def test_latent_pre_pass_stores_the_autoencoder_latents_and_trains(photo_folder, tmp_path):
    model = tiny_perco("r0.0059").eval()
    fixed = ImageFolder(
        photo_folder, crop_size=64, random_crop=False, captions=photo_folder / "captions.tsv"
    )
    with pytest.raises(ValueError, match="fixed crops"):
        write_latent_shards(model.autoencoder, ImageFolder(photo_folder, crop_size=64), "x-%d.tar")
    n = write_latent_shards(
        model.autoencoder, fixed, str(tmp_path / "lat" / "l-%03d.tar"), batch_size=2, max_count=3
    )
    assert n == 5
    stored = {
        s["key"]: s for s in latent_shard_dataset(f"{tmp_path}/lat/l-{{000..001}}.tar", shuffle=0)
    }
    direct = model.autoencoder.encode(fixed[0]["image"][None] * 2 - 1)[0]
    torch.testing.assert_close(stored["img0_png"]["latent"], direct, atol=2e-2, rtol=1e-2)  # fp16
    assert stored["img0_png"]["caption"] == "a red square"

    urls = f"data.urls='{tmp_path}/lat/l-{{000..001}}.tar'"
    summary = train(
        compose_train(
            *tiny_overrides(
                photo_folder, tmp_path / "runs", "trainer.max_steps=10", data=["data=latents", urls]
            )
        )
    )
    assert summary["steps"] == 10 and summary["fixed_loss_end"] < summary["fixed_loss_start"]
    assert (tmp_path / "runs" / "tiny" / "r0.0059" / "samples" / "step_0000010.png").is_file()


def test_make_shards_script(photo_folder, tmp_path, capsys):
    import runpy

    main = runpy.run_path(str(ROOT / "scripts" / "make_shards.py"), run_name="make_shards")["main"]
    assert main([str(photo_folder), str(tmp_path / "px-%03d.tar")]) == 0
    assert (
        main(
            [
                str(photo_folder),
                str(tmp_path / "lat-%03d.tar"),
                "--latents-from",
                "tiny",
                "--crop",
                "64",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("wrote 5 samples") == 2
    assert main([str(tmp_path / "missing"), str(tmp_path / "x-%03d.tar")]) == 2
    latents = list(latent_shard_dataset(str(tmp_path / "lat-000.tar"), shuffle=0))
    assert len(latents) == 5 and latents[0]["latent"].shape == (4, 8, 8)


def test_lora_resumes_exactly_and_exports_a_merged_model(photo_folder, tmp_path):
    lora = ("trainable=lora", "trainable.options.lora_rank=4")
    extra = ("trainer.checkpoint_every=2", "trainer.max_steps=4", *lora)
    train(compose_train(*tiny_overrides(photo_folder, tmp_path / "a"), *extra))
    train(
        compose_train(
            *tiny_overrides(photo_folder, tmp_path / "b"),
            *lora,
            "trainer.checkpoint_every=2",
            "trainer.max_steps=2",
        )
    )
    train(
        compose_train(
            *tiny_overrides(photo_folder, tmp_path / "b"), *extra, "trainer.resume=latest"
        )
    )
    a = _weights(tmp_path / "a" / "tiny" / "r0.0059" / "model")
    b = _weights(tmp_path / "b" / "tiny" / "r0.0059" / "model")
    assert not any("lora" in k or "base_layer" in k for k in a)  # a plain, merged U-Net
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # merged weights differ from the untrained model's: the adapters learned something
    fresh = tiny_perco("r0.0059").state_dict()
    to_q = next(k for k in a if k.endswith("attn1.to_q.weight"))
    assert not torch.allclose(a[to_q], fresh[to_q])


def test_merged_lora_model_computes_what_the_adapted_one_did(tmp_path):
    model = tiny_perco("r0.0059").eval()
    model.set_trainable("lora", lora_rank=4)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a non-trivial adapter
    images = torch.rand(1, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    t, noise = torch.tensor([500]), torch.randn(1, 4, 8, 8, generator=g)
    before = model(images, ["x"], timesteps=t, noise=noise).diffusion
    model.save_pretrained(tmp_path / "m")
    merged = PerCo.from_pretrained(tmp_path / "m").eval()
    assert not merged.has_lora and model.has_lora  # saving leaves the training model alone
    after = merged(images, ["x"], timesteps=t, noise=noise).diffusion
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-6)


def test_init_goes_on_from_a_saved_model_with_all_its_state(photo_folder, tmp_path):
    """``init=<folder>``: step 0 is the folder's model exactly (weights, codebook buffers,
    null text, index prior); a step later the weights, and so the fingerprint, move."""
    import numpy as np

    from perco.models.index_prior import ContextPrior

    source = tmp_path / "source"
    model = tiny_perco("r0.0059")
    with torch.no_grad():  # state a fresh model would not have
        model.quantizer.embed.mul_(1.5)
        model.null_text.embedding.add_(0.25)
    torch.manual_seed(0)
    model.set_index_prior(ContextPrior(model.rate.codebook_size, 8, 8, 3), {"fitted_on": "test"})
    model.save_pretrained(source)
    source_model = PerCo.from_pretrained(source).eval()

    def run(steps):
        out = tmp_path / f"runs{steps}"
        cfg = compose_train(*tiny_overrides(photo_folder, out, f"trainer.max_steps={steps}",
                                            f"init={source}", "trainer.val_every=1"))  # fmt: skip
        summary = train(cfg)
        return summary, PerCo.from_pretrained(out / "tiny" / "r0.0059" / "model").eval()

    summary, same = run(0)
    assert summary["init"] == {"from": str(source), "fingerprint": source_model.fingerprint.hex()}
    assert same.fingerprint == source_model.fingerprint
    assert same.index_prior_record["fitted_on"] == "test"
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = (m.encode(images) for m in (source_model, same))
    assert torch.equal(a.indices, b.indices)
    decoded = [m.decode(e, steps=2, generator=[torch.Generator().manual_seed(1)])[0]
               for m, e in ((source_model, a), (same, b))]  # fmt: skip
    assert torch.equal(*decoded)

    summary, moved = run(1)
    assert summary["steps"] == 1 and moved.fingerprint != source_model.fingerprint
    assert moved.index_prior is not None and np.isfinite(summary["fixed_loss_end"])
    assert summary["fixed_loss_start"] == pytest.approx(run(0)[0]["fixed_loss_start"])


def test_regression_loss_is_the_written_out_l1_and_lpips():
    from perco.train.objectives import regression_loss

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1

    def lpips(x, y):  # any per-image distance stands in for LPIPS
        return (x - y).pow(2).mean((1, 2, 3))

    loss, terms = regression_loss(a, b, lpips, l1_weight=2.0, lpips_weight=0.5)
    l1 = sum((x - y).abs().sum() for x, y in zip(a.flatten(), b.flatten(), strict=True)) / a.numel()
    assert torch.allclose(terms["train/l1"], l1) and torch.allclose(
        loss, 2 * l1 + 0.5 * lpips(a, b).mean()
    )
    loss, terms = regression_loss(a, b, None, l1_weight=1.0, lpips_weight=1.0)
    assert set(terms) == {"train/l1"} and torch.allclose(loss, l1)


def test_a_one_step_student_trains_its_unet_only_and_decodes_the_teachers_files(
    photo_folder, tmp_path, assets
):
    """objective=StudentObjective from a saved teacher: the encoder (hyper-encoder,
    quantizer buffers, null text) is bit for bit the teacher's, the U-Net moved, and the
    teacher's file decodes with the student in one U-Net call."""
    from perco import codec

    teacher = tiny_perco("r0.0059").eval()
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "runs"
    backbone = assets / "lpips" / "vgg16_features.safetensors"
    overrides = ["objective=student", f"init={tmp_path / 'teacher'}",
                 f"objective.lpips_backbone={backbone}", "trainer.sample_steps=null"]  # fmt: skip
    cfg = compose_train(*tiny_overrides(photo_folder, out, "trainer.max_steps=2", *overrides))
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["unet_trainable_share"] == 1.0
    student = PerCo.from_pretrained(out / "tiny" / "r0.0059" / "model").eval()
    assert student.config.sampler == "one-step" and student.default_steps == 1
    assert codec.file_fingerprint(student) == teacher.fingerprint
    for name in ("hyper_encoder", "quantizer", "null_text"):
        ours, theirs = getattr(student, name).state_dict(), getattr(teacher, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    moved = [not torch.equal(p, q) for p, q in
             zip(student.unet.parameters(), teacher.unet.parameters(), strict=True)]  # fmt: skip
    assert any(moved)

    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ((data, _),) = codec.compress(teacher, image, ["a photo"])
    calls = []
    handle = student.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        (decoded,) = codec.decompress(student, [codec.parse(student, data)[0]])
    finally:
        handle.remove()
    assert calls == [1] and decoded.shape == (3, 64, 64)


def tiny_sweep(folder, rates):
    """A teacher sweep as ``perco-train -m`` writes one: a model per rung, the rungs with
    their own U-Nets and encoders and one frozen autoencoder."""
    teachers = {rate: tiny_perco(rate, seed=i).eval() for i, rate in enumerate(rates)}
    for rate, teacher in teachers.items():
        teacher.autoencoder = teachers[rates[0]].autoencoder
        teacher.save_pretrained(folder / rate / "model")
    return teachers


def multi_rate_overrides(sweep, assets):
    """A multi-rate student of ``sweep``'s r0.0019 and r0.0059, the run at r0.0059."""
    backbone = assets / "lpips" / "vgg16_features.safetensors"
    return ["objective=student", "rate=r0.0059", f"init={sweep}",
            "objective._target_=perco.train.objectives.MultiRateStudentObjective",
            f"+objective.sweep={sweep}", "+objective.timesteps={r0.0019:999,r0.0059:899}",
            "objective.distill_weight=1.0", "objective.adversarial_weight=0.1",
            f"objective.lpips_backbone={backbone}", "trainer.sample_steps=null"]  # fmt: skip


def test_a_multi_rate_student_trains_one_unet_that_decodes_every_rungs_files(
    photo_folder, tmp_path, assets
):
    """MultiRateStudentObjective from a teacher sweep: one run writes a student per rung,
    each with its teacher's files and its own pseudo-timestep and all with the same
    U-Net, which load_models then holds once; each decodes its teacher's file."""
    from perco import codec, load_models

    sweep = tmp_path / "sweep"
    rates = ["r0.0019", "r0.0059"]
    teachers = tiny_sweep(sweep, rates)
    overrides = multi_rate_overrides(sweep, assets)
    out = tmp_path / "runs"
    summary = train(compose_train(*tiny_overrides(photo_folder, out, "trainer.max_steps=2",
                                                  *overrides)))  # fmt: skip
    assert summary["steps"] == 2 and summary["rate"] == "r0.0059"
    students = load_models(str(out / "tiny"), rates)
    assert students["r0.0019"].unet is students["r0.0059"].unet  # served with one U-Net
    start = teachers["r0.0059"].unet.state_dict()  # the run's rung's U-Net started it
    moved = students["r0.0019"].unet.state_dict()
    assert any(not torch.equal(p, start[k]) for k, p in moved.items())
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for (rate, student), timestep in zip(students.items(), (999, 899), strict=True):
        teacher = teachers[rate]
        assert student.config.sampler == "one-step"
        assert student.config.one_step_timestep == timestep
        assert codec.file_fingerprint(student) == teacher.fingerprint
        for name in ("hyper_encoder", "quantizer", "null_text"):
            ours, theirs = getattr(student, name).state_dict(), getattr(teacher, name).state_dict()
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), (rate, name)
        ((data, _),) = codec.compress(teacher, image, ["a photo"])
        (decoded,) = codec.decompress(student, [codec.parse(student, data)[0]])
        assert decoded.shape == (3, 64, 64) and torch.isfinite(decoded).all()


def test_a_multi_rate_student_refuses_rungs_in_different_latent_spaces(tmp_path):
    """One U-Net cannot decode two autoencoders' latents: teachers whose autoencoders
    differ are a clear error before any training."""
    from perco import load_model
    from perco.train.objectives import MultiRateStudentObjective

    rates = ["r0.0019", "r0.0059"]
    for i, rate in enumerate(rates):
        tiny_perco(rate, seed=i).save_pretrained(tmp_path / rate / "model")
    objective = MultiRateStudentObjective(tmp_path, {"r0.0019": 999, "r0.0059": 899})
    with pytest.raises(ValueError, match="r0.0019's autoencoder is not r0.0059's"):
        objective.model(load_model(str(tmp_path), "r0.0059"))


def test_the_8bit_optimizer_is_a_clear_error_without_cuda_and_a_bad_name_too():
    from omegaconf import OmegaConf

    from perco.train.loop import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    tc = OmegaConf.create({"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0})
    assert isinstance(make_optimizer(params, tc, torch.device("cpu")), torch.optim.AdamW)
    tc.optimizer = "adamw8bit"
    with pytest.raises(ValueError, match="adamw8bit needs a CUDA device"):
        make_optimizer(params, tc, torch.device("cpu"))
    tc.optimizer = "sgd"
    with pytest.raises(ValueError, match="must be adamw or adamw8bit"):
        make_optimizer(params, tc, torch.device("cpu"))


def test_the_dmd_term_has_the_gradient_of_the_score_difference():
    """Its gradient with respect to x0 is (fake − real) / mean|x0 − real| per sample, over
    x0.numel(): written out here by hand."""
    from perco.train.objectives import dmd_loss

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    real, fake = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    dmd_loss(x0, real, fake).backward()
    normaliser = torch.stack([(x0[i] - real[i]).abs().mean() for i in range(2)])
    expected = (fake - real) / normaliser.view(2, 1, 1, 1) / x0.numel()
    assert torch.allclose(x0.grad, expected, atol=1e-7)
    x0.grad = None
    dmd_loss(x0, real, real).backward()  # the student's samples already where the teacher's are
    assert torch.count_nonzero(x0.grad) == 0


def test_the_adversarial_terms_are_the_hinge_losses_written_out():
    """Hinge losses averaged over the heads, against numbers worked out by hand."""
    from perco.train.adversarial import discriminator_loss, generator_loss

    real = [torch.tensor([[0.5, 2.0, -1.0]]), torch.tensor([[1.0]])]
    fake = [torch.tensor([[0.5, -2.0, 0.0]]), torch.tensor([[-1.0]])]
    # head 1: relu(1 - real) = (0.5, 0, 2), relu(1 + fake) = (1.5, 0, 1): 5/6 + 5/6
    # head 2: relu(1 - 1) = 0, relu(1 - 1) = 0
    assert discriminator_loss(real, fake).item() == pytest.approx((5 / 3 + 0) / 2)
    # -mean(fake): head 1 -(-1.5 / 3) = 0.5, head 2 1.0
    assert generator_loss(fake).item() == pytest.approx((0.5 + 1.0) / 2)


def test_the_discriminator_steps_on_detached_images_and_the_students_gradient_skips_it(assets):
    """One call: the discriminator takes one optimizer step; the returned generator loss
    sends gradient to the student's image and none to the discriminator's weights."""
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from perco.train.objectives import StudentObjective

    objective = StudentObjective(
        lpips_backbone=assets / "lpips" / "vgg16_features.safetensors", adversarial_weight=1.0
    )
    trainer = OmegaConf.create(
        {"lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_accum": 1}
    )
    objective.setup(trainer, torch.device("cpu"))
    objective.prepare(Accelerator(cpu=True))
    (heads,) = objective.modules()
    before = {name: p.detach().clone() for name, p in heads.named_parameters()}
    g = torch.Generator().manual_seed(0)
    decoded = (torch.rand(2, 3, 64, 64, generator=g) * 2 - 1).requires_grad_(True)
    target = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    terms = {}
    objective._adversarial(decoded, target, terms).backward()
    assert {"train/discriminator", "train/adversarial"} <= terms.keys()
    # every weight steps (a head's last bias may not: with all logits inside the hinge
    # margins its gradient is -1 + 1 = 0, the real and fake halves being equal in size)
    moved = {name: not torch.equal(p, before[name]) for name, p in heads.named_parameters()}
    assert all(v for name, v in moved.items() if name.endswith("weight")) and any(moved.values())
    assert all(p.grad is None for p in heads.parameters())
    assert decoded.grad is not None and decoded.grad.abs().sum() > 0


def test_a_stage2_student_trains_its_critic_and_discriminator_beside_it_and_resumes_exactly(
    photo_folder, tmp_path, assets, caplog
):
    """Stage 2 from a stage-1 student (init=) and its teacher, DMD and the adversarial term
    together: the critic and the discriminator have their own optimizers, are saved in every
    checkpoint, and a resumed run ends where an uninterrupted one does, student, critic and
    discriminator alike; a wrong teacher is refused."""
    teacher = tiny_perco("r0.0059").eval()
    teacher.save_pretrained(tmp_path / "teacher")
    from perco.models.student import one_step_student

    one_step_student(teacher).save_pretrained(tmp_path / "student")
    backbone = assets / "lpips" / "vgg16_features.safetensors"
    stage2 = ["objective=student", f"init={tmp_path / 'student'}",
              f"objective.teacher={tmp_path / 'teacher'}", "objective.dmd_weight=1.0",
              "objective.adversarial_weight=0.1", "objective.disc_lr=1e-2",
              f"objective.lpips_backbone={backbone}", "trainer.sample_steps=null",
              "trainer.checkpoint_every=2", "trainer.checkpoint_total_limit=5"]  # fmt: skip

    def run(out, *extra):
        return train(compose_train(*tiny_overrides(photo_folder, out, *stage2, *extra)))

    caplog.set_level(logging.INFO)
    summary = run(tmp_path / "a", "trainer.max_steps=4")
    assert summary["steps"] == 4
    run(tmp_path / "b", "trainer.max_steps=2")
    run(tmp_path / "b", "trainer.max_steps=4", "trainer.resume=latest")
    a, b = (tmp_path / x / "tiny" / "r0.0059" for x in "ab")
    ours, theirs = (PerCo.from_pretrained(d / "model").unet.state_dict() for d in (a, b))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    critics, discriminators = ([trained_module(d, prefix) for d in (a, b)]
                               for prefix in ("conv_in.", "heads."))  # fmt: skip
    assert critics[0].keys() == critics[1].keys() and len(critics[0]) > 10
    assert all(torch.equal(critics[0][k], critics[1][k]) for k in critics[0])
    start = teacher.unet.state_dict()  # the critic moved away from the teacher's U-Net
    assert any(not torch.equal(critics[0][k], start[k]) for k in critics[0] if k in start)
    assert len(discriminators[0]) == 12  # 3 depths x 2 convolutions x (weight, bias)
    assert all(torch.equal(discriminators[0][k], discriminators[1][k]) for k in discriminators[0])
    assert "train/discriminator=" in caplog.text and "train/adversarial=" in caplog.text

    tiny_perco("r0.0059", seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="is not this student's teacher"):
        run(tmp_path / "c", "trainer.max_steps=1", f"objective.teacher={tmp_path / 'other'}")


def trained_module(run, prefix):
    """The weights, in the run's last checkpoint, of the one objective module whose keys
    start with ``prefix`` (a critic: ``conv_in.``, a discriminator: ``heads.``)."""
    from safetensors.torch import load_file

    last = sorted((run / "checkpoints").glob("*"))[-1]
    (found,) = [w for f in sorted(last.glob("model*.safetensors"))
                if (w := load_file(f)) and next(iter(w)).startswith(prefix)]  # fmt: skip
    return found


def test_paper_onestep_trains_a_lora_student_of_a_saved_model_in_bf16(
    photo_folder, tmp_path, assets
):
    """experiment=paper_onestep from a saved PerCo folder (here a tiny SD-shaped one; an
    imported PerCo (SD) folder is the same kind of folder), on shards: LoRA adapters only,
    bf16 autocast, the student exported with the adapters merged and the teacher's files."""
    from perco import codec

    teacher = tiny_perco("r0.0059").eval()
    teacher.save_pretrained(tmp_path / "teacher")
    write_shards(photo_folder, str(tmp_path / "shards" / "s-%03d.tar"), max_count=3)
    backbone = assets / "lpips" / "vgg16_features.safetensors"
    overrides = [
        "experiment=paper_onestep", "rate=r0.0059", f"init={tmp_path / 'teacher'}",
        f"data.urls='{tmp_path}/shards/s-{{000..001}}.tar'", "data.crop_size=64",
        f"paths.output_dir={tmp_path / 'runs'}", f"objective.lpips_backbone={backbone}",
        "trainer.max_steps=2", "trainer.batch_size=2", "trainer.num_workers=0",
        "trainer.val_every=100", "trainer.tensorboard=false", "trainer.warmup_steps=0",
    ]  # fmt: skip
    cfg = compose_train(*overrides)
    assert cfg.trainer.mixed_precision == "bf16" and cfg.trainable.mode == "lora"
    summary = train_in_a_new_process(overrides, tmp_path / "runs" / "paper_onestep" / "r0.0059")
    assert summary["steps"] == 2 and summary["unet_trainable_share"] < 0.2
    student = PerCo.from_pretrained(tmp_path / "runs" / "paper_onestep" / "r0.0059" / "model")
    assert student.config.sampler == "one-step" and not student.has_lora  # merged
    assert codec.file_fingerprint(student) == teacher.fingerprint


def test_bf16_mixed_precision_trains_and_validates(photo_folder, tmp_path):
    """The SD experiments' default (trainer.mixed_precision: bf16) casts the frozen
    autoencoder to bf16: validation, outside the prepared module, must run under the same
    autocast (it failed with a bf16/float conv mismatch before)."""
    extra = ["trainer.max_steps=2", "trainer.mixed_precision=bf16", "trainer.val_every=1"]
    overrides = tiny_overrides(photo_folder, tmp_path, *extra)
    summary = train_in_a_new_process(overrides, tmp_path / "tiny" / "r0.0059")
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["fixed_loss_end"]))


def train_in_a_new_process(overrides: list[str], run: Path) -> dict:
    """``perco-train`` in its own process, as users run it: Accelerate fixes the mixed
    precision once per process, and a test worker may have set it already."""
    cmd = [sys.executable, "-m", "perco.train.cli", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run / "summary.json").read_text())
