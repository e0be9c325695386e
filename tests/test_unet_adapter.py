from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from perco.models.unet_adapter import linear_parameter_share, widen_conv_in
from perco.testing import sd21_config, tiny_components


@pytest.fixture
def unet():
    return tiny_components()["unet"].eval()


def _inputs(channels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)


def test_zero_init_keeps_the_original_output(unet):
    x, ctx = _inputs(4)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        reference = unet(x, t, ctx).sample
        widen_conv_in(unet, 320, init="zero")
        z = torch.randn(2, 320, 8, 8)  # whatever z_l is, it has no effect yet
        widened = unet(torch.cat([x, z], dim=1), t, ctx).sample
    torch.testing.assert_close(widened, reference)


def test_random_init_copies_pretrained_channels(unet):
    old_w, old_b = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    widen_conv_in(unet, 8, init="random", generator=torch.Generator().manual_seed(0))
    assert unet.conv_in.in_channels == 12 and unet.config.in_channels == 12
    torch.testing.assert_close(unet.conv_in.weight[:, :4], old_w)
    torch.testing.assert_close(unet.conv_in.bias, old_b)
    new = unet.conv_in.weight[:, 4:]
    assert new.abs().sum() > 0 and new.abs().max() <= 1 / (12 * 9) ** 0.5


def test_widened_unet_round_trips(unet, tmp_path):
    widen_conv_in(unet, 8)
    unet.save_pretrained(tmp_path)
    back = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert back.conv_in.in_channels == 12
    x, ctx = _inputs(12)
    with torch.no_grad():
        torch.testing.assert_close(back(x, 3, ctx).sample, unet(x, 3, ctx).sample)


def test_rejects_bad_arguments(unet):
    with pytest.raises(ValueError):
        widen_conv_in(unet, 0)
    with pytest.raises(ValueError):
        widen_conv_in(unet, 4, init="ones")


@pytest.mark.slow
def test_stable_diffusion_21_unet_on_meta():
    """SD 2.1's published U-Net config, widened for z_l; counted on the meta device."""
    config = sd21_config("unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    before = sum(p.numel() for p in unet.parameters())
    linear, total = linear_parameter_share(unet)
    widen_conv_in(unet, 320)  # "projected" conditioning: 4 + 320 input channels
    added = sum(p.numel() for p in unet.parameters()) - before
    assert unet.conv_in.weight.shape == (320, 324, 3, 3)
    assert added == 320 * 320 * 9
    # measured values (the paper's "about 15%" is for its own U-Net): SD 2.1 uses linear
    # projections in its transformer blocks (use_linear_projection), so its share is higher
    assert total == before == 865_910_724
    assert linear == 301_404_800
    share = linear / total
    print(
        f"SD 2.1 U-Net: {total:,} parameters, {linear:,} in nn.Linear ({share:.1%}); "
        f"widening conv_in by 320 channels adds {added:,}"
    )


@pytest.mark.slow
def test_count_params_script_prints_the_measured_numbers(capsys, monkeypatch):
    import runpy

    script = Path(__file__).resolve().parents[1] / "scripts" / "count_params.py"
    monkeypatch.syspath_prepend(str(script.parent))  # as when run: its _bench beside it
    runpy.run_path(str(script), run_name="perco_count_params")["main"]([])
    out = capsys.readouterr().out
    assert "| r0.0019 | ×8 | 8×8 | 256 | 5,868,032 | 5,888,864 |" in out
    assert "| r0.1250 | ×1 | 64×64 | 256 | 4,080,128 | 4,100,960 |" in out
    assert "nn.Linear layers: 301,404,800 (34.8%)" in out
    # PerCo on SD 2.1: linear mode trains the U-Net's linear layers plus the new parts
    assert "| linear | 308,305,952 | 1,296,841,739 | 23.8% | 34.9% |" in out
    assert "| none | 6,901,152 | 1,296,841,739 | 0.5% | 0.1% |" in out
    assert "| lora | 10,220,960 | 1,300,161,547 | 0.8% | 0.5% |" in out  # rank 16
    # the backbones at 768×512: SD 2.1's call and decoders as DESIGN.md states them; FLUX.2
    # [klein]: 3,875,544,576 + 1280 × 3072 for z_l's packed channels; LoRA 5 × 8 × 16 · 6144
    # (double blocks) + 20 × 16 · (30720 + 15360) (single blocks' fused projections)
    assert "| SD 2.1 (U-Net) | 0.867 B | 3.3 M | 6,144 | 77 | 1.31 | SD VAE | 3.80 |" in out
    assert "| FLUX.2 [klein] 4B | 3.879 B | 18.7 M | 1,536 | 512 | 13.89 | TAEF2 | 0.21 |" in out
    committed = Path(__file__).resolve().parents[1] / "results" / "counts" / "backbones_768x512.md"
    assert committed.read_text() in out  # the docs' table is this run's
