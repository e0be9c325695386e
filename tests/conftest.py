"""Shared fixtures: tiny components (no download) and the offline assets folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from perco.testing import tiny_perco

ROOT = Path(__file__).resolve().parents[1]
HAS_COMPRESSAI = importlib.util.find_spec("compressai") is not None
NEEDS_COMPRESSAI = "needs the sprdiff extra (CompressAI pins numpy<2): pip install -e '.[sprdiff]'"
ASSETS = Path(os.environ.get("PERCO_ASSETS", ROOT.parent / "shared" / "assets"))

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n N`: each worker its share of cores
    torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def mutate(draw, data: bytes, header_bytes: int) -> bytes:
    """One to three random edits of a file for a hypothesis ``draw``: bit flips,
    truncation, inserted or deleted bytes past the fixed header (hypothesis favours small
    integers, which would otherwise hit the magic byte nearly every time), or any value
    in one of the header's first ten bytes."""
    from hypothesis import strategies as st

    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "header"]))
        if len(data) <= header_bytes:
            break
        pos = header_bytes + draw(st.integers(0, len(data) - 1 - header_bytes))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        else:
            data[draw(st.integers(0, min(9, len(data) - 1)))] = draw(st.integers(0, 255))
    return bytes(data)


def structural_mutations(data: bytes, header_bytes: int) -> dict[str, bytes]:
    """Every cut (lengths 0 to n-1), 1 to 16 appended bytes (zeros, and a non-zero
    pattern), and every single-bit change of the first ``header_bytes`` bytes."""
    out = {f"cut to {k} of {len(data)}": data[:k] for k in range(len(data))}
    for j in range(1, 17):
        out[f"{j} zero bytes appended"] = data + bytes(j)
        out[f"{j} bytes appended"] = data + bytes(range(0x55, 0x55 + j))
    for i in range(header_bytes):
        for b in range(8):
            out[f"header byte {i} bit {b}"] = data[:i] + bytes([data[i] ^ 1 << b]) + data[i + 1 :]
    return out


def fuzz_reads(cases, fingerprint: bytes, seed_value: int, prior=None) -> dict:
    """Read 10,000 mutated files drawn from ``cases`` (a strategy of ``(data, rate)``)
    for a model with ``fingerprint`` (and ``prior``): each must end in a
    ``BitstreamError`` or a valid decode of exactly that file; returns the counts."""
    from hypothesis import HealthCheck, given, seed, settings

    from perco import bitstream

    counts = {"total": 0, "payload": 0, "valid": 0}

    @seed(seed_value)
    @settings(
        max_examples=10_000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(cases)
    def fuzz(case):
        data, rate = case
        counts["total"] += 1
        try:
            header = bitstream.read_header(data)
            bitstream.check_model(header, fingerprint=fingerprint, rate=rate)
            counts["payload"] += 1
            image, info = bitstream.read_payload(data, header, rate=rate, prior=prior)
        except bitstream.BitstreamError:
            return
        counts["valid"] += 1
        assert info.file_bytes == len(data)
        assert image.indices.max(initial=0) < rate.codebook_size

    fuzz()
    print(counts)
    return counts


def entry_point(name: str) -> str:
    """An installed command (``perco-eval``, ``accelerate``, ...) of the environment of
    this interpreter, not whatever ``PATH`` finds first."""
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed next to {sys.executable}"
    return found


def pytest_addoption(parser):
    parser.addoption(
        "--regen-golden",
        action="store_true",
        help="rewrite the golden files in tests/expected/ instead of comparing with them",
    )


@pytest.fixture(scope="session")
def assets() -> Path:
    """``../shared/assets`` (or ``$PERCO_ASSETS``); skips the test when it is absent."""
    if not ASSETS.is_dir():
        pytest.skip(f"offline assets not found at {ASSETS} (set PERCO_ASSETS)")
    return ASSETS


@pytest.fixture
def model():
    """A fresh tiny PerCo at the lowest rung, in eval mode."""
    return tiny_perco("r0.0019").eval()


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(2, 3, 64, 64)


@pytest.fixture
def photo_folder(tmp_path):
    """Five small random photos (72 px high, widths 80-96), two of them captioned."""
    from perco.io import save_image

    folder = tmp_path / "photos"
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        save_image(torch.rand(3, 72, 80 + 4 * i, generator=g), folder / f"img{i}.png")
    (folder / "captions.tsv").write_text("img0\ta red square\nimg3.png\tblue noise\n")
    return folder


@pytest.fixture(scope="session")
def blip2_dir(tmp_path_factory):
    """A tiny random BLIP-2 saved like a hub checkpoint (loaded through the real loader)."""
    from perco.testing import tiny_blip2

    folder = tmp_path_factory.mktemp("blip2")
    model, processor = tiny_blip2()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
