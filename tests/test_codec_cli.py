import json

import numpy as np
import pytest
import torch
from PIL import Image

from perco import codec
from perco.cli import main
from perco.io import load_image, read_image, save_image
from perco.testing import tiny_perco


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    g = torch.Generator().manual_seed(0)
    save_image(torch.rand(3, 64, 96, generator=g), folder / "wide.png")
    save_image(torch.rand(3, 100, 70, generator=g), folder / "tall.png")
    save_image(torch.rand(3, 64, 96, generator=g), folder / "wide2.png")
    return folder


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compress_then_decompress_a_folder(photos, tmp_path, capsys):
    bits = tmp_path / "bits"
    code, out, err = _run(
        capsys, "compress", photos, "-o", bits, "--caption", "noise", "--json", "--batch-size", "2"
    )
    assert code == 0, err
    report = json.loads(out)
    assert sorted(f["file"].rsplit("/", 1)[1] for f in report["files"]) == [
        "tall.png",
        "wide.png",
        "wide2.png",
    ]
    for f in report["files"]:
        data = (bits / (f["file"].rsplit("/", 1)[1][:-4] + ".perco")).read_bytes()
        assert f["file_bytes"] == len(data)
        assert f["bpp_file"] == pytest.approx(8 * len(data) / (f["height"] * f["width"]))
        # 8 + codec id byte + the caption's length (version 3) + the default CRC-16
        assert f["header_bytes"] == 12 and f["caption_codec"] == "tokens"
        assert f["crc"] and f["format_version"] == 3 and data[1] >> 3 & 1
    assert {"autoencoder encode", "hyper-encoder"} <= set(report["timings_s"])

    recon = tmp_path / "recon"
    code, out, err = _run(capsys, "decompress", bits, "-o", recon, "--steps", "2", "--json")
    assert code == 0, err
    assert {"decode steps", "autoencoder decode"} <= set(json.loads(out)["timings_s"])
    assert load_image(recon / "tall.png").shape == (1, 3, 100, 70)
    assert load_image(recon / "wide.png").shape == (1, 3, 64, 96)


def test_decoding_does_not_depend_on_batching(photos, tmp_path, capsys):
    bits = tmp_path / "bits"
    assert _run(capsys, "compress", photos, "-o", bits, "--seed", "11")[0] == 0
    assert _run(capsys, "decompress", bits, "-o", tmp_path / "a", "--steps", "2")[0] == 0
    assert (
        _run(
            capsys,
            "decompress",
            bits / "wide2.perco",
            "-o",
            tmp_path / "b",
            "--steps",
            "2",
            "--batch-size",
            "1",
        )[0]
        == 0
    )
    batched = load_image(tmp_path / "a" / "wide2.png")
    alone = load_image(tmp_path / "b" / "wide2.png")
    assert (batched - alone).abs().max() <= 1 / 255 + 1e-6


def test_compression_is_deterministic(photos, tmp_path, capsys):
    for out in ("x", "y"):
        assert _run(capsys, "compress", photos / "wide.png", "-o", tmp_path / out)[0] == 0
    assert (tmp_path / "x" / "wide.perco").read_bytes() == (
        tmp_path / "y" / "wide.perco"
    ).read_bytes()


def test_bad_inputs_fail_alone_with_one_line_each(photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes(b"\x89PNG truncated")
    save_image(torch.rand(3, 40, 200), photos / "small.png")  # under 64 px at x8
    bits = tmp_path / "bits"
    code, out, err = _run(capsys, "compress", photos, "-o", bits)
    assert code == 1
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 2
    assert any("broken.png: cannot read image" in line for line in lines)
    assert any(
        "small.png: image 200x40 is smaller than rate r0.0019's minimum of 64x64" in line
        for line in lines
    )
    assert sorted(p.name for p in bits.iterdir()) == ["tall.perco", "wide.perco", "wide2.perco"]

    (bits / "empty.perco").write_bytes(b"")
    (bits / "junk.perco").write_bytes(b"\x00" * 40)
    wide = (bits / "wide.perco").read_bytes()
    from perco.bitstream import read_header

    (bits / "cut.perco").write_bytes(wide[: read_header(wide).length + 1])  # 1 index byte
    recon = tmp_path / "recon"
    code, out, err = _run(capsys, "decompress", bits, "-o", recon, "--steps", "1")
    assert code == 1
    assert "empty.perco: empty file" in err
    assert "junk.perco: not a perco file" in err
    assert "cut.perco: truncated index payload" in err
    assert sorted(p.name for p in recon.iterdir()) == ["tall.png", "wide.png", "wide2.png"]


def test_a_file_from_another_model_is_refused(photos, tmp_path, capsys):
    other = tiny_perco("r0.0019", seed=1).eval()
    other.save_pretrained(tmp_path / "sweep" / "r0.0019")
    bits = tmp_path / "bits"
    # a sweep folder: --model DIR --rate RATE picks DIR/RATE
    code, _, err = _run(
        capsys,
        "compress",
        photos / "wide.png",
        "-o",
        bits,
        "--model",
        tmp_path / "sweep",
        "--rate",
        "r0.0019",
    )
    assert code == 0, err
    code, _, err = _run(capsys, "decompress", bits, "-o", tmp_path / "r", "--model", "tiny")
    assert code == 1
    fp = other.fingerprint[:2].hex()
    assert f"wide.perco: made by model {fp}, this model is " in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_rate_disagreeing_with_the_model_is_an_error(tmp_path, capsys):
    tiny_perco("r0.0019").save_pretrained(tmp_path / "ckpt")
    code, _, err = _run(
        capsys, "decompress", tmp_path, "--model", tmp_path / "ckpt", "--rate", "r0.0059"
    )
    assert code == 2 and err.strip().endswith("is at r0.0019, not r0.0059")


def test_image_modes_are_converted_with_a_notice(tmp_path, capsys):
    folder = tmp_path / "modes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(
        folder / "rgba.png"
    )
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert("P").save(
        folder / "pal.png"
    )
    Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)).save(folder / "deep.png")
    code, _, err = _run(capsys, "compress", folder, "-o", tmp_path / "bits")
    assert code == 0
    for name, mode in [("gray", "L"), ("rgba", "RGBA"), ("pal", "P"), ("deep", "I;16")]:
        assert f"{name}.png: converted {mode} image to 8-bit RGB" in err
    deep, _ = read_image(folder / "deep.png")
    raw = np.asarray(Image.open(folder / "deep.png"), dtype=np.float64) / 65535
    assert np.allclose(deep[0, 0].numpy(), raw, atol=1e-6)  # 16 bits kept, not clipped


