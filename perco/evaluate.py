"""``perco-eval``: dataset → real bitstreams → reconstructions → per-image CSV + results JSON.

    perco-eval checkpoint=runs/tiny_taef2 rate=r0.0019 dataset=kodak metrics=offline
    accelerate launch --multi_gpu --num_processes 8 -m perco.evaluate \
        checkpoint=runs/paper rate=r0.0019 dataset=coco30k
    perco-eval -m checkpoint=runs/paper 'rate=glob(*)' dataset=coco30k  # one job per rung

Every image is compressed to a real ``.perco`` file (``bpp_file`` from its bytes,
``bpp_payload`` from its index and caption bits), parsed back and decoded once per step
count and sample. Reconstruction ``k`` of image ``id`` is seeded from ``(seed, id, k)``,
images are sharded across processes without padding and grouped by size, and
dataset-level scores (FID/KID, mIoU) are computed from per-image cached features and
counts in image order, so results do not depend on the number of processes. Per-image
results are cached under ``<out>/cache``; a rerun skips finished images.

Outputs in ``<output_dir>/<rate>/``: ``per_image.csv``, ``results.json`` (CompressAI's
``{name, description, results: {bpp: [...], ...}}`` plus the protocol), ``plot.png``,
``grid.png`` and, optionally, every reconstruction as PNG.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import codec
from .data.eval_sets import EvalSet
from .io import atomic_write, save_image
from .metrics import LPIPSDistance, colour_stats, fid_kid, hific_patches, ms_ssim, psnr
from .metrics.miou import intersections_unions, mean_iou
from .models.perco import PerCo

__all__ = ["EvalSettings", "Backbones", "evaluate", "reconstruction_seed", "main"]

log = logging.getLogger("perco.eval")

CEILING = "autoencoder"
PER_IMAGE_METRICS = (
    "psnr",
    "ms_ssim",
    "lpips",
    "clip_text",
    "clip_image",
    "delta_e2000",
    "mean_shift_r",
    "mean_shift_g",
    "mean_shift_b",
    "std_shift_r",
    "std_shift_g",
    "std_shift_b",
    "diversity_lpips",
)


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
    ceiling: bool = True
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

    def describe(self) -> dict:
        def name(m):
            return None if m is None else getattr(m, "name", type(m).__name__)

        return {
            "lpips": f"lpips v0.1 {self.lpips.net}",
            "fid_features": name(self.features),
            "clip": name(self.clip),
            "segmenter": name(self.segmenter),
        }


def reconstruction_seed(seed: int, image_id: str, sample: int) -> int:
    """The sampler seed of reconstruction ``sample`` of ``image_id`` (63 bits)."""
    digest = hashlib.sha256(f"{seed}/{image_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _series(steps: int | None, model: PerCo) -> str:
    return f"steps={steps or model.default_steps}"


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """What a saved 8-bit PNG holds: every metric sees exactly that."""
    return images.clamp(0, 1).mul(255).round().div(255)


@dataclass
class _ImageResult:
    """One image's rows (one per series and sample), FID features and mIoU counts."""

    rows: list[dict] = field(default_factory=list)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    segmentation: dict[str, dict] = field(default_factory=dict)


