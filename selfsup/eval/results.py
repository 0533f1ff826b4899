"""Where evaluation results go and how they are merged: RUN_DIR/eval/<protocol>.json, and one
detection.json for both backbone starts (`selfsup report` reads them)."""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_json
from ..errors import ConfigError

DET_METRICS = ("ap50", "ap", "ap75", "voc07_ap50", "voc07_ap75", "voc07_ap")


def eval_out(out: str | None, run: str | None, checkpoint: str | None) -> Path | None:
    """The folder of `eval knn|linear|logreg|finetune`'s json: --out, else RUN_DIR/eval; None (no file)
    for a --checkpoint alone. A --checkpoint outside --run is another encoder: its numbers never go under
    the run's name (its eval/, then its model card and report), so it needs --out."""
    if out:
        if Path(out).exists() and not Path(out).is_dir():
            raise ConfigError(f"--out {out} is a file; --out takes a folder (new or existing) to write into")
        return Path(out)
    if not run:
        return None
    if checkpoint and not Path(checkpoint).resolve().is_relative_to(Path(run).resolve()):
        raise ConfigError(f"--checkpoint {checkpoint} is not a file of run {run}: its results would be "
                          f"filed as that run's ({Path(run) / 'eval'}). Give --out DIR for them, or leave out "
                          "--checkpoint to evaluate the run's own encoder")
    return Path(run) / "eval"


def out_dir(out: str | None, run: str | None, checkpoint: str | None, name: str) -> Path:
    """Where embed and visualize write: --out, else RUN_DIR/eval/<name>; as `eval_out`, another run's
    --checkpoint needs --out."""
    base = eval_out(out, run, checkpoint)
    if base is None:
        raise ConfigError("give --out DIR: with --checkpoint there is no run directory to write into")
    return base if out else base / name


def save_eval(out: Path | None, name: str, res: dict, checkpoint: str | None = None) -> dict:
    """Write `res` to OUT/<name>.json (`eval_out`; None: no file); return it. The protocol names the
    encoder when it came from --checkpoint."""
    if checkpoint:
        res["protocol"] = f"{res['protocol']}; encoder: {Path(checkpoint).resolve()}"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{name}.json", res)   # a temporary file, then a rename: never half a json
    return res


def read_detection(path: Path) -> dict:
    """The detection json at `path`, {} when there is none; anything but a JSON object with a list
    "runs" (as `save_detection` writes it) is refused, naming the file."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("runs", []), list):
        raise ConfigError(f"{path} is not a detection results file (a JSON object with a list \"runs\", as "
                          "`selfsup eval detection` writes it): move or remove it, or give another --out")
    return old


def save_detection(path: Path, results: dict) -> dict:
    """Merge `results` ({init: scores}) into the detection json at `path` (one file for SSL and random
    init, flat det_<init>_<metric> numbers with protocol_<init>, as `selfsup report` reads them)."""
    old = read_detection(path)
    runs = {r["init"]: r for r in old.get("runs", []) if isinstance(r, dict) and "init" in r}
    runs.update({k: {kk: vv for kk, vv in v.items() if kk != "protocol"} for k, v in results.items()})
    protocols = {k[len("protocol_"):]: v for k, v in old.items() if k.startswith("protocol_")}
    protocols.update({k: v["protocol"] for k, v in results.items()})
    res = {}
    for init in ("ssl", "random"):
        if init in runs:
            res.update({f"det_{init}_{m}": runs[init][m] for m in DET_METRICS if m in runs[init]})
            res[f"det_{init}_s_per_iter"] = runs[init].get("s_per_iter")
    res["protocol"] = "transfer to detection (eval/detection/<init>/: checkpoints, metrics.jsonl)"
    res.update({f"protocol_{k}": v for k, v in protocols.items()})
    res["runs"] = [runs[k] for k in ("ssl", "random") if k in runs]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, res)
    return res
