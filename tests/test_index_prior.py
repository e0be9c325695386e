"""The learned index prior: exact coding, hybrid mode, model folders, files, CLI."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import fuzz_reads, mutate, structural_mutations
from hypothesis import strategies as st

from perco import bitstream, codec
from perco.bitstream import BitstreamError, CompressedImage
from perco.captioning import text_codec
from perco.models.index_prior import (
    ContextPrior,
    UniformPrior,
    fit_context_prior,
    kept_count,
    pass_order,
)
from perco.models.perco import PerCo
from perco.rates import RATES
from perco.testing import tiny_perco

FP = bytes.fromhex("5eed")


def _prior(v=256, d=8, channels=16, seed=0, scale=3.0) -> ContextPrior:
    torch.manual_seed(seed)
    prior = ContextPrior(v, d, channels, 5).eval()
    with torch.no_grad():  # a prior with some structure: neighbours' embeddings matter
        for p in prior.parameters():
            p.mul_(scale)
    return prior


def _smooth_maps(n, shape, v, seed=0):
    """Index maps with spatial correlation (blurred noise, quantized)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, shape[0] + 4, shape[1] + 4, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 5, 1)[:, 0]
    ranks = x.flatten().argsort().argsort().view_as(x)
    return (ranks * v // ranks.numel()).numpy().astype(np.int64)


def test_coding_order_visits_every_position_once_pass_by_pass():
    order = pass_order(3, 5)
    assert sorted(order) == list(range(15))
    assert list(order[:6]) == [0, 2, 4, 10, 12, 14]  # (even, even) first, raster inside
    assert list(order[6:8]) == [6, 8]  # then (odd, odd)
    assert kept_count(0, 15) == 15 and kept_count(16, 15) == 4 and kept_count(48, 96) == 72


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (2, 2), (7, 3), (8, 12)])
def test_round_trip_is_exact_for_any_shape(shape):
    prior = _prior()
    maps = np.random.default_rng(0).integers(0, 256, (3, *shape))
    streams = prior.encode(maps)
    for m, s in zip(maps, streams, strict=True):
        back, code = prior.decode(s, shape)
        assert code == 0 and np.array_equal(back, m)


def test_actual_bits_are_within_16_of_the_ideal_cross_entropy():
    # (a prior that gives the true symbols under 2^-24 codes them at the coder's floor,
    # below the ideal: a random prior that peaked would test that instead)
    prior = _prior(scale=1.0)
    maps = _smooth_maps(4, (16, 24), 256)
    ideal = prior.ideal_bits(maps)
    actual = np.array([8 * len(s) for s in prior.encode(maps)])
    assert np.all(actual - ideal < 16) and np.all(actual - ideal > -8)


def test_the_integer_network_follows_the_float_network():
    prior = _prior()
    maps = torch.from_numpy(_smooth_maps(2, (8, 10), 256))
    for p, logits in enumerate(prior.logits(maps)):
        exact = prior.weights(maps, p)
        log_exact = torch.log(exact / exact.sum(-1, keepdim=True))
        log_float = torch.log_softmax(logits.double().flatten(2).transpose(1, 2), -1)
        likely = log_float > -8  # where the table's floor of 1 does not dominate
        assert (log_exact - log_float)[likely].abs().max() < 0.05


def test_distributions_do_not_depend_on_batch_or_threads():
    prior = _prior(1024, d=16, channels=32)
    maps = torch.from_numpy(_smooth_maps(4, (16, 24), 1024))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        together = [prior.weights(maps, p) for p in range(4)]
        torch.set_num_threads(1)
        for i in range(4):
            for p in range(4):
                assert torch.equal(prior.weights(maps[i : i + 1], p)[0], together[p][i])
    finally:
        torch.set_num_threads(threads)


def test_a_prior_cast_to_another_dtype_refuses_to_code():
    prior = _prior()
    m = _smooth_maps(1, (4, 6), 256)
    (stream,) = prior.encode(m)
    prior.to(torch.bfloat16)  # what model.to(torch.bfloat16) does to it
    with pytest.raises(ValueError, match="must stay in float32"):
        prior.decode(stream, (4, 6))
    with pytest.raises(ValueError, match="must stay in float32"):
        prior.encode(m)


