"""Open a run directory: name a fresh one, or take up the run to resume.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/last.pt`` and, at the end, ``encoder.safetensors``; rank 0 writes it, every rank reads
the checkpoint of a resumed run.

Rules (rank 0 decides, every rank follows):

- A default run directory ``runs/<preset>-<YYYYmmdd-HHMMSS>`` is made with an exclusive mkdir;
  a name already taken (two runs in the same second) becomes ``...-2``, ``...-3``, ...
- A fresh run into a given ``run_dir`` needs it absent or empty; a non-empty one is refused
  (continue it with ``--resume`` when it holds a checkpoint, or pick another ``run_dir``, or remove it).
- ``train.resume=auto`` (CLI: ``--resume-if-exists``): a ``run_dir`` holding a checkpoint is resumed;
  otherwise the run starts fresh (into an absent or empty folder, or over the leftovers of a start of
  the same run that never wrote a checkpoint); it needs a fixed ``run_dir`` (a new default folder at each
  start would never be resumed). ``train.resume=never`` (the default): only ``--resume``.
- A resume is checked before anything is written: only the keys of ``RESUME_MAY_CHANGE`` may differ
  from the config stored in the checkpoint; any other difference is refused with the list of them
  (``key: old -> new``) and the run directory is left byte-for-byte as it was.
- Nothing is written until start-up is over (`Run.commit`: ``config.yaml``, stale ``*.tmp`` of a
  killed save removed); a start that fails removes what this run created (`Run.abandon`).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from ..config import Config, migrate
from ..errors import CheckpointError, ConfigError, SelfsupError
from ..parallel import distributed as D
from .checkpoint import load_checkpoint

__all__ = ["RESUME_MAY_CHANGE", "Run", "check_resume", "check_run_resume", "checkpoint_path", "open_run"]

# The keys that may change when a run is resumed: how long it runs, how often it logs, checkpoints
# and evaluates, where and how fast it runs. Every other key (model, method, augmentation, batch
# size, data set and split, optimiser and schedule shape, seed ...) is fixed by the checkpoint.
# The memory knobs too (train.micro_batch, model.checkpointing): a run resumed where memory is
# smaller may cut its batch into smaller chunks (exact but for BatchNorm's per-chunk statistics).
# A name ending in "." stands for every key under it.
RESUME_MAY_CHANGE = (
    "run_dir", "preset", "device",
    "train.epochs", "train.max_steps", "train.checkpoint_every", "train.log_every", "train.threads",
    "train.precision", "train.compile", "train.resume", "train.micro_batch", "model.checkpointing",
    "train.nonfinite", "train.nonfinite_lr_factor", "train.nonfinite_max", "train.progress_s",
    "data.root", "data.download", "data.num_workers", "data.prefetch", "data.on_error", "data.index_cache",
    "data.cache_mode", "data.decode",
    "eval.", "det.", "log.", "dist.",
)


def checkpoint_path(run_dir) -> Path:
    """RUN_DIR/checkpoints/last.pt."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(saved: dict, now: dict, may_change, refuse) -> None:
    """The resume check of every loop: raise `refuse(lines)` when a key of the settings `saved` (in the
    checkpoint) and `now` (nested dicts, compared leaf by leaf) differs and is not in `may_change`;
    `lines` are "key: old -> new", sorted. A name in `may_change` ending in "." stands for every key
    under it."""
    old, new = _flat(saved), _flat(now)
    free = [k for k in sorted(set(old) | set(new))
            if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in may_change)]
    diff = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in free if old.get(k) != new.get(k)]
    if diff:
        raise refuse(diff)


def check_run_resume(cfg, saved_yaml: str, run_dir) -> None:
    """Raise ConfigError listing every key of `cfg` that differs from the run's saved config
    (`saved_yaml`, the copy inside its checkpoint) and may not change on resume."""
    try:
        saved = OmegaConf.merge(OmegaConf.structured(Config), migrate(OmegaConf.create(saved_yaml)))
    except Exception as e:   # noqa: BLE001 -- YAML or schema errors alike: the stored config is unusable
        raise CheckpointError(f"the config stored in {checkpoint_path(run_dir)} cannot be read: {e}") from None

    def refuse(diff: list) -> ConfigError:
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE[2:])
        return ConfigError(
            f"cannot resume '{run_dir}': these keys differ from the run's checkpoint and may not change "
            "on resume:\n" + "\n".join("  " + d for d in diff) + "\nResume with the run's own values (`selfsup "
            f"train --resume {run_dir}` without these overrides; if {Path(run_dir) / 'config.yaml'} itself "
            f"differs, restore those keys in it) or start a new run with another run_dir=... Keys that may "
            f"change on resume: {allowed}")

    check_resume(OmegaConf.to_container(saved), OmegaConf.to_container(cfg), RESUME_MAY_CHANGE, refuse)


