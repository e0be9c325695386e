"""``perco-plot``: rate–metric curves from ``results.json`` files, with published references.

    perco-plot runs/eval/coco30k -o coco30k.pdf --metrics fid lpips ms_ssim
    perco-plot a/results.json b/results.json -o curves.png --x bpp_file

Files (or folders searched for ``results.json``) with the same ``name`` form one curve,
sorted by rate. The reference series are the published numbers recorded in DESIGN.md
(read off the papers' plots, ≈): official PerCo and PerCo (SD 2.1) on MS-COCO 30k, and
PerCo (SD) on Kodak; they are drawn when the results' dataset matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import atomic_write, load_image, to_pil

__all__ = ["REFERENCES", "plot_results", "reconstruction_grid", "main"]

# payload bpp and metrics; COCO-30k at 512², Kodak at native size
REFERENCES = {
    "coco30k": {
        "PerCo (official)": {
            "bpp_payload": [0.0042, 0.0121, 0.0334, 0.0529, 0.1268],
            "fid": [5.46, 3.67, 2.6, 2.12, 1.01],
            "lpips": [0.539, 0.395, 0.241, 0.160, 0.103],
            "ms_ssim": [0.395, 0.580, 0.709, 0.777, 0.879],
        },
        "PerCo (SD 2.1, 50k steps)": {
            "bpp_payload": [0.0037, 0.0113, 0.0329, 0.1266],
            "fid": [4.76, 3.38, 2.57, 1.22],
            "lpips": [0.551, 0.432, 0.313, 0.140],
        },
    },
    "kodak": {
        "PerCo (SD)": {
            "bpp_payload": [0.0324, 0.1261],
            "lpips": [0.297, 0.143],
            "ms_ssim": [0.674, 0.847],
            "psnr": [19.53, 22.79],
        },
    },
}

DEFAULT_METRICS = ("lpips", "ms_ssim", "psnr", "fid")


def _curves(
    docs: list[dict], x: str, uniform_too: bool = False
) -> dict[str, list[tuple[float, dict]]]:
    """Points per labelled curve. ``x="bpp_uniform"`` places uniformly coded results at
    their ``bpp``; ``uniform_too`` adds, for results coded with a learned index prior, the
    same points at ``bpp_uniform`` (PerCo's coding of the same indices)."""
    curves = defaultdict(list)
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
                curves[label + suffix].append((res[key][i], {k: v[i] for k, v in res.items()}))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in curves.items()}


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
    reference: str | None = None,
    uniform_too: bool = False,
) -> None:
    """One panel per metric that any result or reference has; PNG or PDF by suffix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(docs, x, uniform_too)
    refs = REFERENCES.get(reference or "", {})
    shown = [
        m
        for m in metrics
        if any(m in p for pts in curves.values() for _, p in pts)
        or any(m in r for r in refs.values())
    ]
    if not shown:
        raise ValueError(f"none of {metrics} is in the results")
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], shown, strict=True):
        for label, points in curves.items():
            xs = [px for px, p in points if p.get(metric) is not None]
            ys = [p[metric] for _, p in points if p.get(metric) is not None]
            if xs:
                ax.plot(xs, ys, "o-", label=label)
        for label, ref in refs.items():
            if metric in ref:
                ax.plot(ref["bpp_payload"], ref[metric], "s--", alpha=0.6, label=label)
        ax.set_xscale("log")
        ax.set_xlabel(x.replace("_", " "))
        ax.set_title(_title(metric, docs))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    suffix = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix, dpi=120))
    plt.close(fig)


def reconstruction_grid(
    data,
    folders: list[Path],
    ids: list[str],
    height: int = 192,
    columns: list[str] | None = None,
) -> torch.Tensor | None:
    """Rows of images: the original, then ``<id>_0.png`` from each folder (a series'
    reconstructions); ``None`` if none was saved.

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
            if path.is_file():
                cells.append(load_image(path)[0])
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
        "--reference", help="dataset of the reference series (default: the results')"
    )
    args = parser.parse_args(argv)
    try:
        docs = _gather(args.inputs)
        reference = args.reference or docs[0].get("protocol", {}).get("dataset")
        plot_results(docs, args.output, tuple(args.metrics), args.x, reference, args.uniform_too)
    except (OSError, ValueError) as e:
        print(f"perco-plot: error: {e}", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
