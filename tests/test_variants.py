"""PerCo-Image and the SPRDiff-style model on tiny components, offline.

Pretrained weights of open_clip, DINOv2 and CompressAI cannot be downloaded here: the
tests build small random stand-ins (a tiny open_clip ViT, a tiny DINOv2, a narrow
mbt2018-mean checkpoint) and load them through the same loaders real runs use
(``open_clip.create_model``, ``AutoModel.from_pretrained``, CompressAI's
``load_state_dict`` + ``from_state_dict``). AlexNet is the real ImageNet one from the
offline assets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import NEEDS_COMPRESSAI

from perco import bitstream, codec
from perco.bitstream import BitstreamError
from perco.cli import main
from perco.models.perco import PerCo
from perco.models.product_quantizer import ProductQuantizer
from perco.models.sprdiff import SPRDiffStyle, load_distortion_encoder
from perco.models.vision import VisionEncoder, load_vision_encoder
from perco.testing import save_tiny_open_clip, tiny_perco


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def compressai_checkpoint(tmp_path_factory):
    """A narrow mbt2018-mean (MeanScaleHyperprior) with random weights, saved as a
    CompressAI checkpoint (a state dict)."""
    pytest.importorskip("compressai", reason=NEEDS_COMPRESSAI)
    from compressai.models import MeanScaleHyperprior

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("compressai") / "mbt2018-mean-tiny.pth"
    torch.save(MeanScaleHyperprior(N=8, M=12).state_dict(), path)
    return path


def perco_image(open_clip_dir, **kwargs):
    kwargs.setdefault("image_quantizer", {"num_subvectors": 4, "codebook_size": 16})
    return tiny_perco(
        "r0.0019", variant="perco_image", vision=f"open_clip:local-dir:{open_clip_dir}", **kwargs
    )


def fitted_perco_image(open_clip_dir, **kwargs):
    model = perco_image(open_clip_dir, **kwargs)
    g = torch.Generator().manual_seed(0)
    pictures = torch.rand(32, 3, 64, 64, generator=g)
    model.fit_global_codebooks([{"images": pictures[i : i + 8]} for i in range(0, 32, 8)], 32)
    return model


def sprdiff(open_clip_dir, compressai_checkpoint, **kwargs):
    return tiny_perco(
        "r0.0019",
        variant="sprdiff_style",
        distortion=f"mbt2018-mean:{compressai_checkpoint}",
        semantic=f"open_clip:local-dir:{open_clip_dir}",
        reconstruction={"channels": 16, "pixel_channels": 4},
        **kwargs,
    )


def fixed_loss(model, images, captions, pairs) -> float:
    model.eval()
    with torch.no_grad():
        return sum(
            model(images, captions, timesteps=t, noise=n).loss.item() for t, n in pairs
        ) / len(pairs)


def train_lowers_loss(model, images, captions, steps: int = 12) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    shape = (images.shape[0], 4, images.shape[-2] // 8, images.shape[-1] // 8)
    pairs = [(torch.randint(0, 1000, (images.shape[0],), generator=g),
              torch.randn(shape, generator=g)) for _ in range(4)]  # fmt: skip
    before = fixed_loss(model, images, captions, pairs)
    params = model.set_trainable("full")
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    for step in range(steps):
        loss = model(images, captions, generator=torch.Generator().manual_seed(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, fixed_loss(model, images, captions, pairs)


# -- the product quantizer -----------------------------------------------------------
def test_product_quantizer_bits_are_m_log2_v():
    pq = ProductQuantizer(dim=512, num_subvectors=16, codebook_size=1024)
    assert pq.bits == 16 * math.log2(1024) == 160
    assert pq.bits / (512 * 512) == pytest.approx(0.00061, abs=1e-5)  # the paper's figure


def test_product_quantizer_fit_encode_lookup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    pq = ProductQuantizer(dim=8, num_subvectors=2, codebook_size=16)
    with pytest.raises(ValueError, match="at least as many"):
        pq.fit(x[:10])
    pq.fit(x, g)
    assert bool(pq.fitted)
    codes = pq.encode(x)
    assert codes.shape == (200, 2) and codes.max() < 16
    quantized = pq.lookup(codes)
    # each sub-vector goes to its nearest entry: no other entry is closer
    sub = x.view(200, 2, 4)
    for m in range(2):
        nearest = torch.cdist(sub[:, m], pq.embed[m]).min(dim=1).values
        assert torch.allclose((quantized.view(200, 2, 4)[:, m] - sub[:, m]).norm(dim=1), nearest,
                              atol=1e-5)  # fmt: skip
    assert (quantized - x).pow(2).mean() < x.pow(2).mean() / 2


@pytest.mark.parametrize("update", ["frozen", "ema"])
def test_product_quantizer_updates_only_when_told(update):
    g = torch.Generator().manual_seed(0)
    pq = ProductQuantizer(dim=8, num_subvectors=2, codebook_size=16, update=update, decay=0.5)
    pq.fit(torch.randn(64, 8, generator=g), g)
    before = pq.embed.clone()
    pq.train()
    pq(torch.randn(64, 8, generator=g) + 3)
    assert torch.equal(pq.embed, before) == (update == "frozen")


# -- vision encoders -------------------------------------------------------------------
def test_vision_encoders_through_their_loaders(tmp_path, open_clip_dir, assets):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=37, image_size=32, patch_size=8)  # fmt: skip
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    specs = {
        f"open_clip:local-dir:{open_clip_dir}": (32, 32, 4),
        f"dinov2:{tmp_path / 'dinov2'}": (32, 32, 4),
        f"alexnet:{assets / 'lpips' / 'alexnet_features.safetensors'}": (256, 256, 13),
    }
    x = torch.rand(2, 3, 48, 80)
    for spec, (embed_dim, grid_dim, side) in specs.items():
        encoder = load_vision_encoder(spec)
        embedding, grid = encoder(x)
        assert embedding.shape == (2, embed_dim) and grid.shape == (2, grid_dim, side, side)
        assert not any(p.requires_grad for p in encoder.parameters())
        encoder.save_pretrained(tmp_path / "saved")
        again = VisionEncoder.from_pretrained(tmp_path / "saved")
        assert torch.allclose(again(x)[1], grid, atol=1e-6), spec
    with pytest.raises(ValueError, match="not 'open_clip"):
        load_vision_encoder("clip-vit")


# -- PerCo-Image ---------------------------------------------------------------------
def test_perco_image_needs_fitted_codebooks(open_clip_dir, images):
    model = perco_image(open_clip_dir)
    with pytest.raises(RuntimeError, match="not fitted"):
        model.encode(images)


def test_perco_image_trains(open_clip_dir, images):
    model = fitted_perco_image(open_clip_dir)
    before, after = train_lowers_loss(model, images, [None, None])
    assert after < before


def test_perco_image_bitstream_round_trip(tmp_path, open_clip_dir, images):
    model = fitted_perco_image(open_clip_dir).eval()
    encoded = model.encode(images)
    files = codec.compress(model, images)
    for (data, breakdown), codes in zip(files, encoded.global_codes, strict=True):
        assert breakdown.caption_codec == "image-pq"
        assert breakdown.caption_bits == 8 * math.ceil(model.global_bits / 8) == 16
        assert breakdown.index_bits == 8  # one cell of V = 256 at 64 px
        parsed, _ = codec.parse(model, data)
        assert parsed.caption is None
        np.testing.assert_array_equal(parsed.global_codes, codes.numpy())

    model.save_pretrained(tmp_path / "ckpt")
    loaded = PerCo.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model) and loaded.fingerprint == model.fingerprint
    parsed = [codec.parse(loaded, data)[0] for data, _ in files]
    direct = model.decode(encoded, steps=2)
    from_files = codec.decompress(loaded, parsed, steps=2)
    for a, b in zip(direct, from_files, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_perco_image_embeds_the_image_not_its_padding(open_clip_dir):
    model = fitted_perco_image(open_clip_dir).eval()
    embed, seen = model._embed, []
    model._embed = lambda x: (seen.append(tuple(x.shape[-2:])), embed(x))[1]
    image = torch.rand(1, 3, 72, 100, generator=torch.Generator().manual_seed(3))
    assert model.padded_size(72, 100) != (72, 100)
    encoded = model.encode(image)
    with torch.no_grad():
        model(image, [None])
    assert seen == [(72, 100), (72, 100)]
    _, codes = model.image_quantizer(embed(image))
    assert torch.equal(encoded.global_codes, codes)


def test_caption_and_embedding_files_are_not_mixed(open_clip_dir, images):
    image_model = fitted_perco_image(open_clip_dir).eval()
    text_model = tiny_perco("r0.0019").eval()
    (pq_file, _), = codec.compress(image_model, images[:1])  # fmt: skip
    (caption_file, _), = codec.compress(text_model, images[:1], ["a cat"])  # fmt: skip
    fp = image_model.fingerprint
    rate = image_model.rate
    with pytest.raises(BitstreamError, match="carries an image embedding"):
        bitstream.read(pq_file, fingerprint=fp, rate=rate)
    with pytest.raises(BitstreamError, match="carries a caption"):
        bitstream.read(caption_file, fingerprint=text_model.fingerprint, rate=rate,
                       global_pq=(4, 16))  # fmt: skip


# -- SPRDiff-style -----------------------------------------------------------------------
@pytest.mark.sprdiff
def test_distortion_encoder_through_compressai_loaders(compressai_checkpoint):
    from compressai.models import MeanScaleHyperprior
    from compressai.zoo import load_state_dict

    encoder = load_distortion_encoder(f"mbt2018-mean:{compressai_checkpoint}")
    reference = MeanScaleHyperprior.from_state_dict(
        load_state_dict(torch.load(compressai_checkpoint, weights_only=True))
    )
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(encoder(x), reference.g_a(x))
    assert encoder(x).shape == (1, 12, 4, 4)
    # the zoo path builds the real architecture (random weights: no download here)
    zoo = load_distortion_encoder("mbt2018-mean:1", pretrained=False)
    assert (zoo.config.N, zoo.config.M) == (128, 192)
    with pytest.raises(FileNotFoundError):
        load_distortion_encoder("mbt2018-mean:/no/such/checkpoint.pth")


@pytest.mark.sprdiff
def test_sprdiff_fusion_starts_as_the_latent(open_clip_dir, compressai_checkpoint, images):
    model = sprdiff(open_clip_dir, compressai_checkpoint).eval()
    latents = model._latents(images)
    with torch.no_grad():
        assert torch.allclose(model._hyper_input(latents, images), latents, atol=1e-6)


@pytest.mark.sprdiff
def test_sprdiff_trains(open_clip_dir, compressai_checkpoint, images):
    model = sprdiff(open_clip_dir, compressai_checkpoint)
    out = model(images, [None, "a cat"])
    assert out.image is not None and out.image > 0
    before, after = train_lowers_loss(model, images, [None, "a cat"])
    assert after < before


@pytest.mark.sprdiff
def test_sprdiff_round_trip_and_coarse(tmp_path, open_clip_dir, compressai_checkpoint):
    model = sprdiff(open_clip_dir, compressai_checkpoint).eval()
    image = torch.rand(1, 3, 72, 100)  # padded to 128 x 128 inside
    coarse = model.coarse(model.encode(image))
    assert coarse[0].shape == image[0].shape
    assert coarse[0].min() >= 0 and coarse[0].max() <= 1

    (data, breakdown), = codec.compress(model, image, ["a red car"])  # fmt: skip
    assert breakdown.index_bits == 2 * 2 * 8  # 2 x 2 cells of V = 256
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PerCo.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(loaded, SPRDiffStyle) and loaded.fingerprint == model.fingerprint
    parsed, _ = codec.parse(loaded, data)
    assert parsed.caption == "a red car"
    (from_file,) = codec.decompress(loaded, [parsed], coarse=True)
    assert torch.allclose(from_file, coarse[0], atol=1e-5)
    (decoded,) = codec.decompress(loaded, [parsed], steps=2)
    assert decoded.shape == image[0].shape

    # the CLI: --coarse writes the preview; a plain PerCo refuses it in one line
    (tmp_path / "in.perco").write_bytes(data)
    out = tmp_path / "out"
    argv = ["decompress", str(tmp_path / "in.perco"), "-o", str(out), "--model"]
    assert main([*argv, str(tmp_path / "ckpt"), "--coarse"]) == 0
    from perco.io import load_image

    assert load_image(out / "in.png").shape == (1, 3, 72, 100)
    tiny_perco("r0.0019").save_pretrained(tmp_path / "plain")
    assert main([*argv, str(tmp_path / "plain"), "--coarse"]) == 2
