"""The FLUX.2 backbone: PerCo on ``Flux2Transformer2DModel`` with rectified flow.

FLUX.2 (and its 4B [klein]) packs the 32-channel latent 2×2 into 128-channel tokens
(``Flux2KleinPipeline._patchify_latents`` then ``_pack_latents``); the transformer embeds
them with one linear layer, ``x_embedder``. ``z_l`` enters the way FLUX.1 Fill takes its
masked image: nearest-upsampled to the latent grid, packed 2×2 as the latent is, and
concatenated to the latent's tokens on channels, so ``x_embedder`` is widened from
``4·C_latent`` to ``4·(C_latent + C_z)`` inputs, the pretrained columns copied::

    x_t (B, 32, h, w) ──pack 2×2──► (B, hw/4, 128) ─┐
    z_l (B, C_z, h, w) ─pack 2×2──► (B, hw/4, 4·C_z) ┴ concat ─► x_embedder ─► blocks

Image tokens carry FLUX.2's 4-axis position ids ``(t, h, w, l) = (0, row, col, 0)``, text
tokens ``(0, 0, 0, index)``; the transformer is given ``t / 1000`` (it scales by 1000
itself) and no guidance embedding ([klein] is not guidance-distilled). A flow scheduler
with dynamic shifting is shifted by the FLUX.2 pipeline's ``compute_empirical_mu`` of the
image token count and step count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from diffusers import Flux2Transformer2DModel

from ..packing import PATCH, pack, unpack
from . import Backbone, widened

__all__ = [
    "Flux2Backbone",
    "FLUX2",
    "FLOW_SCHEDULER",
    "KLEIN",
    "pack",
    "unpack",
    "new_transformer",
    "flux2_parts",
]

KLEIN = "black-forest-labs/FLUX.2-klein-4B"  # the distilled 4B; "-base-4B": not distilled

# a FLUX.2-style flow scheduler for new transformers: rectified flow on the pipeline's
# resolution-dependent (exponential) shift
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "use_dynamic_shifting": True,
                  "time_shift_type": "exponential"}  # fmt: skip


def _ids(rows: int, cols: int, length: int, device) -> torch.Tensor:
    axis = [torch.arange(n, device=device) for n in (1, rows, cols, length)]
    return torch.cartesian_prod(*axis)


class Flux2Backbone(Backbone):
    name = "flux2"
    attribute = "transformer"
    module_class = Flux2Transformer2DModel
    label = "FLUX.2 transformer"
    # the attention projections: the double-stream blocks' (image and text streams) and
    # the single-stream blocks' fused QKV(+MLP input) and output projections, which FLUX.2
    # does not split; a regex, since "attn.to_out" alone also names the double blocks' list
    lora_targets = (
        r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
        r"|to_qkv_mlp_proj)$|.*single_transformer_blocks\.\d+\.attn\.to_out$"
    )

    def widen(self, module, extra, init):
        out = module.config.out_channels or module.config.in_channels
        module.x_embedder = widened(module.x_embedder, extra * PATCH * PATCH, init)
        # out_channels defaults to in_channels: record it, or reloading widens the output too
        module.register_to_config(in_channels=module.x_embedder.in_features, out_channels=out)

    def input_layer(self, module):
        return module.x_embedder

    def in_channels(self, module):
        return module.config.in_channels // (PATCH * PATCH)

    def out_channels(self, module):
        out = module.config.out_channels or module.config.in_channels
        return out // (PATCH * PATCH)

    def context_dim(self, module):
        return module.config.joint_attention_dim

    def pad_factor(self, module):
        return PATCH * module.config.patch_size

    def mu(self, module, latent_size, steps):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        tokens = (latent_size[0] // PATCH) * (latent_size[1] // PATCH)
        return compute_empirical_mu(image_seq_len=tokens, num_steps=steps)

    def predict(self, called, x, spatial, t, context):
        b, _, h, w = x.shape
        tokens = torch.cat([pack(x), pack(spatial.to(x.dtype))], dim=-1)
        t = torch.as_tensor(t, device=x.device).to(x.dtype).expand(b)
        out = called(
            hidden_states=tokens,
            encoder_hidden_states=context.to(x.dtype),
            timestep=t / 1000,
            img_ids=_ids(h // PATCH, w // PATCH, 1, x.device),
            txt_ids=_ids(1, 1, context.shape[1], x.device),
            guidance=None,
            return_dict=False,
        )[0]
        return unpack(out, h, w)


FLUX2 = Flux2Backbone()


def new_transformer(
    latent_channels: int,
    *,
    width: int = 192,
    head_dim: int = 64,
    double_blocks: int = 2,
    single_blocks: int = 4,
    text_dim: int = 32,
    time_channels: int = 256,
    seed: int | None = None,
) -> Flux2Transformer2DModel:
    """A new FLUX.2 transformer (random weights) for ``latent_channels``-channel latents:
    ``width / head_dim`` heads, FLUX.2's block types and 4-axis rotary embedding
    (``head_dim / 4`` each), no guidance embedding; ``seed`` seeds its initialisation."""
    if seed is not None:
        torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        in_channels=latent_channels * PATCH * PATCH,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=text_dim,
        timestep_guidance_channels=time_channels,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=False,
    )


def flux2_parts(
    pretrained: str | os.PathLike = KLEIN,
    *,
    torch_dtype: torch.dtype | None = None,
    decoder: Literal["vae", "taef2"] = "vae",
    taef2_dir: str | os.PathLike | None = None,
    transformer: Flux2Transformer2DModel | None = None,
) -> dict:
    """A FLUX.2 pipeline's (a hub id or a local diffusers folder: ``transformer/``,
    ``vae/``, ``text_encoder/`` (Qwen3), ``tokenizer/``, ``scheduler/``) parts, as
    :meth:`perco.PerCo.from_components` takes them. ``decoder="taef2"``: decode with TAEF2
    (from ``taef2_dir``) instead of the VAE's decoder; ``transformer``: one to use instead
    of the pipeline's (e.g. built on the meta device)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..autoencoders import Flux2Autoencoder
    from ..text import check_tokenizer

    if decoder not in ("vae", "taef2"):
        raise ValueError(f"decoder must be 'vae' or 'taef2', got {decoder!r}")
    if decoder == "taef2" and taef2_dir is None:
        raise ValueError("decoder=taef2 needs taef2_dir (the assets' taef2/ folder)")
    load = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    tiny = None
    if decoder == "taef2":  # its published .pth state dicts (the assets' taef2/)
        from ..taesd import TinyAutoencoder

        tiny = TinyAutoencoder.from_state_dicts(
            Path(taef2_dir) / "taef2_encoder.pth", Path(taef2_dir) / "taef2_decoder.pth"
        ).eval().requires_grad_(False)
    vae = AutoencoderKLFlux2.from_pretrained(pretrained, subfolder="vae", **load)
    if transformer is None:
        transformer = Flux2Transformer2DModel.from_pretrained(
            pretrained, subfolder="transformer", **load
        )
    text_encoder = AutoModelForCausalLM.from_pretrained(pretrained, subfolder="text_encoder",
                                                        **load)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    check_tokenizer(tokenizer, str(pretrained))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained,
                                                                subfolder="scheduler")  # fmt: skip
    return {
        "autoencoder": Flux2Autoencoder(vae, tiny),
        "denoiser": transformer,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
