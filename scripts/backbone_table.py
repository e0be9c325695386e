"""The U-Net and the small FLUX.2 transformer side by side, rendered from committed results.

Reads ``results/bsds500-test/backbones/``: ``summary.json`` (one ``perco-eval`` run of both
sweeps on the first 24 BSDS500 test photos: metrics per row, decode timing on one image)
and ``training/<family>/<rate>.json`` (each rung's ``perco-train`` summary; minutes from
600 steps of 16 crops at its measured crops/s). Writes ``table.md`` beside them, or with
``--check`` fails if the file differs from what it renders.

    python scripts/backbone_table.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "results" / "bsds500-test" / "backbones"
FAMILIES = {"unet": ("U-Net", "tiny_taef2 {rate}"), "flux2": ("FLUX.2 transformer",
            "tiny_taef2_flux2 {rate} (5 steps)")}  # fmt: skip
COLUMNS = [("bpp_file", "bpp", "{:.4f}"), ("lpips", "LPIPS-Alex", "{:.3f}"),
           ("lpips_vgg", "LPIPS-VGG", "{:.3f}"), ("dists", "DISTS", "{:.3f}"),
           ("fid", "patch FID", "{:.1f}"), ("psnr", "PSNR", "{:.2f}")]  # fmt: skip


def render(folder: Path = HERE) -> str:
    summary = json.loads((folder / "summary.json").read_text())
    lines = [
        "| rung | backbone | " + " | ".join(name for _, name, _ in COLUMNS)
        + " | decode s | training min |",
        "|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for rate in summary["rates"]:
        for family, (label, row) in FAMILIES.items():
            metrics = summary["rows"][row.format(rate=rate)]
            timed = summary["timing"][rate][f"{row.format(rate=rate).split(' (')[0]} (5 steps)"]
            train = json.loads((folder / "training" / family / f"{rate}.json").read_text())
            minutes = train["steps"] * 16 / train["samples_per_s"] / 60
            cells = [fmt.format(metrics[key]) for key, _, fmt in COLUMNS]
            decode = timed["decode s"].split(" ")[0]
            lines.append(f"| {rate} | {label} | " + " | ".join(cells)
                         + f" | {decode} | {minutes:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if table.md differs")
    args = parser.parse_args(argv)
    table, target = render(), HERE / "table.md"
    if args.check:
        if not target.is_file() or target.read_text() != table:
            print(f"{target} differs from the results it is rendered from", file=sys.stderr)
            return 1
        return 0
    target.write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
