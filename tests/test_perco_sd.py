"""Importing PerCo (SD)'s checkpoints (``perco import-checkpoint perco-sd``).

PerCo (SD)'s real weights cannot be downloaded here. These tests write folders the way its
training script saves them, at tiny size: the tensor names and shapes of its own modules
(``HyperEncoder`` with CompressAI blocks and vector-quantize-pytorch's ``VectorQuantize``
inside; its U-Net, SD's plus ``conv_in_extended``), random values, diffusers layout. The
layout is written out here from its source's structure, not produced by perco's mapping.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from perco import PerCo, codec
from perco.cli import main
from perco.models.text import encode_captions
from perco.testing import save_tiny_stable_diffusion, tiny_components

N, M, CODEBOOK_DIM = 32, 64, 8  # tiny widths (PerCo (SD): 192, 320, 32)


# -- PerCo (SD)-format folders ----------------------------------------------------------
def hyper_enc_state(cfg_ss: int, cfg_cs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``hyper_enc``'s tensors: ``backbone`` = Sequential(entry, 3 residual bottlenecks,
    entry, 3 bottlenecks, AttentionBlock(N), entry, 3 bottlenecks, 1×1 N→M,
    AttentionBlock(M)); an entry is CompressAI's ``conv`` (5×5 stride 2) where the spatial
    size asks for it, else 1×1; ``quantizer`` = ``VectorQuantize(dim=M, codebook_dim=32,
    use_cosine_sim=True)`` with its ``Linear`` projections and one codebook."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k):
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        state[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.1

    def bottleneck(name, c):  # ResidualBottleneckBlock.layers / ResidualUnit.conv
        conv(f"{name}.0", c, c // 2, 1)
        conv(f"{name}.2", c // 2, c // 2, 3)
        conv(f"{name}.4", c // 2, c, 1)

    def attention(name, c):  # compressai.layers.AttentionBlock
        for k in range(3):
            bottleneck(f"{name}.conv_a.{k}.conv", c)
            bottleneck(f"{name}.conv_b.{k}.conv", c)
        conv(f"{name}.conv_b.3", c, c, 1)

    conv("backbone.0", 4, N, 1 if cfg_ss >= 16 else 5)
    for i in (1, 2, 3, 5, 6, 7, 10, 11, 12):
        bottleneck(f"backbone.{i}.layers", N)
    conv("backbone.4", N, N, 1 if cfg_ss >= 32 else 5)
    attention("backbone.8", N)
    conv("backbone.9", N, N, 1 if cfg_ss == 64 else 5)
    conv("backbone.13", N, M, 1)
    attention("backbone.14", M)
    state["quantizer.project_in.weight"] = torch.randn(CODEBOOK_DIM, M, generator=g) / M**0.5
    state["quantizer.project_in.bias"] = torch.randn(CODEBOOK_DIM, generator=g) * 0.1
    state["quantizer.project_out.weight"] = torch.randn(M, CODEBOOK_DIM, generator=g) * 0.3
    state["quantizer.project_out.bias"] = torch.randn(M, generator=g) * 0.1
    embed = F.normalize(torch.randn(1, cfg_cs, CODEBOOK_DIM, generator=g), dim=-1)
    state["quantizer._codebook.embed"] = embed
    state["quantizer._codebook.embed_avg"] = embed * 3
    state["quantizer._codebook.cluster_size"] = torch.full((1, cfg_cs), 3.0)
    state["quantizer._codebook.initted"] = torch.tensor([1.0])
    return state


def write_perco_sd(path, cfg_ss=32, cfg_cs=256, *, pipeline=True, seed=0, hyper=None):
    """A PerCo (SD) output folder: ``pipeline.save_pretrained`` (``model_index.json``, SD's
    parts and ``hyper_enc/``, ``unet/``) or a ``checkpoint-N`` (``unet/``, ``hyper_enc/``)."""
    c = tiny_components(seed)
    unet = c["unet"]
    unet.save_pretrained(path / "unet")
    weights = load_file(path / "unet" / "diffusion_pytorch_model.safetensors")
    g = torch.Generator().manual_seed(seed + 1)
    width = unet.config.block_out_channels[0]
    weights["conv_in_extended.weight"] = torch.randn(width, 4 + M, 3, 3, generator=g) * 0.05
    weights["conv_in_extended.bias"] = torch.randn(width, generator=g) * 0.05
    save_file(weights, path / "unet" / "diffusion_pytorch_model.safetensors")
    (path / "hyper_enc").mkdir()
    config = {"_class_name": "HyperEncoder", "_diffusers_version": "0.27.0.dev0",
              "in_channels": 4, "N": N, "M": M, "codebook_dim": CODEBOOK_DIM,
              "cfg_ss": cfg_ss, "cfg_cs": cfg_cs}  # fmt: skip
    (path / "hyper_enc" / "config.json").write_text(json.dumps(config, indent=2))
    state = hyper if hyper is not None else hyper_enc_state(cfg_ss, cfg_cs, seed)
    save_file(state, path / "hyper_enc" / "diffusion_pytorch_model.safetensors")
    if pipeline:
        c["vae"].save_pretrained(path / "vae")
        for name in ("text_encoder", "tokenizer", "scheduler"):
            c[name].save_pretrained(path / name)
        index = {
            "_class_name": "StableDiffusionPipelinePerco", "_diffusers_version": "0.27.0.dev0",
            "hyper_enc": ["hyper_encoder", "HyperEncoder"],
            "unet": ["unet_2d_perco", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }  # fmt: skip
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def import_checkpoint(src, rate, base, out, *extra) -> int:
    """``perco import-checkpoint perco-sd SRC --rate RATE --base BASE -o OUT [extra]``."""
    argv = ["import-checkpoint", "perco-sd", src, "--rate", rate, "--base", base, "-o", out]
    return main([str(a) for a in (*argv, *extra)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The Stable Diffusion the checkpoints were finetuned from (tiny, SD 2.1's scheduler)."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("sd21"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, base):
    src = write_perco_sd(tmp_path_factory.mktemp("perco_sd") / "r0.0313")
    out = tmp_path_factory.mktemp("out") / "perco_sd_r0.0313"
    assert import_checkpoint(src, "0.0313", base, out) == 0
    return src, out


# -- where each tensor lands ------------------------------------------------------------
def _perco_hyper_name(key: str) -> str:
    """Where a PerCo (SD) hyper-encoder tensor belongs in perco, by its role."""
    rules = [
        (r"backbone\.(\d+)\.layers\.(\d)\.", r"layers.\1.body.\2."),  # bottleneck convs
        (r"backbone\.(\d+)\.conv_a\.(\d)\.conv\.(\d)\.", r"layers.\1.trunk.\2.body.\3."),
        (r"backbone\.(\d+)\.conv_b\.([012])\.conv\.(\d)\.", r"layers.\1.mask.\2.body.\3."),
        (r"backbone\.(\d+)\.conv_b\.3\.", r"layers.\1.mask.3."),  # the mask's 1×1 conv
        (r"backbone\.(\d+)\.", r"layers.\1."),  # entries and the N→M conv
    ]
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    raise AssertionError(key)


def test_every_tensor_lands_where_its_semantics_say(imported, base):
    src, out = imported
    model = PerCo.from_pretrained(out)
    hyper = load_file(src / "hyper_enc" / "diffusion_pytorch_model.safetensors")
    unet = load_file(src / "unet" / "diffusion_pytorch_model.safetensors")

    mine = model.hyper_encoder.state_dict()
    backbone = {k: v for k, v in hyper.items() if k.startswith("backbone.")}
    assert len(backbone) == len(mine)
    for key, value in backbone.items():
        assert torch.equal(mine[_perco_hyper_name(key)], value), key
    # cfg_ss 32: only the third group's entry is CompressAI's 5×5 stride-2 conv
    strides = [model.hyper_encoder.layers[i].stride for i in (0, 4, 9)]
    assert strides == [(1, 1), (1, 1), (2, 2)] and model.hyper_encoder.config.attention_relu

    vq = model.quantizer
    assert vq.config.distance == "cosine" and vq.config.codebook_size == 256
    for name in ("project_in", "project_out"):  # Linear → 1×1 conv, same numbers
        assert torch.equal(getattr(vq, name).weight[:, :, 0, 0], hyper[f"quantizer.{name}.weight"])
        assert torch.equal(getattr(vq, name).bias, hyper[f"quantizer.{name}.bias"])
    assert torch.equal(vq.embed, hyper["quantizer._codebook.embed"][0])
    assert torch.equal(vq.embed_avg, hyper["quantizer._codebook.embed_avg"][0])
    assert torch.equal(vq.cluster_size, hyper["quantizer._codebook.cluster_size"][0])
    assert bool(vq.initted)
    assert vq.config.commitment_weight == 0 and vq.config.dead_code_threshold == 0

    # the extended first conv is perco's widened conv_in; SD's unused conv_in is dropped
    assert torch.equal(model.unet.conv_in.weight, unet["conv_in_extended.weight"])
    assert torch.equal(model.unet.conv_in.bias, unet["conv_in_extended.bias"])
    rest = {k: v for k, v in unet.items() if not k.startswith("conv_in")}
    assert set(rest) | {"conv_in.weight", "conv_in.bias"} == set(model.unet.state_dict())
    for key, value in rest.items():
        assert torch.equal(model.unet.state_dict()[key], value), key

    # PerCo (SD)'s behaviour as settings
    cfg = model.config
    assert (cfg.condition, cfg.guidance, cfg.guidance_scale) == ("projected", "text", 3.0)
    assert cfg.posterior == "sample" and model.rate.name == "r0.0313" and model.default_steps == 20
    sched = model.scheduler.config
    assert (sched.timestep_spacing, sched.prediction_type, sched.steps_offset) == (
        "leading", "v_prediction", 1)  # fmt: skip
    assert not isinstance(model.null_text.embedding, torch.nn.Parameter)  # fixed, not learned
    empty = encode_captions(model.tokenizer, model.text_encoder, [""])
    torch.testing.assert_close(model.null_text(1), empty)
    record = json.loads((out / "perco.json").read_text())["imported_from"]
    assert record["format"] == "perco-sd" and record["rate"] == "0.0313"
    assert record["tensors"] == len(hyper) + len(unet)


# -- the same maths, written from PerCo (SD)'s description ------------------------------
def _reference_hyper_latent(state: dict[str, torch.Tensor], latents: torch.Tensor):
    """PerCo (SD)'s hyper-encoder and cosine quantizer on ``latents``, op by op:
    ``(indices, z_hat)``. Written from the source's structure, with ``F.conv2d`` only."""

    def conv(x, name, stride=1):
        w = state[f"{name}.weight"]
        pad = w.shape[-1] // 2
        return F.conv2d(x, w, state[f"{name}.bias"], stride=stride, padding=pad)

    def block(x, name):  # 1×1, ReLU, 3×3, ReLU, 1×1
        return conv(F.relu(conv(F.relu(conv(x, f"{name}.0")), f"{name}.2")), f"{name}.4")

    def unit(x, name):  # CompressAI ResidualUnit: ReLU after the skip
        return F.relu(x + block(x, name))

    def attention(x, name):  # CompressAI AttentionBlock: x + a(x) · σ(b(x))
        a, b = x, x
        for k in range(3):
            a = unit(a, f"{name}.conv_a.{k}.conv")
            b = unit(b, f"{name}.conv_b.{k}.conv")
        return x + a * torch.sigmoid(conv(b, f"{name}.conv_b.3"))

    def entry(x, i):
        down = state[f"backbone.{i}.weight"].shape[-1] == 5
        return conv(x, f"backbone.{i}", stride=2 if down else 1)

    x = entry(latents, 0)
    for i in (1, 2, 3):
        x = x + block(x, f"backbone.{i}.layers")
    x = entry(x, 4)
    for i in (5, 6, 7):
        x = x + block(x, f"backbone.{i}.layers")
    x = entry(attention(x, "backbone.8"), 9)
    for i in (10, 11, 12):
        x = x + block(x, f"backbone.{i}.layers")
    x = attention(conv(x, "backbone.13"), "backbone.14")

    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # (B·h·w, M), channel-last as it runs
    z = rows @ state["quantizer.project_in.weight"].t() + state["quantizer.project_in.bias"]
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)  # use_cosine_sim: l2norm
    embed = state["quantizer._codebook.embed"][0]
    indices = (z @ embed.t()).argmax(dim=1)  # largest cosine similarity
    z_hat = embed[indices] @ state["quantizer.project_out.weight"].t()
    z_hat = z_hat + state["quantizer.project_out.bias"]
    return indices.view(b, h, w), z_hat.view(b, h, w, c).permute(0, 3, 1, 2)


