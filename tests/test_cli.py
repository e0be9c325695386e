import torch

from perco.cli import main
from perco.io import load_image, save_image


def test_demo_encodes_counts_and_decodes(tmp_path, capsys):
    image = tmp_path / "photo.png"
    save_image(torch.rand(3, 40, 72), image)
    out = tmp_path / "out"
    code = main(
        [
            "demo",
            "--image",
            str(image),
            "--rate",
            "r0.0059",
            "--steps",
            "1",
            "--caption",
            "a test card",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    # x4 downsampling of the 8x latent: 32-px cells, so 40x72 pads to 64x96 and gives
    # a 2x3 grid of indices at 6 bits each (V=64)
    assert "padded to 96x64" in text
    assert "index bits     36 " in text
    # the bits printed are those of the file written, which decodes to the same image
    from perco import codec
    from perco.testing import tiny_perco

    data = (out / "photo_r0.0059.perco").read_bytes()
    parsed, bits = codec.parse(tiny_perco("r0.0059").eval(), data)
    assert f"{len(data)} bytes" in text and f"caption bits   {bits.caption_bits} " in text
    assert f"({bits.caption_codec})" in text and parsed.caption == "a test card"
    recon = load_image(out / "photo_r0.0059.png")
    assert recon.shape == (1, 3, 40, 72)


def test_demo_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["demo", "--image", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("perco demo: error: no image at") and "\n" not in err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["demo", "--image", str(broken), "--out", str(tmp_path)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_save_image_round_trips_and_leaves_no_temp_files(tmp_path):
    x = torch.rand(3, 5, 7)
    save_image(x, tmp_path / "a.png")
    back = load_image(tmp_path / "a.png")[0]
    assert (back - x).abs().max() <= 0.5 / 255 + 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
