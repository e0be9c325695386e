import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import fuzz_reads, mutate, structural_mutations
from hypothesis import strategies as st

from perco import bitstream
from perco.bitstream import BitstreamError, CompressedImage
from perco.captioning import text_codec
from perco.rates import RATES, Rate, index_bits

FP = bytes.fromhex("5eed")
NON_POWER_OF_TWO = Rate("v1000", downsample=8, codebook_size=1000, steps=20)
CAPTION_40 = "two parrots standing next to each other."
GOLDEN = Path(__file__).parent / "expected" / "format_v1.perco"


def _image(rate, size=(512, 768), caption=CAPTION_40, seed=0, rng=0):
    cell = 8 * rate.downsample
    grid = (math.ceil(size[0] / cell), math.ceil(size[1] / cell))
    indices = np.random.default_rng(rng).integers(0, rate.codebook_size, grid)
    return CompressedImage(indices, caption, size, rate, seed)


@pytest.mark.parametrize("rate", [*RATES.values(), NON_POWER_OF_TWO], ids=lambda r: r.name)
def test_round_trip_is_bit_exact_and_sized_by_the_formula(rate):
    for size, caption in [((512, 768), CAPTION_40), ((333, 517), None), ((64, 64), "é ✓ 日本")]:
        image = _image(rate, size, caption)
        data, info = bitstream.write(image, fingerprint=FP)
        back, info2 = bitstream.read(data, fingerprint=FP, rate=rate)
        assert np.array_equal(back.indices, image.indices) and back.caption == caption
        assert back.size == size and back.seed == 0 and info2 == info
        bits = index_bits(rate, *size)
        assert (
            info.index_bits == bits == math.ceil(image.indices.size * math.log2(rate.codebook_size))
        )
        codec, caption_data = text_codec.encode_caption(caption)
        extended = codec >= text_codec.EXTENDED  # one codec id byte in the header
        length = codec in text_codec.RANGE_CODED  # its byte length: one byte (version 3)
        assert data[1] >> 5 == (3 if length else 1) == info.version
        assert len(data) == 8 + extended + length + math.ceil(bits / 8) + len(caption_data)
        assert info.header_bytes == 8 + extended + length and info.padding_bits == -bits % 8


def test_kodak_lowest_rung_with_a_40_character_caption_is_under_153_bytes():
    assert len(CAPTION_40) == 40
    for use, codec in [(["deflate"], "deflate"), (None, "exact")]:
        codecs = text_codec.caption_codecs(use=use)
        data, info = bitstream.write(
            _image(RATES["r0.0019"]), fingerprint=FP, caption_codecs=codecs
        )
        assert len(data) < 153  # the paper's Kodak figure at 0.003 bpp
        assert info.file_bytes == len(data) and info.caption_codec == codec
    assert info.bpp_file == pytest.approx(8 * len(data) / (512 * 768))
    assert info.bpp_payload == pytest.approx((768 + info.caption_bits) / (512 * 768))


def test_optional_fields_cost_what_the_docstring_says():
    rate = RATES["r0.0019"]
    plain, base = bitstream.write(_image(rate), fingerprint=FP)
    assert base.header_bytes == 10  # 8 + the extended caption codec id + its length (exact)
    seeded, info = bitstream.write(_image(rate, seed=7), fingerprint=FP)
    assert len(seeded) == len(plain) + 1 and info.header_bytes == 11
    big_seed, _ = bitstream.write(_image(rate, seed=300), fingerprint=FP)
    assert len(big_seed) == len(plain) + 2
    with_crc, info = bitstream.write(_image(rate), fingerprint=FP, crc=True)
    assert len(with_crc) == len(plain) + 2 and info.header_bytes == 12 and info.crc
    large, info = bitstream.write(_image(rate, size=(70, 20000), caption=None), fingerprint=FP)
    assert info.header_bytes == 10
    back, _ = bitstream.read(large, fingerprint=FP, rate=rate)
    assert back.size == (70, 20000)
    back, _ = bitstream.read(seeded, fingerprint=FP, rate=rate)
    assert back.seed == 7


def test_zlib_is_the_reference_and_raw_deflate_wins_by_its_wrapper():
    codec, data = text_codec.encode_caption(
        CAPTION_40, text_codec.caption_codecs(use=["zlib", "deflate"])
    )
    assert codec == bitstream.CAPTION_DEFLATE
    assert len(zlib.compress(CAPTION_40.encode(), 9)) == len(data) + 6
    # a zlib-coded caption (the paper's coding) decodes too
    assert text_codec.decode_caption(bitstream.CAPTION_ZLIB, zlib.compress(b"abc")) == "abc"


