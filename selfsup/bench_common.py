"""What every `selfsup bench NAME` shares: settings with defaults, the JSON file, the printout."""
from __future__ import annotations

import json
import os
import threading
import time


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
    """Write `res` to `out` (when given; folders made) and return it."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return res


def print_result(res: dict) -> dict:
    """Print the table and the notes of a benchmark result; return it."""
    print(res["table"])
    for n in res["notes"]:
        print("note:", n)
    return res


def device_name(device=None) -> str:
    """The GPU's name for a CUDA device, else the CPU model (from /proc/cpuinfo where there is one)."""
    import platform

    import torch

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
    import torch

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


def cpu_snapshot():
    """(wall s, busy CPU s of the whole machine from /proc/stat, CPU s of this process and its reaped
    children, i.e. DataLoader workers); None where /proc/stat is missing."""
    import resource

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
