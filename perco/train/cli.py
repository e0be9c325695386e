"""``perco-train``: a thin Hydra entry point around :func:`perco.train.train`.

perco-train experiment=tiny
perco-train -m rate=glob(*) experiment=paper          # one run per rung
accelerate launch --multi_gpu --num_processes 8 -m perco.train.cli experiment=paper

Exit status: 0 when done, 75 when stopped by a preemption signal after writing a
checkpoint (requeue with ``trainer.resume=latest``), 2 for a checkpoint that cannot be
resumed from.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from .. import CONFIG_DIR
from .checkpoints import CheckpointError
from .loop import train
from .preemption import PREEMPTED_EXIT, Preempted


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _main(cfg: DictConfig) -> None:
    if "SUBMITIT_EXECUTOR" in os.environ and "RANK" not in os.environ:
        # a task of the SLURM launcher (hydra/launcher=slurm): one task per GPU becomes
        # one torch.distributed rank, as `accelerate launch` would arrange
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    try:
        train(cfg)
    except Preempted as e:
        print(f"perco-train: {e}; continue with trainer.resume=latest", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except CheckpointError as e:
        print(f"perco-train: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
