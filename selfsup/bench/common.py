"""What every `selfsup bench NAME` shares: the `Bench` skeleton (settings with defaults and a quick
variant -> measurement -> table, notes and JSON), and the probes (device name and sync, peak RSS,
CPU load of other processes)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..atomic import write_text


@dataclass(frozen=True)
class Bench:
    """One benchmark. `run(settings)` and `main(argv)` are the same for every benchmark:

    settings = `defaults` <- `quick` (with ``quick=True``) <- the given ones; ``measure(settings,
    notes)`` returns ``{"rows": [...], "config": {...}, ...}``; the result gets the notes and
    ``table(rows)``, is written to ``out`` (JSON) when given and returned. `options(parser)` adds
    the command-line options (``--quick`` and ``--out`` are added here). A benchmark that writes
    several files names its JSON file in `out_file`: ``out`` is then a folder, passed to ``measure``
    (which returns the folder it used as ``config["out"]``, a default one when ``out`` was None)."""

    name: str
    about: str
    defaults: dict
    quick: dict
    quick_help: str
    measure: Callable[[dict, list], dict]
    table: Callable[[list], str]
    options: Callable[[argparse.ArgumentParser], None]
    out_file: str | None = None

    def run(self, args: dict | None = None) -> dict:
        """Measure with `args` (keys of `defaults`, plus ``quick`` and ``out``); return the result."""
        s, quick = settings(args, self.defaults, self.quick)
        out = None if self.out_file else s.pop("out", None)
        notes: list[str] = []
        res = self.measure(s, notes)
        if self.out_file:
            out = os.path.join(res["config"]["out"], self.out_file)
        res["config"] = {**res["config"], "quick": quick}
        res.update(notes=notes, table=self.table(res["rows"]))
        return write_json(res, out)

    def main(self, argv: list[str] | None = None) -> dict:
        """Command line: ``selfsup bench NAME [--quick] [options] [--out FILE.json]``; prints the table."""
        p = argparse.ArgumentParser(prog=f"selfsup bench {self.name}", description=self.about)
        p.add_argument("--quick", action="store_true", help=self.quick_help)
        self.options(p)
        p.add_argument("--out", help=f"folder to write {self.out_file} and the rest into" if self.out_file
                       else "JSON file to write")
        return print_result(self.run(vars(p.parse_args(argv))))


def settings(args: dict | None, defaults: dict, quick_settings: dict) -> tuple[dict, bool]:
    """(settings, quick): `defaults`, then `quick_settings` when args["quick"], then the given
    non-None `args`; ValueError naming unknown keys."""
    args = dict(args or {})
    quick = bool(args.pop("quick", False))
    s = dict(defaults)
    if quick:
        s.update(quick_settings)
    unknown = set(args) - set(s)
    if unknown:
        raise ValueError(f"unknown benchmark settings {sorted(unknown)}; valid: {sorted(s)} and 'quick'")
    s.update({k: v for k, v in args.items() if v is not None})
    return s, quick


def write_json(res: dict, out: str | None) -> dict:
    """Write `res` to `out` (when given; folders made; a temporary file renamed over it) and return it."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_text(out, json.dumps(res, indent=2) + "\n")
    return res


def text_table(rows: list[dict], columns: list[tuple]) -> str:
    """Fixed-width text table of `rows`: `columns` = [(header, width, cell)], where a cell is a row key,
    "key:format" (e.g. "step_ms:.1f"), or a function of the row that returns the text. A missing or
    None value prints "-"."""
    def text(r, cell):
        if callable(cell):
            return str(cell(r))
        key, _, fmt = cell.partition(":")
        return "-" if r.get(key) is None else format(r[key], fmt)

    head = " ".join(f"{h:>{w}}" for h, w, _ in columns)
    return "\n".join([head, "-" * len(head)] + [" ".join(f"{text(r, c):>{w}}" for _, w, c in columns) for r in rows])


def progress(bench: str, **fields) -> None:
    """One line on stderr per measured configuration, printed as it is measured: a run cut short (a
    time limit on a lent GPU) still shows what it got."""
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    print(f"[bench {bench}] {text}", file=sys.stderr, flush=True)


def print_result(res: dict) -> dict:
    """Print the table and the notes of a benchmark result; return it."""
    print(res["table"])
    for n in res["notes"]:
        print("note:", n)
    return res


def device_name(device=None) -> str:
    """The GPU's name for a CUDA device, else the CPU model (from /proc/cpuinfo where there is one)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class RssPeak:
    """Peak resident set size of this process, sampled every `period` s by a thread (Linux; 0
    elsewhere). `base` is the RSS on entering the `with` block."""

    def __init__(self, period: float = 0.001):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return 0

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


class StepRss:
    """Peak RSS growth of the block inside (Linux, glibc): ``with StepRss() as m: step()``, then
    ``m.peak`` (bytes; None where unsupported: ``m.ok`` is False).

    On entering, freed heap memory goes back to the OS (``malloc_trim(0)``), blocks of 64 KiB and
    more are taken by mmap (``M_MMAP_THRESHOLD``), so a freed tensor leaves the RSS at once instead of
    staying in a heap kept warm by the trainer's ``keep_freed_memory``, and the kernel's high-water
    mark ``VmHWM`` is reset (write "5" to ``/proc/self/clear_refs``); ``peak`` = VmHWM on leaving
    minus the RSS on entering: what the block allocated at its peak (activations, gradients and
    temporaries) over what was resident before it. `restore` is called on leaving (the caller's
    allocator settings: ``keep_freed_memory``)."""

    def __init__(self, restore: Callable[[], None] | None = None):
        self.restore, self.peak, self.ok = restore, None, False

    def __enter__(self):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 16)   # M_MMAP_THRESHOLD
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS")
            self.ok = self.base is not None
        except (OSError, AttributeError):
            self.ok = False
        return self

    def __exit__(self, *exc):
        if self.ok:
            hwm = _status_kib("VmHWM")
            self.peak = None if hwm is None else max(0, hwm - self.base)
        if self.restore is not None:
            self.restore()


def tensor_peak(fn: Callable[[], object]) -> tuple[object, int | None]:
    """Run ``fn()`` under the profiler's memory tracking: (its result, the peak of the tensor bytes it
    had allocated at once: each tensor's creation and release from the profiler's memory timeline;
    tensors that existed before do not count). The counterpart of CUDA's ``max_memory_allocated`` on
    the CPU, without the allocator's own overhead; None where that (private) torch API is missing."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action
    except ImportError:
        return fn(), None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        out = fn()
    try:
        timeline = prof._memory_profile().timeline
    except Exception:  # noqa: BLE001 - a private API: no figure rather than a failed benchmark
        return out, None
    cur = peak = 0
    for _, action, _, size in timeline:
        cur += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, cur)
    return out, peak


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def cpu_snapshot():
    """(wall s, busy CPU s of the whole machine from /proc/stat, CPU s of this process and its reaped
    children, i.e. DataLoader workers); None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # all but idle and iowait
    own = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    return time.perf_counter(), busy, own


def others_share(start, end, cpus: int) -> float | None:
    """Share of the machine's CPU time used by other processes between two `cpu_snapshot()`s."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    other = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, other) / ((end[0] - start[0]) * cpus)