def test_indices_and_unet_input_equal_a_from_scratch_reference(imported):
    src, out = imported
    model = PerCo.from_pretrained(out).eval()
    state = load_file(src / "hyper_enc" / "diffusion_pytorch_model.safetensors")
    unet = load_file(src / "unet" / "diffusion_pytorch_model.safetensors")
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_indices, ref_z_hat = _reference_hyper_latent(state, latents)
        indices = model.quantizer.encode(model.hyper_encoder(latents))
        assert ref_indices.shape == (2, 8, 12) and len(ref_indices.unique()) > 20
        assert torch.equal(indices, ref_indices)
        z_hat = model._z_l(model.quantizer.lookup(indices))
        torch.testing.assert_close(z_hat, ref_z_hat, rtol=1e-5, atol=1e-5)
        # the U-Net's first layer: conv_in_extended(cat[x_t, nearest-upsampled z_hat])
        x_t = torch.randn(2, 4, 16, 24)
        upsampled = F.interpolate(ref_z_hat, size=(16, 24), mode="nearest")
        weight, bias = unet["conv_in_extended.weight"], unet["conv_in_extended.bias"]
        ref = F.conv2d(torch.cat([x_t, upsampled], 1), weight, bias, padding=1)
        spatial = model._spatial(model.quantizer.lookup(indices), (16, 24))
        mine = model.unet.conv_in(torch.cat([x_t, spatial], 1))
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_an_imported_model_compresses_and_decodes_its_own_files(imported):
    _, out = imported
    model = PerCo.from_pretrained(out).eval()
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    [(data, breakdown)] = codec.compress(model, image, ["a red barn"])
    again = PerCo.from_pretrained(out).eval()
    assert codec.compress(again, image, ["a red barn"])[0][0] == data  # posterior draws seeded
    parsed, _ = codec.parse(again, data)
    [recon] = codec.decompress(again, [parsed], steps=2)
    assert recon.shape == (3, 64, 96) and breakdown.index_bits == 4 * 6 * 8


