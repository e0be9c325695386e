"""Training: the Accelerate loop, fixed-set validation, the ``perco-train`` entry point."""

from .loop import TrainState, run_dir, train, trainable_report
from .validation import FixedValidation

__all__ = ["train", "TrainState", "run_dir", "trainable_report", "FixedValidation"]
