"""Atomic checkpoints, loaded through torch's safe (weights_only) unpickler."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not match the run."""


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
