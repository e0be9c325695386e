"""``perco-plot``: rate–metric curves from ``results.json`` files, with published references.

    perco-plot runs/eval/coco30k -o coco30k.pdf --metrics fid lpips ms_ssim
    perco-plot a/results.json b/results.json -o curves.png --x bpp_file

    perco-plot runs/eval/kodak/tiny_taef2 --reference perco-sd-kodak --reference my.json
    perco-plot runs/eval/kodak/tiny_taef2 --bd-anchor avif

Files (or folders searched for ``results.json``) with the same ``name`` form one curve,
sorted by rate. Classic codecs rate-matched in those runs (``eval.references``) form one
curve each, from the targets every image reached. ``--reference`` adds published points
(:mod:`perco.published`, by name) or any CompressAI-format results file; by default, the
shipped references on the results' dataset are drawn, each marked as another model.
``--bd-anchor`` prints each curve's BD-rate against one of them (:mod:`perco.eval.bd`).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import atomic_write, load_image, to_pil
from .published import for_dataset, load_reference

__all__ = ["curves", "plot_results", "reconstruction_grid", "main"]

DEFAULT_METRICS = ("lpips", "ms_ssim", "psnr", "fid")


def published_label(ref: dict) -> str:
    """A published curve's legend entry: it is another model, measured elsewhere."""
    return f"{ref['name']} [published, another model; {ref.get('dataset', 'unknown set')}]"


def curves(
    docs: list[dict], x: str, uniform_too: bool = False, references: list[dict] = ()
) -> dict[str, list[tuple[float, dict]]]:
    """Points ``(rate, {column: value})`` per labelled curve, sorted by rate.

    ``x="bpp_uniform"`` places uniformly coded results at their ``bpp``; ``uniform_too``
    adds, for results coded with a learned index prior, the same points at
    ``bpp_uniform`` (PerCo's coding of the same indices). Rate-matched classic codecs
    are placed at their file bpp, published references at the bpp they report."""
    from .eval.codecs import codec_label, rate_matched

    out = defaultdict(list)
    for doc in docs:
        res = doc["results"]
        name = doc["name"]
        codecs = doc.get("protocol", {}).get("caption_codecs_used")
        if codecs:  # the caption codec behind the bpp
            name += f" [{'/'.join(codecs)} captions]"
        learned = "bpp_uniform" in res
        axes = [(x if x != "bpp_uniform" or learned else "bpp", "")]
        if uniform_too and learned and x != "bpp_uniform":
            axes.append(("bpp_uniform", " [uniform coding]"))
        for key, suffix in axes:
            for i in range(len(res.get(key, []))):
                label = name if len(res[key]) == 1 else f"{name} ({res['steps'][i]} steps)"
                out[label + suffix].append((res[key][i], {k: v[i] for k, v in res.items()}))
        for codec, _, _, row in rate_matched(doc, complete=True):
            label = f"{codec_label(codec)} (rate-matched)"
            if all(p["target_bpp"] != row["target_bpp"] for _, p in out[label]):
                out[label].append((row["bpp_file"], row))
    for ref in references:
        res = ref["results"]
        out[published_label(ref)] = [(res["bpp"][i], {k: v[i] for k, v in res.items()})
                      for i in range(len(res["bpp"]))]  # fmt: skip
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items() if v}


def _title(metric: str, docs: list[dict]) -> str:
    """FID/KID titles say when they are not standard (patches, non-Inception features)."""
    title = metric.replace("_", "-").upper()
    if metric in ("fid", "kid"):
        protocols = [d.get("protocol", {}) for d in docs]
        if any(str(p.get("fid_variant", "")).startswith("patches") for p in protocols):
            title = "patch " + title
        features = {str(p.get("fid_features", "")).split(" ")[0] for p in protocols}
        if features - {"inception-v3-compat", ""}:
            title += f" ({', '.join(sorted(features))} features)"
    return title