def test_the_rung_is_found_below_a_download_folder_and_checkpoint_layouts_import(
    tmp_path, base, capsys
):
    root = tmp_path / "download"
    write_perco_sd(root / "perco_0.0019", cfg_ss=8, cfg_cs=256, seed=1)
    write_perco_sd(root / "runs" / "checkpoint-50000", cfg_ss=64, cfg_cs=64, pipeline=False)
    out = tmp_path / "out"
    assert import_checkpoint(root, "r0.0019", base, out, "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert record["source"].endswith("perco_0.0019") and record["perco_rate"] == "r0.0019"
    # perco's name of PerCo (SD)'s 0.0937 rung, from a checkpoint-N folder (no pipeline)
    assert import_checkpoint(root, "r0.0938", base, out) == 0
    model = PerCo.from_pretrained(out)
    assert model.rate.name == "r0.0938" and model.hyper_encoder.config.downsample == 1


def test_the_0_0507_rung_keeps_its_codebook_of_8196(tmp_path, base):
    src = write_perco_sd(tmp_path / "src", cfg_ss=32, cfg_cs=8196, pipeline=False)
    out = tmp_path / "out"
    assert import_checkpoint(src, "0.0507", base, out) == 0
    model = PerCo.from_pretrained(out)
    rate = model.rate
    assert (rate.name, rate.downsample, rate.codebook_size, rate.steps) == ("r0.0507", 2, 8196, 5)
    image = torch.rand(1, 3, 64, 64)
    [(data, breakdown)] = codec.compress(model, image)
    parsed, _ = codec.parse(model, data)
    assert parsed.indices.max() < 8196 and breakdown.index_bits == (8196**16 - 1).bit_length()


# -- refusals: one line each -------------------------------------------------------------
def _edit_hyper(path, edit):
    file = path / "hyper_enc" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file)