def test_verify_reads_back_and_reports_psnr(photos, tmp_path, capsys):
    code, out, err = _run(
        capsys,
        "compress",
        photos / "wide.png",
        "-o",
        tmp_path,
        "--verify",
        "--steps",
        "1",
        "--json",
        "--captions-file",
        _captions(tmp_path),
    )
    assert code == 0, err
    entry = json.loads(out)["files"][0]
    assert entry["verify"]["parsed"] and 0 < entry["verify"]["psnr"] < 60
    assert entry["caption"] == "a wide test card"


def _captions(tmp_path):
    path = tmp_path / "captions.tsv"
    path.write_text("wide\ta wide test card\ntall.png\ta tall one\n")
    return path


def test_codec_api_matches_the_model(tmp_path):
    model = tiny_perco("r0.0059").eval()
    images = torch.rand(2, 3, 64, 64)
    files = codec.compress(model, images, ["a", None], seed=4)
    parsed = [codec.parse(model, data)[0] for data, _ in files]
    assert [p.seed for p in parsed] == [4, 4] and parsed[1].caption is None
    decoded = codec.decompress(model, parsed, steps=2)
    direct = model.decode(model.encode(images, ["a", None]), steps=2, seed=4)
    for a, b in zip(decoded, direct, strict=True):
        torch.testing.assert_close(a, b)


def test_a_model_without_text_refuses_captions_in_the_api_and_the_cli(photos, tmp_path, capsys):
    model = tiny_perco("r0.0019", text=False, guidance="none").eval()
    image = load_image(photos / "wide.png")
    with pytest.raises(ValueError, match="no text conditioning"):
        model.encode(image, ["motorbikes racing"])
    with pytest.raises(ValueError, match="no text conditioning"):
        codec.compress(model, image, ["motorbikes racing"])
    assert len(codec.compress(model, image)) == 1  # no caption: fine
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    code, out, err = _run(capsys, "compress", photos / "wide.png", "-o", tmp_path / "b",
                          "--model", tmp_path / "m", "--caption", "motorbikes racing")  # fmt: skip
    assert code == 2 and not (tmp_path / "b").exists()
    last = err.strip().splitlines()[-1]  # (loaders' progress bars come before it)
    assert last.startswith("perco compress: error:") and "no text conditioning" in last
    assert "Traceback" not in err


def test_one_rule_for_decoding_steps_shown_per_file(photos, tmp_path, capsys):
    """--steps, else the model's `steps` (perco.json), else the rung's default."""
    model = tiny_perco("r0.0019", steps=3).eval()
    assert model.default_steps == 3 and tiny_perco("r0.0019").default_steps == 20
    model.save_pretrained(tmp_path / "m")
    bits = tmp_path / "bits"
    assert (
        _run(capsys, "compress", photos / "wide.png", "-o", bits, "--model", tmp_path / "m")[0] == 0
    )
    code, out, err = _run(
        capsys, "decompress", bits, "-o", tmp_path / "r", "--model", tmp_path / "m"
    )
    assert code == 0, err
    assert "3 steps" in out
    parsed = codec.parse(model, (bits / "wide.perco").read_bytes())[0]
    assert torch.equal(
        codec.decompress(model, [parsed])[0], codec.decompress(model, [parsed], steps=3)[0]
    )
    _, out, _ = _run(capsys, "decompress", bits, "-o", tmp_path / "r", "--model", tmp_path / "m",
                     "--steps", "2")  # fmt: skip
    assert "2 steps" in out
    with pytest.raises(SystemExit):
        main(["decompress", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "perco.json, else the rung's: 20 below 0.05 bpp, 5 above" in help_text
