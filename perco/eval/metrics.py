"""The per-image metric registry: one entry per metric, and it appears everywhere.

A :class:`Metric` is a name, the :class:`~perco.eval.settings.Backbones` field it needs
(or none) and a function of a batch of originals and 8-bit reconstructions returning one
value per image for each of its columns. Every registered metric is computed for every
series, written to ``per_image.csv``, averaged into ``results.json``, printed in the
table (its ``table`` columns) and plotted by ``perco-plot --metrics <column>``. Add one
with :func:`register`::

    from perco.eval import Metric, register

    register(Metric("l1", lambda batch: {"l1": (batch.x - batch.y).abs().mean((1, 2, 3))}))

From the command line, put the call in a module and name it: ``perco-eval
imports=[my_metrics] ...``.

Dataset-level scores (FID/KID from per-image features, mIoU from per-image counts) are
computed from per-image caches too, in :mod:`perco.eval.results`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..metrics import colour_stats, ms_ssim, psnr

__all__ = ["Batch", "Metric", "METRICS", "register", "compute", "score", "table_columns", "to_8bit"]


@dataclass
class Batch:
    """What a metric sees: originals ``x`` and reconstructions ``y`` (``(B, 3, H, W)`` in
    ``[0, 1]``, on the evaluation device), the backbones, and per image the ground-truth
    caption to score text–image agreement with (``None`` when there is none)."""

    x: torch.Tensor
    y: torch.Tensor
    backbones: object
    captions: list[str | None]


@dataclass(frozen=True)
class Metric:
    """``fn(batch) -> {column: (B,) tensor}``; skipped when the backbone ``needs`` is off."""

    name: str
    fn: Callable[[Batch], dict[str, torch.Tensor]]
    columns: tuple[str, ...] = ()  # default: (name,)
    needs: str | None = None  # a Backbones field, e.g. "lpips" or "clip"
    table: tuple[str, ...] | None = None  # columns in the printed table; default: all

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.columns or (self.name,)

    @property
    def shown(self) -> tuple[str, ...]:
        return self.outputs if self.table is None else self.table

    def available(self, backbones) -> bool:
        return self.needs is None or getattr(backbones, self.needs, None) is not None


def _clip_text(batch: Batch) -> torch.Tensor:
    """CLIP text–image score of each reconstruction with its caption; NaN without one."""
    text = torch.full((len(batch.y),), float("nan"))
    idx = [i for i, c in enumerate(batch.captions) if c]
    if idx:
        scores = batch.backbones.clip.text_image(batch.y[idx], [batch.captions[i] for i in idx])
        text[idx] = scores.float().cpu()
    return text


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add (or replace) a per-image metric for every later evaluation."""
    METRICS[metric.name] = metric
    return metric


COLOUR = tuple(f"{k}_shift_{c}" for k in ("mean", "std") for c in "rgb")
for _metric in (
    Metric("psnr", lambda b: {"psnr": psnr(b.x, b.y)}),
    Metric("ms_ssim", lambda b: {"ms_ssim": ms_ssim(b.x, b.y)}),
    Metric("lpips", lambda b: {"lpips": b.backbones.lpips(b.x, b.y)}, needs="lpips"),
    Metric("lpips_vgg", lambda b: {"lpips_vgg": b.backbones.lpips_vgg(b.x, b.y)},
           needs="lpips_vgg"),
    Metric("dists", lambda b: {"dists": b.backbones.dists(b.x, b.y)}, needs="dists"),
    Metric("colour", lambda b: colour_stats(b.x, b.y), ("delta_e2000", *COLOUR),
           table=("delta_e2000",)),
    Metric("clip", lambda b: {"clip_text": _clip_text(b),
                              "clip_image": b.backbones.clip.image_image(b.x, b.y)},
           ("clip_text", "clip_image"), needs="clip"),
):  # fmt: skip
    register(_metric)


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """What a saved 8-bit PNG holds: every metric sees exactly that."""
    return images.clamp(0, 1).mul(255).round().div(255)


def compute(batch: Batch) -> dict[str, torch.Tensor]:
    """Every registered metric that ``batch.backbones`` supports, on one batch:
    ``{column: (B,) tensor}``."""
    values = {}
    for metric in METRICS.values():
        if metric.available(batch.backbones):
            values.update(metric.fn(batch))
    return values


def table_columns() -> list[str]:
    """The registered metrics' columns shown in printed tables, in registry order."""
    return [c for m in METRICS.values() for c in m.shown]


def score(originals, reconstructions, backbones, patch_size: int | None = 256) -> dict:
    """Mean registered metrics, and FID/KID when ``backbones.features`` is set (on HiFiC
    patches of ``patch_size``, or whole images with ``None``), of paired image lists
    (each ``(3, H, W)`` in ``[0, 1]``; reconstructions are rounded to 8 bits first)."""
    from ..metrics import fid_kid, hific_patches

    rows, real, fake = [], [], []
    for x, y in zip(originals, reconstructions, strict=True):
        x, y = x[None], to_8bit(y[None])
        values = compute(Batch(x, y, backbones, [None]))
        rows.append({k: float(v[0]) for k, v in values.items()})
        if backbones.features is not None:
            if patch_size is not None:
                x, y = hific_patches(x, patch_size), hific_patches(y, patch_size)
            real.append(backbones.features(x))
            fake.append(backbones.features(y))
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    if real:
        out.update(fid_kid(torch.cat(real), torch.cat(fake)))
    return out