def test_hybrid_mode_sends_a_share_and_draws_the_rest_with_the_seed():
    prior = _prior()
    m = _smooth_maps(1, (8, 12), 256)
    order = pass_order(8, 12)
    sizes = []
    for keep in (1.0, 0.75, 0.5, 0.25):
        (stream,) = prior.encode(m, keep)
        sizes.append(len(stream))
        back, code = prior.decode(stream, (8, 12), seed=5)
        kept = kept_count(code, 96)
        assert kept == round(96 * keep) and code == (0 if keep == 1 else round(64 * keep))
        assert np.array_equal(back.reshape(-1)[order[:kept]], m[0].reshape(-1)[order[:kept]])
        again, _ = prior.decode(stream, (8, 12), seed=5)
        assert np.array_equal(again, back)  # the draws are a function of the seed
        if keep < 1:
            other, _ = prior.decode(stream, (8, 12), seed=6)
            assert not np.array_equal(other, back)
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 2
    with pytest.raises(ValueError, match="rounds to 0"):
        prior.encode(m, 0.001)
    with pytest.raises(ValueError, match="fitted index prior"):
        UniformPrior(256).encode(m, 0.5)


def test_a_map_the_prior_codes_almost_for_free_is_padded_to_the_minimum_length():
    prior = _prior(64, scale=1.0)
    with torch.no_grad():
        prior.pass_bias[:, 7] = 40.0  # index 7 everywhere costs ~0 bits
        prior.head.weight.zero_()
    flat = np.full((1, 40, 40), 7)
    (stream,) = prior.encode(flat)
    assert len(stream) == 1600 // 128 + 1 and stream.endswith(b"\0")
    assert np.array_equal(prior.decode(stream, (40, 40))[0], flat[0])
    with pytest.raises(BitstreamError, match="too short"):
        prior.decode(stream[:-1], (40, 40))


def test_fitting_beats_the_frequency_table_on_held_out_maps():
    maps = _smooth_maps(60, (12, 12), 64, seed=1)
    # a codebook whose neighbouring entries stand for similar values, as a trained one
    codebook = torch.cat([torch.linspace(-2, 2, 64)[:, None], 0.1 * torch.randn(64, 7)], 1)
    prior, record = fit_context_prior(
        list(maps[:50]), list(maps[50:55]), codebook, steps=200, channels=16, eval_every=50
    )
    from perco.models.index_prior import unigram_bits

    test = list(maps[55:])
    ideal = prior.ideal_bits(np.stack(test)).sum()
    assert ideal < 0.9 * unigram_bits(list(maps[:50]), test, 64).sum()
    assert record["step"] > 0 and record["valid_bits_per_index"] < 6


# -- a model with a prior ----------------------------------------------------------------
def _with_prior(rate="r0.0019"):
    model = tiny_perco(rate).eval()
    before = model.fingerprint
    v = model.rate.codebook_size
    model.set_index_prior(_prior(v, model.quantizer.config.codebook_dim), {"fitted_on": "test"})
    assert model.fingerprint != before  # a prior changes what decodes the files
    return model


@pytest.mark.parametrize("rate", list(RATES))
def test_every_rung_round_trips_through_files(rate):
    model = _with_prior(rate)
    images = torch.rand(2, 3, 128, 192)
    encoded = model.encode(images)
    files = codec.compress(model, images)
    for i, (data, info) in enumerate(files):
        assert data[1] >> 5 == bitstream.PRIOR_VERSION and info.index_coding == "learned prior"
        parsed, info2 = codec.parse(model, data)
        assert np.array_equal(parsed.indices, encoded.indices[i].numpy())
        assert info2.index_bits == info.index_bits and info2.bpp_uniform == info.bpp_uniform
    uniform = codec.compress(model, images, uniform=True)
    assert all(d[1] >> 5 == bitstream.UNIFORM_VERSION for d, _ in uniform)
    assert np.array_equal(codec.parse(model, uniform[0][0])[0].indices, encoded.indices[0].numpy())
    assert files[0][1].bpp_uniform == uniform[0][1].bpp_file


def test_the_prior_is_saved_in_the_folder_and_changes_the_fingerprint(tmp_path):
    model = _with_prior()
    model.save_pretrained(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "perco.json").read_text())
    assert doc["index_prior"] == {"class": "ContextPrior", "fitted_on": "test"}
    loaded = PerCo.from_pretrained(tmp_path / "m")
    assert loaded.fingerprint == model.fingerprint
    for a, b in zip(loaded.index_prior.state_dict().values(),
                    model.index_prior.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b)
    plain = tiny_perco()
    loaded.set_index_prior(None)
    assert loaded.fingerprint == plain.fingerprint  # removed: the model it was before


def test_a_prior_coded_file_is_refused_by_a_model_without_one():
    model = _with_prior()
    data, _ = codec.compress(model, torch.rand(1, 3, 64, 64))[0]
    header = bitstream.read_header(data)
    with pytest.raises(BitstreamError, match="learned index prior; this model has none"):
        bitstream.read_payload(data, header, rate=model.rate)