def _refusals():
    def drop(key):
        return lambda s: s.pop(key)

    def add(key):
        return lambda s: s.update({key: torch.zeros(1, 8)})

    def codebook(s):
        s["quantizer._codebook.embed"] = torch.zeros(1, 1024, CODEBOOK_DIM)

    return {
        "empty folder": (lambda p, b: None, "0.0313", "is not a PerCo (SD) checkpoint"),
        "other rung": (lambda p, b: None, "0.0019", "holds PerCo (SD)'s rung 0.0313"),
        "unknown rung": (lambda p, b: None, "0.05", "unknown PerCo (SD) rate '0.05'"),
        "codebook size": (lambda p, b: _edit_hyper(p, codebook), "0.0313",
                          "the codebook has 1024 entries, rung 0.0313 has V=256"),
        "downsampling": (lambda p, b: _edit_hyper(p, lambda s: s.update(
            {"backbone.9.weight": torch.zeros(N, N, 1, 1)})), "0.0313",
            "downsamples the latent by 1, rung 0.0313 by 2"),
        "missing tensor": (lambda p, b: _edit_hyper(p, drop("backbone.8.conv_b.3.weight")),
                           "0.0313", "misses tensors: backbone.8.conv_b.3.weight"),
        "unexpected tensor": (lambda p, b: _edit_hyper(p, add("quantizer._codebook.batch_mean")),
                              "0.0313", "unexpected tensors: quantizer._codebook.batch_mean"),
        "base U-Net": (lambda p, b: _other_base(b), "0.0313",
                       "the base model's U-Net"),
        "epsilon base": (lambda p, b: _epsilon_base(b), "0.0313", "predicts 'epsilon'"),
        "no base": (lambda p, b: _remove(b), "0.0313", "cannot load the base model"),
    }  # fmt: skip