def test_golden_file_pins_the_format(request):
    image = CompressedImage(
        np.arange(96).reshape(8, 12) % 256, CAPTION_40, (512, 768), RATES["r0.0019"], seed=3
    )
    deflate = text_codec.caption_codecs(use=["deflate"])
    data, _ = bitstream.write(image, fingerprint=FP, crc=True, caption_codecs=deflate)
    if request.config.getoption("--regen-golden"):
        GOLDEN.write_bytes(data)
    assert data == GOLDEN.read_bytes(), "format changed: bump VERSION, then --regen-golden"
    magic, flags, fingerprint = "a7", f"{1 << 5 | 1 << 4 | 1 << 3 | 2:02x}", "5eed"
    fields = f"{0 << 28 | 511 << 14 | 767:08x}"  # rate id 0, height-1, width-1
    assert data[:9].hex() == magic + flags + fingerprint + fields + "03"
    assert data[8] == 3 and data[11:14] == bytes([0, 1, 2])  # seed, then the indices


def test_the_golden_version_1_file_still_decodes_to_the_same_content():
    image, info = bitstream.read(GOLDEN.read_bytes(), fingerprint=FP, rate=RATES["r0.0019"])
    assert np.array_equal(image.indices, np.arange(96).reshape(8, 12) % 256)
    assert image.caption == CAPTION_40 and image.seed == 3 and image.size == (512, 768)
    assert info.version == 1 and info.crc


def _files_of_each_layout(crc: bool):
    """Packed indices with no caption, a self-delimiting caption (version 1) and a
    range-coded one (version 3), and large-image and non-power-of-two variants."""
    rate = RATES["r0.0019"]
    deflate, exact = (text_codec.caption_codecs(use=[c]) for c in ("deflate", "exact"))
    files = {
        "v1 no caption": (_image(rate, caption=None), rate, None),
        "v1 deflate": (_image(rate), rate, deflate),
        "v3 exact, seed": (_image(rate, seed=300), rate, exact),
        "v1 large": (_image(rate, size=(70, 20000), caption=None), rate, None),
        "v3 V=1000": (_image(NON_POWER_OF_TWO, size=(200, 300)), NON_POWER_OF_TWO, exact),
    }
    return {name: (bitstream.write(im, fingerprint=FP, caption_codecs=c, crc=crc)[0], r)
            for name, (im, r, c) in files.items()}  # fmt: skip


@pytest.mark.parametrize("crc", [False, True], ids=["no CRC", "CRC"])
def test_cut_or_extended_files_are_refused_whatever_the_layout(crc):
    """No valid decode allowed: a cut or extended file is refused with or without a CRC,
    and with the CRC every single-bit change of the header is refused too (without it, a
    bit of the image size or the seed can change to another valid value)."""
    for name, (data, rate) in _files_of_each_layout(crc).items():
        assert data[1] >> 5 in (1, 3), name
        header = bitstream.read_header(data)
        assert bitstream.end_checked(header)
        for what, bad in structural_mutations(data, header.length if crc else 0).items():
            with pytest.raises(BitstreamError):
                bitstream.read(bad, fingerprint=FP, rate=rate)
                pytest.fail(f"{name}: {what} decoded")


def test_a_version_1_file_with_a_range_coded_caption_is_read_but_not_end_checked():
    """Files written before version 3 keep decoding as they always did."""
    rate = RATES["r0.0019"]
    data, info = bitstream.write(_image(rate), fingerprint=FP)  # version 3, exact text
    at = info.header_bytes - 1 + 96  # header with codec id, the indices, the caption length
    assert data[at] == len(data) - at - 1
    old = bytes([data[0], data[1] & 0x1F | 1 << 5]) + data[2:at] + data[at + 1 :]
    image, info = bitstream.read(old, fingerprint=FP, rate=rate)
    assert image.caption == CAPTION_40 and info.version == 1
    assert not bitstream.end_checked(bitstream.read_header(old))
    # the reason version 3 exists: the same file cut by a byte still decodes
    bitstream.read(old[:-1], fingerprint=FP, rate=rate)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"", "empty file"),
        (lambda d: d[:5], "truncated header"),
        (lambda d: b"\x00" + d[1:], "not a perco file"),
        (lambda d: d[:1] + bytes([d[1] & 0x1F | 0xE0]) + d[2:], "newer than this perco"),
        (lambda d: d[:1] + bytes([d[1] & 0x1F]) + d[2:], "version 0"),
        (lambda d: d[:2] + b"\x00\x00" + d[4:], "made by model 0000"),
        (lambda d: d[:4] + bytes([d[4] & 0x0F | 0x90]) + d[5:], "rate id 9 is unknown"),
        (lambda d: d[:4] + bytes([d[4] & 0x0F | 0x10]) + d[5:], "file is at r0.0024"),
        (lambda d: d[:50], "truncated index payload"),
        (lambda d: d[:-3], "caption stream is truncated"),
        (lambda d: d + b"\x00", "trailing bytes"),
        (lambda d: d[: 8 + 96] + b"\xff\xff\xff", "do not inflate"),  # reserved block type
    ],
)
def test_bad_files_raise_bitstream_errors(mutate, message):
    deflate = text_codec.caption_codecs(use=["deflate"])
    data, _ = bitstream.write(_image(RATES["r0.0019"]), fingerprint=FP, caption_codecs=deflate)
    with pytest.raises(BitstreamError, match=message):
        bitstream.read(mutate(data), fingerprint=FP, rate=RATES["r0.0019"])


