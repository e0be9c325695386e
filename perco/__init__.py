"""perco — image compression at ultra-low bitrates with a diffusion decoder.

Implements PerCo (Careil et al., "Towards image compression with perfect realism at
ultra-low bitrates", ICLR 2024). The public API:

    >>> from perco import PerCo, RATES, load_model
    >>> model = load_model("runs/tiny_taef2", rate="r0.0019")  # a folder, run, hub id or "tiny"
    >>> model = PerCo.from_stable_diffusion("stabilityai/stable-diffusion-2-1", rate="r0.0019")
    >>> encoded = model.encode(images, captions)        # images (B, 3, H, W) in [0, 1]
    >>> reconstructions = model.decode(encoded, seed=0)
"""

from pathlib import Path

from .models.config import PerCoConfig
from .models.loading import load_model, load_models
from .models.perco import PerCo
from .rates import RATES, Rate, get_rate, index_bits
from .types import EncodedImages, PerCoLoss, QuantizerOutput

__version__ = "0.1.0"

#: The Hydra configs of ``perco-train`` and ``perco-eval``, shipped inside the package
#: (``configs/`` in the repository links here). Add your own folder on top with
#: ``hydra.searchpath=[file://my_configs]``.
CONFIG_DIR = Path(__file__).parent / "configs"

__all__ = [
    "PerCo",
    "PerCoConfig",
    "load_model",
    "load_models",
    "RATES",
    "Rate",
    "get_rate",
    "index_bits",
    "EncodedImages",
    "PerCoLoss",
    "QuantizerOutput",
    "CONFIG_DIR",
    "__version__",
]
