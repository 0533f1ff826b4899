"""Time to accuracy of every method on the user's own machine and data: ``selfsup bench methods``.

Each preset of the list (default: every ``*-fmnist-cpu`` preset) is trained as ``selfsup train``
would train it (the trainer itself, the preset's own schedule; ``data.*`` and other overrides apply
to every preset), with the kNN of its encoder measured at fixed points of training time, then:

* the final kNN (the run's protocol: ``eval.knn_k``, ``eval.knn_temperature``, clean features) and the
  linear probe (``selfsup eval linear``'s protocol, frozen encoder, precomputed features);
* the baselines with the same kNN protocol: centred raw pixels, and each backbone at its random
  initialisation (:mod:`selfsup.eval.baselines`);
* views/s, peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, sampled) and the
  wall times: set-up (data, model), training (the kNN points of the bench excluded: they are not part
  of the run), evaluation.

A budget: ``minutes`` of training per preset (the run stops there if its schedule is longer: the
row says so), or ``steps`` (``train.max_steps``). The kNN points are at ``points`` evenly spaced
times up to the budget (``minutes``), or steps (``steps``), and at the end.

Writes into ``out`` (a folder): ``methods.json`` (settings, rows, baselines, notes), ``methods.png``
(kNN against training minutes, one line per preset, the baselines as horizontal lines),
``methods.md`` (the table, for a README), ``rows.jsonl`` (each row as soon as its preset is done) and
``runs/<preset>/`` (each run directory).

Usage::

    selfsup bench methods --minutes 15 --out runs/bench/methods
    selfsup bench methods --presets simclr-fmnist-cpu,mocov2-fmnist-cpu --steps 500 data.root=DIR
    selfsup bench methods --quick        # synthetic data, tiny models, a few steps: under a minute
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..config import list_presets, load_config
from ..data.splits import load_eval_data
from ..engine.trainer import Trainer
from ..errors import ConfigError
from ..eval.baselines import pixel_baseline, random_init_baseline
from ..eval.linear import linear_eval
from ..eval.monitor import knn_eval, knn_protocol
from ..atomic import write_text
from .common import Bench, RssPeak, device_name, progress, text_table

__all__ = ["BENCH", "run", "main", "DEFAULTS", "QUICK", "default_presets", "plot_methods"]

DEFAULTS = dict(presets=None, minutes=15.0, steps=None, points=6, linear=True, overrides=(), out=None)
# CI-sized: the procedural synthetic set, tiny models, 4 steps; timm ViTs shrunk to one block
QUICK = dict(steps=4, points=2, overrides=(
    "data.name=synthetic", "device=cpu", "model.width=8", "model.head_hidden=32", "model.proj_dim=16",
    "train.batch_size=32", "train.threads=1", "train.log_every=2", "eval.knn_k=20", "eval.batch_size=256",
    "eval.linear_epochs=2", "data.window=512", "data.stride=128", "moco.queue_size=256", "instdisc.nce_k=64",
    "mocov3.proj_hidden=32", "mocov3.proj_dim=16", "model.backbone_args.embed_dim=24", "model.backbone_args.depth=1"))


def default_presets() -> list[str]:
    """Every shipped ``*-fmnist-cpu`` preset: one per method (and the ViT ones)."""
    return [p for p in list_presets() if p.endswith("-fmnist-cpu")]


def _preset_config(preset: str, overrides: list[str], run_dir: Path, steps: int | None):
    """The preset's config as the bench trains it; quick-mode keys a preset does not have (a ViT's
    backbone_args on a ResNet) are dropped rather than refused."""
    keep = []
    base = load_config(preset, [])
    for o in overrides:
        key = o.split("=", 1)[0]
        if key.startswith("model.backbone_args.") and not str(base.model.backbone).startswith("timm/"):
            continue
        keep.append(o)
    extra = [f"run_dir={run_dir}", "eval.every=0"] + ([f"train.max_steps={steps}"] if steps else [])
    return load_config(preset, keep + extra)


class _Clock:
    """The bench's side of one run: kNN at the points, its own time kept out of the training clock."""

    def __init__(self, cfg, trainer: Trainer, marks: list[float], by_steps: bool, budget_s: float | None):
        self.cfg, self.marks, self.by_steps, self.budget_s = cfg, list(marks), by_steps, budget_s
        self.eval_s, self.curve, self.stopped_at_budget = 0.0, [], False
        self.train_ds, self.test_ds = load_eval_data(cfg, trainer.data.ds, trainer.data.stream)

    def train_s(self, trainer: Trainer) -> float:
        return trainer.wall() - self.eval_s

    def evaluate(self, trainer: Trainer) -> dict:
        t0, train_s, env = time.perf_counter(), self.train_s(trainer), trainer.env
        res = knn_eval(trainer.model.encoder, self.cfg, self.train_ds, self.test_ds, env.device, env.amp)
        point = {"step": trainer.state.step, "epoch": trainer.state.step / trainer.data.steps_per_epoch,
                 "train_s": train_s, **res}
        self.eval_s += time.perf_counter() - t0
        self.curve.append(point)
        progress("methods", preset=self.cfg.preset, step=point["step"], train_s=point["train_s"],
                 knn_top1=point["knn_top1"])
        return point

    def __call__(self, trainer: Trainer) -> bool:
        now = trainer.state.step if self.by_steps else self.train_s(trainer)
        if self.marks and now >= self.marks[0]:
            while self.marks and now >= self.marks[0]:
                self.marks.pop(0)
            self.evaluate(trainer)
        if self.budget_s is not None and self.train_s(trainer) >= self.budget_s:
            self.stopped_at_budget = trainer.state.step < trainer.data.total_steps
            return True
        return False


