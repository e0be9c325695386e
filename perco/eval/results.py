"""From per-image results to what a run reports: the protocol, dataset-level summaries,
``per_image.csv``, ``results.json``, the table, the plot and the grid."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import torch

from ..data.eval_sets import EvalSet
from ..io import atomic_write, save_image
from ..metrics import fid_kid
from ..metrics.miou import mean_iou
from ..models.perco import PerCo
from .cache import ImageResult, load_result
from .codecs import codec_series
from .metrics import METRICS, table_columns
from .references import CONTROL
from .settings import Backbones, EvalSettings

__all__ = ["CEILING", "protocol", "departures", "summarise", "write_outputs", "format_table"]

log = logging.getLogger("perco.eval")

CEILING = "autoencoder"

ABLATIONS = {  # PerCoConfig.local: what an ablation's rows measure
    "continuous": "PerCo without quantization (paper Table 1 right): continuous z_l in "
    "float32, no bitstream, rate not applicable",
    "none": "text-only (paper Fig. 7): no z_l; bpp_payload is the caption's bits, no file",
}

# the paper's protocol (Careil et al. 2024, §4.1 and Fig. 7-8): what `protocol=paper` sets
PAPER = {
    "captions": "captioner blip2, at encode time",
    "caption_codec": "zlib",
    "guidance": "text",
    "guidance_scale": 3.0,
}


def series_name(steps: int | None, model: PerCo) -> str:
    return f"steps={steps or model.default_steps}"


def jpeg_series(quality: int) -> str:
    return f"jpeg q={quality}"


def reference_targets(settings: EvalSettings, model: PerCo) -> list[float]:
    """The bpps the classic codecs are rate-matched to: the settings' or the rung's own
    (its index bpp, as its name says)."""
    if settings.reference_bpp is not None:
        return list(settings.reference_bpp)
    return [round(model.rate.bpp(), 4)]


def reference_series(settings: EvalSettings, model: PerCo) -> list[str]:
    """The reference rows a run records besides the ceiling, in table order."""
    targets = reference_targets(settings, model)
    codecs = [codec_series(c, t) for c in settings.references for t in targets]
    control = [CONTROL] if settings.control else []
    return [jpeg_series(q) for q in settings.jpeg] + codecs + control


RATE_MATCHING = (
    "per image, the highest quality whose file (container included) is at most the target "
    "bpp, by binary search over the codec's qualities; an image whose lowest-quality file is "
    "still larger cannot reach the target: it is listed with that smallest bpp and left out "
    "of the row's means, never measured at a higher rate"
)


def _caption_source(settings: EvalSettings) -> str:
    if settings.captions == "captioner":
        return f"captioner {settings.captioner}, at encode time"
    if settings.captions in ("ground-truth", "none"):
        return settings.captions
    return f"file {settings.captions}"


DRAW = "a draw from the VAE posterior, seeded per image (PerCo (SD)), not its mean"


def protocol(model: PerCo, data: EvalSet, settings: EvalSettings, backbones: Backbones) -> dict:
    """Everything a results table must state (DESIGN: evaluation protocol)."""
    sched = model.sampler(settings.timestep_spacing)
    references = {}
    if settings.jpeg:
        references["jpeg_qualities"] = list(settings.jpeg)
    if settings.references:
        from .codecs import get_codec

        references["reference_codecs"] = {
            name: get_codec(name).describe() for name in settings.references
        }
        references["reference_targets_bpp"] = reference_targets(settings, model)
        references["reference_rate_matching"] = RATE_MATCHING
    if settings.control:
        references["control"] = (
            "each image's file decoded with the indices of another image of its size "
            f"(pairs shuffled with seed {settings.seed}), its own seed and caption"
        )
    sampler = {}
    if model.config.sampler == "one-step":  # absent for DDIM: older protocols unchanged
        sampler["sampler"] = (
            f"one-step student: one {model.backbone.label} call at t = "
            f"{model.config.one_step_timestep} from "
            f"noise, no guidance pass; decodes model {model.config.file_fingerprint[:4]}'s files"
        )
    prior = {}
    if model.index_prior is not None:  # absent for uniform coding: older protocols unchanged
        record = model.index_prior_record or {}
        prior["index_coding"] = (
            f"learned context prior ({type(model.index_prior).__name__}, fitted on "
            f"{record.get('fitted_on', 'unrecorded data')}); bpp_uniform: the same indices "
            "at log2 V bits each"
        )
    return {
        **data.describe(),
        "rate": model.rate.name,
        **({"imported_from": model.provenance} if model.provenance else {}),
        **({"vae_posterior": DRAW} if model.config.posterior == "sample" else {}),
        **prior,
        **({"ablation": ABLATIONS[model.config.local]} if model.config.local in ABLATIONS else {}),
        "model_fingerprint": model.fingerprint.hex(),
        **model.backbone.settings,  # absent for the U-Net: older protocols unchanged
        "scheduler": model.schedule.describe(sched),
        **sampler,
        "steps": [s or model.default_steps for s in settings.steps],
        "guidance": settings.guidance or model.config.guidance,
        "guidance_scale": model.config.guidance_scale
        if settings.guidance_scale is None
        else settings.guidance_scale,
        "captions": _caption_source(settings),
        "caption_codec": settings.caption_codec or "the shortest that applies (per file)",
        "integrity_check": "none: bpp_file counts the header and stream lengths, no CRC-16 "
        "(perco compress adds one by default, 2 bytes a file)",
        "clip_text_caption": "a ground-truth caption other than the conditioning one",
        "seed": settings.seed,
        "seeding": "sha256(seed/image id/sample index)",
        "samples_per_image": settings.samples,
        "fid_variant": f"patches {settings.patch_size}px, HiFiC grid + half-shifted grid"
        if settings.fid_variant == "patches"
        else "whole image",
        "kid_subset_size_max": settings.kid_subset_size,
        "autoencoder_ceiling": settings.ceiling,
        **references,
        **backbones.describe(),
        "metrics_on": "8-bit reconstructions (as saved to PNG)",
    }


def departures(doc: dict, model: PerCo, settings: EvalSettings) -> list[str]:
    """Every point where a run departs from the paper's protocol, in words."""
    proto, out = doc["protocol"], []
    if proto["captions"] != PAPER["captions"]:
        out.append(f"captions: {proto['captions']} (paper: BLIP-2 captions made at encode time)")
    if proto.get("uncaptioned_images"):
        out.append(
            f"{proto['uncaptioned_images']} of {proto['images']} images decoded without a caption"
        )
    if proto["caption_codec"] != PAPER["caption_codec"]:
        out.append(f"caption codec: {proto['caption_codec']} (paper: zlib)")
    if proto["guidance"] != PAPER["guidance"] or proto["guidance_scale"] != PAPER["guidance_scale"]:
        out.append(
            f"guidance: {proto['guidance']} at {proto['guidance_scale']} (paper: text only at 3)"
        )
    if any(s != model.rate.steps for s in proto["steps"]):
        out.append(f"steps {proto['steps']} (the paper's for this rung: {model.rate.steps})")
    if str(proto["fid_variant"]).startswith("patches"):
        out.append(f"FID/KID on {proto['fid_variant']} (paper: whole images; none on Kodak)")
    features = str(proto.get("fid_features") or "")
    if features and "inception" not in features.lower():
        out.append(f"FID/KID features: {features} (paper: Inception v3), not comparable")
    if proto.get("segmenter"):
        out.append(f"mIoU segmenter: {proto['segmenter']} (paper: ViT-Adapter), not comparable")
    if proto["transform"] != "native":
        out.append(f"images transformed: {proto['transform']}")
    if proto.get("index_coding"):
        out.append("indices entropy-coded with a learned prior (paper: log2 V bits each); "
                   "bpp_uniform is the paper's coding of the same indices")  # fmt: skip
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _of(series: str, keyed: dict) -> list:
    return [v for k, v in keyed.items() if k.startswith(series + "/")]


