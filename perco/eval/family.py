"""Several rungs of one model family in one run: one table, shared latents, references once.

``perco-eval checkpoint=RUNS rates=[r0.0019,r0.0098,r0.1250]`` evaluates each rung into
``<output_dir>/<rate>/`` as a single-rung run would, sharing the images' autoencoder
latents between rungs with the same autoencoder. The reference rows are measured once:
the autoencoder ceiling and JPEG with the first rung, the shuffled-index control with the
last (top) rung. It then writes ``summary.md`` and ``summary.json`` (one row per rung and
reference, per-image encode and decode times) and ``grid.png`` (the original, each rung,
the references) in ``<output_dir>``; ``perco-eval preset=tiny_taef2`` is the small real
model's table in the README.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..io import atomic_write, save_image
from ..models.perco import PerCo
from ..timing import OtherLoad, machine_load, repeat
from .bd import INTERPOLATION, bd_rate
from .codecs import codec_label, rate_matched
from .metrics import table_columns
from .references import CONTROL
from .results import SERIES_COLUMNS, jpeg_series
from .runner import LatentCache, evaluate
from .settings import Backbones, EvalSettings

__all__ = ["evaluate_family", "time_codec", "timing_table", "markdown_table"]


def time_codec(
    model: PerCo, image: torch.Tensor, steps: list[int | None], repeats: int, label: str
) -> dict[str, dict]:
    """Encode and decode one image: median (fastest–slowest) of ``repeats`` runs after a
    warm-up, and the U-Net calls of one decode; a row per step count (``label`` with the
    count where there are several), with and without CFG for a model that has text to
    guide with (a one-step student has no guidance pass)."""
    from ..timing import CallCounter

    with torch.no_grad():
        encoded = model.encode(image)
        encode = repeat(lambda: model.encode(image), repeats)
        guided = model.config.text and model.config.sampler != "one-step"
        modes = ("none", "text") if guided else (None,)
        rows = {}
        for n in steps:
            for guidance in modes:
                row = f"{label} ({_steps(n or model.default_steps)})"
                row += f", cfg {guidance}" if len(modes) > 1 else ""

                def decode(n=n, guidance=guidance):
                    return model.decode(encoded, steps=n, guidance=guidance)

                counter = CallCounter(model.denoiser)
                decode()
                counter.remove()
                rows[row] = {"encode s": encode, "decode s": repeat(decode, repeats),
                             "U-Net calls": counter.calls}  # fmt: skip
    return rows


def markdown_table(rows: dict[str, dict], columns: list[str]) -> str:
    """One markdown row per entry of ``rows``, ``-`` where a value is missing."""
    lines = ["| row | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_family(
    models: dict[str, PerCo],
    data,
    settings: EvalSettings,
    backbones: Backbones,
    out_dir: str | Path,
    name: str,
    timing_repeats: int = 0,
    compare: dict[str, dict[str, PerCo]] | None = None,
) -> dict | None:
    """Evaluate ``models`` (``{rate: model}``, lowest rung first) and write the family's
    summary; the main process returns it.

    ``compare``: other families at the same rungs (``{label: {rate: model}}``, e.g. the
    one-step students of ``models``), each into ``<out_dir>/<label>/<rate>/`` and a row
    per rung beside the family's, decoded as each was saved to (its own steps, guidance
    and spacing; the references are measured once, with ``models``)."""
    from accelerate import PartialState

    state = PartialState()
    loaded = machine_load()  # before this run loads the machine; replaced where measurable
    start = time.perf_counter()
    out, cache, docs = Path(out_dir), LatentCache(), {}
    rates = list(models)
    for i, (rate, model) in enumerate(models.items()):
        rung = replace(
            settings,
            ceiling=settings.ceiling and i == 0,
            jpeg=list(settings.jpeg) if i == 0 else [],
            # each rung its own target, or the settings' targets once
            references=settings.references if settings.reference_bpp is None or i == 0 else [],
            control=settings.control and i == len(models) - 1,
        )
        docs[rate] = evaluate(model, data, rung, backbones, out / rate, name, cache)
    compare = compare or {}
    as_saved = replace(settings, steps=[None], guidance=None, guidance_scale=None,
                       timestep_spacing=None, ceiling=False, jpeg=[], references=[],
                       control=False)  # fmt: skip
    compared = {label: {rate: evaluate(model, data, as_saved, backbones, out / label / rate,
                                       label, cache) for rate, model in family.items()}
                for label, family in compare.items()}  # fmt: skip
    if not state.is_main_process:
        return None
    eval_s = time.perf_counter() - start

    steps = docs[rates[0]]["results"]["steps"][0]
    rows = {}
    for rate in rates:  # per rung: a row per step count, then each compared family's
        res = docs[rate]["results"]
        for i, n in enumerate(res["steps"]):
            label = f"{name} {rate}" + (f" ({_steps(n)})" if len(res["steps"]) > 1 else "")
            rows[label] = {k: v[i] for k, v in res.items()}
        for label, family_docs in compared.items():
            res = family_docs[rate]["results"]
            rows[f"{label} {rate} ({_steps(res['steps'][0])})"] = {k: v[0] for k, v in res.items()}
    first, top = docs[rates[0]], docs[rates[-1]]
    if "autoencoder_ceiling" in first:
        rows["autoencoder alone (ceiling)"] = first["autoencoder_ceiling"]
    for q in settings.jpeg:
        rows[f"JPEG quality {q} (Pillow)"] = first["references"][jpeg_series(q)]
    for rate in rates:
        for codec, target, _, row in rate_matched(docs[rate]):
            rows[codec_row_label(codec, target, row, len(data))] = row
    control = top.get("references", {}).get(CONTROL)
    if control:  # (an image alone in its size has no donor: no control without a pair)
        rows[f"control: {rates[-1]} from shuffled z_l ({control['images']} images)"] = control
    columns = ["bpp_file", "bpp_payload", "bpp_uniform", *table_columns(), *SERIES_COLUMNS]
    columns = [c for c in columns if any(isinstance(r.get(c), float) for r in rows.values())]

    image = data[0]["image"][None]
    timing, others = {}, OtherLoad()
    if timing_repeats:
        with others:
            for rate, model in models.items():
                timed = {(name, model): list(settings.steps)}
                timed.update({(label, family[rate]): [None] for label, family in compare.items()})
                timing[rate] = {}
                for (label, m), counts in timed.items():
                    timing[rate].update(time_codec(m, image.to(m.device), counts,
                                                   timing_repeats, f"{label} {rate}"))  # fmt: skip
    if others.cores is not None:  # measured during the timing itself, not before the run
        loaded = others.warning()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    first_model = models[rates[0]]
    lines = [
        f"{data.name} ({len(data)} images, {first['protocol']['transform']}), "
        f"steps {', '.join(map(str, first['results']['steps']))}, "
        f"guidance {first['protocol']['guidance']}",
        "",
        markdown_table(rows, columns),
    ]
    if timing:
        h, w = image.shape[-2:]
        threads = f"{torch.get_num_threads()} CPU threads" if first_model.device.type == "cpu" \
            else str(first_model.device)  # fmt: skip
        lines += ["", f"time per {w}×{h} image on {threads}: median (fastest–slowest) of "
                  f"{timing_repeats} runs after a warm-up"]  # fmt: skip
        if loaded:
            lines.append(f"warning: {loaded}; these times are not the machine's own")
        lines += timing_table(timing)
    lines += ["", f"evaluation wall-clock {eval_s / 60:.1f} min; peak memory {peak:.2f} GB"]
    bd = {}
    if settings.bd_anchor:
        bd = bd_rates(docs, rates, settings.bd_anchor, [c for c in columns if c.startswith(
            ("lpips", "dists", "psnr", "ms_ssim"))])  # fmt: skip
        lines += ["", *bd_lines(bd, settings.bd_anchor)]
    departures = sorted({d for doc in docs.values() for d in doc["departures_from_paper"]})
    if departures:
        lines += ["", "departures from the paper's protocol:", *(f"- {d}" for d in departures)]

    grid = _grid(data, out, docs, rates, settings, steps, compared)
    if grid is not None:
        save_image(grid, out / "grid.png")
        lines.append(f"\ngrid: {out / 'grid.png'} (rows: images; columns: original, "
                     f"{', '.join(rates)}{' and the compared at each' if compared else ''}, "
                     f"the codecs at {rates[-1]}"
                     f"{', control' if control else ''})")  # fmt: skip
    text = "\n".join(lines) + "\n"
    summary = {
        "name": name,
        "rates": rates,
        "rows": rows,
        **({"bd_rate": bd} if bd else {}),
        "timing": {
            rate: {row: {k: str(v) for k, v in t.items()} for row, t in rows.items()}
            for rate, rows in timing.items()
        },  # fmt: skip
        "compared": {
            label: {rate: str(out / label / rate / "results.json") for rate in rates}
            for label in compared
        },  # fmt: skip
        "machine_load": loaded,
        "other_processes_cores_while_timing": others.cores,
        "evaluation_s": eval_s,
        "peak_memory_gb": peak,
        "results": {rate: str(out / rate / "results.json") for rate in rates},
    }
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    doc = json.dumps(summary, indent=1, allow_nan=True)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(doc))
    print("\n" + text)
    return summary


def _steps(n: int) -> str:
    return "1 step" if n == 1 else f"{n} steps"


def timing_table(timing: dict[str, dict[str, dict]]) -> list[str]:
    """The timing rows (``{rate: {row: times}}``), each with its decode time over that of
    the first row at its rung."""
    lines = ["| row | encode s | decode s | U-Net calls | decode time / first row's |",
             "|---|---|---|---|---|"]  # fmt: skip
    for rows in timing.values():
        base = next(iter(rows.values()))["decode s"].median
        lines += [f"| {label} | {t['encode s']} | {t['decode s']} | {t['U-Net calls']} | "
                  f"{t['decode s'].median / base:.2f} |" for label, t in rows.items()]  # fmt: skip
    return lines


def _grid(
    data, out: Path, docs: dict, rates: list[str], settings: EvalSettings, steps, compared: dict
):
    """Original, each rung (with its bpp) and the compared families' at it, the classic
    codecs at the top rung's rate (blank where one cannot reach it) and the control, for
    the first images."""
    from ..plot import reconstruction_grid

    folders, labels = [], ["original"]
    for rate in rates:  # each rung, then the compared families' at it
        folders.append(out / rate / "reconstructions" / f"steps={steps}")
        labels.append(f"{rate}\n{docs[rate]['results']['bpp'][0]:.4f} bpp")
        for label, family_docs in compared.items():
            n = family_docs[rate]["results"]["steps"][0]
            folders.append(out / label / rate / "reconstructions" / f"steps={n}")
            labels.append(f"{label}\n{rate}, {_steps(n)}")
    for codec, target, series, row in rate_matched(docs[rates[-1]]):  # codecs at the top
        if (out / rates[-1] / "reconstructions" / series).is_dir():
            folders.append(out / rates[-1] / "reconstructions" / series)
            labels.append(f"{codec_label(codec)} <= {target}\n{row['bpp_file']:.4f} bpp")
    if (out / rates[-1] / "reconstructions" / CONTROL).is_dir():
        folders.append(out / rates[-1] / "reconstructions" / CONTROL)
        labels.append(f"control: {rates[-1]}\nwith shuffled z_l")
    ids = [it.id for it in data.items[: settings.grid_images]]
    return reconstruction_grid(data, folders, ids, height=160, columns=labels)


def codec_row_label(codec: str, target: str, row: dict, images: int) -> str:
    """``AVIF ≤0.1250 bpp (20/24 images)``, or that the codec cannot reach the rate."""
    label = f"{codec_label(codec)} ≤{target} bpp"
    if not row["images"]:
        return f"{label}: cannot reach (smallest {min(row['cannot_reach'].values()):.4f} bpp)"
    return f"{label} ({row['images']}/{images} images)"


def bd_rates(docs: dict, rates: list[str], anchor: str, metrics: list[str]) -> dict:
    """BD-rate per metric of the rungs (first step count) against ``anchor``'s rate-matched
    rows, counting only the targets every image reached (a partial row is biased)."""
    points = {series: row for rate in rates
              for codec, _, series, row in rate_matched(docs[rate], complete=True)
              if codec == anchor}  # fmt: skip
    out = {}
    for metric in metrics:
        test = [(docs[r]["results"]["bpp_file"][0], docs[r]["results"].get(metric, [None])[0])
                for r in rates]  # fmt: skip
        base = [(row["bpp_file"], row.get(metric)) for row in points.values()]
        out[metric] = bd_rate(base, test, metric)
    return {"anchor": anchor, "anchor_points": len(points), "interpolation": INTERPOLATION,
            "rate": "bpp_file", "metrics": out}  # fmt: skip


def bd_lines(bd: dict, anchor: str) -> list[str]:
    """The BD-rate section of ``summary.md``."""
    lines = [f"BD-rate of the rungs against {codec_label(anchor)} (rate: bpp_file; "
             f"{bd['anchor_points']} anchor point(s) that every image reached; "
             f"{bd['interpolation']}):"]  # fmt: skip
    for metric, r in bd["metrics"].items():
        if "none" in r:
            lines.append(f"- {metric}: not computed: {r['none']}")
        else:
            lines.append(f"- {metric}: {r['bd_rate_percent']:+.1f}% over {metric} "
                         f"{r['overlap'][0]}..{r['overlap'][1]} "
                         f"({100 * r['overlap_fraction']:.0f}% of the narrower range)")  # fmt: skip
    return lines
