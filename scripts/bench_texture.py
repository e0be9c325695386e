"""Periodic texture in reconstructions: spectral peaks of the error at the index cells'
period (seams), TAEF2's latent stride (8 px) and anywhere else (a hatch).

For each reconstruction ``y`` of an image ``x`` (both as perco-eval saves them), the
error ``y − x`` (luma, Hann-windowed) is Fourier transformed; a periodic pattern is a
peak of its power over the median of the bins around it. For each series the table
gives, averaged over images (geometric mean), the peak ratio of the power along the
horizontal and vertical axes at the cell frequency and the 8-px frequency, and the
strongest off-axis peak with its period and angle (a diagonal hatch shows there). A
ratio near 1: no periodic pattern; the photos' own TAEF2 round trip gives the floor.

    python scripts/bench_texture.py --images ../shared/assets/bsds500/test --limit 24 \
        --cell 64 --series unet=runs/eval/.../reconstructions/<series> ... [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image


def luma(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    return rgb @ np.array([0.299, 0.587, 0.114])


def spectrum(error: np.ndarray) -> np.ndarray:
    """Power of the Hann-windowed error, DC at the centre."""
    h, w = error.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    return np.abs(np.fft.fftshift(np.fft.fft2((error - error.mean()) * window))) ** 2


def peak_ratio(power: np.ndarray, fy: int, fx: int, radius: int = 3) -> float:
    """Power around the bin ``(fy, fx)`` from the centre (the mean of its 3×3
    neighbourhood, for periods between bins) over the median of the ring of bins
    ``radius`` away: about 1.4 for white noise."""
    cy, cx = power.shape[0] // 2, power.shape[1] // 2
    y, x = cy + fy, cx + fx
    peak = power[y - 1 : y + 2, x - 1 : x + 2].mean()
    box = power[y - radius : y + radius + 1, x - radius : x + radius + 1].copy()
    box[1 : -1, 1 : -1] = np.nan
    return float(peak / np.nanmedian(box))


def axis_ratio(power: np.ndarray, period: float) -> float:
    """Mean peak ratio at ``period`` px along the vertical and horizontal axes."""
    h, w = power.shape
    return float(np.mean([peak_ratio(power, round(h / period), 0),
                          peak_ratio(power, 0, round(w / period))]))  # fmt: skip


def strongest_off_axis(power: np.ndarray, min_period: float = 3.0) -> tuple[float, float, float]:
    """``(ratio, period px, angle °)`` of the strongest peak off the axes (more than 10°
    from them), at periods of ``min_period`` px and longer, over a local median."""
    from scipy.ndimage import median_filter

    h, w = power.shape
    yy, xx = np.mgrid[:h, :w]
    fy, fx = (yy - h // 2) / h, (xx - w // 2) / w
    radius = np.hypot(fy, fx)
    angle = np.degrees(np.arctan2(np.abs(fy), np.abs(fx)))
    keep = (radius > 1 / 64) & (radius < 1 / min_period) & (angle > 10) & (angle < 80)
    ratio = power / np.maximum(median_filter(power, size=9), 1e-30)
    ratio[~keep] = 0
    y, x = np.unravel_index(np.argmax(ratio), ratio.shape)
    return float(ratio[y, x]), float(1 / radius[y, x]), float(angle[y, x])


def measure(images: list[Path], folder: Path, cell: int) -> dict:
    rows = []
    for path in images:
        recon = sorted(folder.glob(f"{path.stem}_*.png"))
        if not recon:
            continue
        x = luma(path)
        y = luma(recon[0])[: x.shape[0], : x.shape[1]]
        power = spectrum(y - x)
        rows.append((axis_ratio(power, cell), axis_ratio(power, 8), *strongest_off_axis(power)))
    if not rows:
        raise SystemExit(f"no reconstructions of these images in {folder}")
    a = np.array(rows)
    gmean = lambda v: float(math.exp(np.log(v).mean()))  # noqa: E731
    return {
        "images": len(rows),
        "cell_peak": gmean(a[:, 0]),
        "stride8_peak": gmean(a[:, 1]),
        "off_axis_peak": gmean(a[:, 2]),
        "off_axis_period_px": float(np.median(a[:, 3])),
        "off_axis_angle_deg": float(np.median(a[:, 4])),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="the originals' folder")
    parser.add_argument("--limit", type=int, default=24, help="the first N images, sorted")
    parser.add_argument("--cell", type=int, default=64, help="pixels per index cell")
    parser.add_argument("--series", nargs="+", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    images = images[: args.limit]
    rows = {}
    for spec in args.series:
        name, _, folder = spec.partition("=")
        rows[name] = measure(images, Path(folder), args.cell)
    print(f"Periodic error texture, {len(images)} images, cell {args.cell} px: peak over "
          "local median (1: none)")  # fmt: skip
    print(f"| series | images | cell {args.cell} px | 8 px | off-axis peak | its period px "
          "| its angle ° |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['images']} | {r['cell_peak']:.2f} | {r['stride8_peak']:.2f} "
              f"| {r['off_axis_peak']:.2f} | {r['off_axis_period_px']:.1f} "
              f"| {r['off_axis_angle_deg']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"cell": args.cell, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
