"""Test-size components and stand-ins for pretrained networks, for tests and offline trials.

Nothing here is a trained model. Following diffusers' ``get_dummy_components`` habit
(small widths, seeded construction), it builds:

- Stable-Diffusion-shaped components (:func:`tiny_components`, :func:`tiny_perco`,
  :func:`save_tiny_stable_diffusion`): an 8× VAE with 4 latent channels, a
  cross-attention U-Net, a CLIP text encoder with the real CLIP BPE vocabulary (read from
  the file open_clip ships, so tokenization is the real one), SD 2.1's scheduler settings
  with v-prediction. Attention runs only at the U-Net's lowest resolution, keeping CPU
  runs fast. ``perco demo`` and ``--model tiny`` use them to try the codec offline.
- Stable Diffusion 2.1 at its real size with random weights (:func:`sd21_components`,
  :func:`save_sd21`), built from its published configs shipped in ``perco/models/sd21/``:
  the architecture that the meta-device counts, the full-size tests and the benchmarks
  run, never downloaded.
- Random BLIP-2 and open_clip models (:func:`tiny_blip2`, :func:`save_tiny_open_clip`)
  saved like hub checkpoints, so the real loaders read them.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, Flux2Transformer2DModel, UNet2DConditionModel

from .models.autoencoders import SDAutoencoder
from .models.perco import PerCo
from .models.serialization import variant_class
from .rates import Rate

__all__ = [
    "SD21_SCHEDULER",
    "clip_tokenizer",
    "tiny_components",
    "tiny_perco",
    "tiny_flux2_perco",
    "tiny_qwen_tokenizer",
    "tiny_flux2_components",
    "save_tiny_flux2",
    "flux2_klein_components",
    "save_tiny_stable_diffusion",
    "SD21_CONFIGS",
    "published_config",
    "sd21_config",
    "sd21_components",
    "save_sd21",
    "tiny_blip2",
    "save_tiny_open_clip",
]

TEXT_DIM = 32

# Stable Diffusion 2.1's published scheduler config (v-prediction, "leading" spacing)
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
    timestep_spacing="leading",
)


def clip_tokenizer():
    """The CLIP BPE tokenizer (49,408 tokens, 77 positions) built from open_clip's vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={v: i for i, v in enumerate(vocab)}, merges=merges, model_max_length=77
    )


def tiny_components(seed: int = 0) -> dict:
    """Keys ``vae`` (an :class:`SDAutoencoder`), ``unet``, ``text_encoder``, ``tokenizer``,
    ``scheduler``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=64,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return {
        "vae": SDAutoencoder(vae),
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD21_SCHEDULER),
    }


# hyper-encoder and quantizer widths for the tiny model (the defaults are 192/320/32)
TINY_HYPER_ENCODER = {"channels": 32, "out_channels": 64}
TINY_QUANTIZER = {"codebook_dim": 8}


def tiny_perco(
    rate: str | Rate = "r0.0019", seed: int = 0, variant: str = "perco", **kwargs
) -> PerCo:
    """A tiny PerCo (or ``variant``) with random weights; ``kwargs`` go to the variant's
    ``from_components``."""
    c = tiny_components(seed)
    kwargs.setdefault("hyper_encoder", TINY_HYPER_ENCODER)
    kwargs.setdefault("quantizer", TINY_QUANTIZER)
    return variant_class(variant).from_components(
        c["vae"], c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"], rate, **kwargs
    )


def tiny_flux2_perco(rate: str | Rate = "r0.0019", seed: int = 0, **kwargs) -> PerCo:
    """A tiny PerCo on the FLUX.2 backbone with rectified flow: the tiny SD-shaped VAE and
    text encoder of :func:`tiny_components`, a one-double-block, one-single-block
    ``Flux2Transformer2DModel`` of width 32 and a FLUX.2-style flow scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .models.backbones.flux2 import FLOW_SCHEDULER, new_transformer

    c = tiny_components(seed)
    transformer = new_transformer(4, width=32, head_dim=16, double_blocks=1, single_blocks=1,
                                  text_dim=TEXT_DIM, time_channels=32, seed=seed)  # fmt: skip
    kwargs.setdefault("hyper_encoder", TINY_HYPER_ENCODER)
    kwargs.setdefault("quantizer", TINY_QUANTIZER)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER)
    return PerCo.from_components(c["vae"], transformer, c["text_encoder"], c["tokenizer"],
                                 scheduler, rate, **kwargs)  # fmt: skip


