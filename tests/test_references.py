"""Classic codecs rate-matched per image, published reference curves, BD-rates (issue 28)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from perco.eval.bd import bd_rate
from perco.eval.codecs import CODECS, CodecUnavailable, get_codec, rate_match
from perco.io import load_image
from perco.metrics import psnr
from perco.published import available, for_dataset, load_reference

pytest.importorskip("imagecodecs", reason="the codecs extra: pip install 'perco[codecs]'")


@pytest.fixture(scope="module")
def kodim(assets):
    return load_image(assets / "kodak" / "kodim23.png")[0]


def bpp(data: bytes, image: torch.Tensor) -> float:
    return 8 * len(data) / (image.shape[-2] * image.shape[-1])


@pytest.mark.parametrize("name", CODECS)
def test_each_codec_round_trips_a_kodak_image(kodim, name):
    codec = get_codec(name)
    data = codec.encode(kodim, codec.qualities[len(codec.qualities) // 2])
    y = codec.decode(data)
    assert y.shape == kodim.shape and y.dtype == torch.float32
    assert float(psnr(kodim[None], y[None])) > 28  # a mid quality: close, not lossless
    assert 0 < bpp(data, kodim) < 4


@pytest.mark.parametrize("name", ["avif", "hevc", "webp"])
def test_rate_matching_finds_the_largest_file_under_the_target(kodim, name):
    codec = get_codec(name)
    match = rate_match(codec, kodim, 0.125)
    assert match.reached and match.bpp <= 0.125
    assert match.bpp == bpp(codec.encode(kodim, match.quality), kodim)  # the real file
    # one quality step higher goes over the target
    assert bpp(codec.encode(kodim, match.quality + 1), kodim) > 0.125
    # and it is the largest file under the target among every quality below it
    below = [bpp(codec.encode(kodim, q), kodim) for q in codec.qualities[: match.quality]]
    assert all(b <= match.bpp for b in below)
    assert match.encodes <= 9  # a binary search, not a sweep


def test_cannot_reach_is_recorded_with_the_smallest_bpp(kodim):
    codec = get_codec("jpeg")
    match = rate_match(codec, kodim, 0.0019)
    smallest = bpp(codec.encode(kodim, codec.qualities.start), kodim)
    assert not match.reached and match.bpp == smallest > 0.0019 and match.encodes == 1


def test_a_missing_codec_library_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # an import of it fails
    with pytest.raises(CodecUnavailable, match=r"pillow-heif .*pip install 'perco\[codecs\]'"):
        get_codec("hevc")
    with pytest.raises(ValueError, match="unknown reference codec 'bpg'"):
        get_codec("bpg")


def test_codec_descriptions_name_library_version_and_settings():
    avif = get_codec("avif").describe()
    assert avif["library"].startswith("imagecodecs 2") and avif["speed"] == 6
    assert avif["chroma"] == "4:2:0" and "container" in avif
    assert get_codec("jxl").describe()["effort"] == 7


def test_every_published_point_has_a_source():
    names = available()
    shipped = {"perco-paper-coco30k", "perco-sd-kodak", "oscar-kodak", "stablecodec-kodak"}
    assert shipped <= set(names)
    for name in names:
        doc = load_reference(name)
        n = len(doc["results"]["bpp"])
        assert n and len(doc["sources"]) == n, name
        for i, source in enumerate(doc["sources"]):
            assert source["point"] == i
            for key in ("paper", "where", "dataset", "resolution", "metrics"):
                assert source[key], (name, i, key)
            assert set(doc["results"]) <= set(source["metrics"]), name  # every metric defined
            if source["read_from_figure"]:
                assert "precision" in source, name
    assert "perco-sd-kodak" in for_dataset("kodak")


def test_published_files_load_through_the_compressai_reader(tmp_path):
    """A CompressAI results file (its own metric names) and a shipped one, one reader."""
    mine = tmp_path / "bpg.json"
    mine.write_text(json.dumps({
        "name": "BPG", "description": "a CompressAI-style file",
        "results": {"bpp": [0.1, 0.2], "psnr-rgb": [27.0, 29.5], "ms-ssim-rgb": [0.9, 0.94]},
    }))  # fmt: skip
    doc = load_reference(mine)
    assert doc["results"] == {"bpp": [0.1, 0.2], "psnr": [27.0, 29.5], "ms_ssim": [0.9, 0.94]}
    shipped = load_reference("perco-sd-kodak")
    assert shipped["results"]["lpips"] == [0.297, 0.143]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "results": {"bpp": [0.1], "psnr": [1, 2]}}))
    with pytest.raises(ValueError, match="one length"):
        load_reference(bad)
    with pytest.raises(ValueError, match="neither a file nor a shipped reference"):
        load_reference("hific-kodak")


def test_perco_plot_draws_references_and_prints_bd_rates(tmp_path, capsys):
    from perco.plot import main as plot_main

    run = tmp_path / "results.json"
    run.write_text(json.dumps({
        "name": "mine", "protocol": {"dataset": "kodak"},
        "results": {"steps": [5, 5], "bpp_payload": [0.02, 0.06], "lpips": [0.5, 0.3]},
    }))  # fmt: skip
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps({"name": "anchor", "results": {
        "bpp": [0.04, 0.12], "lpips": [0.5, 0.3]}}))  # fmt: skip
    out = tmp_path / "rd.png"
    label = "anchor [published, another model; unknown set]"
    args = [str(run), "-o", str(out), "--metrics", "lpips", "--reference", "perco-sd-kodak",
            "--reference", str(anchor), "--bd-anchor", label]
    assert plot_main(args) == 0 and out.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "| mine (5 steps) | -50.0% |" in table  # half the rate at every LPIPS
    assert "| PerCo (SD) [published, another model; kodak] | - (" in table  # one point: no curve


def test_bd_rate_is_zero_against_itself_and_never_extrapolates():
    a = [(0.1, 0.5), (0.2, 0.4), (0.4, 0.3)]
    assert bd_rate(a, a, "lpips")["bd_rate_percent"] == pytest.approx(0)
    double = bd_rate(a, [(2 * r, m) for r, m in a], "lpips")
    assert double["bd_rate_percent"] == pytest.approx(100) and double["overlap_fraction"] == 1
    psnr_curve = [(0.1, 25.0), (0.2, 27.0)]
    assert bd_rate(psnr_curve, [(0.05, 25.0), (0.1, 27.0)], "psnr")["bd_rate_percent"] == (
        pytest.approx(-50)
    )
    apart = bd_rate(a, [(0.01, 0.7), (0.02, 0.6)], "lpips")
    assert "no overlap in lpips" in apart["none"] and "not extrapolated" in apart["none"]
    assert "two needed" in bd_rate(a, [(0.1, 0.5)], "lpips")["none"]
    partial = bd_rate(a, [(0.05, 0.45), (0.1, 0.35), (0.2, 0.25)], "lpips")
    assert partial["overlap"] == (0.3, 0.45) and partial["overlap_fraction"] == 0.75
