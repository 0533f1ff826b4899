"""The non-finite guard: what a NaN or infinite loss or gradient does (train.nonfinite).

* ``stop`` (default): raise `NonFiniteLossError`; the last good checkpoint stays. The loss is checked
  every step on a CPU, and on a GPU at logging steps only (no host sync inside the step).
* ``skip``: drop the step: no update, BN running statistics as before it (`BNSnapshot`), queue and
  bank untouched; the data and the lr schedule move on.
* ``rollback``: return to the last checkpoint.

``skip`` and ``rollback`` check the loss and every gradient on every rank (one host sync per step),
scale the lr by ``train.nonfinite_lr_factor``, log a ``nonfinite`` event, and stop after
``train.nonfinite_max`` events. No checkpoint is ever written from a non-finite state (`check_params`).
`Guard` holds this policy for a run; `finite_everywhere` is the one-flag check other loops use.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..errors import NonFiniteLossError
from ..parallel import distributed as D
from .checkpoint import load_checkpoint, restore

__all__ = ["BNSnapshot", "Guard", "all_finite", "check_params", "finite_everywhere", "nonfinite_error", "scale_lr"]


def nonfinite_error(what: str, step: int, epoch: int, checkpoints) -> NonFiniteLossError:
    """The error that stops a run on a non-finite value, with what to try."""
    return NonFiniteLossError(
        f"non-finite {what} at step {step}, epoch {epoch}. Training stopped; the last good checkpoint (if any) "
        f"is untouched in {checkpoints}. Try a lower train.lr or train.base_lr, a longer train.warmup_epochs, "
        "train.precision=fp32, or train.nonfinite=skip|rollback.")


def finite_everywhere(values: torch.Tensor) -> bool:
    """Every element of `values` finite on every rank (one host sync; an all-reduce under
    torch.distributed, so every rank takes the same branch and none is left waiting)."""
    ok = torch.isfinite(values.detach()).all().float()
    if D.is_dist():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def all_finite(loss: torch.Tensor, model: nn.Module) -> bool:
    """Loss and every gradient finite on every rank (one host sync; a collective under DDP)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []   # one fused kernel: inf/NaN anywhere -> inf/NaN
    return finite_everywhere(torch.stack([loss.detach().float().reshape(())] + [n.float() for n in norms]))


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


class Guard:
    """train.nonfinite for one run: checks the loss (and, for skip / rollback, the gradients) of each
    step and, on a non-finite value, stops, drops the step or rolls back to the last checkpoint.

    `t`: the train section; `ckpt`: the run's checkpoint path; `restart()`: called after a rollback
    (the data loader follows the restored schedule); `logger`: where `nonfinite` events go. Owns the
    BN snapshot a skipped step puts back (empty under stop)."""

    def __init__(self, t, model: nn.Module, device: torch.device, ckpt, steps_per_epoch: int, restart, logger):
        self.t, self.model, self.device, self.ckpt, self.steps_per_epoch = t, model, device, ckpt, steps_per_epoch
        self.restart, self.logger = restart, logger
        self.guarded = t.nonfinite != "stop"
        self.bn = BNSnapshot(model, self.guarded)

    def error(self, what: str, step: int) -> NonFiniteLossError:
        """The error that stops the run at `step`."""
        return nonfinite_error(what, step, step // self.steps_per_epoch, self.ckpt.parent)

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        """NonFiniteLossError on every rank when the loss is not finite on any (a collective under torchrun:
        every rank takes the same branch, none is left waiting in the next step's collective)."""
        losses = D.all_gather_no_grad(loss.detach().float().reshape(1), check_shapes=False).tolist()
        bad = [(r, v) for r, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            n = len(losses)
            raise self.error(f"loss ({losses[0]})" if n == 1 else
                             "loss (" + ", ".join(f"rank {r} of {n}: {v}" for r, v in bad) + ")", step)

    def loss_ok(self, loss: torch.Tensor, step: int) -> bool:
        """skip/rollback: loss and gradients finite on every rank. stop: raise on a non-finite loss (on
        a GPU only at logging steps: no host sync inside the step)."""
        if self.guarded:
            return all_finite(loss, self.model)
        if self.device.type == "cpu" or (step + 1) % self.t.log_every == 0:
            self.check_loss(loss, step)
        return True

    def recover(self, loss: torch.Tensor, s) -> str:
        """After a non-finite step of run state `s`: drop it (skip: the data and the schedule move on,
        BN statistics as before it) or go back to the last checkpoint (rollback); lower the lr; log
        it. Raises after train.nonfinite_max events. Returns the action taken."""
        t = self.t
        s.nonfinite_events += 1
        if s.nonfinite_events > t.nonfinite_max:
            raise self.error(f"loss or gradient (event {s.nonfinite_events}, over train.nonfinite_max="
                             f"{t.nonfinite_max})", s.step)
        s.opt.zero_grad(set_to_none=True)
        self.model.discard_step()
        event = {"event": "nonfinite", "step": s.step, "loss": str(float(loss.detach())), "action": t.nonfinite}
        if t.nonfinite == "rollback":
            self._rollback(s)
            event["rolled_back_to"] = s.step
        event["lr"] = scale_lr(s.opt, s.sched, t.nonfinite_lr_factor)
        self.logger.log(event)
        D.say(f"non-finite loss or gradient at step {event['step']}: {t.nonfinite}, lr now "
              f"{event['lr']:.3g} ({s.nonfinite_events}/{t.nonfinite_max})")
        if t.nonfinite == "skip":
            self.bn.restore()
            with warnings.catch_warnings():   # "scheduler stepped before optimizer": intended here
                warnings.simplefilter("ignore", UserWarning)
                s.sched.step()
            s.step += 1
        return t.nonfinite

    def _rollback(self, s) -> None:
        """`s` back to the last checkpoint, keeping the count of non-finite events."""
        if not self.ckpt.exists():
            raise self.error("loss or gradient, and no checkpoint to roll back to yet", s.step)
        count = s.nonfinite_events
        restore(s, load_checkpoint(self.ckpt), self.device)
        self.restart()
        s.nonfinite_events = count