def summarise(results: dict[str, ImageResult], settings: EvalSettings, series: str) -> dict:
    """Dataset-level numbers of one series, from per-image results in image order.

    FID/KID compare the series' reconstructions with the originals of the images that
    have them (all of them, except for a control that leaves some images out)."""
    rows = [r for res in results.values() for r in res.rows if r["series"] == series]
    unreached = [r for r in rows if r.get("cannot_reach")]
    rows = [r for r in rows if not r.get("cannot_reach")]
    out = {"images": len({r["id"] for r in rows}), "reconstructions": len(rows)}
    if unreached or any("target_bpp" in r for r in rows):  # a rate-matched classic codec
        out["target_bpp"] = (unreached or rows)[0]["target_bpp"]
        out["cannot_reach"] = {r["id"]: r["min_bpp"] for r in unreached}
    columns = [c for m in METRICS.values() for c in m.outputs]
    keys = ("bpp_file", "bpp_payload", "bpp_uniform", "index_bits", "bytes", "caption_bits")
    for key in (*keys, *columns, "diversity_lpips"):
        if any(key in r for r in rows):
            out[key] = _mean([r.get(key) for r in rows])
    having = [res for res in results.values() if _of(series, res.features)]
    if having:
        real = torch.cat([res.features["real"] for res in having])
        fakes = torch.cat([f for res in having for f in _of(series, res.features)])
        out.update(fid_kid(real, fakes, settings.kid_subset_size, seed=settings.seed))
    counts = [c for res in results.values() for c in _of(series, res.segmentation)]
    if counts:
        out["miou"] = mean_iou(counts)
    return out


