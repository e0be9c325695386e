import math

import pytest

from perco.rates import RATES, get_rate, hyper_latent_size, index_bits

# index bpp at 512² from the rate ladder of DESIGN.md
DESIGN_BPP = {
    "r0.0019": 0.00195,
    "r0.0024": 0.00244,
    "r0.0059": 0.00586,
    "r0.0098": 0.00977,
    "r0.0313": 0.03125,
    "r0.0508": 0.05078,
    "r0.0938": 0.09375,
    "r0.1250": 0.12500,
}


def test_ladder_matches_design_table():
    assert list(RATES) == list(DESIGN_BPP)
    for name, bpp in DESIGN_BPP.items():
        assert RATES[name].bpp(512, 512) == pytest.approx(bpp, abs=5e-6)


def test_default_steps_follow_the_005_bpp_rule():
    for rate in RATES.values():
        assert rate.steps == (20 if rate.bpp() < 0.05 else 5)


def test_hyper_latent_size_scales_with_the_image():
    assert hyper_latent_size("r0.0019", 512, 512) == (8, 8)
    assert hyper_latent_size("r0.0019", 512, 768) == (8, 12)  # Kodak landscape
    assert hyper_latent_size("r0.1250", 768, 512) == (96, 64)
    assert hyper_latent_size("r0.0019", 500, 700) == (8, 11)  # partial cells count


def test_index_bits_is_exact_for_any_codebook_size():
    assert index_bits("r0.0019", 512, 512) == 8 * 8 * 8
    assert index_bits("r0.0508", 512, 512) == 32 * 32 * 13
    # a rate whose V is not a power of two: ceil(n log2 V), not n ceil(log2 V)
    from perco.rates import Rate

    r = Rate("custom", downsample=8, codebook_size=1000, steps=20)
    n = 8 * 12
    assert index_bits(r, 512, 768) == math.ceil(n * math.log2(1000))
    assert index_bits(r, 512, 768) < n * 10
    # exact also where floating point would be off by one: 3^(n) vs 2^k boundaries
    r3 = Rate("three", downsample=8, codebook_size=3, steps=20)
    for n_side in range(1, 30):
        bits = index_bits(r3, 64, 64 * n_side)
        assert 2 ** (bits - 1) < 3**n_side <= 2**bits


def test_chunked_packing_loses_under_one_bit_per_chunk():
    from perco.rates import CHUNK_BITS, chunk_length, packed_bits

    v = 1000
    k = chunk_length(v)
    assert k * math.log2(v) <= CHUNK_BITS
    for count in (k, k + 1, 3 * k + 17):
        exact = math.ceil(count * math.log2(v))
        chunks = math.ceil(count / k)
        assert exact <= packed_bits(count, v) < exact + chunks
    assert packed_bits(10**7, 256) == 8 * 10**7  # powers of two never lose a bit
    assert packed_bits(5, 1) == 0


def test_get_rate_accepts_names_and_rejects_unknown():
    assert get_rate("0.0019") is RATES["r0.0019"]
    assert get_rate(RATES["r0.1250"]) is RATES["r0.1250"]
    with pytest.raises(KeyError, match="unknown rate"):
        get_rate("r0.5")