@dataclass
class Run:
    """The run directory a Trainer starts in. `ckpt`: the checkpoint to resume (None: a fresh start).
    `made`: what this run made of the folder ("dir": the folder, "contents": it was empty, None:
    nothing, the run resumes or starts over in it); a failed start removes just that."""

    dir: Path
    ckpt: dict | None
    made: str | None
    main: bool

    def commit(self, cfg) -> None:
        """Start-up is over: remove stale temporary files of a killed save, write config.yaml; on a
        start over (resume=auto, no checkpoint) the previous attempt's events are dropped."""
        if not self.main:
            return
        for tmp in [*self.dir.glob("checkpoints/*.tmp"), self.dir / "metrics.tmp"]:
            tmp.unlink(missing_ok=True)
        if self.ckpt is None and self.made is None and (self.dir / "metrics.jsonl").exists():
            (self.dir / "metrics.jsonl").write_text("")
        tmp = self.dir / "config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(cfg))
        os.replace(tmp, self.dir / "config.yaml")

    def abandon(self) -> None:
        """Start-up failed: remove what this run created (the folder, or what it wrote in a folder that
        was empty), nothing else."""
        if not self.main or self.made is None:
            return
        if self.made == "dir":
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for p in self.dir.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _new_default_dir(cfg) -> Path:
    """runs/<preset>-<YYYYmmdd-HHMMSS>, made with an exclusive mkdir (-2, -3, ... when taken)."""
    base = f"runs/{cfg.preset or cfg.method}-{_now()}"
    Path("runs").mkdir(exist_ok=True)
    for n in range(1, 10_000):
        path = Path(base if n == 1 else f"{base}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not make a new run directory {base}-N: set run_dir=...")


def _now() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _decide(cfg, resume: str | None) -> tuple[str, dict | None, str | None]:
    """(run directory, checkpoint or None, what this run made of it) on rank 0; raises before
    anything is written."""
    if resume:
        ckpt = load_checkpoint(checkpoint_path(resume))
        check_run_resume(cfg, ckpt["config"], resume)
        return str(resume), ckpt, None
    if cfg.run_dir is None:
        if cfg.train.resume == "auto":
            raise ConfigError("train.resume=auto (--resume-if-exists) needs a fixed run_dir=...: without one every "
                              "start makes a new runs/<preset>-<time> folder, so a requeued job would start again "
                              "from step 0. Add run_dir=DIR, the same on every launch of the job")
        return str(_new_default_dir(cfg)), None, "dir"
    run_dir, auto = Path(cfg.run_dir), cfg.train.resume == "auto"
    if auto and checkpoint_path(run_dir).exists():
        ckpt = load_checkpoint(checkpoint_path(run_dir))
        check_run_resume(cfg, ckpt["config"], run_dir)
        D.say(f"train.resume=auto: {run_dir} holds a checkpoint, resuming it")
        return str(run_dir), ckpt, None
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir '{run_dir}' is a file, not a folder: choose another run_dir=...")
    if _non_empty(run_dir):
        if auto and (run_dir / "config.yaml").is_file():   # a start of this run killed before its first checkpoint
            check_run_resume(cfg, (run_dir / "config.yaml").read_text(), run_dir)
            D.say(f"train.resume=auto: {run_dir} holds no checkpoint yet, starting it over")
            return str(run_dir), None, None
        if checkpoint_path(run_dir).exists():
            raise ConfigError(f"run directory '{run_dir}' is not empty (it holds a checkpoint): continue that run "
                              f"with `selfsup train --resume {run_dir}` (or train.resume=auto), choose another "
                              f"run_dir=..., or remove '{run_dir}'")
        if (run_dir / "config.yaml").is_file():   # --resume would fail: there is no checkpoint to resume
            raise ConfigError(f"run directory '{run_dir}' is not empty: it holds a run that stopped before its first "
                              "checkpoint (config.yaml, no checkpoints/last.pt). Start it over in that folder with "
                              "--resume-if-exists (train.resume=auto), choose another run_dir=..., or remove "
                              f"'{run_dir}'")
        raise ConfigError(f"run directory '{run_dir}' is not empty (it holds other files, no checkpoint): choose "
                          f"another run_dir=..., or remove '{run_dir}'")
    if run_dir.is_dir():
        return str(run_dir), None, "contents"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(run_dir)
    except FileExistsError:   # made by another run just now
        raise ConfigError(f"run directory '{run_dir}' was just created by another run: choose another "
                          "run_dir=...") from None
    return str(run_dir), None, "dir"


def open_run(cfg, resume: str | None, main: bool) -> Run:
    """The run directory to start in, decided on rank 0 (`main`) and shared with every rank; sets
    ``cfg.run_dir``. Refusals (ConfigError) come before anything is written; the folder of a fresh
    run is made here, ``config.yaml`` only by `Run.commit` once start-up is over."""
    ckpt = None
    if not D.is_dist():
        run_dir, ckpt, made = _decide(cfg, resume)
    else:   # every rank must use the same folder, and fail the same way
        box = [None]
        if main:
            try:
                run_dir, ckpt, made = _decide(cfg, resume)
                box = [(run_dir, ckpt is not None, made)]
            except SelfsupError as e:
                box = [e]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        run_dir, resuming, made = box[0]
        if resuming and ckpt is None:
            ckpt = load_checkpoint(checkpoint_path(run_dir))
    cfg.run_dir = run_dir
    return Run(Path(run_dir), ckpt, made, main)