class _Evaluator:
    """Evaluates batches of same-size images and caches each image's results."""

    def __init__(self, model, data, settings, backbones, out, keep: set[str], latent_cache=None):
        self.model, self.data, self.s, self.b, self.out = model, data, settings, backbones, out
        self.latent_cache = latent_cache
        self.keep = keep  # ids whose reconstructions are saved as PNG
        self.file_captions = {}
        self.captioner = None
        # a model trained without captions is given none (captions_for), so needs no source
        if model.config.text and settings.captions == "captioner":
            from .captioning import load_captioner

            self.captioner = load_captioner(settings.captioner)
        elif model.config.text and settings.captions not in ("ground-truth", "none", "captioner"):
            from .io import read_captions

            self.file_captions = read_captions(settings.captions)
        self.codecs = None if settings.caption_codec is None else [settings.caption_codec]
        self.device = model.device

    def captions_for(self, items: list[dict], images: torch.Tensor) -> list[tuple]:
        """(conditioning caption, ground-truth caption CLIP text–image is scored with) per
        image: the scoring caption is never the conditioning one."""
        if self.captioner is not None:  # made at encode time from the image, as the paper
            from .io import to_pil

            made = self.captioner([to_pil(x) for x in images], [it["id"] for it in items])
        out = []
        for i, item in enumerate(items):
            gt = item["captions"]
            if self.s.captions == "none" or not self.model.config.text:
                out.append((None, gt[0] if gt else None))
            elif self.s.captions == "ground-truth":
                out.append(((gt[0] if gt else None), (gt[1] if len(gt) > 1 else None)))
            else:
                caption = made[i] if self.captioner else self.file_captions.get(item["id"])
                caption = caption or None
                out.append((caption, next((c for c in gt if c != caption), None)))
        return out

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """FID features per image: one vector, or one per HiFiC patch."""
        if self.s.fid_variant == "patches":
            per = hific_patches(images[:1], self.s.patch_size).shape[0]
            images = hific_patches(images, self.s.patch_size)
        else:
            per = 1
        return list(self.b.features(images.to(self.device)).float().cpu().split(per))

    def measure(self, x, y, scored, labels) -> tuple[list[dict], list]:
        """Per-image metrics and mIoU counts of reconstructions ``y`` of ``x``."""
        x, y = x.to(self.device), y.to(self.device)
        values = {"psnr": psnr(x, y), "ms_ssim": ms_ssim(x, y), "lpips": self.b.lpips(x, y)}
        values.update(colour_stats(x, y))
        if self.b.clip is not None:
            values["clip_image"] = self.b.clip.image_image(x, y)
            text = torch.full((len(x),), float("nan"))
            idx = [i for i, c in enumerate(scored) if c]
            if idx:
                text[idx] = self.b.clip.text_image(y[idx], [scored[i] for i in idx]).cpu()
            values["clip_text"] = text
        rows = [{k: float(v[i]) for k, v in values.items()} for i in range(len(x))]
        counts = [None] * len(x)
        if self.b.segmenter is not None and any(lab is not None for lab in labels):
            pred = self.b.segmenter(y).cpu()
            table = self.b.segmenter.class_map(self.data.label_names)
            for i, lab in enumerate(labels):
                if lab is not None:
                    counts[i] = intersections_unions(table[pred[i]], lab)
        return rows, counts

    def latents(self, ids: list[str], images: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents of the padded images, through the shared cache if any."""
        h, w = images.shape[-2:]
        ph, pw = self.model.padded_size(h, w)
        keys = [(image_id, ph, pw) for image_id in ids]
        cache = self.latent_cache if self.latent_cache is not None else {}
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            x = F.pad(images[missing].to(self.device), (0, pw - w, 0, ph - h), mode="replicate")
            with torch.no_grad():
                z = self.model.autoencoder.encode(x * 2 - 1)
            for i, zi in zip(missing, z, strict=True):
                cache[keys[i]] = zi[None]
        return torch.cat([cache[k] for k in keys]).to(self.device)

    def autoencode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The autoencoder-only ceiling: decode the latents of the (padded) images."""
        with torch.no_grad():
            y = (self.model.autoencoder.decode(latents).float() + 1) / 2
        return y[..., : size[0], : size[1]].cpu()

    def run(self, items: list[dict]) -> None:
        x = torch.stack([it["image"] for it in items])
        captions = self.captions_for(items, x)
        scored = [s for _, s in captions]
        labels = [it["labels"] for it in items]
        results = {it["id"]: _ImageResult() for it in items}
        if self.b.features is not None:
            for it, f in zip(items, self.features(x), strict=True):
                results[it["id"]].features["real"] = f

        z = self.latents([it["id"] for it in items], x)
        conditioning = [c for c, _ in captions]
        if self.model.config.local == "quantized":
            rates, decoded, reconstruct = self._through_files(items, x, z, conditioning)
        else:
            rates, decoded, reconstruct = self._ablation(items, x, z, conditioning)
        for steps in self.s.steps:
            series, samples = _series(steps, self.model), []
            for k in range(self.s.samples):
                y = _quantize(torch.stack(reconstruct(steps, k)).cpu())
                self._record(series, k, items, x, y, scored, labels, results, rates, decoded)
                samples.append(y)
            if len(samples) > 1:
                self._diversity(series, samples, items, results)
        if self.s.ceiling:
            y = _quantize(self.autoencode(z, x.shape[-2:]))
            self._record(CEILING, 0, items, x, y, scored, labels, results, None, None)
        for it in items:
            self._write_cache(it["id"], results[it["id"]])

    def _decode_options(self, steps) -> dict:
        return {
            "steps": steps,
            "guidance": self.s.guidance,
            "guidance_scale": self.s.guidance_scale,
            "timestep_spacing": self.s.timestep_spacing,
        }

    def _through_files(self, items, x, z, conditioning):
        """Real ``.perco`` files: (rates, the captions the files carry, reconstruct)."""
        files = codec.compress(
            self.model, x.to(self.device), conditioning, latents=z, caption_codecs=self.codecs
        )
        parsed = [codec.parse(self.model, data)[0] for data, _ in files]
        rates = [
            {"bytes": b.file_bytes, "bpp_file": b.bpp_file, "bpp_payload": b.bpp_payload,
             "caption_bits": b.caption_bits, "caption_codec": b.caption_codec}
            for _, b in files
        ]  # fmt: skip

        def reconstruct(steps, k):
            seeded = [
                replace(p, seed=reconstruction_seed(self.s.seed, it["id"], k))
                for p, it in zip(parsed, items, strict=True)
            ]
            return codec.decompress(
                self.model, seeded, batch_size=self.s.batch_size, **self._decode_options(steps)
            )

        return rates, [p.caption for p in parsed], reconstruct

    def _ablation(self, items, x, z, conditioning):
        """An ablation without a bitstream (``local`` continuous or none), decoded from its
        encoding: the text-only model's rate is its caption's, the other's not applicable."""
        from .captioning import text_codec

        encoded = self.model.encode(x.to(self.device), conditioning, latents=z)
        pixels = x.shape[-2] * x.shape[-1]
        codecs = text_codec.caption_codecs(self.model.tokenizer, self.codecs)
        rates = []
        for caption in conditioning:
            rate = {"bytes": math.nan, "bpp_file": math.nan, "bpp_payload": math.nan}
            if self.model.config.local == "none":
                codec_id, data = text_codec.encode_caption(caption, codecs)
                name = text_codec.CODEC_NAMES.get(codec_id, str(codec_id))
                rate.update(bpp_payload=8 * len(data) / pixels, caption_bits=8 * len(data),
                            caption_codec=name)  # fmt: skip
            rates.append(rate)

        def reconstruct(steps, k):
            seeds = [reconstruction_seed(self.s.seed, it["id"], k) for it in items]
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            return self.model.decode(encoded, generator=generators, **self._decode_options(steps))

        return rates, conditioning, reconstruct

    def _record(self, series, k, items, x, y, scored, labels, results, rates, captions):
        metrics, counts = self.measure(x, y, scored, labels)
        fake = self.features(y) if self.b.features is not None else None
        for i, it in enumerate(items):
            result = results[it["id"]]
            row = {"id": it["id"], "series": series, "sample": k, "height": x.shape[-2],
                   "width": x.shape[-1]}  # fmt: skip
            if rates is not None:
                row.update(rates[i], caption=str(captions[i] or ""))
            row.update(metrics[i])
            result.rows.append(row)
            if fake is not None:
                result.features[f"{series}/{k}"] = fake[i]
            if counts[i] is not None:
                result.segmentation[f"{series}/{k}"] = counts[i]
            if it["id"] in self.keep:
                save_image(y[i], self.out / "reconstructions" / series / f"{it['id']}_{k}.png")

    def _diversity(self, series, samples, items, results) -> None:
        """Mean pairwise LPIPS between an image's samples (paper Fig. 6), on its rows."""
        pairs = list(combinations(range(len(samples)), 2))
        d = [self.b.lpips(samples[a].to(self.device), samples[b].to(self.device)) for a, b in pairs]
        total = (sum(d) / len(pairs)).cpu()
        for i, it in enumerate(items):
            for row in results[it["id"]].rows:
                if row["series"] == series:
                    row["diversity_lpips"] = float(total[i])

    def _write_cache(self, image_id: str, result: _ImageResult) -> None:
        """Features first, the JSON last: a JSON file marks a finished image."""
        cache = self.out / "cache"
        if result.features:
            tensors = {k: v.contiguous() for k, v in result.features.items()}
            atomic_write(cache / f"{image_id}.safetensors", lambda tmp: save_file(tensors, tmp))
        doc = json.dumps({"rows": result.rows, "segmentation": result.segmentation})
        atomic_write(cache / f"{image_id}.json", lambda tmp: Path(tmp).write_text(doc))


def _load_cache(out: Path, image_id: str) -> _ImageResult:
    doc = json.loads((out / "cache" / f"{image_id}.json").read_text())
    features = out / "cache" / f"{image_id}.safetensors"
    segmentation = {
        series: {int(c): v for c, v in counts.items()}
        for series, counts in doc["segmentation"].items()
    }
    return _ImageResult(
        doc["rows"], load_file(features) if features.is_file() else {}, segmentation
    )


# -- the run ------------------------------------------------------------------------------
def protocol(model: PerCo, data: EvalSet, settings: EvalSettings, backbones: Backbones) -> dict:
    """Everything a results table must state (DESIGN: evaluation protocol)."""
    sched = model.sampler(settings.timestep_spacing).config
    return {
        **data.describe(),
        "rate": model.rate.name,
        **({"ablation": ABLATIONS[model.config.local]} if model.config.local in ABLATIONS else {}),
        "model_fingerprint": model.fingerprint.hex(),
        "scheduler": f"{type(model.scheduler).__name__} ({sched.prediction_type}, "
        f"{sched.timestep_spacing} spacing)",
        "steps": [s or model.default_steps for s in settings.steps],
        "guidance": settings.guidance or model.config.guidance,
        "guidance_scale": model.config.guidance_scale
        if settings.guidance_scale is None
        else settings.guidance_scale,
        "captions": _caption_source(settings),
        "caption_codec": settings.caption_codec or "the shortest that applies (per file)",
        "clip_text_caption": "a ground-truth caption other than the conditioning one",
        "seed": settings.seed,
        "seeding": "sha256(seed/image id/sample index)",
        "samples_per_image": settings.samples,
        "fid_variant": f"patches {settings.patch_size}px, HiFiC grid + half-shifted grid"
        if settings.fid_variant == "patches"
        else "whole image",
        "kid_subset_size_max": settings.kid_subset_size,
        "autoencoder_ceiling": settings.ceiling,
        **backbones.describe(),
        "metrics_on": "8-bit reconstructions (as saved to PNG)",
    }


def _caption_source(settings: EvalSettings) -> str:
    if settings.captions == "captioner":
        return f"captioner {settings.captioner}, at encode time"
    if settings.captions in ("ground-truth", "none"):
        return settings.captions
    return f"file {settings.captions}"


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
    return out


def evaluate(
    model: PerCo,
    data: EvalSet,
    settings: EvalSettings,
    backbones: Backbones,
    out_dir: str | os.PathLike,
    name: str = "perco",
    latent_cache: dict | None = None,
) -> dict | None:
    """Run (or resume) an evaluation; the main process returns the results document.

    ``latent_cache``: a dict shared by evaluations of models with the *same*
    autoencoder (e.g. the rungs of one family), so each image is encoded once.
    """
    from accelerate import PartialState
    from tqdm import tqdm

    state = PartialState()
    out = Path(out_dir)
    proto = protocol(model, data, settings, backbones)
    _check_cache(out, proto, state)

    ids = [it.id for it in data.items]
    keep = set(ids) if settings.save_reconstructions else set(ids[: settings.grid_images])
    pending = [
        i for i, image_id in enumerate(ids) if not (out / "cache" / f"{image_id}.json").is_file()
    ]
    mine = pending[state.process_index :: state.num_processes]  # no padding duplicates
    groups = defaultdict(list)
    for i in mine:
        groups[data.image_size(i)].append(i)

    evaluator = _Evaluator(model, data, settings, backbones, out, keep, latent_cache)
    bar = tqdm(total=len(mine), desc="perco-eval", unit="img", disable=not state.is_main_process)
    for indices in groups.values():
        for start in range(0, len(indices), settings.batch_size):
            chunk = indices[start : start + settings.batch_size]
            evaluator.run([data[i] for i in chunk])
            bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return _write_outputs(out, data, settings, proto, name, model)


def _check_cache(out: Path, proto: dict, state) -> None:
    """A cache made under another protocol would mix results: refuse to resume it."""
    path = out / "cache" / "protocol.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        changed = sorted(k for k in set(cached) | set(proto) if cached.get(k) != proto.get(k))
        if changed:
            raise ValueError(
                f"{out}/cache was made with different settings ({', '.join(changed)}); "
                "use another output_dir or delete it"
            )
    elif state.is_main_process:
        text = json.dumps(proto, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    state.wait_for_everyone()


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def summarise(results: dict[str, _ImageResult], settings: EvalSettings, series: str) -> dict:
    """Dataset-level numbers of one series, from per-image results in image order."""
    rows = [r for res in results.values() for r in res.rows if r["series"] == series]
    out = {"images": len({r["id"] for r in rows}), "reconstructions": len(rows)}
    for key in ("bpp_file", "bpp_payload", "bytes", "caption_bits", *PER_IMAGE_METRICS):
        if any(key in r for r in rows):
            out[key] = _mean([r.get(key) for r in rows])
    fakes = [
        f for res in results.values() for k, f in res.features.items() if k.startswith(series + "/")
    ]
    if fakes:
        real = torch.cat([res.features["real"] for res in results.values()])
        scores = fid_kid(real, torch.cat(fakes), settings.kid_subset_size, seed=settings.seed)
        out.update(scores)
    counts = [
        c
        for res in results.values()
        for k, c in res.segmentation.items()
        if k.startswith(series + "/")
    ]
    if counts:
        out["miou"] = mean_iou(counts)
    return out


def _write_outputs(out, data, settings, proto, name, model) -> dict:
    ids = [it.id for it in data.items]
    results = {image_id: _load_cache(out, image_id) for image_id in ids}
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
    dims = next((f.shape[-1] for r in results.values() for f in r.features.values()), None)
    if dims is not None and summaries[0].get("fid_samples", dims) < dims:
        doc["fid_note"] = (
            f"{summaries[0]['fid_samples']} samples for {dims}-d features: the covariances "
            "are singular and FID/KID are indicative only"
        )
    text = json.dumps(doc, indent=1, allow_nan=True)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))

    from .plot import plot_results, reconstruction_grid

    plot_results([doc], out / "plot.png", reference=data.name)
    columns = ["original"] + [
        f"{name}\n{summary.get('bpp_file', math.nan):.4f} bpp"
        for name, summary in zip(series, summaries, strict=True)
    ]
    columns += [f"{CEILING}\n(ceiling)"] if settings.ceiling else []
    grid = reconstruction_grid(data, out, series + ([CEILING] if settings.ceiling else []),
                               ids[: settings.grid_images], columns=columns)  # fmt: skip
    if grid is not None:
        save_image(grid, out / "grid.png")
    print(format_table(doc))
    return doc