QWEN_CHAT_TEMPLATE = (  # the shape of Qwen3's template that FLUX.2 [klein]'s prompts go through
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def tiny_qwen_tokenizer(vocab_size: int = 1200):
    """A byte-level BPE tokenizer in Qwen's layout (``<|im_start|>``/``<|im_end|>`` chat
    markers, ``<|endoftext|>`` padding, a chat template), trained on CLIP's vocabulary
    words: real tokenization offline, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [w.removesuffix("</w>") for w in clip_tokenizer().get_vocab() if w.isascii()]
    corpus = [" ".join(words[i : i + 16]) for i in range(0, len(words), 16)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size,
                                                        special_tokens=specials))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=QWEN_CHAT_TEMPLATE)


def tiny_flux2_components(seed: int = 0) -> dict:
    """A FLUX.2 [klein]-shaped pipeline's parts with random weights, from its published
    configs (``perco/models/flux2_klein/``) with the widths and depths shrunk: the
    transformer (one double-stream, one single-stream block, width 32), the VAE (32 latent
    channels, as TAEF2's), a four-layer Qwen3 text encoder, :func:`tiny_qwen_tokenizer`
    and a FLUX.2-style flow scheduler."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .models.backbones.flux2 import FLOW_SCHEDULER

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    transformer = {**published_config("flux2_klein", "transformer"), "num_layers": 1,
                   "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                   "joint_attention_dim": 3 * 32, "timestep_guidance_channels": 32,
                   "axes_dims_rope": [4, 4, 4, 4]}  # fmt: skip
    vae = {**published_config("flux2_klein", "vae"), "block_out_channels": [8, 16, 16, 16],
           "layers_per_block": 1, "norm_num_groups": 8,
           "mid_block_add_attention": False}  # fmt: skip
    vae = AutoencoderKLFlux2.from_config(vae)
    with torch.no_grad():  # batch-norm statistics as a trained VAE has them, not 0 and 1
        vae.bn.running_mean.normal_(0, 0.1)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return {
        "transformer": Flux2Transformer2DModel.from_config(transformer),
        "vae": vae,
        "text_encoder": qwen,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER),
    }


def flux2_klein_components(
    seed: int = 0, double_blocks: int = 1, single_blocks: int = 1, text_layers: int = 4
) -> dict:
    """FLUX.2 [klein] 4B's parts at their real widths with random weights, shallower: its
    published transformer config with ``double_blocks`` + ``single_blocks`` blocks (of 5 +
    20), the real VAE, a ``text_layers``-layer Qwen3 of Qwen3-4B's width and vocabulary
    (three of its layers still give the 7680-wide context), :func:`tiny_qwen_tokenizer`
    and the flow scheduler: every real module class, at every real width, at a size a CPU
    trains (the full-size check, ``scripts/full_size_check.py --backbone flux2``)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .models.backbones.flux2 import FLOW_SCHEDULER

    torch.manual_seed(seed)
    transformer = {**published_config("flux2_klein", "transformer"),
                   "num_layers": double_blocks, "num_single_layers": single_blocks}  # fmt: skip
    text = {k: v for k, v in published_config("flux2_klein", "text_encoder").items()
            if k != "model_type"}  # fmt: skip
    return {
        "transformer": Flux2Transformer2DModel.from_config(transformer),
        "vae": AutoencoderKLFlux2.from_config(published_config("flux2_klein", "vae")),
        "text_encoder": Qwen3ForCausalLM(Qwen3Config(**{**text, "num_hidden_layers": text_layers})),
        "tokenizer": tiny_qwen_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER),
    }


def save_tiny_flux2(path: str | os.PathLike, seed: int = 0, components: dict | None = None) -> Path:
    """Write :func:`tiny_flux2_components` (or ``components``, e.g.
    :func:`flux2_klein_components`) as a diffusers FLUX.2 [klein] folder (its
    ``model_index.json`` and subfolders), which :meth:`PerCo.from_flux2` loads through
    the real loading path."""
    path = Path(path)
    for name, part in (components or tiny_flux2_components(seed)).items():
        part.save_pretrained(path / name)
    index = {"_class_name": "Flux2KleinPipeline", "is_distilled": True,
             "transformer": ["diffusers", "Flux2Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLFlux2"],
             "text_encoder": ["transformers", "Qwen3ForCausalLM"],
             "tokenizer": ["transformers", "Qwen2TokenizerFast"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}  # fmt: skip
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def save_tiny_stable_diffusion(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny components as a diffusers Stable Diffusion folder.

    The layout (``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)
    is that of ``stabilityai/stable-diffusion-2-1``, so
    :meth:`PerCo.from_stable_diffusion` loads it through the real loading path.
    """
    return _save_components(tiny_components(seed), Path(path))


def _save_components(c: dict, path: Path) -> Path:
    """Components as a diffusers Stable Diffusion folder (one subfolder each)."""
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        c[name].save_pretrained(path / name)
    return path


SD21_CONFIGS = Path(__file__).parent / "models" / "sd21"


def published_config(family: str, name: str) -> dict:
    """A published config shipped in ``perco/models/<family>/<name>.json`` (``sd21``,
    ``sd35_medium``, ``flux2_klein``), without the notes on where it came from."""
    config = json.loads((SD21_CONFIGS.parent / family / f"{name}.json").read_text())
    return {k: v for k, v in config.items() if k not in ("_source", "architectures")}


def sd21_config(name: str) -> dict:
    """SD 2.1's published config of ``unet``, ``vae`` or ``text_encoder``."""
    return published_config("sd21", name)


def sd21_components(seed: int = 0) -> dict:
    """Stable Diffusion 2.1's components at their real size (865M-parameter U-Net, OpenCLIP
    ViT-H text encoder, 8× VAE) with random weights, on the current default device (build
    them under ``torch.device("meta")`` to count, or ``"cuda"`` to skip a CPU copy). Keys
    as :func:`tiny_components`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return {
        "vae": SDAutoencoder(AutoencoderKL.from_config(sd21_config("vae"))),
        "unet": UNet2DConditionModel.from_config(sd21_config("unet")),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**sd21_config("text_encoder"))),
        "tokenizer": clip_tokenizer(),
        "scheduler": DDIMScheduler(**SD21_SCHEDULER),
    }


def save_sd21(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write :func:`sd21_components` as a diffusers folder with the layout of
    ``stabilityai/stable-diffusion-2-1`` (about 5.2 GB in float32), which
    :meth:`PerCo.from_stable_diffusion` loads through its real loading path."""
    return _save_components(sd21_components(seed), Path(path))


def tiny_blip2(seed: int = 0, image_size: int = 32):
    """A random BLIP-2 ``(model, processor)`` a few hundred kB in size, for offline tests.

    Same classes as ``Salesforce/blip2-opt-2.7b-coco`` (ViT, Q-Former, OPT), with a small
    word-level tokenizer over common caption words standing in for OPT's BPE. Saved with
    ``save_pretrained``, it loads back through :class:`~perco.captioning.Blip2Captioner`'s
    ``from_pretrained`` path.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        PreTrainedTokenizerFast,
    )

    words = [  # common caption words, for a tokenizer that needs no download
        "a", "an", "the", "of", "on", "in", "with", "and", "to", "is", "are", "at", "near",
        "two", "man", "woman", "dog", "cat", "bus", "train", "street", "table", "people",
        "sitting", "standing", "white", "black", "red", "blue", "green", "large", "small",
        "plate", "food", "pizza", "room", "field", "grass", "water", "sky", "building", "car",
        "bike", "horse", "bird",
    ]  # fmt: skip
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", "<image>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )
    tokenizer.image_token = "<image>"
    queries = 4
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            image_size=image_size, patch_size=8,
        ),
        qformer_config=dict(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=37, encoder_hidden_size=32,
        ),
        text_config=dict(
            model_type="opt", vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
            ffn_dim=37, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=1, pad_token_id=0,
        ),
        num_query_tokens=queries,
        image_token_index=vocab["<image>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random logits would often pick </s> first: an empty caption
        model.get_output_embeddings().weight[:4] = 0
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=queries)
    return model, processor


def save_tiny_open_clip(path: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A random open_clip ViT-CLIP a few hundred kB in size, written as an open_clip
    folder (``open_clip_config.json`` + ``open_clip_model.safetensors``), so that
    ``load_vision_encoder("open_clip:local-dir:<path>")`` reads it through
    ``open_clip.create_model``: the stand-in for pretrained CLIP weights in tests."""
    import json

    import open_clip
    from safetensors.torch import save_file

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "patch_size": 8,
                       "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    }  # fmt: skip
    torch.manual_seed(seed)
    model = open_clip.CLIP(**config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / "open_clip_model.safetensors")
    return path
