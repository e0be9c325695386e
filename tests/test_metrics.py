"""Metric sanity on real images (Kodak, BSDS500 and LPIPS weights from the assets)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from perco.io import load_image
from perco.metrics import (
    AlexNetFeatures,
    LPIPSDistance,
    colour_stats,
    delta_e2000,
    fid_kid,
    hific_patches,
    ms_ssim,
    psnr,
    rgb_to_lab,
)
from perco.metrics.fid_kid import load_extractor
from perco.metrics.miou import intersections_unions, mean_iou


@pytest.fixture(scope="module")
def kodak(assets):
    return torch.cat([load_image(assets / "kodak" / f"kodim{i:02d}.png") for i in (1, 2, 3)])


@pytest.fixture(scope="module")
def lpips_alex(assets):
    return LPIPSDistance("alex", assets / "lpips" / "alexnet_features.safetensors")


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in images:
        pil = Image.fromarray(img.mul(255).round().byte().permute(1, 2, 0).numpy())
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=quality)
        out.append(load_image(io.BytesIO(buffer.getvalue())))
    return torch.cat(out)


def test_ms_ssim_of_an_image_with_itself_is_one_and_small_images_are_nan(kodak):
    assert torch.allclose(ms_ssim(kodak, kodak), torch.ones(3), atol=1e-5)
    assert ms_ssim(kodak, jpeg(kodak, 5)).max() < 0.99
    assert torch.isnan(ms_ssim(kodak[..., :128, :128], kodak[..., :128, :128])).all()


def test_psnr_matches_the_closed_form(kodak):
    noisy = (kodak + 0.05 * torch.randn_like(kodak, generator=None)).clamp(0, 1)
    mse = (noisy - kodak).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(psnr(kodak, noisy), 10 * torch.log10(1 / mse), rtol=1e-5)


def test_lpips_is_zero_for_identical_images_and_ranks_jpeg_qualities(kodak, lpips_alex):
    assert lpips_alex(kodak, kodak).abs().max() < 1e-6
    q5, q50 = lpips_alex(kodak, jpeg(kodak, 5)), lpips_alex(kodak, jpeg(kodak, 50))
    assert (q5 > q50).all() and (q50 > 0).all()


def test_lpips_vgg_is_a_second_column_beside_alexnet_and_ranks_jpeg_qualities(
    kodak, lpips_alex, assets
):
    from perco.eval import Backbones
    from perco.eval.metrics import Batch, compute

    vgg = LPIPSDistance("vgg", assets / "lpips" / "vgg16_features.safetensors")
    x = kodak[..., :256, :256]
    q5, q50 = (compute(Batch(x, jpeg(x, q), Backbones(lpips_alex, lpips_vgg=vgg), [None] * 3))
               for q in (5, 50))  # fmt: skip
    assert (q5["lpips_vgg"] > q50["lpips_vgg"]).all() and (q50["lpips_vgg"] > 0).all()
    assert not torch.allclose(q5["lpips_vgg"], q5["lpips"])  # its own network, not a copy
    assert vgg(x, x).abs().max() < 1e-6
    assert "lpips_vgg" not in compute(Batch(x, x, Backbones(lpips_alex), [None] * 3))


def test_hific_patch_counts():
    # 768x512: 3x2 on the grid + 2x1 on the shifted grid = 8 (Kodak: 24 x 8 = 192)
    assert hific_patches(torch.zeros(2, 3, 512, 768)).shape == (16, 3, 256, 256)
    assert hific_patches(torch.zeros(1, 3, 768, 512)).shape == (8, 3, 256, 256)
    assert hific_patches(torch.zeros(1, 3, 512, 512)).shape == (5, 3, 256, 256)
    x = torch.arange(512 * 512.0).view(1, 1, 512, 512).expand(1, 3, -1, -1)
    assert torch.equal(hific_patches(x)[4], x[0, :, 128:384, 128:384])


def test_fid_and_kid_are_near_zero_on_a_set_itself_and_grow_with_noise(assets):
    folder = assets / "bsds500" / "val"
    photos = torch.cat([load_image(p)[..., :320, :320] for p in sorted(folder.glob("*.jpg"))[:64]])
    extractor = AlexNetFeatures(assets / "lpips" / "alexnet_features.safetensors")
    real = extractor(photos)
    scores = []
    for sigma in (0.0, 0.1, 0.3):
        noise = torch.randn(photos.shape, generator=torch.Generator().manual_seed(0))
        scores.append(fid_kid(real, extractor((photos + sigma * noise).clamp(0, 1)), 32))
    assert abs(scores[0]["fid"]) < 1e-3
    assert scores[0]["fid"] < scores[1]["fid"] < scores[2]["fid"]
    # the unbiased KID of a set against itself is slightly negative: subsets drawn from
    # the same features share samples; it stays small next to real differences
    assert scores[0]["kid"] < scores[1]["kid"] < scores[2]["kid"]
    assert abs(scores[0]["kid"]) < scores[2]["kid"] / 4
    # KID's subset never exceeds the sample count
    assert fid_kid(real[:5], real[:5], kid_subset_size=1000)["kid_subset_size"] == 5
    # same features, same score: the subsets come from a fixed seed
    assert fid_kid(real, real * 0.9)["kid"] == fid_kid(real, real * 0.9)["kid"]


def test_unknown_feature_extractor_is_an_error():
    with pytest.raises(ValueError, match="unknown feature extractor"):
        load_extractor("vgg")
    with pytest.raises(ValueError, match="weights"):
        load_extractor("alexnet")


def test_delta_e2000_matches_sharma_test_data():
    # pairs 1-4 and 34 of Sharma, Wu & Dalal (2005), Table 1
    lab1 = torch.tensor(
        [
            [50, 2.6772, -79.7751],
            [50, 3.1571, -77.2803],
            [50, 2.8361, -74.02],
            [50, -1.3802, -84.2814],
            [2.0776, 0.0795, -1.135],
        ]  # fmt: skip
    )
    lab2 = torch.tensor(
        [
            [50, 0, -82.7485],
            [50, 0, -82.7485],
            [50, 0, -82.7485],
            [50, 0, -82.7485],
            [0.9033, -0.0636, -0.5514],
        ]  # fmt: skip
    )
    expected = torch.tensor([2.0425, 2.8615, 3.4412, 1.0, 0.9082], dtype=torch.float64)
    got = delta_e2000(lab1.T[:, :, None], lab2.T[:, :, None]).flatten()
    assert torch.allclose(got, expected, atol=1e-4)


def test_lab_of_srgb_primaries_and_colour_shift():
    white = rgb_to_lab(torch.ones(3, 1, 1)).flatten()
    red = rgb_to_lab(torch.tensor([1.0, 0, 0]).view(3, 1, 1)).flatten()
    assert torch.allclose(white, torch.tensor([100.0, 0, 0], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(red, torch.tensor([53.24, 80.09, 67.20], dtype=torch.float64), atol=0.01)
    x = torch.rand(2, 3, 16, 16) * 0.8
    stats = colour_stats(x, x + torch.tensor([0.1, 0.0, 0.0]).view(1, 3, 1, 1))
    assert torch.allclose(stats["mean_shift_r"], torch.full((2,), 0.1), atol=1e-6)
    assert stats["std_shift_g"].abs().max() < 1e-6 and (stats["delta_e2000"] > 0).all()
    assert colour_stats(x, x)["delta_e2000"].abs().max() < 1e-9


def test_miou_counts_and_dataset_mean():
    target = torch.tensor([[1, 1, 2, 255]])
    pred = torch.tensor([[1, 2, 2, 7]])
    counts = intersections_unions(pred, target)
    assert counts == {1: [1, 2], 2: [1, 2]}  # the ignored pixel counts for nothing
    assert mean_iou([counts]) == 0.5
    assert mean_iou([intersections_unions(target, target)]) == 1.0
    assert math.isnan(mean_iou([]))


def _package_dists(assets, tmp_path):
    """The dists-pytorch package's own DISTS class, unchanged. Its constructor loads
    torchvision's ImageNet VGG16 from the torch hub cache (downloading it when absent):
    the cache here holds a checkpoint whose `features` are the assets' VGG16 weights (the
    classifier, which DISTS does not use, is stored as zeros of stride 0: a few bytes)."""
    from DISTS_pytorch import DISTS as PackageDISTS
    from safetensors.torch import load_file
    from torchvision.models import VGG16_Weights, vgg16

    features = load_file(assets / "lpips" / "vgg16_features.safetensors")
    state = {k: features[k] if k in features else torch.zeros(1).expand(v.shape)
             for k, v in vgg16().state_dict().items()}  # fmt: skip
    url = VGG16_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        return PackageDISTS()
    finally:
        torch.hub.set_dir(before)


def test_dists_matches_the_dists_pytorch_package_on_real_images(assets, tmp_path):
    from perco.metrics.dists import DISTS

    ours = DISTS(assets / "lpips" / "vgg16_features.safetensors")
    reference = _package_dists(assets, tmp_path)
    x = load_image(assets / "kodak" / "kodim01.png")[..., :256, :384]
    y = load_image(assets / "kodak" / "kodim02.png")[..., :256, :384]
    ours_xy, expected = ours(x, y), reference(x, y)
    assert ours_xy.shape == (1,) and abs(ours_xy.item() - expected.item()) < 1e-5
    assert 0.1 < ours_xy.item() < 1
    assert abs(ours(x, x).item()) < 1e-5  # an image against itself
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2)  # closer than another photo
    assert ours(x, blurred).item() < ours_xy.item()
    # a registered metric: every evaluation with the backbone has a dists column
    from perco.eval import Backbones
    from perco.eval.metrics import Batch, compute

    batch = Batch(x, y, Backbones(lpips=None, dists=ours), [None])
    assert torch.allclose(compute(batch)["dists"], ours_xy)
    assert "dists" not in compute(Batch(x, y, Backbones(lpips=None), [None]))
