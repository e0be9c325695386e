"""The evaluation loop: images → real ``.perco`` files → reconstructions → per-image results.

Every image is compressed to a real file (``bpp_file`` from its bytes, ``bpp_payload``
from its index and caption bits), parsed back and decoded once per step count and
sample. Reconstruction ``k`` of image ``id`` is seeded from ``(seed, id, k)``, images are
sharded across processes without padding and grouped by size, and each finished image is
cached (:mod:`perco.eval.cache`), so results do not depend on the number of processes
and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import codec
from ..data.eval_sets import EvalSet
from ..fingerprint import fingerprint
from ..io import save_image
from ..metrics import hific_patches
from ..metrics.miou import intersections_unions
from ..models.perco import PerCo
from .cache import ImageResult, check_protocol, is_done, write_result
from .codecs import codec_series, get_codec, rate_match
from .metrics import Batch, compute, to_8bit
from .references import CONTROL, jpeg, shuffle_pairs
from .results import CEILING, jpeg_series, protocol, reference_targets, series_name, write_outputs
from .settings import Backbones, EvalSettings

__all__ = ["evaluate", "reconstruction_seed", "LatentCache"]


def reconstruction_seed(seed: int, image_id: str, sample: int) -> int:
    """The sampler seed of reconstruction ``sample`` of ``image_id`` (63 bits)."""
    digest = hashlib.sha256(f"{seed}/{image_id}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class LatentCache(dict):
    """Autoencoder latents of padded evaluation images, keyed by the autoencoder's
    fingerprint, the image id and the padded size: evaluations of several models share
    one, and each image is encoded once per distinct autoencoder."""

    @staticmethod
    def autoencoder_key(model: PerCo) -> str:
        ae = model.autoencoder
        return fingerprint({"autoencoder": ae}, {"class": type(ae).__name__}).hex()[:16]


class _Evaluator:
    """Evaluates batches of same-size images and caches each image's results."""

    def __init__(self, model, data, settings, backbones, out, keep, latent_cache, donors):
        self.model, self.data, self.s, self.b, self.out = model, data, settings, backbones, out
        self.latent_cache = latent_cache if latent_cache is not None else LatentCache()
        self.ae_key = LatentCache.autoencoder_key(model)
        self.keep = keep  # ids whose reconstructions are saved as PNG
        self.donors = donors  # control: {image index: donor index}
        self.file_captions = {}
        self.captioner = None
        # a model trained without captions is given none (captions_for), so needs no source
        if model.config.text and settings.captions == "captioner":
            from ..captioning import load_captioner

            self.captioner = load_captioner(settings.captioner)
        elif model.config.text and settings.captions not in ("ground-truth", "none", "captioner"):
            from ..io import read_captions

            self.file_captions = read_captions(settings.captions)
        self.codecs = None if settings.caption_codec is None else [settings.caption_codec]
        self.classic = [get_codec(name) for name in settings.references]
        self.targets = reference_targets(settings, model)
        self.device = model.device

    def captions_for(self, items: list[dict], images: torch.Tensor) -> list[tuple]:
        """(conditioning caption, ground-truth caption CLIP text–image is scored with) per
        image: the scoring caption is never the conditioning one."""
        if self.captioner is not None:  # made at encode time from the image, as the paper
            from ..io import to_pil

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
        """The registered per-image metrics and mIoU counts of reconstructions ``y``."""
        batch = Batch(x.to(self.device), y.to(self.device), self.b, scored)
        values = compute(batch)
        rows = [{k: float(v[i]) for k, v in values.items()} for i in range(len(x))]
        counts = [None] * len(x)
        if self.b.segmenter is not None and any(lab is not None for lab in labels):
            pred = self.b.segmenter(batch.y).cpu()
            table = self.b.segmenter.class_map(self.data.label_names)
            for i, lab in enumerate(labels):
                if lab is not None:
                    counts[i] = intersections_unions(table[pred[i]], lab)
        return rows, counts

    def latents(self, ids: list[str], images: torch.Tensor) -> torch.Tensor:
        """Autoencoder latents of the padded images, through the shared cache."""
        h, w = images.shape[-2:]
        ph, pw = self.model.padded_size(h, w)
        keys = [(self.ae_key, image_id, ph, pw) for image_id in ids]
        cache = self.latent_cache
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            x = F.pad(images[missing].to(self.device), (0, pw - w, 0, ph - h), mode="replicate")
            with torch.no_grad():
                z = self.model.autoencoder.encode_pixels(x)
            for i, zi in zip(missing, z, strict=True):
                cache[keys[i]] = zi[None]
        return torch.cat([cache[k] for k in keys]).to(self.device)

    def autoencode(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The autoencoder-only ceiling: decode the latents of the (padded) images."""
        with torch.no_grad():
            y = self.model.autoencoder.decode_pixels(latents)
        return y[..., : size[0], : size[1]].cpu()

    def run(self, indices: list[int]) -> None:
        items = [self.data[i] for i in indices]
        x = torch.stack([it["image"] for it in items])
        captions = self.captions_for(items, x)
        scored = [s for _, s in captions]
        labels = [it["labels"] for it in items]
        results = {it["id"]: ImageResult() for it in items}
        if self.b.features is not None:
            for it, f in zip(items, self.features(x), strict=True):
                results[it["id"]].features["real"] = f

        z = self.latents([it["id"] for it in items], x)
        conditioning = [c for c, _ in captions]
        parsed = None
        if self.model.config.local == "quantized":
            rates, decoded, reconstruct, parsed = self._through_files(items, x, z, conditioning)
        else:
            rates, decoded, reconstruct = self._ablation(items, x, z, conditioning)
        record = (items, x, scored, labels, results)
        for steps in self.s.steps:
            series, samples = series_name(steps, self.model), []
            for k in range(self.s.samples):
                y = to_8bit(torch.stack(reconstruct(steps, k)).cpu())
                self._record(series, k, *record, rates, decoded, y=y)
                samples.append(y)
            if len(samples) > 1:
                self._diversity(series, samples, items, results)
        if self.s.ceiling:
            y = to_8bit(self.autoencode(z, x.shape[-2:]))
            self._record(CEILING, 0, *record, None, None, y=y)
        for quality in self.s.jpeg:
            decoded_jpeg, sizes = zip(*(jpeg(image, quality) for image in x), strict=True)
            pixels = x.shape[-2] * x.shape[-1]
            jpeg_rates = [{"bytes": n, "bpp_file": 8 * n / pixels, "bpp_payload": 8 * n / pixels}
                          for n in sizes]  # fmt: skip
            y = torch.stack(decoded_jpeg)
            self._record(jpeg_series(quality), 0, *record, jpeg_rates, [None] * len(items), y=y)
        for classic in self.classic:
            for target in self.targets:
                self._rate_matched(classic, target, record)
        if self.s.control and parsed is not None:
            self._control(indices, parsed, record)
        for it in items:
            write_result(self.out, it["id"], results[it["id"]])

    def _control(self, indices, parsed, record) -> None:
        """Decode each image's file with its donor's indices (see :func:`shuffle_pairs`)."""
        items, x, scored, labels, results = record
        mine = [i for i, index in enumerate(indices) if index in self.donors]
        if not mine:
            return
        swapped = []
        for i in mine:  # the donor's indices, as its own file would carry them
            donor = self.data[self.donors[indices[i]]]
            image = donor["image"][None].to(self.device)
            z = self.latents([donor["id"]], image)
            coded = self.model.encode(image, latents=z).indices[0].cpu().numpy()
            swapped.append(replace(parsed[i], indices=coded))
        y = to_8bit(torch.stack(codec.decompress(
            self.model, swapped, batch_size=self.s.batch_size,
            **self._decode_options(self.s.steps[0]),
        )).cpu())  # fmt: skip
        self._record(CONTROL, 0, *_subset(record, mine), None, None, y=y)

    def _rate_matched(self, classic, target: float, record) -> None:
        """A classic codec's files rate-matched to ``target`` bpp: the images it reaches
        are decoded and measured; the others get a row that says so, with the smallest bpp
        the codec reaches for them."""
        items, x, _, _, results = record
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            matches = list(pool.map(lambda image: rate_match(classic, image, target), x))
        series = codec_series(classic.name, target)
        reached = [i for i, m in enumerate(matches) if m.reached]
        for i, m in enumerate(matches):
            if not m.reached:
                results[items[i]["id"]].rows.append({
                    "id": items[i]["id"], "series": series, "sample": 0,
                    "height": x.shape[-2], "width": x.shape[-1], "target_bpp": target,
                    "cannot_reach": True, "min_bpp": m.bpp, "quality": m.quality,
                })  # fmt: skip
        if reached:
            y = torch.stack([classic.decode(matches[i].data) for i in reached])
            rates = [{"bytes": len(m.data), "bpp_file": m.bpp, "bpp_payload": m.bpp,
                      "target_bpp": target, "quality": m.quality}
                     for m in (matches[i] for i in reached)]  # fmt: skip
            sub = _subset(record, reached)
            self._record(series, 0, *sub, rates, [None] * len(reached), y=y)

    def _decode_options(self, steps) -> dict:
        return {
            "steps": steps,
            "guidance": self.s.guidance,
            "guidance_scale": self.s.guidance_scale,
            "timestep_spacing": self.s.timestep_spacing,
        }

    def _through_files(self, items, x, z, conditioning):
        """Real ``.perco`` files: (rates, the captions the files carry, reconstruct, the
        parsed files)."""
        files = codec.compress(
            self.model, x.to(self.device), conditioning, latents=z, caption_codecs=self.codecs
        )
        parsed = [codec.parse(self.model, data)[0] for data, _ in files]
        rates = [
            {"bytes": b.file_bytes, "bpp_file": b.bpp_file, "bpp_payload": b.bpp_payload,
             "caption_bits": b.caption_bits, "caption_codec": b.caption_codec,
             # a learned prior: also what PerCo's uniform coding of the same indices costs
             **({"bpp_uniform": b.bpp_uniform, "index_bits": b.index_bits}
                if b.index_coding != "uniform" else {})}
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

        return rates, [p.caption for p in parsed], reconstruct, parsed

    def _ablation(self, items, x, z, conditioning):
        """An ablation without a bitstream (``local`` continuous or none), decoded from its
        encoding: the text-only model's rate is its caption's, the other's not applicable."""
        from ..captioning import text_codec

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

    def _record(self, series, k, items, x, scored, labels, results, rates, captions, *, y):
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


def _subset(record: tuple, keep: list[int]) -> tuple:
    """A batch's ``(items, x, scored, labels, results)`` for the images at ``keep``."""
    items, x, scored, labels, results = record
    return ([items[i] for i in keep], x[keep], [scored[i] for i in keep],
            [labels[i] for i in keep], results)  # fmt: skip


def evaluate(
    model: PerCo,
    data: EvalSet,
    settings: EvalSettings,
    backbones: Backbones,
    out_dir: str | os.PathLike,
    name: str = "perco",
    latent_cache: LatentCache | None = None,
) -> dict | None:
    """Run (or resume) an evaluation; the main process returns the results document.

    ``latent_cache``: a :class:`LatentCache` shared by several evaluations (e.g. the
    rungs of one family), so each image is encoded once per autoencoder.
    """
    from accelerate import PartialState
    from tqdm import tqdm

    state = PartialState()
    out = Path(out_dir)
    proto = protocol(model, data, settings, backbones)
    check_protocol(out, proto, state)

    ids = [it.id for it in data.items]
    keep = set(ids) if settings.save_reconstructions else set(ids[: settings.grid_images])
    pending = [i for i, image_id in enumerate(ids) if not is_done(out, image_id)]
    mine = pending[state.process_index :: state.num_processes]  # no padding duplicates
    groups = defaultdict(list)
    for i in mine:
        groups[data.image_size(i)].append(i)
    donors = {}
    if settings.control:
        sizes = [data.image_size(i) for i in range(len(ids))]
        donors = dict(shuffle_pairs(sizes, settings.seed))

    evaluator = _Evaluator(model, data, settings, backbones, out, keep, latent_cache, donors)
    bar = tqdm(total=len(mine), desc="perco-eval", unit="img", disable=not state.is_main_process)
    for indices in groups.values():
        for start in range(0, len(indices), settings.batch_size):
            chunk = indices[start : start + settings.batch_size]
            evaluator.run(chunk)
            bar.update(len(chunk))
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return write_outputs(out, data, settings, proto, name, model)