def format_table(doc: dict) -> str:
    """The results as a plain-text table: one line per series, ceiling last."""
    cols = ["bpp", "bpp_payload", "psnr", "ms_ssim", "lpips", "delta_e2000", "clip_text",
            "clip_image", "fid", "kid", "miou", "diversity_lpips"]  # fmt: skip
    res = doc["results"]
    cols = [c for c in cols if c in res or c in doc.get("autoencoder_ceiling", {})]
    lines = [f"{doc['description']}", f"{'series':<14}" + "".join(f"{c:>12}" for c in cols)]

    def cell(v):
        return f"{v:>12.4f}" if isinstance(v, float) and v == v else f"{'-':>12}"

    for i, steps in enumerate(res["steps"]):
        lines.append(
            f"{f'steps={steps}':<14}" + "".join(cell(res.get(c, [None] * 99)[i]) for c in cols)
        )
    if "autoencoder_ceiling" in doc:
        ceiling = doc["autoencoder_ceiling"]
        lines.append(f"{CEILING:<14}" + "".join(cell(ceiling.get(c)) for c in cols))
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------
class BackboneUnavailable(RuntimeError):
    """A metric's pretrained network could not be loaded (said in one line)."""


def _backbone(what: str, load):
    try:
        return load()
    except Exception as e:  # offline, missing file, unknown name: one line, not a traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BackboneUnavailable(
            f"cannot load the {what} ({type(e).__name__}: {reason[:200]}); without network "
            "access use metrics=offline (the assets' LPIPS and AlexNet weights)"
        ) from e


