"""Write a file whole or not at all: a temporary file in the same folder, then `os.replace`.

A reader, or a command killed half-way (SIGTERM, a full disk), never finds half a file at the path:
it holds the old file or the new one. A write that fails removes its temporary file; a process
killed outright leaves at most a `NAME.PID.tmp` beside the path, never a damaged NAME.

This is a bottom layer: it imports nothing of the project.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

__all__ = ["replacing", "write_bytes", "write_json", "write_text"]


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path beside `path` to write; when the block ends without an error it replaces
    `path`, otherwise it is removed. (A writer that picks the format by the file name needs the format
    given: the temporary name ends in .tmp.)"""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")
