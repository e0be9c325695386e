"""``perco-download kodak DIR``: fetch the 24 Kodak images and verify their pixels.

Each image is checked against the SHA-256 of its decoded RGB pixels shipped with the
package (so a lossless re-encoding verifies too) and written through a temp file; a file
already present and correct is not fetched again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import urllib.request
from pathlib import Path

from ..data.eval_sets import kodak_checksums, pixel_sha256
from ..io import write_bytes

KODAK_URL = "https://r0k.us/graphics/kodak/kodak/{name}"


def download_kodak(folder: Path, url: str = KODAK_URL) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, digest in kodak_checksums().items():
        target = folder / name
        if target.is_file() and pixel_sha256(target) == digest:
            continue
        try:
            with urllib.request.urlopen(url.format(name=name), timeout=60) as response:
                data = response.read()
        except OSError as e:
            print(f"perco-download: error: {name}: {e}", file=sys.stderr)
            failed += 1
            continue
        with tempfile.NamedTemporaryFile(suffix=".png") as tmp:
            Path(tmp.name).write_bytes(data)
            ok = pixel_sha256(tmp.name) == digest
        if not ok:
            print(f"perco-download: error: {name}: pixel checksum mismatch", file=sys.stderr)
            failed += 1
            continue
        write_bytes(target, data)
        print(f"{target}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perco-download", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["kodak"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--url", default=KODAK_URL, help="URL template with {name}")
    args = parser.parse_args(argv)
    return download_kodak(args.folder, args.url)


if __name__ == "__main__":
    sys.exit(main())
