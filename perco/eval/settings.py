"""What an evaluation decodes and measures with: :class:`EvalSettings`, :class:`Backbones`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..metrics import LPIPSDistance

__all__ = ["EvalSettings", "Backbones"]


@dataclass
class EvalSettings:
    """What to decode and how; every field is recorded in the results' protocol."""

    samples: int = 1
    steps: list[int | None] = field(default_factory=lambda: [None])
    guidance: str | None = None
    guidance_scale: float | None = None
    timestep_spacing: str | None = None  # None: the model's scheduler config
    captions: str = "ground-truth"  # ground-truth | none | captioner | a captions file
    captioner: str = "blip2"  # with captions="captioner": a perco.captioning spec
    caption_codec: str | None = None  # None: the shortest that applies; "zlib": the paper's
    seed: int = 0
    ceiling: bool = True  # reference: the autoencoder alone
    jpeg: list[int] = field(default_factory=list)  # reference: JPEG (Pillow) at these qualities
    control: bool = False  # reference: each image decoded from another image's indices
    references: list[str] = field(default_factory=list)  # classic codecs, rate-matched
    reference_bpp: list[float] | None = None  # their targets; None: the rung's own bpp
    bd_anchor: str | None = None  # BD-rates of the rungs against this reference codec
    batch_size: int = 4
    fid_variant: str = "whole"  # whole | patches
    patch_size: int = 256
    kid_subset_size: int = 1000
    save_reconstructions: bool = False
    grid_images: int = 6


@dataclass
class Backbones:
    """Pretrained networks behind the metrics; ``None`` turns a metric off."""

    lpips: LPIPSDistance
    features: torch.nn.Module | None = None
    clip: torch.nn.Module | None = None
    segmenter: torch.nn.Module | None = None
    dists: torch.nn.Module | None = None
    lpips_vgg: LPIPSDistance | None = None  # a second LPIPS column beside an AlexNet one

    def describe(self) -> dict:
        def name(m):
            return None if m is None else getattr(m, "name", type(m).__name__)

        return {
            "lpips": f"lpips v0.1 {self.lpips.net}",
            "fid_features": name(self.features),
            "clip": name(self.clip),
            "segmenter": name(self.segmenter),
            **({"dists": f"{name(self.dists)}, full resolution"} if self.dists else {}),
            **({"lpips_vgg": "lpips v0.1 vgg"} if self.lpips_vgg else {}),
        }
