"""Evaluation: dataset → real bitstreams → reconstructions → per-image CSV + results JSON.

- :mod:`.settings`: :class:`EvalSettings` (what to decode, the protocol) and
  :class:`Backbones` (the pretrained networks behind the metrics)
- :mod:`.metrics`: the per-image metric registry (:func:`register` a new one)
- :mod:`.runner`: :func:`evaluate`, the loop over images, files and decodes
- :mod:`.references`: JPEG and the shuffled-index control, beside the autoencoder ceiling
- :mod:`.cache`: the per-image result cache a rerun resumes from
- :mod:`.results`: the protocol, summaries, ``results.json``, the table, plot and grid
- :mod:`.family`: several rungs in one run, one table (``rates=[...]``)
- :mod:`.cli`: ``perco-eval`` (Hydra, ``configs/eval.yaml``)
"""

from .cli import BackboneUnavailable, load_backbones, run
from .family import evaluate_family
from .metrics import METRICS, Batch, Metric, register
from .results import format_table, summarise
from .runner import LatentCache, evaluate, reconstruction_seed
from .settings import Backbones, EvalSettings

__all__ = [
    "EvalSettings",
    "Backbones",
    "Metric",
    "Batch",
    "METRICS",
    "register",
    "evaluate",
    "evaluate_family",
    "reconstruction_seed",
    "LatentCache",
    "summarise",
    "format_table",
    "load_backbones",
    "BackboneUnavailable",
    "run",
]
