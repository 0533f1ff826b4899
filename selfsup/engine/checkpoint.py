"""Checkpoints: written atomically, read through torch's safe (weights_only) unpickler, and what a
run's checkpoint holds (`RunState`: `capture` and `restore`).
"""
from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from ..parallel import distributed as D
from .setup import hash_seed

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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):   # torch's writer came up short
            raise OSError(errno.ENOSPC, "No space left on device: the checkpoint could not be written whole",
                          str(path)) from None
        raise


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` with `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at '{path}'. Is this a run directory of `selfsup train`?")
    fix = ("copy the file again or restore it from a backup, or point to another checkpoint; a run whose only "
           "checkpoint is lost starts over (remove its folder or choose another run_dir=...)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (0 bytes): a copy or save that did not finish "
                              f"truncated it: {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a checkpoint
        why = str(e).strip().rstrip(".") or f"{type(e).__name__}: the file ends early (truncated) or is not a torch " \
            "checkpoint"
        raise CheckpointError(f"could not read checkpoint '{path}': {why}; {fix}") from e


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


def _capture_rng(aug_gen: torch.Generator) -> dict:
    """The global torch RNG, the CUDA RNGs (a run on cuda) and the augmentation RNG with the device
    type it lives on; under DDP every rank's augmentation stream (a collective: every rank calls
    it), so a resume on the same world size and device type is exact."""
    state = {"torch": torch.get_rng_state(), "aug": aug_gen.get_state(), "aug_device": aug_gen.device.type}
    if aug_gen.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if D.is_dist():
        states = [None] * D.world_size()
        dist.all_gather_object(states, state["aug"].cpu())
        state["aug_all"] = states
    return state


def _seed_from(name: str, step: int, saved: torch.Tensor) -> int:
    """A seed for stream `name` that a checkpoint cannot restore here: a hash of the name, the step
    and the saved state (which holds the run's seed and position), so a resume is deterministic."""
    return hash_seed(name, step, saved.cpu().numpy().tobytes())


def _saved_device(rng: dict, here: torch.Generator) -> str:
    """The device type of the checkpoint's augmentation stream. A checkpoint older than the
    "aug_device" field: the current device when the state has its size (it then loads as before)."""
    if "aug_device" in rng:
        return rng["aug_device"]
    same = rng["aug"].numel() == here.get_state().numel()
    return here.device.type if same else ("cpu" if here.device.type != "cpu" else "cuda")


def _restore_rng(s: RunState, rng: dict, device: torch.device) -> None:
    """The RNG part of `restore`. A stream saved on another device type, or CUDA states of another
    number of GPUs, cannot be loaded: it is re-seeded (`_seed_from`), and rank 0 says so once."""
    torch.set_rng_state(rng["torch"])
    aug_on = _saved_device(rng, s.aug_gen)
    saved_on, here, reseeded = aug_on, device.type, []   # what the note says
    if here == "cuda":
        cuda = rng.get("cuda")
        if cuda is not None and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            torch.cuda.manual_seed_all(_seed_from("cuda", s.step, rng["torch"]))
            reseeded.append("the CUDA RNG")
            if cuda is not None and aug_on == "cuda":
                saved_on, here = f"{len(cuda)} GPUs", f"{torch.cuda.device_count()} GPUs"
    aug_states, world = rng.get("aug_all") or [rng["aug"]], D.world_size()
    if len(aug_states) != world:
        D.say(f"resuming on {world} processes from a run on {len(aug_states)}: "
              "augmentation streams are re-seeded, so the resume is not bit-exact")
    elif aug_on != s.aug_gen.device.type:
        s.aug_gen.manual_seed(_seed_from("aug", s.step, aug_states[D.rank()]))
        reseeded.insert(0, "the augmentation stream")
    else:
        s.aug_gen.set_state(aug_states[D.rank()].to(s.aug_gen.get_state().device))
    if reseeded:
        D.say(f"checkpoint written on {saved_on}, resuming on {here}: {' and '.join(reseeded)} "
              f"{'is' if len(reseeded) == 1 else 'are'} re-seeded; the run continues but is not "
              "bit-identical to an uninterrupted one")


def capture(s: RunState, config_yaml: str, elapsed: float, log_lines: int) -> dict:
    """The checkpoint of `s` (format 1). Collective under DDP (RNG streams; sharded state such as
    PIC's rows gathered whole, so the run resumes on any number of processes): every rank calls it."""
    rng = _capture_rng(s.aug_gen)
    state = s.model.state_dict()
    if s.model.ddp_ignored():   # sharded state: every rank's shard
        state = s.model.gather_sharded_state(state)
    return {"format": 1, "config": config_yaml, "model": state, "optimizer": s.opt.state_dict(),
            "scheduler": s.sched.state_dict(), "sampler": s.sampler.state_dict(), "step": s.step,
            "epoch": s.step // s.steps_per_epoch, "batch_in_epoch": s.step % s.steps_per_epoch, "elapsed": elapsed,
            "rng": rng, "world_size": D.world_size(), "nonfinite_events": s.nonfinite_events, "log_lines": log_lines}


def restore(s: RunState, ck: dict, device: torch.device) -> None:
    """Put `s` back to checkpoint `ck` (a resume, or a rollback of the non-finite guard). The
    RNG streams are restored when the world size and device type are the ones at save time;
    otherwise they are re-seeded (said once), and the resume is exact up to the augmentation."""
    load_state_checked(s.model, ck["model"], "model")
    s.opt.load_state_dict(ck["optimizer"])
    s.sched.load_state_dict(ck["scheduler"])
    s.sampler.load_state_dict(ck.get("sampler") or {"epoch": ck["epoch"], "batch_in_epoch": ck["batch_in_epoch"]})
    s.step, s.nonfinite_events = ck["step"], ck.get("nonfinite_events", 0)
    _restore_rng(s, ck["rng"], device)
