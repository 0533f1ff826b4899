"""The non-finite guard: what a NaN or infinite loss or gradient does (train.nonfinite).

* ``stop`` (default): raise `NonFiniteLossError`; the last good checkpoint stays. The loss is checked
  every step on a CPU, and on a GPU at logging steps only (no host sync inside the step).
* ``skip``: drop the step: no update, BN running statistics as before it (`BNSnapshot`), queue and
  bank untouched; the data and the lr schedule move on.
* ``rollback``: return to the last checkpoint.

``skip`` and ``rollback`` check the loss and every gradient on every rank (one host sync per step),
scale the lr by ``train.nonfinite_lr_factor``, log a ``nonfinite`` event, and stop after
``train.nonfinite_max`` events. No checkpoint is ever written from a non-finite state (`check_params`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import NonFiniteLossError
from ..parallel import distributed as D

__all__ = ["BNSnapshot", "all_finite", "check_params", "nonfinite_error", "scale_lr"]


def nonfinite_error(what: str, step: int, epoch: int, checkpoints) -> NonFiniteLossError:
    """The error that stops a run on a non-finite value, with what to try."""
    return NonFiniteLossError(
        f"non-finite {what} at step {step}, epoch {epoch}. Training stopped; the last good checkpoint (if any) "
        f"is untouched in {checkpoints}. Try a lower train.lr or train.base_lr, a longer train.warmup_epochs, "
        "train.precision=fp32, or train.nonfinite=skip|rollback.")


def all_finite(loss: torch.Tensor, model: nn.Module) -> bool:
    """Loss and every gradient finite on every rank (one host sync; a collective under DDP)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []   # one fused kernel: inf/NaN anywhere -> inf/NaN
    ok = torch.isfinite(torch.stack([loss.detach().float().reshape(())] + [n.float() for n in norms])).all().float()
    if D.is_dist():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def check_params(model: nn.Module, step: int, checkpoints) -> None:
    """NonFiniteLossError unless every parameter is finite: never write a checkpoint from a NaN state."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(f"non-finite parameters ({', '.join(bad[:3])}...) at step {step}; the last good "
                                 f"checkpoint in {checkpoints} is kept. Try a lower train.lr / train.base_lr or "
                                 "train.precision=fp32.")


def scale_lr(opt, sched, factor: float) -> float:
    """Scale the schedule's base learning rates (and the current ones) by `factor`; the new lr."""
    sched.base_lrs = [b * factor for b in sched.base_lrs]
    for g, b, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = b * fn(sched.last_epoch)
    return opt.param_groups[0]["lr"]


class BNSnapshot:
    """BatchNorm running statistics change in the forward; a skipped step puts them back.
    Empty (free) when `enabled` is false."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None] \
            if enabled else []
        self.saved: list = []

    def save(self) -> None:
        self.saved = [b.clone() for b in self.buffers]

    def restore(self) -> None:
        for b, saved in zip(self.buffers, self.saved):
            b.copy_(saved)
