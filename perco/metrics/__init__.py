"""Evaluation metrics, one module per family; every pretrained backbone is injectable.

- :mod:`.fidelity`: PSNR, MS-SSIM, LPIPS (per image)
- :mod:`.dists`: DISTS (per image; the dists-pytorch weights)
- :mod:`.colour`: per-channel mean/std shift and mean ΔE2000 (per image)
- :mod:`.fid_kid`: FID and KID on whole images or HiFiC patches, from cached features
- :mod:`.clip_score`: CLIP text–image and image–image scores (open_clip)
- :mod:`.miou`: mIoU of a segmenter's predictions against ground-truth label maps
"""

from .colour import colour_stats, delta_e2000, rgb_to_lab
from .fid_kid import AlexNetFeatures, InceptionFeatures, fid_kid, hific_patches
from .fidelity import LPIPSDistance, ms_ssim, psnr

__all__ = [
    "AlexNetFeatures",
    "InceptionFeatures",
    "LPIPSDistance",
    "colour_stats",
    "delta_e2000",
    "fid_kid",
    "hific_patches",
    "ms_ssim",
    "psnr",
    "rgb_to_lab",
]