def write_outputs(out: Path, data, settings: EvalSettings, proto: dict, name: str, model) -> dict:
    """Read every image's cached result and write the run's outputs; returns the document."""
    ids = [it.id for it in data.items]
    results = {image_id: load_result(out, image_id) for image_id in ids}
    rows = [r for image_id in ids for r in results[image_id].rows]
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "per_image.csv", write_csv)

    steps = proto["steps"]
    series = [f"steps={s}" for s in steps]
    summaries = [summarise(results, settings, s) for s in series]
    keys = list(dict.fromkeys(k for s in summaries for k in s))
    first = [r for r in rows if r["series"] == series[0] and r["sample"] == 0]
    captioned = sum(1 for r in first if r.get("caption"))
    proto = {**proto, "captioned_images": captioned, "uncaptioned_images": len(first) - captioned}
    if not model.config.text:
        proto["captions"] = "none (the model has no text conditioning)"
    elif captioned == 0 and settings.captions != "none":  # say what the images really got
        proto["captions"] = f"none ({proto['captions']} gave no caption for any image)"
    warnings = []
    if model.config.guidance != "none" and proto["uncaptioned_images"]:
        warnings.append(
            f"{proto['uncaptioned_images']} of {len(first)} images were decoded without a "
            f"caption by a text-conditioned model (guidance {model.config.guidance}): guidance "
            "did nothing for them; eval.captions=captioner captions them as the paper does"
        )
    codecs = sorted(
        {r["caption_codec"] for r in first if r.get("caption") and "caption_codec" in r}
    )
    proto["caption_codecs_used"] = codecs
    doc = {
        "name": name,
        "description": f"{name} at {model.rate.name} on {data.name} "
        f"({proto['images']} images, {proto['transform']})",
        "protocol": proto,
        "results": {
            "rate": [model.rate.name] * len(series),
            "steps": steps,
            "bpp": [s.get("bpp_file") for s in summaries],
            **{k: [s.get(k) for s in summaries] for k in keys},
        },
    }
    doc["departures_from_paper"] = departures(doc, model, settings)
    if warnings:
        doc["warnings"] = warnings
        for w in warnings:
            log.warning(w)
    if settings.ceiling:
        doc["autoencoder_ceiling"] = summarise(results, settings, CEILING)
    references = [
        s for s in reference_series(settings, model) if any(r["series"] == s for r in rows)
    ]
    if references:
        doc["references"] = {s: summarise(results, settings, s) for s in references}
    dims = next((f.shape[-1] for r in results.values() for f in r.features.values()), None)
    if dims is not None and summaries[0].get("fid_samples", dims) < dims:
        doc["fid_note"] = (
            f"{summaries[0]['fid_samples']} samples for {dims}-d features: the covariances "
            "are singular and FID/KID are indicative only"
        )
    text = json.dumps(doc, indent=1, allow_nan=True)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))

    from ..plot import plot_results, reconstruction_grid

    plot_results([doc], out / "plot.png")
    drawn = [s for s in references if (out / "reconstructions" / s).is_dir()]
    shown = series + ([CEILING] if settings.ceiling else []) + drawn
    labels = ["original"] + [
        f"{s}\n{summary.get('bpp_file', math.nan):.4f} bpp"
        for s, summary in zip(series, summaries, strict=True)
    ]
    labels += [f"{CEILING}\n(ceiling)"] if settings.ceiling else []
    labels += [f"{s}\n(reference)" for s in drawn]
    folders = [out / "reconstructions" / s for s in shown]
    grid = reconstruction_grid(data, folders, ids[: settings.grid_images], columns=labels)
    if grid is not None:
        save_image(grid, out / "grid.png")
    print(format_table(doc))
    return doc


def table_rows(doc: dict) -> dict[str, dict]:
    """``{row name: {column: value}}`` of a results document: each step series, then the
    ceiling and the references."""
    res = doc["results"]
    rows = {
        f"steps={s}": {k: v[i] for k, v in res.items() if isinstance(v, list)}
        for i, s in enumerate(res["steps"])
    }
    if "autoencoder_ceiling" in doc:
        rows[CEILING] = doc["autoencoder_ceiling"]
    rows.update(doc.get("references", {}))
    return rows


# what a printed table shows after the per-image metrics: the scores of a whole series
SERIES_COLUMNS = ("fid", "kid", "miou", "diversity_lpips")


def format_table(doc: dict, columns: list[str] | None = None) -> str:
    """The results as a plain-text table: one line per series, then ceiling and references."""
    columns = columns or ["bpp", "bpp_payload", "bpp_uniform", *table_columns(), *SERIES_COLUMNS]
    rows = table_rows(doc)
    columns = [c for c in columns if any(c in r for r in rows.values())]
    widths = [max(12, len(c) + 1) for c in columns]  # a space before every header
    header = "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    lines = [f"{doc['description']}", f"{'series':<14}" + header]

    def cell(v, w):
        return f"{v:>{w}.4f}" if isinstance(v, float) and v == v else f"{'-':>{w}}"

    for name, row in rows.items():
        value = {**row, "bpp": row.get("bpp", row.get("bpp_file"))}
        cells = (cell(value.get(c), w) for c, w in zip(columns, widths, strict=True))
        lines.append(f"{name:<14}" + "".join(cells))
    return "\n".join(lines)