def _other_base(base):
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    config["block_out_channels"] = [32, 48]
    UNet2DConditionModel.from_config(config).save_pretrained(base / "unet")


def _epsilon_base(base):
    file = base / "scheduler" / "scheduler_config.json"
    file.write_text(file.read_text().replace('"v_prediction"', '"epsilon"'))


def _remove(base):
    import shutil

    shutil.rmtree(base)


@pytest.mark.parametrize("case", list(_refusals()))
def test_refusals_are_one_line(case, tmp_path, capsys):
    break_it, rate, message = _refusals()[case]
    src = tmp_path / "src"
    if case == "empty folder":
        src.mkdir()
    else:
        write_perco_sd(src, pipeline=False)
    base = save_tiny_stable_diffusion(tmp_path / "base")
    break_it(src, base)
    out = tmp_path / "out"
    capsys.readouterr()
    code = import_checkpoint(src, rate, base, out)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("perco import-checkpoint: error:") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


def test_an_unrelated_output_folder_is_not_replaced(tmp_path, base, capsys):
    src = write_perco_sd(tmp_path / "src", pipeline=False)
    out = tmp_path / "papers"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    code = import_checkpoint(src, "0.0313", base, out)
    assert code == 2 and "not replacing it" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "keep me"


def test_perco_eval_records_the_import_and_perco_sd_resize(imported, tmp_path, assets):
    from hydra import compose, initialize_config_dir

    from perco import CONFIG_DIR
    from perco.eval import run
    from perco.io import save_image

    _, out = imported
    photos = tmp_path / "photos"
    save_image(torch.rand(3, 80, 120, generator=torch.Generator().manual_seed(0)), photos / "a.png")
    (photos / "captions.tsv").write_text("a\ta red barn\n")
    overrides = [
        f"checkpoint={out}", "dataset=folder", f"dataset.root={photos}",
        f"dataset.captions={photos / 'captions.tsv'}", "dataset.transform=resize",
        "dataset.size=64", "metrics=offline", "metrics.patch_size=32",
        f"output_dir={tmp_path / 'eval'}", "eval.steps=[2]", "eval.ceiling=false",
        "eval.grid_images=1",
    ]  # fmt: skip
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        doc = run(compose("eval", overrides=overrides))
    proto = doc["protocol"]
    assert proto["imported_from"]["format"] == "perco-sd" and "draw" in proto["vae_posterior"]
    assert "leading spacing" in proto["scheduler"]
    assert "images transformed: resize 64" in doc["departures_from_paper"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):  # PerCo (SD)'s protocol
        cfg = compose("eval", overrides=["protocol=perco_sd", "dataset=kodak"])
    assert (cfg.dataset.transform, cfg.dataset.size, cfg.eval.caption_codec) == (
        "resize", 512, "zlib")  # fmt: skip
    assert (cfg.eval.captions, cfg.eval.captioner, cfg.eval.guidance_scale) == (
        "captioner", "blip2", 3.0)  # fmt: skip


def test_the_parity_script_compares_and_fails_on_other_indices(imported, tmp_path):
    """``scripts/perco_sd_parity.py compare`` on a record whose indices and ``z_hat`` come
    from the from-scratch reference above. Its decoded image is perco's own here (PerCo
    (SD)'s pipeline needs its own environment: README, "Using PerCo (SD)'s released
    weights"), so this checks the comparison and its verdict, not the pipelines."""
    import subprocess
    import sys

    from conftest import ROOT

    src, out = imported
    model = PerCo.from_pretrained(out).eval()
    state = load_file(src / "hyper_enc" / "diffusion_pytorch_model.safetensors")
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = model._latents(image[None])
        indices, z_hat = _reference_hyper_latent(state, latents)
        encoded = model.encode(image[None], ["a barn"], latents=latents)
        [decoded] = model.decode(encoded, steps=2, generator=torch.Generator().manual_seed(0))
    record = {"image": image, "latents": latents, "indices": indices, "z_hat": z_hat,
              "decoded": decoded[None], "caption": "a barn", "steps": 2, "seed": 0}  # fmt: skip
    script = [sys.executable, str(ROOT / "scripts" / "perco_sd_parity.py"), "compare"]
    for tamper, verdict, code in ((False, "parity", 0), (True, "NO parity", 1)):
        if tamper:
            record["indices"] = (indices + 1) % 256
        torch.save(record, tmp_path / "parity.pt")
        done = subprocess.run([*script, "--model", str(out), "--out", str(tmp_path / "parity.pt")],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == code, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1].startswith(verdict)
        assert ("indices equal               1.0000" in done.stdout) != tamper


