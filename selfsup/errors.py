"""What a user sees when something they can fix goes wrong: `SelfsupError` and its kinds.

The command line prints any of them as one ``selfsup: error: ...`` line and exits with code 2; the
message names the problem and the fix. Each kind also derives from the builtin exception that
code outside the project would expect (``ValueError`` for a bad value, ``FileNotFoundError`` for a
missing dataset), so ``except ValueError`` keeps working.

This is the bottom layer: it imports nothing of the project.
"""
from __future__ import annotations

import errno

__all__ = ["SelfsupError", "ConfigError", "DataError", "DatasetNotFoundError", "DatasetFormatError",
           "CheckpointError", "NonFiniteLossError", "CollectiveTimeoutError", "TrainingStopped", "os_error_text"]


class SelfsupError(Exception):
    """An error the user can fix: bad config, missing or corrupt data, unusable checkpoint, divergence."""


class ConfigError(SelfsupError, ValueError):
    """A config that cannot be used: unknown key, preset or method, or a bad value or combination."""


class DataError(SelfsupError):
    """A dataset that cannot be used."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset files were not found; the message lists every path tried."""


class DatasetFormatError(DataError, ValueError):
    """A dataset file exists but is corrupt or in the wrong format; the message names the file."""


class CheckpointError(SelfsupError, RuntimeError):
    """A checkpoint that is missing, unreadable or does not match the run."""


class NonFiniteLossError(SelfsupError, RuntimeError):
    """The loss or a parameter became NaN or infinite; training stopped without writing a checkpoint."""


class CollectiveTimeoutError(SelfsupError, RuntimeError):
    """A torch.distributed collective waited longer than dist.timeout_s: another rank is stuck or dead."""


class TrainingStopped(Exception):
    """Training was stopped by a signal after writing a checkpoint (not an error: the run is resumable).

    The command line exits with `exit_code` and prints nothing more (rank 0 has already printed where
    the checkpoint is and how to resume): 75 (EX_TEMPFAIL, "preempted, resumable") for SIGTERM, 130 for
    SIGINT (Ctrl-C)."""

    EXIT_CODES = {"SIGTERM": 75, "SIGINT": 130}

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = self.EXIT_CODES.get(signal_name, 75)


def os_error_text(e: OSError) -> str:
    """An OSError as what happened, to which file, and what to do (the CLI's message for it)."""
    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    fix = {errno.ENOSPC: "free some space or write elsewhere (run_dir=..., --out); the last complete "
                         "checkpoint is intact",
           errno.EDQUOT: "free some space or write elsewhere (run_dir=..., --out)",
           errno.EACCES: "choose a folder you may write (run_dir=..., --out, data.index_cache=null)",
           errno.EPERM: "choose a folder you may write (run_dir=..., --out, data.index_cache=null)",
           errno.EROFS: "the file system is read-only: choose a writable folder (run_dir=..., --out)",
           errno.EEXIST: "choose another path or remove it",
           errno.EISDIR: "give a file, not a folder",
           errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(e.errno, "check the path")
    return f"{what}{where}: {fix}"
