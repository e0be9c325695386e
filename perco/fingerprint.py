"""A model fingerprint: SHA-256 of a checkpoint's settings and every weight and buffer.

Files carry its first bytes so that a file is only decoded by the model that wrote it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["fingerprint"]


def fingerprint(modules: Mapping[str, nn.Module], settings: Mapping) -> bytes:
    """SHA-256 over ``settings`` (as sorted JSON) and the state dicts of ``modules``.

    Each tensor contributes its name, dtype, shape and raw bytes, in sorted order, so the
    value does not depend on the device or on module construction order.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in sorted(modules):
        for key, tensor in sorted(modules[name].state_dict().items()):
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}.{key}:{t.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy())
    return digest.digest()
