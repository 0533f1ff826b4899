"""What every `selfsup bench NAME` shares: settings with defaults, the JSON file, the printout."""
from __future__ import annotations

import json
import os


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