def _peak_memory(device, rss: RssPeak) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss.peak / 2**20


def bench_preset(preset: str, s: dict, out: Path, baselines: dict, notes: list) -> dict:
    """Train one preset under the budget of `s`; its row (and the baselines it needs, cached in `baselines`)."""
    run_dir = out / "runs" / preset
    if run_dir.exists():
        raise ConfigError(f"{run_dir} exists: give another --out, or remove that folder to measure {preset} again")
    cfg = _preset_config(preset, list(s["overrides"]), run_dir, s["steps"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    env, total = trainer.env, trainer.data.total_steps
    budget_s = None if s["steps"] else 60.0 * s["minutes"]
    if s["steps"]:
        marks = [min(s["steps"], total) * (i + 1) / s["points"] for i in range(s["points"])]
    else:
        marks = [budget_s * (i + 1) / s["points"] for i in range(s["points"])]
    clock = _Clock(cfg, trainer, marks, bool(s["steps"]), budget_s)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    with RssPeak(period=0.05) as rss:
        trainer.fit(clock)
    peak = _peak_memory(env.device, rss)
    steps, train_s = trainer.state.step, clock.train_s(trainer)
    final = clock.curve[-1] if clock.curve and clock.curve[-1]["step"] == steps else clock.evaluate(trainer)
    t1 = time.perf_counter()
    row = {"preset": preset, "method": cfg.method, "device": device_name(env.device), "backbone": cfg.model.backbone, "steps": steps,
           "total_steps": total, "epochs": steps / trainer.data.steps_per_epoch,
           "stopped_at_budget": clock.stopped_at_budget, "setup_s": setup_s, "train_s": train_s,
           "views_per_s": steps * cfg.train.batch_size * trainer.model.n_views / max(train_s, 1e-9),
           "peak_mem_mib": peak, "knn_top1": final["knn_top1"], "knn_top5": final.get("knn_top5"),
           "knn_protocol": knn_protocol(cfg, len(clock.train_ds)), "curve": clock.curve}
    if s["linear"]:
        lin = linear_eval(trainer.model.encoder, cfg, clock.train_ds, clock.test_ds, env.device, env.amp)
        row.update(linear_top1=lin["linear_top1"], linear_protocol=lin["protocol"])
    row.update(_baselines_of(cfg, clock, env, baselines))
    row["eval_s"] = clock.eval_s + time.perf_counter() - t1
    progress("methods", preset=preset, steps=steps, train_s=train_s, knn_top1=row["knn_top1"],
             linear_top1=row.get("linear_top1", float("nan")))
    return row


def _baselines_of(cfg, clock: _Clock, env, cache: dict) -> dict:
    """This preset's baselines: pixels of its data, its backbone at random init (each measured once)."""
    e = cfg.eval   # the same data under the same kNN protocol gives the same baseline
    data_key = json.dumps([OmegaConf.to_container(cfg.data), e.knn_k, e.knn_temperature, e.train_split, e.test_split],
                          sort_keys=True)
    model_key = json.dumps([OmegaConf.to_container(cfg.model), cfg.seed, data_key], sort_keys=True, default=str)
    if ("pixels", data_key) not in cache:
        cache["pixels", data_key] = pixel_baseline(cfg, clock.train_ds, clock.test_ds, env.device)
    if ("random_init", model_key) not in cache:
        cache["random_init", model_key] = random_init_baseline(cfg, clock.train_ds, clock.test_ds, env.device, env.amp)
    pixels, rand = cache["pixels", data_key], cache["random_init", model_key]
    return {"baseline_pixels_top1": pixels["baseline_pixels_top1"],
            "baseline_random_init_top1": rand["baseline_random_init_top1"],
            "random_init_of": _backbone_name(cfg)}


def _backbone_name(cfg) -> str:
    m = cfg.model
    if str(m.backbone).startswith("timm/"):
        args = ",".join(f"{k}={v}" for k, v in m.backbone_args.items() if k in ("patch_size", "embed_dim", "depth"))
        return f"{m.backbone}({args})"
    return f"{m.backbone}" + (f" width {m.width}" if m.backbone == "resnet_small" else "")


def plot_methods(rows: list[dict], path: Path, title: str) -> Path:
    """kNN top-1 against training minutes, one line per preset; the baselines as horizontal lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, r in enumerate(rows):
        x = [p["train_s"] / 60 for p in r["curve"]]
        ax.plot(x, [p["knn_top1"] for p in r["curve"]], marker="o", markersize=3, color=f"C{i % 10}",
                label=r["preset"])
    pixels = {r["baseline_pixels_top1"] for r in rows}
    for v in sorted(pixels):
        ax.axhline(v, color="black", linestyle="--", linewidth=1, label=f"raw pixels (centred) {v:.4f}")
    rand = {r["random_init_of"]: r["baseline_random_init_top1"] for r in rows}
    for name, v in rand.items():
        ax.axhline(v, color="grey", linestyle=":", linewidth=1, label=f"random init {name} {v:.4f}")
    ax.set_xlabel("training time (minutes; the bench's kNN evaluations excluded)")
    ax.set_ylabel("kNN top-1")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


COLUMNS = [("preset", 24, "preset"), ("steps", 6, "steps"), ("epochs", 6, "epochs:.1f"), ("min", 5, lambda r: f"{r['train_s'] / 60:.1f}"),
           ("views/s", 8, "views_per_s:.0f"), ("MiB", 6, "peak_mem_mib:.0f"), ("kNN", 7, "knn_top1:.4f"),
           ("linear", 7, "linear_top1:.4f"), ("pixels", 7, "baseline_pixels_top1:.4f"),
           ("random", 7, "baseline_random_init_top1:.4f")]


def format_table(rows: list[dict]) -> str:
    return text_table(rows, COLUMNS)


def markdown_table(rows: list[dict], machine: str) -> str:
    """The README's table: method, kNN, linear, minutes, machine, with the baselines beside it."""
    lines = ["| preset | method | kNN top-1 | linear top-1 | minutes | raw pixels kNN | random-init kNN | machine |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lin = f"{r['linear_top1']:.4f}" if r.get("linear_top1") is not None else "-"
        lines.append(f"| `{r['preset']}` | {r['method']} | {r['knn_top1']:.4f} | {lin} | {r['train_s'] / 60:.1f} | "
                     f"{r['baseline_pixels_top1']:.4f} | {r['baseline_random_init_top1']:.4f} | {machine} |")
    return "\n".join(lines) + "\n"


def _measure(s: dict, notes: list) -> dict:
    presets = s["presets"] or default_presets()
    if isinstance(presets, str):
        presets = [p for p in presets.split(",") if p]
    unknown = [p for p in presets if p not in list_presets()]
    if unknown:
        raise ConfigError(f"unknown preset(s) {', '.join(unknown)}; valid: {', '.join(list_presets())}")
    if s["steps"] is not None and s["steps"] < 1 or s["minutes"] <= 0 or s["points"] < 1:
        raise ConfigError("--steps and --points must be >= 1 and --minutes > 0")
    out = Path(s["out"] or f"runs/bench/methods-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows, cache = [], {}
    for preset in presets:
        rows.append(bench_preset(preset, s, out, cache, notes))
        with open(out / "rows.jsonl", "a") as f:   # each row as it comes: a long bench that fails keeps them
            f.write(json.dumps(rows[-1]) + "\n")
        gc.collect()
    machine = rows[0]["device"]
    budget = f"{s['steps']} steps" if s["steps"] else f"{s['minutes']:g} minutes"
    notes.append(f"machine: {machine}, torch {torch.__version__}; budget {budget} of training per preset")
    notes.append("kNN: each run's own protocol (clean features); train_s excludes the bench's kNN points; "
                 "linear: `selfsup eval linear` (features mode); baselines with the same kNN protocol")
    cut = [r["preset"] for r in rows if r["stopped_at_budget"]]
    if cut:
        notes.append(f"stopped at the budget before the end of their schedule: {', '.join(cut)}")
    plot_methods(rows, out / "methods.png", f"time to accuracy, {machine}, budget {budget}")
    write_text(out / "methods.md", markdown_table(rows, machine))
    return {"config": {**s, "presets": presets, "overrides": list(s["overrides"]), "out": str(out),
                       "machine": machine, "torch": torch.__version__}, "rows": rows}


def _options(p) -> None:
    p.add_argument("--presets", help="comma-separated presets (default: every *-fmnist-cpu preset)")
    p.add_argument("--minutes", type=float, help="training budget per preset in minutes (default 15)")
    p.add_argument("--steps", type=int, help="a budget in steps instead (train.max_steps)")
    p.add_argument("--points", type=int, help="kNN points along each run (default 6)")
    p.add_argument("--no-linear", dest="linear", action="store_const", const=False, help="skip the linear probe")
    p.add_argument("overrides", nargs="*", default=argparse.SUPPRESS,
                   help="config overrides for every preset, e.g. data.root=DIR")


BENCH = Bench(
    name="methods",
    about="time to accuracy: train presets under a budget, kNN at fixed times, final kNN and linear, baselines",
    defaults=DEFAULTS, quick=QUICK, quick_help="CI-sized run: synthetic data, tiny models, 4 steps per preset",
    measure=_measure, table=format_table, options=_options, out_file="methods.json")
run, main = BENCH.run, BENCH.main
