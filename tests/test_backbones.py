"""The backbone seam (perco/models/backbones): one data path for a U-Net and a FLUX.2
transformer; how z_l enters each, saving and loading, LoRA, and older folders."""

import json
import shutil

import pytest
import torch
from torch import nn

from perco import codec
from perco.models.backbones import backbone_named, backbone_of, unwrap, widened
from perco.models.backbones.flux2 import new_transformer, pack, unpack
from perco.models.perco import PerCo
from perco.testing import tiny_flux2_perco, tiny_perco


@pytest.fixture(scope="module")
def flux():
    return tiny_flux2_perco("r0.0098").eval()


def test_each_denoiser_names_its_backbone(flux):
    assert backbone_of(tiny_perco().unet).name == "unet"
    assert flux.backbone.name == "flux2" and flux.denoiser is flux.transformer
    assert not hasattr(flux, "unet")
    with pytest.raises(TypeError, match="not a denoiser"):
        backbone_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_named("dit")


def test_a_wrapped_denoiser_is_called_but_its_inside_described(flux):
    class Wrapper(nn.Module):  # as DDP holds its module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    wrapped = Wrapper(flux.denoiser)
    assert unwrap(wrapped) is flux.denoiser and backbone_of(wrapped).name == "flux2"


def test_packing_is_invertible():
    x = torch.randn(2, 5, 6, 10)
    assert pack(x).shape == (2, 15, 20)
    assert torch.equal(unpack(pack(x), 6, 10), x)


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 8, 3, padding=1), nn.Linear(16, 8, bias=False)])
def test_widening_copies_the_pretrained_weights_and_zero_init_changes_nothing(layer):
    new = widened(layer, 3, "zero")
    assert torch.equal(new.weight[:, : new.weight.shape[1] - 3], layer.weight)
    x = torch.randn(2, *((4, 5, 5) if isinstance(layer, nn.Conv2d) else (16,)))
    extra = torch.randn(2, 3, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 3)
    torch.testing.assert_close(new(torch.cat([x, extra], dim=1)), layer(x))
    drawn = widened(layer, 3, "random", torch.Generator().manual_seed(0))
    assert drawn.weight[:, -3:].abs().max() <= 1 / drawn.weight[0].numel() ** 0.5


def test_the_transformer_takes_z_l_through_its_widened_patch_embedding(flux):
    """FLUX.1 Fill's way: the code channels packed 2×2 like the latent, after its tokens."""
    fresh = new_transformer(4, width=32, head_dim=16, double_blocks=1, single_blocks=1,
                            text_dim=32, time_channels=32, seed=0)  # fmt: skip
    assert fresh.config.in_channels == 16
    config = flux.denoiser.config
    assert config.in_channels == 4 * (4 + flux.local_channels)
    assert config.out_channels == 16  # the output stays the latent's packing
    assert flux.backbone.in_channels(flux.denoiser) == 4 + flux.local_channels
    assert flux.pad_multiple == 8 * max(flux.rate.downsample, 2)