def load_backbones(cfg, device) -> Backbones:
    """Backbones from a ``metrics`` config (see configs/metrics/)."""
    from .metrics.fid_kid import load_extractor

    lpips = _backbone(
        f"LPIPS {cfg.lpips.net} backbone", lambda: LPIPSDistance(cfg.lpips.net, cfg.lpips.backbone)
    )
    features = None
    if cfg.get("features"):
        features = _backbone(
            f"FID feature network ({cfg.features.name})",
            lambda: load_extractor(cfg.features.name, cfg.features.get("weights")),
        )
    clip = segmenter = None
    if cfg.get("clip"):
        from .metrics.clip_score import ClipScorer

        clip = _backbone(
            f"CLIP model {cfg.clip.model}/{cfg.clip.pretrained}",
            lambda: ClipScorer.from_pretrained(cfg.clip.model, cfg.clip.pretrained),
        )
    if cfg.get("segmenter"):
        from .metrics.miou import Segmenter

        segmenter = _backbone(
            f"segmenter {cfg.segmenter}", lambda: Segmenter.from_pretrained(cfg.segmenter)
        )
    backbones = Backbones(lpips, features, clip, segmenter)
    for module in (lpips, features, clip, segmenter):
        if module is not None:
            module.to(device)
    return backbones


