import pytest
import torch

from perco.models.hyper_encoder import HyperEncoder
from perco.rates import RATES

# PerCo (SD) reports these for its authors-supplied hyper-encoder (N=192, M=320)
PERCO_SD_COUNTS = {1: 4_080_128, 8: 5_868_032}


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_per_rung_on_sd_latent():
    """Count per rung with default widths on SD's 4-channel latent.

    Included: every conv of the three residual groups, their entry convs (1×1, or
    stride-2 5×5 where the rung downsamples), both attention blocks and the 1×1 conv to
    M=320. Excluded: the quantizer's 320↔32 projections (20,832 parameters), as in PerCo
    (SD)'s published counts.
    """
    counts = {}
    for rate in RATES.values():
        with torch.device("meta"):
            counts[rate.name] = _count(HyperEncoder(in_channels=4, downsample=rate.downsample))
    for name, n in counts.items():
        assert 4_000_000 <= n <= 8_000_000, (name, n)
    assert counts["r0.1250"] == PERCO_SD_COUNTS[1]
    assert counts["r0.0019"] == PERCO_SD_COUNTS[8]
    print({k: f"{v:,}" for k, v in counts.items()})


@pytest.mark.parametrize("downsample", [1, 2, 4, 8])
@pytest.mark.parametrize("in_channels", [4, 16, 32])
def test_output_grid_follows_the_rate(downsample, in_channels):
    enc = HyperEncoder(in_channels=in_channels, downsample=downsample, channels=16, out_channels=24)
    out = enc(torch.randn(2, in_channels, 32, 48))
    assert out.shape == (2, 24, 32 // downsample, 48 // downsample)


def test_nine_residual_blocks_outside_attention():
    from perco.models.hyper_encoder import AttentionBlock, Bottleneck

    enc = HyperEncoder(channels=16, out_channels=24)
    top = [m for m in enc.layers if isinstance(m, Bottleneck)]
    assert len(top) == 9
    assert sum(isinstance(m, AttentionBlock) for m in enc.layers) == 2


def test_rejects_unsupported_downsampling():
    with pytest.raises(ValueError, match="downsample"):
        HyperEncoder(downsample=16)


def test_save_load_round_trip(tmp_path):
    enc = HyperEncoder(in_channels=32, downsample=4, channels=16, out_channels=24)
    enc.save_pretrained(tmp_path)
    back = HyperEncoder.from_pretrained(tmp_path)
    assert back.config.in_channels == 32 and back.config.downsample == 4
    x = torch.randn(1, 32, 16, 16)
    torch.testing.assert_close(back(x), enc(x))


def _compressai_attention(x, block):
    """CompressAI's AttentionBlock from its description, on ``block``'s weights: residual
    units ``relu(x + conv1x1(relu(conv3x3(relu(conv1x1(x))))))``, three for the trunk,
    three and a 1×1 conv for the mask, ``x + trunk(x) · σ(mask(x))``."""
    import torch.nn.functional as F

    def unit(y, body):
        c1, c2, c3 = body[0], body[2], body[4]
        z = F.relu(F.conv2d(y, c1.weight, c1.bias))
        z = F.relu(F.conv2d(z, c2.weight, c2.bias, padding=1))
        return F.relu(y + F.conv2d(z, c3.weight, c3.bias))

    a, b = x, x
    for u in block.trunk:
        a = unit(a, u.body)
    for u in block.mask[:3]:
        b = unit(b, u.body)
    b = F.conv2d(b, block.mask[3].weight, block.mask[3].bias)
    return x + a * torch.sigmoid(b)


def _attention_blocks(encoder):
    from perco.models.hyper_encoder import AttentionBlock

    return [m for m in encoder.layers if isinstance(m, AttentionBlock)]


def test_attention_relu_computes_compressai_attention_blocks_on_the_same_weights():
    torch.manual_seed(0)
    linear = HyperEncoder(channels=16, out_channels=24)
    relu = HyperEncoder(channels=16, out_channels=24, attention_relu=True)
    relu.load_state_dict(linear.state_dict())  # the option adds no weights
    x = torch.randn(2, 4, 16, 16)
    assert not torch.allclose(linear(x), relu(x))
    y = torch.randn(2, 16, 8, 8)
    block = _attention_blocks(relu)[0]
    torch.testing.assert_close(block(y), _compressai_attention(y, block))


@pytest.mark.sprdiff
def test_attention_relu_equals_compressai_attention_block():
    compressai = pytest.importorskip("compressai.layers", reason="the sprdiff extra")
    torch.manual_seed(0)
    block = _attention_blocks(HyperEncoder(channels=16, out_channels=24, attention_relu=True))[0]
    reference = compressai.AttentionBlock(16)
    mapped = {}
    for key, value in block.state_dict().items():
        key = key.replace("trunk.", "conv_a.").replace("mask.", "conv_b.").replace("body.", "conv.")
        mapped[key] = value
    reference.load_state_dict(mapped)
    y = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(y), reference(y))


def test_attention_relu_enters_the_fingerprint_only_when_set():
    from perco.testing import TINY_HYPER_ENCODER, tiny_perco

    plain = tiny_perco()
    same = tiny_perco(hyper_encoder={**TINY_HYPER_ENCODER, "attention_relu": False})
    relu = tiny_perco(hyper_encoder={**TINY_HYPER_ENCODER, "attention_relu": True})
    assert plain.fingerprint == same.fingerprint != relu.fingerprint