def test_a_transformer_model_saves_as_a_diffusers_transformer_folder_and_decodes_the_same(
    flux, tmp_path
):
    flux.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "perco.json").read_text())
    assert saved["backbone"] == "flux2"
    assert saved["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert (tmp_path / "m" / "transformer" / "config.json").is_file()
    assert not (tmp_path / "m" / "unet").exists()
    loaded = PerCo.from_pretrained(tmp_path / "m")
    assert type(loaded.denoiser).__name__ == "Flux2Transformer2DModel"
    loaded.forget_fingerprint()
    assert loaded.fingerprint == flux.fingerprint  # recomputed from the loaded weights

    images = torch.rand(2, 3, 48, 80)
    files = [codec.parse(loaded, data)[0] for data, _ in codec.compress(flux, images)]
    again = codec.decompress(loaded, files, steps=2)
    direct = flux.decode(flux.encode(images), steps=2)
    for a, b in zip(again, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_folder_saved_before_backbones_loads_as_a_unet(tmp_path):
    model = tiny_perco("r0.0019").eval()
    model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "perco.json"
    raw = json.loads(config_file.read_text())
    assert raw.pop("backbone") == "unet"
    config_file.write_text(json.dumps(raw))  # as every folder before backbones
    loaded = PerCo.from_pretrained(tmp_path / "m")
    assert loaded.backbone.name == "unet" and loaded.fingerprint == model.fingerprint
    loaded.forget_fingerprint()
    assert loaded.fingerprint == model.fingerprint  # the U-Net's settings are unchanged
    x = torch.rand(1, 3, 64, 64)
    encoded = model.encode(x)
    torch.testing.assert_close(loaded.decode(encoded, steps=2)[0],
                               model.decode(encoded, steps=2)[0], rtol=0, atol=0)  # fmt: skip


def test_lora_on_the_transformer_trains_only_adapters_and_the_new_parts(tmp_path):
    model = tiny_flux2_perco("r0.0098")
    params = model.set_trainable("lora", lora_rank=4)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    adapted = {n.rsplit(".lora_", 1)[0] for n in names if ".lora_" in n}
    assert any(n.endswith("transformer_blocks.0.attn.to_q") for n in adapted)
    assert any(n.endswith("transformer_blocks.0.attn.add_k_proj") for n in adapted)
    assert any(n.endswith("single_transformer_blocks.0.attn.to_qkv_mlp_proj") for n in adapted)
    assert any(n.endswith("single_transformer_blocks.0.attn.to_out") for n in adapted)
    assert not any("ff." in n or "ff_context" in n for n in adapted)  # attention only
    assert "transformer.x_embedder.weight" in names  # the widened input, in every mode
    assert any(n.startswith("hyper_encoder.") for n in names)
    transformer_names = {n for n in names if n.startswith("transformer.")}
    assert transformer_names <= {n for n in transformer_names if ".lora_" in n} | {
        "transformer.x_embedder.weight"
    }
    with torch.no_grad():  # move the adapters off zero, then save (merged) and reload
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    before = model.decode(model.encode(x), steps=2)[0]
    model.save_pretrained(tmp_path / "m")
    loaded = PerCo.from_pretrained(tmp_path / "m")
    assert not loaded.has_lora
    torch.testing.assert_close(loaded.decode(loaded.encode(x), steps=2)[0], before,
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_the_transformer_model_trains_a_step(tmp_path):
    model = tiny_flux2_perco("r0.1250")
    params = model.set_trainable("full")
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    before = model.denoiser.x_embedder.weight.detach().clone()
    loss = model(images, [None, None], generator=g)
    loss.loss.backward()
    optimizer.step()
    assert torch.isfinite(loss.loss)
    assert not torch.equal(model.denoiser.x_embedder.weight, before)


def test_a_copy_of_a_folder_with_a_mismatched_transformer_is_refused(flux, tmp_path):
    flux.save_pretrained(tmp_path / "m")
    other = tiny_flux2_perco("r0.1250", quantizer={"codebook_dim": 4}, condition="codes")
    other.save_pretrained(tmp_path / "o")
    shutil.rmtree(tmp_path / "m" / "transformer")
    shutil.copytree(tmp_path / "o" / "transformer", tmp_path / "m" / "transformer")
    with pytest.raises(ValueError, match="FLUX.2 transformer takes"):
        PerCo.from_pretrained(tmp_path / "m")


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    from perco.testing import save_tiny_flux2

    return save_tiny_flux2(tmp_path_factory.mktemp("klein") / "FLUX.2-klein-4B")


SMALL = {"hyper_encoder": {"channels": 16, "out_channels": 32}, "quantizer": {"codebook_dim": 8}}


def test_flux2_klein_loads_from_a_pipeline_folder_through_the_real_path(klein_folder, tmp_path):
    from diffusers import Flux2KleinPipeline

    model = PerCo.from_flux2(klein_folder, "r0.0098", **SMALL).eval()
    assert type(model.text_encoder).__name__ == "Qwen3ForCausalLM"
    assert model.backbone.name == "flux2" and model.schedule.name == "flow"
    assert model.null_text.embedding.shape == (1, 512, 3 * 32)  # 3 Qwen3 layers, padded 512
    caption = ["a red house by a lake"]
    with torch.no_grad():  # the caption's context: the FLUX.2 pipeline's own features
        ours = model._text(caption)
        theirs = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            model.text_encoder, model.tokenizer, caption, hidden_states_layers=(1, 2, 3)
        )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    x = torch.rand(1, 3, 64, 96)
    encoded = model.encode(x, caption)
    before = model.decode(encoded, steps=2)[0]
    model.save_pretrained(tmp_path / "m")
    loaded = PerCo.from_pretrained(tmp_path / "m")
    assert type(loaded.text_encoder).__name__ == "Qwen3ForCausalLM"  # not the bare model
    torch.testing.assert_close(loaded.decode(encoded, steps=2)[0], before, rtol=0, atol=0)


def test_the_flux2_vae_normalises_as_the_pipeline_does(klein_folder):
    from diffusers import Flux2KleinPipeline

    model = PerCo.from_flux2(klein_folder, "r0.0098", **SMALL)
    ae, images = model.autoencoder, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ours = ae.encode(images)
        raw = ae.vae.encode(images).latent_dist.mode()
        packed = Flux2KleinPipeline._patchify_latents(raw)
        mean = ae.vae.bn.running_mean.view(1, -1, 1, 1)
        std = (ae.vae.bn.running_var.view(1, -1, 1, 1) + ae.vae.config.batch_norm_eps).sqrt()
        expected = (packed - mean) / std
        torch.testing.assert_close(Flux2KleinPipeline._patchify_latents(ours), expected)
        decoded = ae.decode(ours)
        torch.testing.assert_close(decoded, ae.vae.decode(raw).sample, rtol=1e-4, atol=1e-4)


def test_flux2_decodes_with_taef2_when_asked(klein_folder, assets, tmp_path):
    from perco.models.taesd import TinyAutoencoder

    model = PerCo.from_flux2(klein_folder, "r0.0098", decoder="taef2",
                             taef2_dir=assets / "taef2", **SMALL).eval()  # fmt: skip
    assert isinstance(model.autoencoder.tiny, TinyAutoencoder)
    x = torch.rand(1, 3, 64, 64)
    out = model.decode(model.encode(x), steps=1)[0]
    assert out.shape == (3, 64, 64)
    model.save_pretrained(tmp_path / "m")
    loaded = PerCo.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.autoencoder.tiny, TinyAutoencoder)
    with pytest.raises(ValueError, match="taef2_dir"):
        PerCo.from_flux2(klein_folder, "r0.0098", decoder="taef2", **SMALL)


def test_a_one_step_student_of_a_flow_teacher_trains_and_decodes_its_files(
    photo_folder, tmp_path, assets
):
    """The student objective unchanged on a flow model: one call from pure noise at
    sigma 1 (x0 = x1 - v), paired distillation through the teacher's Euler decode, the
    DMD critic on the flow schedule; the teacher's files decode in one call."""
    from test_train import compose_train, tiny_overrides

    from perco.train import train

    teacher = tiny_flux2_perco("r0.0059").eval()
    teacher.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "runs"
    backbone = assets / "lpips" / "vgg16_features.safetensors"
    overrides = ["objective=student", f"init={tmp_path / 'teacher'}",
                 f"objective.lpips_backbone={backbone}", "trainer.sample_steps=null",
                 "objective.distill_weight=0.5", "objective.dmd_weight=0.5",
                 "trainer.max_steps=2"]  # fmt: skip
    summary = train(compose_train(*tiny_overrides(photo_folder, out, *overrides)))
    assert summary["steps"] == 2 and summary["ranks_in_sync"]
    student = PerCo.from_pretrained(out / "tiny" / "r0.0059" / "model").eval()
    assert student.config.one_step_timestep == 1000 and student.backbone.name == "flux2"
    assert codec.file_fingerprint(student) == teacher.fingerprint
    moved = [not torch.equal(p, q) for p, q in
             zip(student.transformer.parameters(), teacher.transformer.parameters(),
                 strict=True)]  # fmt: skip
    assert any(moved)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ((data, _),) = codec.compress(teacher, image)
    calls = []
    hook = student.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        (decoded,) = codec.decompress(student, [codec.parse(student, data)[0]])
    finally:
        hook.remove()
    assert calls == [1] and decoded.shape == (3, 64, 64)


def test_a_transformer_sweeps_rungs_share_their_frozen_parts_when_loaded(tmp_path):
    """load_models (perco-eval rates=/compare=) on a FLUX.2 sweep: each rung's own
    transformer, one autoencoder and text encoder held once."""
    from perco.models.loading import load_models

    first = tiny_flux2_perco("r0.0019")
    second = tiny_flux2_perco("r0.0098")
    second.autoencoder, second.text_encoder = first.autoencoder, first.text_encoder
    with torch.no_grad():  # rungs train their own transformers
        second.transformer.x_embedder.weight.add_(0.01)
    for model in (first, second):
        model.eval().save_pretrained(tmp_path / "sweep" / model.rate.name / "model")
    loaded = load_models(str(tmp_path / "sweep"), ["r0.0019", "r0.0098"])
    a, b = loaded["r0.0019"], loaded["r0.0098"]
    assert a.autoencoder is b.autoencoder and a.text_encoder is b.text_encoder
    assert a.transformer is not b.transformer
