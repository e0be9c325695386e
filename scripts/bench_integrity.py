"""What a file's integrity costs, and what it catches: stream lengths and the CRC-16.

    python scripts/bench_integrity.py --models runs/tiny_taef2_prior

Per rung and image set (Kodak, and the first 24 BSDS500 test photos): the mean file size
with the learned index prior, the bytes of the index stream's length field (what format
version 4 adds to version 2), and what the optional CRC-16 adds. Then the damage
experiment of issue 30 on the first 6 files of each set: each file cut to half its
length, cut by one byte, one header byte flipped, one middle byte flipped, 3 bytes
appended, the last 4 bytes zeroed; the count of damaged files the reader refuses, for
prior-coded files as version 2 wrote them (read by today's reader, which checks their
stream but cannot know their length), as version 4 writes them, with and without the
CRC, and for uniformly packed files (version 1). A file that is not refused would decode
into an image.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from perco import bitstream, codec
from perco.bitstream import BitstreamError, read_header
from perco.io import load_image
from perco.models.loading import load_model

RATES = ("r0.0019", "r0.0098", "r0.1250")
DAMAGES = {
    "cut to half": lambda d: d[: len(d) // 2],
    "cut by 1 byte": lambda d: d[:-1],
    "header byte flipped": lambda d: d[:5] + bytes([d[5] ^ 0xFF]) + d[6:],
    "middle byte flipped": lambda d: (
        d[: len(d) // 2] + bytes([d[len(d) // 2] ^ 0xFF]) + d[len(d) // 2 + 1 :]
    ),
    "3 bytes appended": lambda d: d + b"\x01\x02\x03",
    "last 4 bytes zeroed": lambda d: d[:-4] + bytes(4),
}


def _images(folder: Path, limit: int) -> dict[str, torch.Tensor]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    return {p.stem: load_image(p) for p in files[:limit]}


def as_version_2(data: bytes, info: bitstream.Breakdown) -> bytes:
    """A caption-less version 4 file as version 2 wrote it: no index stream length."""
    header = read_header(data)
    flags = data[1] & 0x1F | bitstream.LEGACY_PRIOR_VERSION << 5
    return bytes([data[0], flags]) + data[2 : header.length] + data[info.header_bytes :]


def refused(model, files: list[bytes]) -> int:
    count = 0
    for data in files:
        try:
            codec.parse(model, data)
        except BitstreamError:
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("runs/tiny_taef2_prior"))
    assets = os.environ.get("PERCO_ASSETS", "../shared/assets")
    parser.add_argument("--assets", type=Path, default=Path(assets))
    parser.add_argument("--limit", type=int, default=24, help="images per set")
    parser.add_argument("--damaged", type=int, default=6, help="files damaged per set")
    parser.add_argument("--rates", nargs="+", default=list(RATES))
    args = parser.parse_args(argv)
    sets = {
        "Kodak": _images(args.assets / "kodak", args.limit),
        "BSDS500 test": _images(args.assets / "bsds500" / "test", args.limit),
    }
    cost, damage = [], []
    latents: dict = {}
    for rate in args.rates:
        model = load_model(args.models, rate)
        if model.index_prior is None:
            sys.exit(f"error: {args.models} has no fitted index prior at {rate} (perco fit-prior)")
        for set_name, images in sets.items():
            prior, packed, crc = [], [], []
            for name, x in images.items():
                key = (set_name, name)
                if key not in latents:  # one autoencoder encoding per image for every rung
                    latents[key] = model._latents(model._pad(x))
                z = latents[key]
                prior.append(codec.compress(model, x, latents=z)[0])
                packed.append(codec.compress(model, x, latents=z, uniform=True)[0][0])
                crc.append(codec.compress(model, x, latents=z, crc=True)[0][0])
            n = len(prior)
            length_field = sum(i.header_bytes - read_header(d).length for d, i in prior) / n
            file_bytes = sum(i.file_bytes for _, i in prior) / n
            cost.append({
                "rung": rate, "set": set_name, "images": n,
                "file bytes (v4)": f"{file_bytes:.1f}",
                "index length field (B)": f"{length_field:.2f}",
                "share of file": f"{100 * length_field / file_bytes:.2f}%",
                "CRC-16 (B)": 2,
                "CRC share": f"{100 * 2 / file_bytes:.2f}%",
            })  # fmt: skip
            k = min(args.damaged, n)
            kinds = {
                "v2 as written before": [as_version_2(d, i) for d, i in prior[:k]],
                "v4": [d for d, _ in prior[:k]],
                "v4 + CRC": crc[:k],
                "v1 (packed)": packed[:k],
            }
            row = {"rung": rate, "set": set_name}
            for kind, files in kinds.items():
                damaged = [hurt(d) for d in files for hurt in DAMAGES.values()]
                row[f"{kind} refused"] = f"{refused(model, damaged)}/{len(damaged)}"
            per = [refused(model, [DAMAGES[h](d) for d, _ in prior[:k]]) for h in DAMAGES]
            row["v4 per damage"] = " ".join(f"{r}/{k}" for r in per)
            damage.append(row)
            print(f"{rate} {set_name}: done", file=sys.stderr)
    for title, rows in (("integrity cost per file", cost), ("damaged files refused", damage)):
        print(f"\n{title} (damages: {', '.join(DAMAGES)})" if rows is damage else f"\n{title}")
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "---|" * len(rows[0]))
        for r in rows:
            print("| " + " | ".join(str(v) for v in r.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