def test_crc_catches_a_flip_in_the_index_payload():
    rate = RATES["r0.0019"]
    data, _ = bitstream.write(_image(rate), fingerprint=FP, crc=True)
    flipped = bytearray(data)
    flipped[20] ^= 0x10
    plain, _ = bitstream.write(_image(rate), fingerprint=FP)
    silent = bytearray(plain)
    silent[20] ^= 0x10  # without a CRC the same flip decodes to other indices
    bitstream.read(bytes(silent), fingerprint=FP, rate=rate)
    with pytest.raises(BitstreamError, match="CRC mismatch"):
        bitstream.read(bytes(flipped), fingerprint=FP, rate=rate)


def test_non_power_of_two_payload_rejects_values_outside_the_codebook():
    rate = Rate("v3", downsample=8, codebook_size=3, steps=20)
    image = CompressedImage(np.zeros((1, 5), dtype=np.int64), None, (64, 320), rate)
    data, info = bitstream.write(image, fingerprint=FP)
    assert info.index_bits == 8  # 3^5 = 243 < 256
    forged = data[:8] + b"\xff"  # 255 >= 3^5
    with pytest.raises(BitstreamError, match="outside the codebook"):
        bitstream.read(forged, fingerprint=FP, rate=rate)


# -- mutation fuzzing --------------------------------------------------------------------
def _valid_files():
    rate = RATES["r0.0019"]
    files = [
        (bitstream.write(_image(rate), fingerprint=FP)[0], rate),
        (bitstream.write(_image(rate, caption=None, seed=9), fingerprint=FP, crc=True)[0], rate),
        (
            bitstream.write(_image(RATES["r0.0059"], size=(100, 90)), fingerprint=FP)[0],
            RATES["r0.0059"],
        ),
        (
            bitstream.write(_image(NON_POWER_OF_TWO, size=(200, 300)), fingerprint=FP)[0],
            NON_POWER_OF_TWO,
        ),
    ]
    # the paper's zlib-coded caption, set by hand (write() picks the smaller raw DEFLATE)
    data, _ = bitstream.write(_image(rate, caption=None), fingerprint=FP)
    zlib_file = bytes([data[0], data[1] | bitstream.CAPTION_ZLIB]) + data[2:]
    files.append((zlib_file + zlib.compress(CAPTION_40.encode()), rate))
    return files


VALID = _valid_files()


@st.composite
def mutated(draw):
    data, rate = draw(st.sampled_from(VALID))
    return mutate(draw, data, bitstream.HEADER_BYTES), rate


def test_mutated_files_end_in_bitstream_error_or_a_valid_decode():
    counts = fuzz_reads(mutated(), FP, 20241122)
    assert counts["total"] >= 10_000
    assert counts["payload"] >= counts["total"] / 2


@pytest.mark.slow
def test_rate_table_script(tmp_path, capsys):
    import runpy

    import torch

    from perco.io import save_image

    save_image(torch.rand(3, 128, 192), tmp_path / "x.png")
    script = Path(__file__).resolve().parents[1] / "scripts" / "rate_table.py"
    runpy.run_path(str(script), run_name="rate_table")["main"](["--image", str(tmp_path / "x.png")])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| r0")]
    assert len(rows) == len(RATES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # what is neither indices, padding nor caption is exactly the header: 8 bytes,
        # plus the extended caption-codec id byte of the default token-id coder and the
        # caption's length (format version 3)
        assert cells[7] == "10" and cells[6] == str(8 * int(cells[7]))
        assert 0 <= int(cells[3]) < 8
