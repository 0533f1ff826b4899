"""Open a run directory: name a fresh one, or take up the run to resume.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/last.pt`` and, at the end, ``encoder.safetensors``; rank 0 writes it, every rank reads
the checkpoint of a resumed run.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from ..errors import ConfigError
from ..parallel import distributed as D
from .checkpoint import load_checkpoint

__all__ = ["open_run", "checkpoint_path"]


def checkpoint_path(run_dir) -> Path:
    """RUN_DIR/checkpoints/last.pt."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def _default_run_dir(cfg) -> str:
    name = cfg.preset or cfg.method
    run_dir = f"runs/{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if D.is_dist():   # every rank must write to the same folder
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    return run_dir


def open_run(cfg, resume: str | None, main: bool) -> tuple[Path, dict | None]:
    """(run directory, checkpoint to resume or None). Sets ``cfg.run_dir``; a fresh run refuses a
    directory that already holds a checkpoint; rank 0 (`main`) writes ``config.yaml``."""
    ckpt = None
    if resume:
        ckpt = load_checkpoint(checkpoint_path(resume))
        cfg.run_dir = str(resume)
    if cfg.run_dir is None:
        cfg.run_dir = _default_run_dir(cfg)
    run_dir = Path(cfg.run_dir)
    if not resume and checkpoint_path(run_dir).exists():
        raise ConfigError(f"run directory '{run_dir}' already holds a checkpoint: continue it with "
                          f"`selfsup train --resume {run_dir}` or choose another run_dir=...")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run_dir, ckpt
