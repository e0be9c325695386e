"""Backbones: the denoiser families PerCo runs on, behind one small interface.

PerCo = autoencoder + hyper-encoder + quantizer + *denoiser* + text encoder. What differs
between denoiser families lives in one module per family, as diffusers keeps it in each
family's pipeline:

* how ``z_l`` enters — the extra input channels of the first layer (the U-Net's
  ``conv_in``; a transformer's patch embedding ``x_embedder``, as FLUX.1 Fill takes its
  masked image), widened with the pretrained weights copied;
* how the network is called — latent packing, position ids, timestep scaling, text;
* which layers LoRA adapts, and what a padded side must be a multiple of;
* the resolution-dependent shift of a flow schedule (its pipeline's rule).

The noise schedule (ε/v on DDPM-family schedulers, velocity with rectified flow) belongs
to the model's scheduler, not to the family: :mod:`perco.schedules`.

The data path (``encode``, ``decode``, the bitstream, the index prior, the students,
evaluation) never asks which family runs: it calls :func:`predict` and the methods here.
A model's ``perco.json`` names its backbone (absent in older folders: ``"unet"``).
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch
from torch import nn

__all__ = ["Backbone", "BACKBONES", "backbone_named", "backbone_of", "unwrap", "predict", "widened"]

# backbone names (perco.json's "backbone") → the module-level instance of their family
BACKBONES = {
    "unet": "perco.models.backbones.unet:UNET",
    "flux2": "perco.models.backbones.flux2:FLUX2",
}


class Backbone:
    """One denoiser family. Subclasses set the class attributes and implement the calls;
    every method takes the (unwrapped) denoiser module, so one instance serves all."""

    #: the name ``perco.json`` records
    name: str = ""
    #: the PerCo attribute and folder the denoiser is saved under (diffusers' pipeline name)
    attribute: str = ""
    #: the diffusers class the denoiser is loaded with
    module_class: type = nn.Module
    #: how messages name the denoiser
    label: str = ""
    #: what ``set_trainable("lora")`` adapts
    lora_targets: tuple[str, ...] | str = ()  # peft target_modules: names or a regex

    @property
    def settings(self) -> dict:
        """What the model fingerprint records of the family."""
        return {"backbone": self.name}

    def widen(self, module: nn.Module, extra: int, init: Literal["random", "zero"]) -> None:
        """Let ``module`` take ``extra`` more channels on the latent grid, in place."""
        raise NotImplementedError

    def add_lora(self, module: nn.Module, rank: int) -> None:
        """Rank-``rank`` LoRA adapters (peft) on :attr:`lora_targets`, starting at zero."""
        from peft import LoraConfig

        targets = self.lora_targets
        module.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights="gaussian",  # B = 0: training starts from the model
                target_modules=list(targets) if isinstance(targets, tuple) else targets,
            )
        )

    def input_layer(self, module: nn.Module) -> nn.Module:
        """The widened layer: trained in every finetuning mode."""
        raise NotImplementedError

    def in_channels(self, module: nn.Module) -> int:
        """Channels on the latent grid the denoiser takes (latent + ``z_l``)."""
        raise NotImplementedError

    def out_channels(self, module: nn.Module) -> int:
        raise NotImplementedError

    def context_dim(self, module: nn.Module) -> int:
        """Width of the text context (the caption's and a variant's extra tokens)."""
        raise NotImplementedError

    def pad_factor(self, module: nn.Module) -> int:
        """Latent positions a padded latent side must be a multiple of."""
        raise NotImplementedError

    def mu(self, module: nn.Module, latent_size: tuple[int, int], steps: int) -> float | None:
        """The resolution-dependent shift ``mu`` of a flow schedule at ``latent_size`` and
        ``steps`` sampler steps (``None``: the family has none)."""
        return None

    def predict(self, called: nn.Module, x: torch.Tensor, spatial: torch.Tensor, t,
                context: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The denoiser's prediction ``(B, C, h, w)`` on the latent grid at ``x`` (in the
        network's dtype), with ``spatial`` (``z_l`` on the latent grid), timesteps ``t``
        (the scheduler's) and the text ``context``. ``called`` may be wrapped (DDP, FSDP,
        compiled): it is what runs; its :func:`unwrap` is what is described."""
        raise NotImplementedError


def backbone_named(name: str) -> Backbone:
    """The backbone of a name in :data:`BACKBONES`."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    module, _, attr = BACKBONES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def unwrap(module: nn.Module) -> nn.Module:
    """The denoiser inside a DDP/FSDP wrapper or a ``torch.compile``'d module."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def backbone_of(module: nn.Module) -> Backbone:
    """The backbone whose denoiser class ``module`` (or what it wraps) is."""
    core = unwrap(module)
    for name in BACKBONES:
        backbone = backbone_named(name)
        if isinstance(core, backbone.module_class):
            return backbone
    raise TypeError(f"{type(core).__name__} is not a denoiser of any backbone "
                    f"({', '.join(sorted(BACKBONES))})")  # fmt: skip


def predict(called: nn.Module, x, spatial, t, context) -> torch.Tensor:
    """:meth:`Backbone.predict` of ``called``'s family: what the samplers and the losses call."""
    return backbone_of(called).predict(called, x, spatial, t, context)


@torch.no_grad()
def widened(
    layer: nn.Conv2d | nn.Linear,
    extra: int,
    init: Literal["random", "zero"] = "random",
    generator: torch.Generator | None = None,
) -> nn.Conv2d | nn.Linear:
    """A copy of an input layer with ``extra`` more input channels (dimension 1 of its
    weight): the pretrained weights in the first channels, the new ones drawn like a fresh
    layer of the widened shape (Kaiming-uniform, PyTorch's default) or zero, the bias kept.
    The same move for a U-Net's ``conv_in`` and a transformer's patch embedding."""
    if extra <= 0:
        raise ValueError(f"extra_channels must be positive, got {extra}")
    if init not in ("random", "zero"):
        raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
    like = {"bias": layer.bias is not None, "device": layer.weight.device,
            "dtype": layer.weight.dtype}  # fmt: skip
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels + extra, layer.out_channels,
                        kernel_size=layer.kernel_size, stride=layer.stride,
                        padding=layer.padding, **like)  # fmt: skip
        old_in = layer.in_channels
    else:
        new = nn.Linear(layer.in_features + extra, layer.out_features, **like)
        old_in = layer.in_features
    fan_in = new.weight[0].numel()
    bound = 1.0 / fan_in**0.5  # Kaiming-uniform with a=sqrt(5), as reset_parameters draws
    added = new.weight[:, old_in:]
    if init == "zero":
        added.zero_()
    else:
        added.uniform_(-bound, bound, generator=generator)
    new.weight[:, :old_in] = layer.weight
    if layer.bias is not None:
        new.bias.copy_(layer.bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new
