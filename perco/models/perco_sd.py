"""Import PerCo (SD)'s checkpoints (Körber; github.com/Nikolai10/PerCo, Apache-2.0).

PerCo (SD) finetunes Stable Diffusion 2.1 and its training script saves diffusers
folders: ``unet/`` (its U-Net class, SD's plus a ``conv_in_extended``) and ``hyper_enc/``
(its ``HyperEncoder``, with the vector quantizer inside), beside SD 2.1's own ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/`` when the whole pipeline was saved
(``checkpoint-N/`` folders hold only the first two). :func:`import_perco_sd` maps every
tensor onto perco's modules and sets perco's options so that the model computes what
PerCo (SD)'s pipeline and compression script compute:

=========================================  ==========================================
PerCo (SD) (its source)                    the imported perco model
=========================================  ==========================================
``hyper_enc.backbone.{0..14}``: entry      ``HyperEncoder.layers.{0..14}``, the same
conv, bottlenecks (``layers.{0,2,4}``),    layout (:mod:`.hyper_encoder`); a 5×5
CompressAI ``AttentionBlock`` at 8, 14     stride-2 entry where ``cfg_ss`` downsamples
attention residual units end with a ReLU   ``attention_relu=True``
``VectorQuantize(use_cosine_sim=True)``    ``VectorQuantizer(distance="cosine")``
``project_in``/``project_out`` ``Linear``  1×1 convolutions, the same weights
``_codebook.embed`` ``(1, V, 32)``         ``quantizer.embed`` ``(V, 32)``
U-Net input ``conv_in_extended(cat[x_t,    the widened ``conv_in``, same channel order
nearest-upsampled z_hat])``, 4 + 320 in    and upsampling; SD's ``conv_in``, kept but
                                           unused by its forward, is dropped
``z_hat = project_out(codebook[index])``   ``condition="projected"``
negative prompt ``""``, not learned        ``learned_null_text=False`` (the base text
                                           encoder's embedding of ``""``)
CFG 3.0 on the text, z_hat in both         ``guidance="text"``, ``guidance_scale=3.0``
SD 2.1's DDIM config ("leading",           the base's scheduler config as it is (not
``steps_offset`` 1, v-prediction)          perco's "trailing" default)
20 steps below 0.05 bpp, 5 above           the rung's steps (the same rule)
VAE ``latent_dist.sample()``               ``posterior="sample"`` (seeded per image)
trained by EMA only (decay 0.8, no         ``commitment_weight=0``, ``decay=0.8``, no
commitment loss, no code restarts)         restarts, no k-means: training goes on alike
rate (spatial size, V) at 512²             downsample = 64 / size; 0.0507's V = 8196
                                           is the custom rung ``r0.0507``
=========================================  ==========================================

What is not a model setting stays with the evaluation: PerCo (SD) resizes every test
image to 512×512 (bicubic) and captions it with BLIP-2 (``protocol=perco_sd`` of
``perco-eval`` does both), and its files (pickled torchac and zlib streams) are not
perco files: an imported model writes ``.perco`` files under its own fingerprint.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..rates import RATES, Rate
from .hyper_encoder import HyperEncoder
from .perco import PerCo
from .quantizer import VectorQuantizer
from .unet_adapter import widen_conv_in

__all__ = [
    "CheckpointError",
    "PERCO_SD_RATES",
    "PerCoSDCheckpoint",
    "perco_sd_rate",
    "find_checkpoint",
    "import_perco_sd",
]

# PerCo (SD)'s rate table (src/config.py): rung → (hyper-latent side at 512², V)
PERCO_SD_RATES: dict[str, tuple[int, int]] = {
    "0.1250": (64, 256),
    "0.0937": (64, 64),
    "0.0507": (32, 8196),  # not 8192
    "0.0313": (32, 256),
    "0.0098": (16, 1024),
    "0.0024": (8, 1024),
    "0.0019": (8, 256),
}
_ALIASES = {"0.0938": "0.0937", "0.0508": "0.0507"}  # perco's names of the same rungs
_LATENT_SIDE = 64  # SD's latent side at PerCo (SD)'s 512² training size
_HYPER_ENCODER_CONFIG = ("in_channels", "N", "M", "codebook_dim", "cfg_ss", "cfg_cs")
_ENTRIES = (0, 4, 9)  # backbone entries that are 5×5 stride-2 convs when they downsample


class CheckpointError(ValueError):
    """A folder that cannot be imported: says why in one line."""


def perco_sd_rate(name: str) -> tuple[str, Rate]:
    """PerCo (SD)'s rung ``name`` (``"0.1250"``, ``"r0.1250"``; perco's ``r0.0938`` and
    ``r0.0508`` name its 0.0937 and 0.0507) → ``(its name, the perco Rate)``.

    The Rate is the ladder's rung of the same downsampling and ``V`` where there is one,
    else a custom rung (0.0507: ``V = 8196``).
    """
    key = name.removeprefix("r")
    key = _ALIASES.get(key, key)
    if key not in PERCO_SD_RATES:
        raise CheckpointError(
            f"unknown PerCo (SD) rate {name!r}; its rungs: {', '.join(PERCO_SD_RATES)}"
        )
    side, size = PERCO_SD_RATES[key]
    downsample = _LATENT_SIDE // side
    for rate in RATES.values():
        if (rate.downsample, rate.codebook_size) == (downsample, size):
            return key, rate
    return key, Rate(f"r{key}", downsample, size, steps=20 if float(key) < 0.05 else 5)


def _rung_name(side: int, size: int) -> str:
    names = [k for k, v in PERCO_SD_RATES.items() if v == (side, size)]
    return names[0] if names else f"(spatial size {side}, V={size}), not in its table"


@dataclass
class PerCoSDCheckpoint:
    """A PerCo (SD) folder: ``unet/`` and ``hyper_enc/`` (configs read, weights not yet)."""

    path: Path
    hyper_encoder: dict  # hyper_enc/config.json
    unet: dict | None  # unet/config.json

    @property
    def rate_key(self) -> tuple[int, int]:
        return self.hyper_encoder["cfg_ss"], self.hyper_encoder["cfg_cs"]

    @classmethod
    def read(cls, path: Path) -> PerCoSDCheckpoint:
        config = _read_json(path / "hyper_enc" / "config.json")
        missing = [k for k in _HYPER_ENCODER_CONFIG if k not in config]
        if config.get("_class_name") != "HyperEncoder" or missing:
            raise CheckpointError(
                f"{path} is not a PerCo (SD) checkpoint: hyper_enc/config.json is not its "
                f"HyperEncoder's (missing {', '.join(missing) or '_class_name'})"
            )
        unet = path / "unet" / "config.json"
        if not (path / "unet").is_dir():
            raise CheckpointError(f"{path} is not a PerCo (SD) checkpoint: no unet/ folder")
        return cls(path, config, _read_json(unet) if unet.is_file() else None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def find_checkpoint(src: str | os.PathLike, rate: str) -> PerCoSDCheckpoint:
    """The PerCo (SD) checkpoint for ``rate`` at ``src`` or up to three folders below it
    (the download holds one folder per rung, named as its authors chose)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder")
    key, _ = perco_sd_rate(rate)
    want = PERCO_SD_RATES[key]
    if (src / "hyper_enc" / "config.json").is_file():
        found = [PerCoSDCheckpoint.read(src)]
    else:
        patterns = ("*/hyper_enc/config.json", "*/*/hyper_enc/config.json",
                    "*/*/*/hyper_enc/config.json")  # fmt: skip
        folders = sorted({p.parent.parent for pattern in patterns for p in src.glob(pattern)})
        if not folders:
            raise CheckpointError(
                f"{src} is not a PerCo (SD) checkpoint: no hyper_enc/config.json in it or "
                "up to three folders below"
            )
        found = [PerCoSDCheckpoint.read(f) for f in folders]
    matching = [c for c in found if c.rate_key == want]
    if len(found) == 1 and not matching:
        side, size = found[0].rate_key
        raise CheckpointError(
            f"{found[0].path} holds PerCo (SD)'s rung {_rung_name(side, size)} (spatial size "
            f"{side}, V={size}), not {key} (spatial size {want[0]}, V={want[1]})"
        )
    if not matching:
        held = "; ".join(f"{c.path}: {_rung_name(*c.rate_key)}" for c in found)
        raise CheckpointError(f"no checkpoint of rung {key} below {src} ({held})")
    if len(matching) > 1:
        paths = ", ".join(str(c.path) for c in matching)
        raise CheckpointError(f"several checkpoints of rung {key} below {src}: {paths}; pass one")
    return matching[0]


