"""Checkpoints: written atomically, read through torch's safe (weights_only) unpickler, and what a
run's checkpoint holds (`RunState`: `capture` and `restore`).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from ..parallel import distributed as D

__all__ = ["save_checkpoint", "load_checkpoint", "load_state_checked", "RunState", "capture", "restore",
           "CheckpointError"]


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename.

    A crash at any moment leaves either the old or the new file, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` with `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'. Is this a run directory of `selfsup train`?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a checkpoint
        raise CheckpointError(f"could not read checkpoint '{path}': {e}") from e


def load_state_checked(module: torch.nn.Module, state: dict, what: str) -> None:
    """load_state_dict with an error that says which keys or shapes do not match and why."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's {what} does not match this config's model "
                              f"(was it written with another backbone, head or method?):\n{e}") from None


@dataclass
class RunState:
    """What a checkpoint holds and restores: the model (with the method's state), the optimiser, the
    lr schedule, the index schedule's position, this rank's augmentation RNG and the counters."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    sampler: object
    aug_gen: torch.Generator
    steps_per_epoch: int
    step: int = 0
    nonfinite_events: int = 0
    elapsed_before: float = 0.0   # training seconds of the run before this process took it up


def _rng_state(aug_gen: torch.Generator) -> dict:
    """The global torch (and CUDA) RNG and the augmentation RNG; under DDP every rank's augmentation
    stream (a collective: every rank calls it), so a resume on the same world size is exact."""
    state = {"torch": torch.get_rng_state(), "aug": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if D.is_dist():
        states = [None] * D.world_size()
        dist.all_gather_object(states, state["aug"].cpu())
        state["aug_all"] = states
    return state


def capture(s: RunState, config_yaml: str, elapsed: float, log_lines: int) -> dict:
    """The checkpoint of `s` (format 1). Collective under DDP (RNG streams; sharded state such as
    PIC's rows gathered whole, so the run resumes on any number of processes): every rank calls it."""
    rng = _rng_state(s.aug_gen)
    state = s.model.state_dict()
    if s.model.ddp_ignored():   # sharded state: every rank's shard
        state = s.model.gather_sharded_state(state)
    return {"format": 1, "config": config_yaml, "model": state, "optimizer": s.opt.state_dict(),
            "scheduler": s.sched.state_dict(), "sampler": s.sampler.state_dict(), "step": s.step,
            "epoch": s.step // s.steps_per_epoch, "batch_in_epoch": s.step % s.steps_per_epoch, "elapsed": elapsed,
            "rng": rng, "world_size": D.world_size(), "nonfinite_events": s.nonfinite_events, "log_lines": log_lines}


def restore(s: RunState, ck: dict, device: torch.device) -> None:
    """Put `s` back to checkpoint `ck` (a resume, or a rollback of the non-finite guard). The
    augmentation streams are restored when the world size is the one at save time; otherwise they
    are re-seeded (said once), and the resume is exact up to the augmentation."""
    load_state_checked(s.model, ck["model"], "model")
    s.opt.load_state_dict(ck["optimizer"])
    s.sched.load_state_dict(ck["scheduler"])
    s.sampler.load_state_dict(ck.get("sampler") or {"epoch": ck["epoch"], "batch_in_epoch": ck["batch_in_epoch"]})
    s.step, s.nonfinite_events = ck["step"], ck.get("nonfinite_events", 0)
    rng = ck["rng"]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state_all(rng["cuda"])
    aug_states, world = rng.get("aug_all") or [rng["aug"]], D.world_size()
    if len(aug_states) == world:
        s.aug_gen.set_state(aug_states[D.rank()].to(s.aug_gen.get_state().device))
    elif D.rank() == 0:
        print(f"[selfsup] resuming on {world} processes from a run on {len(aug_states)}: "
              "augmentation streams are re-seeded, so the resume is not bit-exact")