def test_bin_sharded_and_fp16_weight_files_are_read(tmp_path, base):
    """Weights as diffusers may have saved them: a ``.bin`` (read with weights_only), shards
    with an index, an fp16 variant; the imported model is float32 and the same."""
    from diffusers import UNet2DConditionModel

    reference = write_perco_sd(tmp_path / "a", pipeline=False)
    variant = write_perco_sd(tmp_path / "b", pipeline=False)
    hyper = variant / "hyper_enc"
    state = load_file(hyper / "diffusion_pytorch_model.safetensors")
    (hyper / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, hyper / "diffusion_pytorch_model.bin")
    unet_dir = variant / "unet"
    weights = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    extended = {k: weights.pop(k) for k in ("conv_in_extended.weight", "conv_in_extended.bias")}
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    unet.load_state_dict(weights)
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(unet_dir, max_shard_size="200KB")  # shards + index
    index = json.loads((unet_dir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    first = sorted(set(index["weight_map"].values()))[0]
    shard = load_file(unet_dir / first)
    shard.update(extended)
    save_file(shard, unet_dir / first)
    index["weight_map"].update(dict.fromkeys(extended, first))
    (unet_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))

    fp16 = write_perco_sd(tmp_path / "c", pipeline=False)
    for part in ("hyper_enc", "unet"):
        file = fp16 / part / "diffusion_pytorch_model.safetensors"
        save_file({k: v.half() for k, v in load_file(file).items()},
                  file.with_name("diffusion_pytorch_model.fp16.safetensors"))  # fmt: skip
        file.unlink()

    models = {}
    for name, src in (("a", reference), ("b", variant), ("c", fp16)):
        out = tmp_path / f"out_{name}"
        assert import_checkpoint(src, "0.0313", base, out) == 0
        models[name] = PerCo.from_pretrained(out)
    a, b, c = (models[k] for k in "abc")
    for module in ("hyper_encoder", "quantizer", "unet"):
        sa, sb, sc = (getattr(m, module).state_dict() for m in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), module
        assert all(sc[k].dtype == sa[k].dtype for k in sa), module
        assert all(torch.equal(sc[k], sa[k].half().to(sa[k].dtype)) for k in sa), module


def test_a_whole_pipeline_folder_is_its_own_base(tmp_path, capsys):
    """``pipeline.save_pretrained`` keeps SD 2.1's parts beside PerCo (SD)'s: offline, the
    checkpoint folder can stand in for ``--base`` (its ``unet/`` config is SD's)."""
    src = write_perco_sd(tmp_path / "pipeline", cfg_ss=8, cfg_cs=256)
    out = tmp_path / "out"
    assert import_checkpoint(src, "0.0019", src, out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["base"] == str(src.resolve())
    model = PerCo.from_pretrained(out)
    assert model.rate.name == "r0.0019" and model.default_steps == 20


def test_the_perco_sd_training_experiment_has_the_imported_settings(imported, base):
    """``experiment=perco_sd`` trains what ``import-checkpoint perco-sd`` loads: the same
    PerCoConfig, quantizer and hyper-encoder options, null text and scheduler."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from perco import CONFIG_DIR

    model = PerCo.from_pretrained(imported[1])
    tiny = [f"model.hyper_encoder.channels={N}", f"model.hyper_encoder.out_channels={M}",
            f"model.quantizer.codebook_dim={CODEBOOK_DIM}"]  # fmt: skip
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=perco_sd", f"model.pretrained={base}",
                                          "rate=r0.0313", *tiny])  # fmt: skip
    trained = instantiate(cfg.model)

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert trained.config == model.config
    for part in ("quantizer", "hyper_encoder", "scheduler", "null_text"):
        assert public(getattr(trained, part).config) == public(getattr(model, part).config)
    assert trained._settings() == model._settings()