def run(cfg) -> dict | None:
    """Everything ``perco-eval`` does, from a resolved config."""
    from accelerate import PartialState

    from .cli._common import load_model
    from .data.eval_sets import load_eval_set

    state = PartialState()
    device = torch.device(cfg.device) if cfg.device else state.device
    ds = cfg.dataset
    data = load_eval_set(
        ds.kind, ds.root, name=ds.name, captions=ds.captions, transform=ds.transform,
        size=ds.size, limit=cfg.eval.limit,
    )  # fmt: skip
    rate = cfg.rate.name if cfg.get("rate") else None
    model = load_model(str(cfg.checkpoint), rate).to(device)
    settings = EvalSettings(
        samples=cfg.eval.samples,
        steps=list(cfg.eval.steps),
        guidance=cfg.eval.guidance,
        guidance_scale=cfg.eval.guidance_scale,
        timestep_spacing=cfg.eval.get("timestep_spacing"),
        captions=str(cfg.eval.captions),
        captioner=str(cfg.eval.get("captioner", "blip2")),
        caption_codec=cfg.eval.get("caption_codec"),
        seed=cfg.eval.seed,
        ceiling=cfg.eval.ceiling,
        batch_size=cfg.eval.batch_size,
        fid_variant=ds.fid_variant,
        patch_size=cfg.metrics.patch_size,
        kid_subset_size=cfg.metrics.kid_subset_size,
        save_reconstructions=cfg.eval.save_reconstructions,
        grid_images=cfg.eval.grid_images,
    )
    backbones = load_backbones(cfg.metrics, device)
    out = Path(cfg.output_dir) / model.rate.name
    return evaluate(model, data, settings, backbones, out, name=cfg.name)


def main() -> None:
    import sys

    import hydra

    from . import CONFIG_DIR

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
    def _main(cfg) -> None:
        try:
            run(cfg)
        except (FileNotFoundError, ValueError, KeyError, BackboneUnavailable) as e:
            print(f"perco-eval: error: {e}", file=sys.stderr)
            sys.exit(1)

    _main()


if __name__ == "__main__":
    main()