def test_captions_follow_a_length_prefixed_stream():
    prior = _prior()
    rate = RATES["r0.0019"]
    m = _smooth_maps(1, (8, 12), 256)[0]
    for caption in ("two parrots", None):
        image = CompressedImage(m, caption, (512, 768), rate, seed=3)
        data, info = bitstream.write(image, fingerprint=FP, prior=prior)
        back, info2 = bitstream.read(data, fingerprint=FP, rate=rate, prior=prior)
        assert np.array_equal(back.indices, m) and back.caption == caption and back.seed == 3
        assert info2 == info and info.uniform_index_bits == 96 * 8
        plain, _ = bitstream.write(image, fingerprint=FP)
        assert info.uniform_file_bytes == len(plain)


SCRIPT = """
import sys, hashlib, torch
torch.set_num_threads(1)
from perco import codec, load_model
model = load_model(sys.argv[1])
for path in sys.argv[2:]:
    parsed, _ = codec.parse(model, open(path, "rb").read())
    print(hashlib.sha256(parsed.indices.tobytes()).hexdigest())
"""


def test_files_made_in_a_batch_of_four_decode_alone_in_another_process(tmp_path):
    model = _with_prior("r0.0098")
    model.save_pretrained(tmp_path / "m")
    images = torch.rand(4, 3, 192, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        files = codec.compress(model, images)
    finally:
        torch.set_num_threads(threads)
    encoded = model.encode(images)
    paths = []
    for i, (data, _) in enumerate(files):
        paths.append(tmp_path / f"{i}.perco")
        paths[-1].write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path / "m"), *map(str, paths)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    import hashlib

    expected = [hashlib.sha256(e.numpy().astype(np.int64).tobytes()).hexdigest()
                for e in encoded.indices]  # fmt: skip
    assert out.stdout.split() == expected


# -- corrupted prior-coded files --------------------------------------------------------
PRIOR = _prior(256, 8, 16)
RATE = RATES["r0.0019"]


def _valid_prior_files():
    m = _smooth_maps(2, (8, 12), 256)
    small = np.random.default_rng(1).integers(0, 256, (2, 3))
    images = [
        CompressedImage(m[0], None, (512, 768), RATE),
        CompressedImage(m[1], "two parrots standing", (512, 768), RATE, seed=9),
        CompressedImage(m[0], None, (512, 768), RATE, keep=0.5),
        CompressedImage(small, "a cat", (100, 150), RATE),
    ]
    files = [bitstream.write(im, fingerprint=FP, prior=PRIOR)[0] for im in images]
    files.append(bitstream.write(images[1], fingerprint=FP, prior=PRIOR, crc=True)[0])
    return files


PRIOR_FILES = _valid_prior_files()


@st.composite
def mutated(draw):
    data = mutate(draw, draw(st.sampled_from(PRIOR_FILES)), bitstream.HEADER_BYTES)
    return data, RATE


def test_mutated_prior_coded_files_end_in_bitstream_error_or_a_valid_decode():
    counts = fuzz_reads(mutated(), FP, 20261130, prior=PRIOR)
    assert counts["total"] >= 10_000
    assert counts["payload"] >= counts["total"] / 2


def _prior_files(crc: bool) -> dict[str, bytes]:
    m = _smooth_maps(2, (8, 12), 256)
    exact = text_codec.caption_codecs(use=["exact"])
    deflate = text_codec.caption_codecs(use=["deflate"])
    images = {
        "no caption": (CompressedImage(m[0], None, (512, 768), RATE), None),
        "hybrid, seed": (CompressedImage(m[0], None, (512, 768), RATE, seed=9, keep=0.5), None),
        "exact caption": (CompressedImage(m[1], "two parrots standing", (512, 768), RATE), exact),
        "deflate caption": (CompressedImage(m[1], "two parrots", (512, 768), RATE), deflate),
    }
    return {
        name: bitstream.write(im, fingerprint=FP, prior=PRIOR, crc=crc, caption_codecs=c)[0]
        for name, (im, c) in images.items()
    }


@pytest.mark.parametrize("crc", [False, True], ids=["no CRC", "CRC"])
def test_cut_or_extended_prior_coded_files_are_refused(crc):
    """The issue this format version fixes: version 2 decoded a cut file, or one with bytes
    appended, into another image. No valid decode is allowed; with the CRC, no single-bit
    change of the header either."""
    for name, data in _prior_files(crc).items():
        header = bitstream.read_header(data)
        assert header.version == bitstream.PRIOR_VERSION and bitstream.end_checked(header)
        for what, bad in structural_mutations(data, header.length if crc else 0).items():
            with pytest.raises(BitstreamError):
                bitstream.read(bad, fingerprint=FP, rate=RATE, prior=PRIOR)
                pytest.fail(f"{name}: {what} decoded")


