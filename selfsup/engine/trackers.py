"""Experiment trackers besides TensorBoard: Weights & Biases (log.wandb) and MLflow (log.mlflow).

Both are optional (``pip install 'selfsup[trackers]'``) and off by default. When on, they receive
what TensorBoard receives (every numeric field of every metrics.jsonl event, at its step), the
resolved config once, and the final metrics as the run's summary. Both work without a network:

* W&B: ``log.wandb_mode=offline`` (the default) writes RUN_DIR/wandb/; ``wandb sync RUN_DIR/wandb/offline-run-*``
  uploads it later. The W&B run id is kept in RUN_DIR/trackers.json, so a resumed run continues the same
  W&B run.
* MLflow: ``log.mlflow_uri`` (a server, or ``sqlite:///FILE`` with the full mlflow package); unset, a file
  store in RUN_DIR/mlruns (``mlflow ui --backend-store-uri RUN_DIR/mlruns``). The MLflow run id is kept in
  RUN_DIR/trackers.json too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from pathlib import Path

from ..atomic import write_text
from ..errors import ConfigError

__all__ = ["check_trackers", "Trackers"]

_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(cfg) -> None:
    """A ConfigError naming the package to install when a tracker is on and its package is missing
    (checked before the run directory is made)."""
    for key, module in _PACKAGES.items():
        if cfg.log.get(key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.{key}=true needs the {module} package: pip install 'selfsup[trackers]' "
                              f"(or pip install {'mlflow-skinny' if key == 'mlflow' else module}), or set log.{key}=false")


class Trackers:
    """The trackers `cfg.log` turns on, for the run in `run_dir` (rank 0 only; nothing when none is on)."""

    def __init__(self, cfg, run_dir: Path, config: dict):
        self.run_dir, self.wandb, self.mlflow = Path(run_dir), None, None
        log = cfg.log
        if not (log.wandb or log.mlflow):
            return
        ids = self._ids()
        name = self.run_dir.name
        if log.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            ids.setdefault("wandb", secrets.token_hex(4))
            self.wandb = wandb.init(project=log.wandb_project, mode=log.wandb_mode, dir=str(self.run_dir),
                                    name=name, id=ids["wandb"], resume="allow", config=config)
        if log.mlflow:
            import mlflow

            uri = log.mlflow_uri
            if not uri:   # a local file store: MLflow 3 keeps it behind an opt-in
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                uri = (self.run_dir / "mlruns").resolve().as_uri()
            self.mlflow = mlflow.MlflowClient(tracking_uri=uri)
            if "mlflow" not in ids:
                exp = self.mlflow.get_experiment_by_name(log.mlflow_experiment)
                exp_id = exp.experiment_id if exp else self.mlflow.create_experiment(log.mlflow_experiment)
                run = self.mlflow.create_run(exp_id, run_name=name)
                ids["mlflow"] = run.info.run_id
                self.mlflow.log_dict(ids["mlflow"], config, "config.json")
                params = _params(config)
                for i in range(0, len(params), 100):   # MLflow takes at most 100 params per call
                    self.mlflow.log_batch(ids["mlflow"], params=params[i:i + 100])
        self.ids = ids
        self._save_ids()

    def _ids(self) -> dict:
        path = self.run_dir / "trackers.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_ids(self) -> None:
        write_text(self.run_dir / "trackers.json", json.dumps(self.ids) + "\n")

    def log(self, scalars: dict, step: int) -> None:
        """The numeric fields of one event at `step`."""
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.mlflow.log_batch(self.ids["mlflow"], metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def final(self, metrics: dict) -> None:
        """The run's final metrics: W&B's summary, MLflow's final-metrics.json artifact (and its metrics)."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb is not None:
            self.wandb.summary.update(numbers)
        if self.mlflow is not None:
            self.mlflow.log_dict(self.ids["mlflow"], metrics, "final-metrics.json")

    def close(self, ok: bool = True) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if ok else 1)
            self.wandb = None
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.ids["mlflow"], "FINISHED" if ok else "KILLED")
            self.mlflow = None


def _params(config: dict, prefix: str = "") -> list:
    """The config flattened to MLflow params ("train.lr": "0.3"), values cut to MLflow's 6000 characters."""
    from mlflow.entities import Param

    out = []
    for k, v in config.items():
        if isinstance(v, dict):
            out.extend(_params(v, f"{prefix}{k}."))
        else:
            out.append(Param(f"{prefix}{k}", str(v)[:6000]))
    return out
