"""Captioners (a tiny BLIP-2 through the real loading path), the caption pre-pass, and the
caption codecs (round trips, the token-id coder's bits on held-out COCO captions)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from perco import bitstream, codec
from perco.bitstream import BitstreamError, CompressedImage
from perco.captioning import load_captioner, text_codec
from perco.captioning.captioners import Blip2Captioner, NoCaptions
from perco.captioning.corpus import fit_split, load_coco_captions
from perco.captioning.prepass import caption_folder, caption_shards, done_ids
from perco.captioning.prepass import main as caption_main
from perco.io import read_captions
from perco.models.text import token_row
from perco.rates import RATES
from perco.testing import clip_tokenizer, tiny_blip2

CAPTION = "A woman holding an umbrella walks past a yellow taxi."


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / name)
    return folder


# -- captioners ------------------------------------------------------------------------
def test_tiny_blip2_captions_offline_through_the_from_pretrained_path(blip2_dir, photos):
    captioner = Blip2Captioner(blip2_dir, max_new_tokens=6, batch_size=2)
    images = [Image.open(p) for p in sorted(photos.iterdir())]
    captions = captioner(images, ["a", "b", "c"])
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    vocab = captioner._load()[1].tokenizer.get_vocab()
    assert all(w in vocab and len(c.split()) <= 6 for c in captions for w in c.split())
    assert captioner(images, ["a", "b", "c"]) == captions  # deterministic decoding
    assert captioner.settings["do_sample"] is False and captioner.settings["max_new_tokens"] == 6


def test_the_generic_image_to_text_captioner_loads_the_same_checkpoint(blip2_dir, photos):
    image = [Image.open(photos / "a.png")]
    blip2 = load_captioner(f"blip2:{blip2_dir}", max_new_tokens=5)
    generic = load_captioner(f"vlm:{blip2_dir}", max_new_tokens=5)
    assert generic(image, ["a"]) == blip2(image, ["a"])


def test_file_ground_truth_and_no_captions(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"x": "one", "y.png": "two"}))
    (tmp_path / "gt.json").write_text(json.dumps({"x": ["first", "second"], "y": []}))
    assert load_captioner(f"file:{tmp_path / 'c.json'}")([], ["x.png", "y.png", "z"]) == [
        "one", "two", None,
    ]  # fmt: skip
    gt = load_captioner(f"ground-truth:{tmp_path / 'gt.json'}")
    assert gt([], ["x", "y"]) == ["first", None]
    assert NoCaptions()([], ["x"]) == [None]
    with pytest.raises(ValueError, match="unknown captioner"):
        load_captioner("llava")


# -- the pre-pass ----------------------------------------------------------------------
def test_prepass_on_a_folder_is_resumable_and_feeds_read_captions(blip2_dir, photos, tmp_path):
    out = tmp_path / "captions.jsonl"
    captioner = Blip2Captioner(blip2_dir, max_new_tokens=4)
    assert caption_folder(captioner, photos, out, batch_size=2) == 3
    first = out.read_text()
    assert caption_folder(captioner, photos, out) == 0 and out.read_text() == first
    assert set(read_captions(out)) == {"a.png", "b.jpg", "c.png"}

    # a crash mid-line leaves a torn line: it is dropped and that image captioned again
    out.write_text(first.rsplit("\n", 2)[0] + '\n{"id": "c.p')
    assert done_ids(out) == {"a.png", "b.jpg"}
    assert caption_folder(captioner, photos, out) == 1
    assert sorted(first.splitlines()) == sorted(out.read_text().splitlines())


def test_prepass_cli_on_shards_adds_txt_and_skips_finished_shards(blip2_dir, photos, tmp_path):
    import webdataset as wds

    shard = tmp_path / "train-0000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for p in sorted(photos.iterdir()):
            sink.write({"__key__": p.stem, p.suffix[1:]: p.read_bytes()})
    out = tmp_path / "captioned"
    caption_main([str(shard), "-o", str(out), "--captioner", f"blip2:{blip2_dir}"])
    samples = list(wds.WebDataset(str(out / shard.name), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a", "b", "c"]
    assert all(s["txt"].decode() for s in samples)
    assert samples[1]["jpg"] == (photos / "b.jpg").read_bytes()  # the image is untouched
    stamp = (out / shard.name).stat().st_mtime_ns
    caption_main([str(shard), "-o", str(out), "--captioner", f"blip2:{blip2_dir}"])
    assert (out / shard.name).stat().st_mtime_ns == stamp

    jsonl = tmp_path / "keys.jsonl"
    assert caption_shards(NoCaptions(), [str(shard)], jsonl) == 3
    assert caption_shards(NoCaptions(), [str(shard)], jsonl) == 0


def test_prepass_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        caption_main([str(tmp_path / "missing-{0..1}.tar"), "-o", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


# -- caption codecs --------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_exact_text_mode_round_trips_any_unicode_string(text):
    exact = text_codec.ExactTextCodec()
    assert exact.decode(exact.encode(text)) == text


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_token_codec_hands_back_exactly_the_tokenizer_ids(tokenizer, text):
    tokens = text_codec.TokenCodec(tokenizer)
    back = tokens.decode(tokens.encode(text))
    assert isinstance(back, text_codec.TokenCaption) and list(back.ids) == tokens.ids(text)
    reference = tokenizer(text, padding="max_length", max_length=77, truncation=True)
    assert token_row(tokenizer, back.ids, 77).tolist() == reference.input_ids


def test_zlib_deflate_exact_tokens_rank_on_a_coco_caption(tokenizer):
    codecs = text_codec.caption_codecs(tokenizer)
    sizes = {c.name: len(c.encode(CAPTION)) for c in codecs.values()}
    assert sizes["zlib"] == len(zlib.compress(CAPTION.encode(), 9))
    assert sizes["zlib"] == sizes["deflate"] + 6
    assert sizes["tokens"] < sizes["exact"] < sizes["deflate"]
    assert text_codec.encode_caption(CAPTION, codecs)[0] == text_codec.TOKENS


def test_token_model_is_refused_for_another_tokenizer(tokenizer):
    other = tiny_blip2()[1].tokenizer
    with pytest.raises(text_codec.CaptionCodingError, match="fitted for tokenizer"):
        text_codec.TokenCodec(other)
    assert text_codec.TOKENS not in text_codec.caption_codecs(other)
    with pytest.raises(ValueError, match="do not apply"):
        text_codec.caption_codecs(other, use=["tokens"])

    # a file whose caption is token ids cannot be read by a model without that tokenizer
    image = CompressedImage(np.zeros((8, 12), np.int64), CAPTION, (512, 768), RATES["r0.0019"])
    data, info = bitstream.write(
        image, fingerprint=b"\x00\x01", caption_codecs=text_codec.caption_codecs(tokenizer)
    )
    assert info.caption_codec == "tokens"
    with pytest.raises(BitstreamError, match="tokenizer this model does not have"):
        bitstream.read(data, fingerprint=b"\x00\x01", rate=RATES["r0.0019"])
    back, _ = bitstream.read(
        data, fingerprint=b"\x00\x01", rate=RATES["r0.0019"],
        caption_codecs=text_codec.caption_codecs(tokenizer),
    )  # fmt: skip
    assert back.caption == "a woman holding an umbrella walks past a yellow taxi ."


def test_a_lowest_rung_kodak_file_with_a_typical_caption_is_well_under_153_bytes(tokenizer):
    image = CompressedImage(np.zeros((8, 12), np.int64), CAPTION, (512, 768), RATES["r0.0019"])
    data, info = bitstream.write(
        image, fingerprint=b"\x00\x01", caption_codecs=text_codec.caption_codecs(tokenizer)
    )
    assert len(data) <= 8 + 1 + 96 + 12 < 153  # header, codec id, 768 index bits, caption
    assert info.caption_bits < 100


def test_tiny_perco_round_trip_conditions_on_the_same_token_ids(model, images):
    files = codec.compress(model, images[:1], [CAPTION])
    assert files[0][1].caption_codec == "tokens"
    parsed, _ = codec.parse(model, files[0][0])
    assert isinstance(parsed.caption, text_codec.TokenCaption)
    with torch.no_grad():
        direct = model._text([CAPTION])
        via_ids = model._text([parsed.caption])
    assert torch.equal(direct, via_ids)
    verbatim = codec.compress(model, images[:1], [CAPTION], caption_codecs=["exact"])
    assert codec.parse(model, verbatim[0][0])[0].caption == CAPTION


def test_token_coder_averages_under_100_bits_on_held_out_coco_captions(assets, tokenizer):
    captions = load_coco_captions(assets / "coco-mini/annotations/captions_val2017.json")
    fit, held_out = fit_split(captions)
    held_images = text_codec.split_by_image(i for i, _ in captions)
    assert 900 < len(held_images) < 1100  # 20 % of the 5,000 images, every caption of each
    assert len(held_out) == sum(i in held_images for i, _ in captions)
    shipped = text_codec.TokenCodec(tokenizer).model
    assert shipped.meta["captions"] == len(fit)  # fitted on exactly the other 80 %
    sample = np.random.default_rng(0).choice(len(held_out), 150, replace=False)
    tokens = text_codec.TokenCodec(tokenizer)
    bits = [8 * len(tokens.encode(held_out[i])) for i in sample]
    assert np.mean(bits) <= 100


def test_compress_cli_captions_with_blip2_and_keeps_text_verbatim_on_request(
    blip2_dir, tokenizer, tmp_path, capsys
):
    from perco.cli import main as perco_main
    from perco.io import save_image

    save_image(
        torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)), tmp_path / "x.png"
    )
    argv = ["compress", str(tmp_path / "x.png"), "-o", str(tmp_path / "bits"), "--json"]
    assert perco_main([*argv, "--captioner", f"blip2:{blip2_dir}"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["files"][0]
    assert entry["caption"] and "caption" in report["timings_s"]  # captioning timed apart
    shortest = text_codec.encode_caption(entry["caption"], text_codec.caption_codecs(tokenizer))
    assert entry["caption_codec"] == text_codec.CODEC_NAMES[shortest[0]]
    assert entry["caption_bits"] == 8 * len(shortest[1])

    assert perco_main([*argv, "--caption", CAPTION, "--caption-codec", "exact"]) == 0
    assert json.loads(capsys.readouterr().out)["files"][0]["caption_codec"] == "exact"