def test_version_2_files_written_before_still_decode():
    """A version 2 file (no index length without a caption) reads as it always did; its
    end cannot be checked, which is why version 4 replaced it."""
    data = _prior_files(False)["no caption"]
    header_bytes = bitstream.read(data, fingerprint=FP, rate=RATE, prior=PRIOR)[1].header_bytes
    stream = data[header_bytes:]  # after the 8-byte header and the index length
    assert header_bytes == 8 + 2 and (data[8] & 0x7F) + (data[9] << 7) == len(stream)
    old = bytes([data[0], data[1] & 0x1F | 2 << 5]) + data[2:8] + stream
    image, info = bitstream.read(old, fingerprint=FP, rate=RATE, prior=PRIOR)
    new, _ = bitstream.read(data, fingerprint=FP, rate=RATE, prior=PRIOR)
    assert np.array_equal(image.indices, new.indices) and info.version == 2
    assert info.uniform_file_bytes == len(old) - len(stream) + 96
    assert not bitstream.end_checked(bitstream.read_header(old))
    bitstream.read(old[:-1], fingerprint=FP, rate=RATE, prior=PRIOR)  # decodes: unchecked


def test_damaged_files_are_refused_in_one_line_and_the_others_decode(tmp_path, capsys):
    from perco.cli import main

    model = _with_prior()
    model.save_pretrained(tmp_path / "m")
    files = codec.compress(model, torch.rand(2, 3, 128, 128))
    (a, _), (b, _) = files
    damaged = {
        "future": bytes([a[0], a[1] & 0x1F | 5 << 5]) + a[2:],  # a format version to come
        "header": a[:8],
        "half": a[: len(a) // 2],
        "cut": a[:-1],
        "appended": a + b"\x00\x01\x02",
    }
    for name, data in {**damaged, "good": b}.items():
        (tmp_path / f"{name}.perco").write_bytes(data)
    capsys.readouterr()
    status = main(["decompress", *(str(tmp_path / f"{n}.perco") for n in [*damaged, "good"]),
                   "--model", str(tmp_path / "m"), "-o", str(tmp_path / "out"),
                   "--steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("perco decompress: error")]
    assert status == 1 and len(errors) == len(damaged) and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


def test_fit_prior_command_then_compress_and_decompress(tmp_path, capsys):
    from perco.cli import main
    from perco.io import save_image

    tiny_perco("r0.0019").save_pretrained(tmp_path / "m")
    photos = tmp_path / "photos"
    photos.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        low = torch.rand(1, 3, 4, 6, generator=g)
        save_image(torch.nn.functional.interpolate(low, size=(128, 192), mode="bilinear")[0],
                   photos / f"p{i:02d}.png")  # fmt: skip
    status = main(["fit-prior", str(tmp_path / "m"), "--images", str(photos), "--steps", "20",
                   "-o", str(tmp_path / "p")])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "context prior" in out and "(2 held out)" in out
    record = json.loads((tmp_path / "p" / "perco.json").read_text())["index_prior"]
    assert record["class"] == "ContextPrior" and record["images"] == 10
    assert str(photos) in record["fitted_on"]
    assert "index_prior" not in json.loads((tmp_path / "m" / "perco.json").read_text())

    photo = photos / "p00.png"
    assert main(["compress", str(photo), "--model", str(tmp_path / "p"), "-o", str(tmp_path / "b"),
                 "--json"]) == 0  # fmt: skip
    (entry,) = json.loads(capsys.readouterr().out)["files"]
    assert entry["index_coding"] == "learned prior" and entry["uniform_index_bits"] == 48
    assert main(["decompress", str(tmp_path / "b" / "p00.perco"), "--model", str(tmp_path / "p"),
                 "-o", str(tmp_path / "r"), "--steps", "1"]) == 0  # fmt: skip
    assert (tmp_path / "r" / "p00.png").is_file()
    # the model without the prior refuses the file in one line
    assert main(["decompress", str(tmp_path / "b" / "p00.perco"), "--model", str(tmp_path / "m"),
                 "-o", str(tmp_path / "r2")]) == 1  # fmt: skip
    assert "made by model" in capsys.readouterr().err


def test_a_stream_that_is_not_its_indices_canonical_code_is_refused():
    """The decoder codes what it read again: zeroed or changed bytes that still decode,
    or the stream read on another grid, are refused; the stream itself passes."""
    m = _smooth_maps(1, (24, 16), 256)
    (stream,) = PRIOR.encode(m)
    assert np.array_equal(PRIOR.decode(stream, (24, 16))[0], m[0])
    for bad in (stream[:-2] + b"\x00\x00", stream[:-1] + bytes([stream[-1] ^ 1]),
                stream[:40] + bytes([stream[40] ^ 0x10]) + stream[41:]):  # fmt: skip
        with pytest.raises(BitstreamError, match="corrupt"):
            PRIOR.decode(bad, (24, 16))
    with pytest.raises(BitstreamError, match="corrupt"):
        PRIOR.decode(stream, (24, 20))  # an image size read as another grid