def plot_results(
    docs: list[dict],
    path: str | Path,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
    x: str = "bpp_payload",
    references: list[dict] | None = None,
    uniform_too: bool = False,
) -> None:
    """One panel per metric that any result or reference has; PNG or PDF by suffix.

    ``references``: published documents (:func:`perco.published.load_reference`), drawn
    dashed; default: the shipped ones on the first result's dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if references is None:
        dataset = docs[0].get("protocol", {}).get("dataset") if docs else None
        references = [load_reference(n) for n in for_dataset(dataset)]
    drawn = curves(docs, x, uniform_too, references)
    published = {published_label(ref) for ref in references}
    shown = [m for m in metrics if any(m in p for pts in drawn.values() for _, p in pts)]
    if not shown:
        raise ValueError(f"none of {metrics} is in the results")
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], shown, strict=True):
        for label, points in drawn.items():
            xs = [px for px, p in points if p.get(metric) is not None]
            ys = [p[metric] for _, p in points if p.get(metric) is not None]
            if xs:
                style = "s--" if label in published else "o-"
                ax.plot(xs, ys, style, alpha=0.6 if label in published else 1.0, label=label)
        ax.set_xscale("log")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_title(_title(metric, docs))
        ax.grid(alpha=0.3)
    entries = {}  # every curve once, whichever panels it is in
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    axes[0][-1].legend(entries.values(), entries.keys(), fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0))  # fmt: skip
    notes = [f"{ref['name']}: {ref['sources'][0]['paper']}, {ref['sources'][0]['where']}"
             + (" (read off a figure)" if ref["sources"][0].get("read_from_figure") else "")
             for ref in references
             if ref.get("sources") and any(m in ref["results"] for m in shown)]  # fmt: skip
    fig.tight_layout()
    if notes:
        fig.text(0.01, -0.01, "\n".join(textwrap.shorten(n, 160) for n in notes),
                 fontsize=6, color="0.3", va="top")  # fmt: skip
    suffix = Path(path).suffix.lstrip(".") or "png"
    atomic_write(
        path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120, bbox_inches="tight")
    )
    plt.close(fig)


def reconstruction_grid(
    data,
    folders: list[Path],
    ids: list[str],
    height: int = 192,
    columns: list[str] | None = None,
) -> torch.Tensor | None:
    """Rows of images: the original, then ``<id>_0.png`` from each folder (a series'
    reconstructions, blank where it has none); ``None`` without ids.

    Each row is labelled with its image id and each column with ``columns`` (default:
    ``original`` and the folder names; a label may hold a second line, e.g. its bpp).
    Every image is scaled to ``height`` and centred in a column as wide as the widest,
    so portrait images sit under their column titles too.
    """
    index = {it.id: i for i, it in enumerate(data.items)}
    found, labels = [], []
    for image_id in ids:
        cells = [data[index[image_id]]["image"]]
        for folder in folders:
            path = Path(folder) / f"{image_id}_0.png"
            # a blank cell where a series has no image (e.g. a codec that cannot reach
            # the rate), so every cell stays under its column's title
            cells.append(load_image(path)[0] if path.is_file() else torch.ones_like(cells[0]))
        h, w = cells[0].shape[-2:]
        size = (height, round(w * height / h))
        found.append([F.interpolate(c[None], size=size, mode="bilinear", antialias=True)[0]
                      for c in cells])  # fmt: skip
        labels.append(image_id)
    if not found:
        return None
    column = max(c.shape[-1] for cells in found for c in cells)

    def boxed(c: torch.Tensor) -> torch.Tensor:  # centred in the column, 2 px margins
        left = (column - c.shape[-1]) // 2
        return F.pad(c, (2 + left, 2 + column - c.shape[-1] - left, 2, 2), value=1.0)

    rows = [torch.cat([boxed(c) for c in cells], dim=-1) for cells in found]
    width, cell = max(r.shape[-1] for r in rows), column + 4
    grid = torch.cat([F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows], dim=-2)
    columns = columns or ["original", *(Path(f).name for f in folders)]
    return _label(grid, columns, labels, cell, height + 4)


def _label(grid, columns: list[str], rows: list[str], cell_w: int, cell_h: int) -> torch.Tensor:
    """``grid`` with the column labels above it and the row labels to its left."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    top, left = 36, max(8 + max(len(r) for r in rows) * 8, 60)
    canvas = Image.new("RGB", (grid.shape[-1] + left, grid.shape[-2] + top), "white")
    canvas.paste(to_pil(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(columns):
        draw.multiline_text((left + i * cell_w + 4, 2), text, fill="black", font=font, spacing=2)
    for i, text in enumerate(rows):
        draw.text((4, top + i * cell_h + cell_h // 2 - 7), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1) / 255


def bd_table(docs, anchor: str, x: str, metrics, references: list[dict]) -> str:
    """Each curve's BD-rate (percent, :func:`perco.eval.bd.bd_rate`) against ``anchor``:
    a classic codec's name or a curve's label."""
    from .eval.bd import INTERPOLATION, bd_rate
    from .eval.codecs import codec_label

    drawn = curves(docs, x, references=references)
    names = [f"{codec_label(anchor)} (rate-matched)", anchor]
    label = next((n for n in names if n in drawn), None)
    if label is None:
        raise ValueError(f"no curve {anchor!r} to anchor on; curves: {', '.join(drawn)}")
    lines = [f"BD-rate against {label} ({INTERPOLATION}; rate: {x})",
             "| curve | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, points in drawn.items():
        if name == label:
            continue
        cells = []
        for metric in metrics:
            pick = [(r, p.get(metric)) for r, p in points]
            result = bd_rate([(r, p.get(metric)) for r, p in drawn[label]], pick, metric)
            cells.append(f"{result['bd_rate_percent']:+.1f}%" if "none" not in result
                         else f"- ({result['none']})")  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gather(paths: list[Path]) -> list[dict]:
    files = []
    for p in paths:
        files += sorted(p.rglob("results.json")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError("no results.json found")
    docs = []
    for f in files:
        try:
            docs.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: not a results file ({e})") from e
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perco-plot", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="results.json files or folders")
    parser.add_argument("-o", "--output", type=Path, default=Path("rd.png"), help=".png or .pdf")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument(
        "--x",
        default="bpp_payload",
        choices=["bpp_payload", "bpp", "bpp_uniform"],
        help="bpp_uniform: the file size with uniformly coded indices (the paper's coding)",
    )
    parser.add_argument(
        "--uniform-too",
        action="store_true",
        help="also draw results coded with a learned index prior at their uniform-coding bpp",
    )
    parser.add_argument(
        "--reference",
        action="append",
        help="published points to draw: a shipped name (perco.published.available()) or a "
        "CompressAI-format results file; repeatable (default: the shipped ones on the "
        "results' dataset)",
    )
    parser.add_argument(
        "--bd-anchor",
        help="print every curve's BD-rate against this one: a codec name (avif) or a label",
    )
    args = parser.parse_args(argv)
    try:
        docs = _gather(args.inputs)
        refs = None if args.reference is None else [load_reference(r) for r in args.reference]
        plot_results(docs, args.output, tuple(args.metrics), args.x, refs, args.uniform_too)
        if args.bd_anchor:
            print(bd_table(docs, args.bd_anchor, args.x, args.metrics, refs or []))
    except (OSError, ValueError) as e:
        print(f"perco-plot: error: {e}", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
