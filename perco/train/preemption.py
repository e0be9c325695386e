"""A clean stop on a cluster's preemption signal.

SLURM sends a signal some time before it kills a job (``--signal=USR1@120``: SIGUSR1 two
minutes before; SIGTERM when a job is preempted or cancelled). :class:`Preemption` turns
the configured signals into a flag; the loop checks it after every optimizer step, all
ranks agreeing (a max over ranks, so a signal that reaches one rank stops all of them
after the same step), then writes a checkpoint and raises :class:`Preempted`.
``perco-train`` exits with :data:`PREEMPTED_EXIT` (75, ``EX_TEMPFAIL``: try again), and a
requeued job continues with ``trainer.resume=latest``.
"""

from __future__ import annotations

import logging
import signal
import time

import torch

__all__ = ["PREEMPTED_EXIT", "Preempted", "Preemption"]

log = logging.getLogger("perco.train")

PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Training stopped on a signal after writing ``checkpoint`` at ``step``."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class Preemption:
    """Catches ``signals`` (names such as ``SIGTERM``) until :meth:`close`.

    ``grace_s`` is the time the scheduler leaves between the signal and the kill; a
    checkpoint write that takes longer is reported, since the next one would not finish.
    """

    def __init__(self, signals: list[str], grace_s: float | None = None):
        self.signals = [signal.Signals[name] for name in signals]
        self.grace_s = grace_s
        self.received: signal.Signals | None = None
        self.received_at = 0.0
        self._previous = {s: signal.signal(s, self._handle) for s in self.signals}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum), time.monotonic()

    def requested(self, accelerator) -> bool:
        """Whether any rank has received a signal (a collective when several ranks run)."""
        flag = self.received is not None
        if accelerator.num_processes > 1:
            flag = bool(
                accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max")
            )
        return flag

    def check_write_time(self, seconds: float) -> None:
        if self.grace_s and seconds > self.grace_s:
            log.warning(
                "a checkpoint write took %.0f s, more than the %.0f s grace period before a "
                "kill: give the scheduler's signal more lead time (trainer.preemption.grace_s)",
                seconds,
                self.grace_s,
            )

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
