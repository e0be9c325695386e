"""Saving and loading PerCo model folders, and the registry of model variants.

A folder holds one subfolder per component (``autoencoder/``, ``hyper_encoder/``,
``quantizer/``, the denoiser's ``unet/`` or ``transformer/``, ``text_encoder/``,
``null_text/``, ``tokenizer/``, ``scheduler/``, a variant's own, and ``index_prior/`` once
one is fitted) and ``perco.json``: the :class:`PerCoConfig`, the variant name (which class
:func:`load` builds), the backbone (:mod:`perco.models.backbones`; absent in folders
older than backbones: the U-Net), the autoencoder and scheduler classes, the model
fingerprint that files carry, with a prior ``index_prior`` (its class and how it was
fitted), and for imported weights ``imported_from`` (their format and source; see
:mod:`perco.models.perco_sd`).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .autoencoders import load_autoencoder
from .backbones import backbone_named
from .config import PerCoConfig
from .text import check_tokenizer

__all__ = ["CONFIG_NAME", "VARIANTS", "variant_class", "save", "load"]

CONFIG_NAME = "perco.json"
# model variants by the name ``perco.json`` records: :func:`load` builds the right one
VARIANTS = {
    "perco": "perco.models.perco:PerCo",
    "perco_image": "perco.models.perco_image:PerCoImage",
    "sprdiff_style": "perco.models.sprdiff:SPRDiffStyle",
}


def variant_class(variant: str) -> type:
    """The model class of a variant name (a key of :data:`VARIANTS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")
    module, _, name = VARIANTS[variant].partition(":")
    return getattr(importlib.import_module(module), name)


def save(model, path: str | os.PathLike) -> None:
    """Write ``model`` as a folder: one subfolder per component (safetensors) and
    ``perco.json`` (its config, variant, autoencoder class, scheduler class, fingerprint).

    The folder is written beside ``path`` and renamed into place, so an existing
    checkpoint is replaced whole or not at all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.autoencoder.save_pretrained(tmp / "autoencoder")
        for name, module in model.components().items():
            if module is model.denoiser and model.has_lora:
                # a plain U-Net with the adapters merged in, loadable anywhere
                module = copy.deepcopy(module)
                module.fuse_lora()
                module.unload_lora()
            module.save_pretrained(tmp / name)
        if model.index_prior is not None:
            model.index_prior.save_pretrained(tmp / "index_prior")
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        model.scheduler.save_pretrained(tmp / "scheduler")
        model.forget_fingerprint()
        config = {
            **model.config.to_dict(),
            "variant": model.variant,
            "backbone": model.backbone.name,
            "autoencoder": model.autoencoder.name,
            "scheduler_class": type(model.scheduler).__name__,
            "fingerprint": model.fingerprint.hex(),
        }
        if model.index_prior is not None:
            config["index_prior"] = {"class": type(model.index_prior).__name__,
                                     **(model.index_prior_record or {})}  # fmt: skip
        if model.provenance is not None:
            config["imported_from"] = model.provenance
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _text_encoder_class(folder: Path):
    """transformers' class for a saved text encoder: a causal LM's own (FLUX.2 [klein]'s
    Qwen3, whose hidden states feed the transformer), else ``AutoModel`` (CLIP)."""
    from transformers import AutoModel, AutoModelForCausalLM

    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    return AutoModelForCausalLM if causal else AutoModel


def load(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None):
    """Load a folder written by :func:`save` as the variant it records, which must be
    ``cls`` or a subclass of it."""
    import diffusers
    from transformers import AutoTokenizer

    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a PerCo checkpoint (no {CONFIG_NAME})")
    raw = json.loads(config_file.read_text())
    variant = raw.pop("variant", "perco")
    if variant not in VARIANTS:
        raise ValueError(f"{path} holds an unknown model variant {variant!r}")
    found = variant_class(variant)
    if not issubclass(found, cls):
        raise ValueError(f"{path} holds a {variant} model, not a {cls.__name__}")
    cls = found
    backbone = backbone_named(raw.pop("backbone", "unet"))
    scheduler_class = getattr(diffusers, raw.pop("scheduler_class"))
    autoencoder = raw.pop("autoencoder")
    stored_fingerprint = raw.pop("fingerprint", None)
    prior_record = raw.pop("index_prior", None)
    provenance = raw.pop("imported_from", None)
    config = PerCoConfig(**raw)
    dtype_kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    check_tokenizer(tokenizer, str(path / "tokenizer"))
    modules = {}
    classes = {backbone.attribute: backbone.module_class, **cls._MODULES}
    for name, module_class in classes.items():
        module_class = module_class or _text_encoder_class(path / name)
        # the large pretrained parts take the dtype; PerCo's own stay float32
        dtype = dtype_kw if name in (backbone.attribute, "text_encoder") else {}
        modules[name] = module_class.from_pretrained(path / name, **dtype)
    model = cls(
        autoencoder=load_autoencoder(autoencoder, path / "autoencoder", **dtype_kw),
        tokenizer=tokenizer,
        scheduler=scheduler_class.from_pretrained(path / "scheduler"),
        config=config,
        **modules,
    )
    if prior_record is not None:
        from .index_prior import ContextPrior

        record = dict(prior_record)
        if record.pop("class") != ContextPrior.__name__:
            raise ValueError(f"{path} holds an unknown index prior {prior_record['class']!r}")
        model.set_index_prior(ContextPrior.from_pretrained(path / "index_prior"), record)
    model.provenance = provenance
    if stored_fingerprint is not None:
        model._fingerprint = bytes.fromhex(stored_fingerprint)
    return model
