"""Progress that every log shows: a tqdm bar when stdout is a terminal, else a plain line every
`every_s` seconds on stdout (a file, a pipe, a SLURM or Kubernetes log: a bar's carriage returns are
lost there, and stderr may go elsewhere)::

    [selfsup] train: step 1200/4914 (24%) epoch 5 loss 7.9842 lr 0.0287 views/s 2266 elapsed 2m10s eta 6m41s
"""
from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

__all__ = ["Progress", "Heartbeat", "duration"]

_last_line = [time.monotonic()]   # when a plain progress line was last printed (Progress or Heartbeat)


def _printed() -> None:
    _last_line[0] = time.monotonic()


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``; ``9`` -> ``9s``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


class Progress:
    """Counts `total` units of work named `desc`. ``update(n)`` after each unit, ``set(**fields)`` for
    the values the line shows (loss, lr, ...), ``write(text)`` for a message, ``close()`` at the end.

    `enabled` False (a non-zero rank) shows nothing. `tty` (default: whether `stream` is a terminal)
    picks the bar or the lines; `clock` is for tests. The plain line comes every `every_s` seconds of
    `clock` and once at ``close`` when units were done since the last line; its ETA extrapolates the
    rate since the start (or since the last ``reset``)."""

    def __init__(self, total: int, desc: str, initial: int = 0, every_s: float = 30.0, enabled: bool = True,
                 stream=None, tty: bool | None = None, clock=time.monotonic, unit: str = "step",
                 final_line: bool = True):
        self.total, self.desc, self.n, self.every_s, self.unit = total, desc, initial, every_s, unit
        self.final_line = final_line   # False: ``close`` prints a last line only after an earlier one
        self.enabled, self.clock = enabled, clock
        self.stream = stream if stream is not None else sys.stdout
        tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) if enabled and tty else None
        self.fields: dict = {}
        self.t0 = self.t_line = clock()
        self.n0 = self.n_line = initial
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.clock() - self.t_line >= self.every_s:
            self._print_line()

    def due(self) -> bool:
        """Whether fresh values would be shown now (a line is due, or the bar's last values are over a
        second old): a loop calls ``set`` only then, so a value that costs a device sync is read rarely."""
        interval = 1.0 if self.bar is not None else self.every_s
        return self.enabled and self.clock() - self.t_line >= interval

    def set(self, **fields) -> None:
        """Values to show from now on (replacing earlier ones of the same name)."""
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.set_postfix({k: _value(v) for k, v in self.fields.items()}, refresh=False)
            self.t_line = self.clock()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, file=self.stream, flush=True)
            _printed()

    def reset(self, total: int, n: int) -> None:
        """Start counting again at `n` of `total` (the rate and ETA from here)."""
        self.total, self.n = total, n
        self.t0, self.n0 = self.clock(), n
        if self.bar is not None:
            self.bar.reset(total=total)
            self.bar.update(n)

    def line(self) -> str:
        """The plain progress line as of now."""
        elapsed = self.clock() - self.t0
        done = self.n - self.n0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"[selfsup] {self.desc}: {self.unit} {self.n}/{self.total}{pct}"]
        parts += [f"{k} {_value(v)}" for k, v in self.fields.items()]
        parts.append(f"elapsed {duration(elapsed)}")
        if done > 0 and self.total:
            parts.append(f"eta {duration(elapsed / done * max(self.total - self.n, 0))}")
        return " ".join(parts)

    def _print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        _printed()
        self.t_line, self.n_line = self.clock(), self.n
        self.lines += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n != self.n_line and (self.final_line or self.lines):
            self._print_line()


class Heartbeat:
    """``with Heartbeat("eval knn"):`` prints ``[selfsup] eval knn: working, elapsed 1m00s`` on a log (stdout
    not a terminal) whenever no progress line was printed for `every_s` seconds: the steps that have no
    count to show (a kNN search, t-SNE, a baseline) never leave a log silent for long. A daemon thread;
    nothing on a terminal, or when not `enabled` (a non-zero rank)."""

    def __init__(self, desc: str, every_s: float = 30.0, enabled: bool = True, stream=None):
        self.desc, self.every_s = desc, every_s
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled and not bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "Heartbeat":
        if self.enabled:
            self.t0 = time.monotonic()
            _printed()
            self._thread = threading.Thread(target=self._run, name="selfsup-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every_s / 4)):
            now = time.monotonic()
            if now - _last_line[0] >= self.every_s:
                print(f"[selfsup] {self.desc}: working, elapsed {duration(now - self.t0)}", file=self.stream, flush=True)
                _printed()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