# -- weights --------------------------------------------------------------------------
def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model folder: safetensors (one file, an fp16 variant,
    or shards), else a ``.bin`` read with ``weights_only=True``."""
    from safetensors.torch import load_file

    stem = "diffusion_pytorch_model"
    try:
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
            if (folder / name).is_file():
                return load_file(folder / name)
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
        if (folder / f"{stem}.bin").is_file():
            return torch.load(folder / f"{stem}.bin", map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read the weights in {folder}: {e}") from None
    raise CheckpointError(f"{folder} has no weights ({stem}.safetensors or .bin)")


def _hyper_encoder_source_key(key: str) -> str:
    """perco ``HyperEncoder`` key → PerCo (SD) ``hyper_enc`` key (CompressAI's names)."""
    key = re.sub(r"^layers\.", "backbone.", key)
    key = re.sub(r"\.trunk\.(\d)\.body\.", r".conv_a.\1.conv.", key)  # attention trunk
    key = re.sub(r"\.mask\.(\d)\.body\.", r".conv_b.\1.conv.", key)  # attention mask units
    key = key.replace(".mask.3.", ".conv_b.3.")  # the mask's last 1×1 conv
    return key.replace(".body.", ".layers.")  # a bottleneck's convs


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


# perco VectorQuantizer key → (PerCo (SD) key, how its value becomes perco's)
_QUANTIZER_KEYS = {
    "project_in.weight": ("quantizer.project_in.weight", lambda t: t[:, :, None, None]),
    "project_in.bias": ("quantizer.project_in.bias", _same),
    "project_out.weight": ("quantizer.project_out.weight", lambda t: t[:, :, None, None]),
    "project_out.bias": ("quantizer.project_out.bias", _same),
    "embed": ("quantizer._codebook.embed", lambda t: t[0]),  # one codebook (heads = 1)
    "embed_avg": ("quantizer._codebook.embed_avg", lambda t: t[0]),
    "cluster_size": ("quantizer._codebook.cluster_size", lambda t: t[0]),
    "initted": ("quantizer._codebook.initted", lambda t: torch.tensor(bool(t.flatten()[0]))),
}


def _unet_source_key(key: str) -> str:
    """perco U-Net key → PerCo (SD)'s: its ``conv_in_extended`` is perco's ``conv_in``."""
    return key.replace("conv_in.", "conv_in_extended.") if key.startswith("conv_in.") else key


def _mapped_state(
    target: dict[str, torch.Tensor],
    source: dict[str, torch.Tensor],
    keys: dict[str, tuple[str, object]],
    what: str,
    ignored: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """``target``'s keys filled from ``source`` by ``keys`` (perco key → (source key,
    value map)), in the target's dtypes; refuses on missing, unexpected or misshapen
    tensors, naming them as the source does."""
    wanted = {src for src, _ in keys.values()}
    missing = sorted(src for src in wanted if src not in source)
    unexpected = sorted(k for k in source if k not in wanted and k not in ignored)
    if missing:
        raise CheckpointError(f"{what} misses tensors: {_listing(missing)}")
    if unexpected:
        raise CheckpointError(f"{what} has unexpected tensors: {_listing(unexpected)}")
    state, wrong = {}, []
    for perco, (src, convert) in keys.items():
        value = convert(source[src])
        if value.shape != target[perco].shape:
            wrong.append(f"{src} {tuple(source[src].shape)}")
            continue
        state[perco] = value.to(target[perco].dtype)
    if wrong:
        raise CheckpointError(f"{what} has tensors of other shapes: {_listing(wrong)}")
    return state


def _listing(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


# -- the import -----------------------------------------------------------------------
def import_perco_sd(
    src: str | os.PathLike,
    rate: str,
    base: str | os.PathLike = "stabilityai/stable-diffusion-2-1",
) -> PerCo:
    """A perco model from PerCo (SD)'s checkpoint of ``rate`` at (or below) ``src``.

    The U-Net and hyper-encoder (with its quantizer) come from ``src``; the VAE, text
    encoder, tokenizer and scheduler from ``base`` (a hub id or a local SD 2.1 folder),
    whose U-Net must have the checkpoint's shapes. Every tensor of ``src`` lands in one
    place and every perco weight comes from one; anything else is refused
    (:class:`CheckpointError`) before the base model's weights are read. The model's
    settings reproduce PerCo (SD)'s behaviour (see the module docstring);
    ``model.provenance`` records what was imported.
    """
    ckpt = find_checkpoint(src, rate)
    key, perco_rate = perco_sd_rate(rate)
    cfg = ckpt.hyper_encoder
    hyper_encoder = HyperEncoder(
        in_channels=cfg["in_channels"],
        downsample=perco_rate.downsample,
        channels=cfg["N"],
        out_channels=cfg["M"],
        attention_relu=True,
    )
    quantizer = VectorQuantizer(
        codebook_size=perco_rate.codebook_size,
        dim=cfg["M"],
        codebook_dim=cfg["codebook_dim"],
        distance="cosine",
        decay=0.8,  # how PerCo (SD) trains it, should training go on
        epsilon=1e-5,
        commitment_weight=0.0,
        dead_code_threshold=0.0,
        kmeans_init=False,
    )
    hyper_source = read_weights(ckpt.path / "hyper_enc")
    _check_rung(ckpt.path, hyper_source, key, perco_rate)
    _load_hyper_encoder(hyper_encoder, quantizer, hyper_source, ckpt.path / "hyper_enc")

    base_unet, scheduler = _base_configs(base)
    if scheduler.get("prediction_type") != "v_prediction":
        raise CheckpointError(
            f"the base model's scheduler predicts {scheduler.get('prediction_type')!r}: PerCo "
            "(SD) finetunes SD 2.1 with v-prediction (stabilityai/stable-diffusion-2-1)"
        )
    unet_config = ckpt.unet or base_unet
    reference = _meta_unet(base_unet).state_dict()
    unet = _meta_unet(unet_config)  # shapes only: checked, then widened as perco's
    own = {k: v.shape for k, v in unet.state_dict().items()}
    differ = sorted(k for k in own if k not in reference or reference[k].shape != own[k])
    differ += sorted(k for k in reference if k not in own)
    if differ:
        raise CheckpointError(f"the base model's U-Net ({base}) does not match the "
                              f"checkpoint's: {_listing(differ)}")  # fmt: skip
    latent = own["conv_in.weight"][1]
    if latent != cfg["in_channels"]:
        raise CheckpointError(f"{ckpt.path}: the U-Net takes {latent} latent channels, the "
                              f"hyper-encoder {cfg['in_channels']}")  # fmt: skip
    widened = widen_conv_in(unet, cfg["M"]).state_dict()
    unet_source = read_weights(ckpt.path / "unet")
    unet_state = _mapped_state(
        widened,
        unet_source,
        {k: (_unet_source_key(k), _same) for k in widened},
        str(ckpt.path / "unet"),
        ignored=("conv_in.weight", "conv_in.bias"),  # SD's own, unused by its forward
    )

    model = PerCo.from_stable_diffusion(
        base,
        perco_rate,
        unet=_meta_unet(unet_config),
        hyper_encoder=dict(hyper_encoder.config),
        quantizer=dict(quantizer.config),
        conv_in_init="zero",
        learned_null_text=False,
        condition="projected",
        guidance="text",
        guidance_scale=3.0,
        text_drop_prob=0.1,
        posterior="sample",
    )
    model.unet.load_state_dict(unet_state, strict=True, assign=True)
    model.hyper_encoder.load_state_dict(hyper_encoder.state_dict())
    model.quantizer.load_state_dict(quantizer.state_dict())
    model.provenance = {
        "format": "perco-sd",
        "source": str(ckpt.path.resolve()),
        "rate": key,
        "base": str(Path(base).resolve()) if Path(base).is_dir() else str(base),
        "hyper_enc": {k: cfg[k] for k in _HYPER_ENCODER_CONFIG},
        "tensors": len(hyper_source) + len(unet_source),
    }
    return model.eval()


def _check_rung(path: Path, state: dict[str, torch.Tensor], key: str, rate: Rate) -> None:
    """The weights must say what the config says: ``V``, and which entries downsample."""
    embed = state.get("quantizer._codebook.embed")
    if embed is not None and embed.shape[-2] != rate.codebook_size:
        raise CheckpointError(f"{path}: the codebook has {embed.shape[-2]} entries, rung {key} "
                              f"has V={rate.codebook_size}")  # fmt: skip
    kernels = [state.get(f"backbone.{i}.weight") for i in _ENTRIES]
    if all(k is not None for k in kernels):
        down = 2 ** sum(k.shape[-1] == 5 for k in kernels)
        if down != rate.downsample:
            raise CheckpointError(
                f"{path}: the hyper-encoder downsamples the latent by {down}, rung {key} by "
                f"{rate.downsample} (spatial size {PERCO_SD_RATES[key][0]} at 512²)"
            )


def _load_hyper_encoder(
    hyper_encoder: HyperEncoder,
    quantizer: VectorQuantizer,
    source: dict[str, torch.Tensor],
    what: Path,
) -> None:
    """``hyper_enc``'s tensors into perco's hyper-encoder and quantizer (all of them)."""
    he_target = hyper_encoder.state_dict()
    keys = {k: (_hyper_encoder_source_key(k), _same) for k in he_target}
    keys.update({f"vq.{k}": v for k, v in _QUANTIZER_KEYS.items()})
    target = {**he_target, **{f"vq.{k}": v for k, v in quantizer.state_dict().items()}}
    state = _mapped_state(target, source, keys, str(what))
    hyper_encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("vq.")})
    quantizer.load_state_dict({k[3:]: v for k, v in state.items() if k.startswith("vq.")})


def _base_configs(base: str | os.PathLike) -> tuple[dict, dict]:
    """The base model's U-Net and scheduler configs (no weights read)."""
    from diffusers import DDIMScheduler

    try:
        unet = UNet2DConditionModel.load_config(base, subfolder="unet")
        scheduler = DDIMScheduler.load_config(base, subfolder="scheduler")
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load the base model {base}: {first}") from None
    return unet, scheduler
