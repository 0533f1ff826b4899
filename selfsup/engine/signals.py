"""Preemption: SIGTERM (what SLURM and Kubernetes send before a kill) and SIGINT (Ctrl-C) stop training
cleanly instead of killing it.

While `StopSignals` is active either signal only records itself. The trainer finishes the current step,
writes a checkpoint (atomically, as always), rank 0 prints one line with the checkpoint and the command
that resumes the run, and the command exits with `TrainingStopped.exit_code`: 75 (EX_TEMPFAIL,
"preempted, resumable") for SIGTERM, 130 for SIGINT. Further signals during the stop are ignored, so a
second Ctrl-C cannot break the save (SIGKILL still works, and the save is atomic anyway).

Under torchrun the ranks must stop at the same step (the checkpoint is collective): they agree with one
all_reduce (MAX) of the recorded signal number at every logging step (train.log_every), where the loss
is synchronised anyway, so a GPU step gains no host sync. A run under torchrun therefore stops within
train.log_every steps of the signal: keep log_every steps well inside the grace period of the scheduler
(SLURM: KillWait, or `--signal=TERM@120`; Kubernetes: terminationGracePeriodSeconds). A single process
checks after every step.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

from ..errors import TrainingStopped
from ..parallel import distributed as D

__all__ = ["STOP_SIGNALS", "StopSignals", "stopped"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """`with StopSignals() as stop:` records the first SIGTERM/SIGINT in `stop.signum` (0: none) and puts
    the previous handlers back on exit. Outside the main thread (where Python cannot set handlers) it
    records nothing."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, device: torch.device) -> int:
        """The signal every rank stops for (0: go on); a collective under torch.distributed."""
        if not D.is_dist():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def stopped(signum: int, after: str, checkpoint, resume: str, main: bool) -> TrainingStopped:
    """The exception that ends a run stopped by `signum` once its checkpoint is written; rank 0 (`main`)
    prints the one line: the signal, how far it got (`after`), the checkpoint and how to `resume`."""
    name = signal.Signals(signum).name
    msg = f"selfsup: stopped by {name} after {after}; checkpoint saved in {checkpoint}; {resume}"
    if main:
        print(msg, file=sys.stderr, flush=True)
    return TrainingStopped(name, msg)
