"""Image-level training losses: LPIPS (Zhang et al. 2018) with offline-loadable weights.

The paper notes the diffusion loss "can be augmented with any image-level loss such as
LPIPS" (§3.1); the trainer applies it to the decoded x0 estimate (``trainer.lpips_weight``).
"""

from __future__ import annotations

import os

from torch import nn

__all__ = ["load_lpips"]


def load_lpips(net: str = "alex", backbone: str | os.PathLike | None = None) -> nn.Module:
    """An ``lpips.LPIPS`` module (inputs in ``[-1, 1]``), frozen, in eval mode.

    The v0.1 linear heads come with the ``lpips`` package. The ImageNet backbone is
    torchvision's pretrained ``alexnet``/``vgg16`` (downloaded by torchvision) unless
    ``backbone`` names a safetensors file of torchvision ``features.*`` weights, e.g.
    ``$PERCO_ASSETS/lpips/alexnet_features.safetensors`` for offline use.
    """
    import lpips
    from safetensors.torch import load_file

    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=backbone is not None, verbose=False)
    if backbone is not None:
        # lpips splits torchvision's `features` into slices that keep the layer indices
        where = {
            index: slice_name
            for slice_name, block in model.net.named_children()
            for index, _ in block.named_children()
        }
        weights = load_file(backbone)
        mapped = {}
        for key, tensor in weights.items():
            _, index, param = key.split(".")
            if index not in where:
                raise ValueError(f"{backbone}: {key} does not belong to an lpips {net} slice")
            mapped[f"net.{where[index]}.{index}.{param}"] = tensor
        missing, unexpected = model.load_state_dict(mapped, strict=False)
        backbone_missing = [k for k in missing if k.startswith("net.")]
        if backbone_missing or unexpected:
            raise ValueError(f"{backbone}: missing {backbone_missing}, unexpected {unexpected}")
    return model.eval().requires_grad_(False)
