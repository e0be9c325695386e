"""Model components: autoencoders, hyper-encoder, quantizer, U-Net adapter, PerCo."""

from .autoencoders import AUTOENCODERS, Autoencoder, SDAutoencoder
from .config import PerCoConfig
from .hyper_encoder import HyperEncoder
from .index_prior import ContextPrior, IndexPrior, UniformPrior
from .loading import load_model, load_models
from .perco import Capability, PerCo
from .quantizer import VectorQuantizer
from .taesd import TinyAutoencoder
from .text import NullTextEmbedding
from .unet_adapter import linear_parameter_share, widen_conv_in

__all__ = [
    "AUTOENCODERS",
    "Autoencoder",
    "SDAutoencoder",
    "TinyAutoencoder",
    "HyperEncoder",
    "IndexPrior",
    "UniformPrior",
    "ContextPrior",
    "PerCo",
    "PerCoConfig",
    "Capability",
    "load_model",
    "load_models",
    "VectorQuantizer",
    "NullTextEmbedding",
    "linear_parameter_share",
    "widen_conv_in",
]
