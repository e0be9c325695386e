"""Training: the Accelerate loop, fixed-set validation, the ``perco-train`` entry point."""

from .checkpoints import CheckpointError, checkpoint_status, resume_checkpoint
from .loop import TrainState, run_dir, train, trainable_report
from .preemption import PREEMPTED_EXIT, Preempted
from .validation import FixedValidation

__all__ = [
    "train",
    "TrainState",
    "run_dir",
    "trainable_report",
    "FixedValidation",
    "CheckpointError",
    "checkpoint_status",
    "resume_checkpoint",
    "Preempted",
    "PREEMPTED_EXIT",
]
