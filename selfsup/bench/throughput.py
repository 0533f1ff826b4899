"""Benchmark of the training step: views/s, ms/step, peak memory, data share and achieved FLOP/s.

For one setting (method, backbone, resolution, batch size: a preset plus overrides) the training
step of the trainer (:class:`selfsup.engine.step.TrainStep`, the same object) is timed in two modes:

* ``synthetic``: the views are fixed random float tensors already on the device (one per entry of
  ``model.view_augs(aug)``, at that augmentation's size, channels-last when the trainer would use
  it); each step is only forward + backward + optimiser steps: the model's own ceiling;
* ``pipeline``: the trainer's data path each step (:class:`selfsup.engine.data.TrainData`: index
  schedule -> uint8 images gathered from the in-memory set, resident on the GPU when
  ``data.on_device`` -> ``model.make_views`` with the batched augmentation -> channels-last copy; for
  streamed sets (``data.stream``) its :class:`~selfsup.data.loader.StreamLoader`), then the same step.

Model, optimiser and step are built by the trainer's own functions (``build_model``,
``make_optimizer``, ``wrap_model``, ``TrainStep``): the precision, ``train.channels_last``,
``train.compile``, the method's own row update (PIC), ``after_step()``.  Left out: DDP (one
process), the non-finite guard's per-step host sync, logging, checkpoints and the kNN monitor;
``init_from_data`` is skipped (it sets values, not costs).

Settings may list several ``micro_batch`` values (``train.micro_batch``: gradient caching, None =
the whole batch) and ``checkpointing`` values (``model.checkpointing``: activation checkpointing of
the backbone); every (micro-batch, checkpointing) pair is a configuration, measured in each mode,
one row each, in order.

Per row: views/s over the timed steps (wall clock, one device sync at each end),
median ms/step, the data part's median ms and its share of the step (on CUDA from CUDA events
recorded between the parts, so the step is not serialised by the measurement; on CPU from the
wall clock), peak memory, and achieved TFLOP/s from a counted FLOP figure of the backbone: one
forward of one image per view size counted by ``torch.utils.flop_counter.FlopCounterMode``
(a multiply-add = 2 FLOPs), times 3 for forward + backward of every trained view (MoCo: 3 for
the query views, 1 for the key encoder's forward-only views).  The head, the loss and the
augmentation are not counted.

Peak memory, per row: on CUDA ``max_memory_allocated`` over the timed steps (``peak_mem_mib``). On
the CPU two untimed steps follow the timed ones: one gives ``peak_mem_mib``, the step's peak RSS
growth above the resident model and optimiser state (:class:`~selfsup.bench.common.StepRss`: heap
trimmed, large blocks mmapped so that freed tensors leave the RSS, the kernel's ``VmHWM`` reset
before it; a row's figure does not inherit an earlier row's heap), the other ``tensor_peak_mib``,
the peak of the tensor bytes it held at once (:func:`~selfsup.bench.common.tensor_peak`, the
profiler's memory timeline: deterministic, without the allocator's overhead).

Usage::

    from selfsup.bench.throughput import run
    res = run({"quick": True, "out": "bench.json"})   # -> {"config", "rows", "notes", "table"}
    selfsup bench throughput --preset simclr-fmnist --image-size 32 --batch 512 --out tp.json
    selfsup bench throughput --preset simclr-fmnist-cpu --batch 4096 --modes synthetic \
        --micro-batch none,1024,256 --checkpointing off,on --out mem.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import resource
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import load_config, uses_stream
from ..data.datasets import build_dataset
from ..data.splits import load_split
from ..engine.data import TrainData, crop_specs, make_views
from ..engine.setup import Env, autocast_dtype, configure_torch, data_on_device, keep_freed_memory, resolve_device
from ..engine.step import TrainStep, build_model, make_optimizer, wrap_model
from ..errors import DatasetNotFoundError
from ..methods import build_method
from .common import Bench, RssPeak, StepRss, device_name, progress, sync, tensor_peak, text_table

__all__ = ["BENCH", "count_backbone_flops", "bench_throughput", "run", "format_table", "main", "DEFAULTS", "QUICK",
           "MODES"]

MODES = ("synthetic", "pipeline")
DEFAULTS = dict(preset="simclr-cifar10", overrides=(), method=None, backbone=None, width=None, batch=None,
                image_size=None, data="preset", modes=MODES, steps=20, warmup=3, device="auto", threads=None,
                compile=None, channels_last=None, precision=None, cudnn_benchmark=None, seed=0,
                micro_batch=None, checkpointing=None, out=None)
QUICK = dict(method="simclr", backbone="resnet_small", width=8, image_size=32, batch=16, steps=3, warmup=1,
             data="synthetic")


# ---------------------------------------------------------------- FLOPs


def count_backbone_flops(backbone: torch.nn.Module, size: int, channels: int = 3) -> int:
    """FLOPs (a multiply-add counts 2) of one forward of `backbone` on one (channels, size, size) image,
    counted by ``FlopCounterMode`` on a CPU copy in eval mode (the model is untouched)."""
    net = copy.deepcopy(backbone).float().cpu().eval()
    x = torch.zeros(1, channels, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- config


def _list(v) -> list:
    """A setting that may list values: a comma-separated string, a list/tuple, or one value."""
    if isinstance(v, str):
        return [x.strip() for x in v.split(",")]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def micro_batches(v) -> list:
    """The ``micro_batch`` setting -> the ``train.micro_batch`` overrides to measure: None (the setting
    not given) -> [None] (no override: the preset's); else each value a positive integer, or
    none / null / 0 / all for the whole batch ("null"). ValueError for anything else."""
    if v is None:
        return [None]
    out = []
    for x in _list(v):
        t = str(x).strip().lower()
        if t in ("none", "null", "0", "all"):
            out.append("null")
        elif t.isdigit() and not isinstance(x, bool):
            out.append(str(int(t)))
        else:
            raise ValueError(f"bad micro-batch value {x!r}: a positive integer (images per chunk), or none / 0 "
                             "for the whole batch; a list is comma-separated, e.g. --micro-batch none,1024,256")
    return out


def checkpointings(v) -> list:
    """The ``checkpointing`` setting -> the ``model.checkpointing`` overrides to measure: None (not given)
    -> [None] (the preset's); else each of on/off (true/false, 1/0, yes/no). ValueError otherwise."""
    if v is None:
        return [None]
    words = {"on": "true", "true": "true", "1": "true", "yes": "true",
             "off": "false", "false": "false", "0": "false", "no": "false"}
    out = []
    for x in _list(v):
        t = str(x).strip().lower()
        if t not in words:
            raise ValueError(f"bad checkpointing value {x!r}: on or off (true/false); a list is comma-separated, "
                             "e.g. --checkpointing off,on")
        out.append(words[t])
    return out


def _overrides(s: dict) -> list[str]:
    """The overrides of settings `s` on their preset: the given overrides, then the explicit settings."""
    over = list(s["overrides"] or ())
    explicit = {"method": s["method"], "model.backbone": s["backbone"], "model.width": s["width"],
                "train.batch_size": s["batch"], "data.image_size": s["image_size"], "device": s["device"],
                "train.threads": s["threads"], "train.compile": s["compile"],
                "train.channels_last": s["channels_last"], "train.precision": s["precision"], "seed": s["seed"]}
    for k, v in explicit.items():
        if v is not None:
            over.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    if s["data"] == "synthetic":
        over += ["data.name=synthetic", "data.stream=null", "data.cache_mode=none"]
    return over


def _build_config(s: dict, micro_batch: str | None = None, checkpointing: str | None = None):
    """The trainer config for settings `s` (:func:`_overrides`) and this configuration's `micro_batch` /
    `checkpointing` (override values; None: not overridden)."""
    pair = ([f"train.micro_batch={micro_batch}"] if micro_batch is not None else []) + \
        ([f"model.checkpointing={checkpointing}"] if checkpointing is not None else [])
    return load_config(s["preset"], _overrides(s) + pair)


def _load_train_set(cfg, stream: bool):
    d = cfg.data
    if d.name == "synthetic":   # enough images for a batch; procedural, at the requested size
        return build_dataset("synthetic", "train", image_size=d.image_size,
                             num_samples=max(1024, cfg.train.batch_size), seed=cfg.seed)
    try:
        return load_split(cfg, d.train_split, stream)
    except (DatasetNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError(f"{e}\n(bench throughput: `--data synthetic` measures the same pipeline on "
                                "the procedural synthetic set)") from None


# ---------------------------------------------------------------- one mode


def _flop_views(model, cfg, sizes: list[int]) -> dict:
    """Which views pass through the backbone with a backward (x3 FLOPs) and which only forward (x1):
    every view is trained, except MoCo's, where x1 (and x2 when symmetric) goes through the query
    encoder and x2 (and x1) through the key encoder without gradient."""
    if hasattr(model, "key_encoder"):
        q = sizes if cfg.moco.symmetric else sizes[:1]
        return {"trained_views": list(q), "forward_views": list(sizes if cfg.moco.symmetric else sizes[1:])}
    return {"trained_views": list(sizes), "forward_views": []}


def _build_step(mode, cfg, ds, env) -> dict:
    """Model, optimiser, step and data path of `mode`, built as the trainer builds them: {model, augs,
    size, data_part(i) -> (views, index on the device) of step i, train_part(views, index) -> loss}.
    The two functions hold everything: clearing the dict frees it."""
    device = env.device
    data = TrainData(cfg, env, ds=ds)
    model, channels_last = build_model(cfg, len(ds), env)
    opt, sched = make_optimizer(model, cfg, data.steps_per_epoch)
    step = TrainStep(model, wrap_model(model, cfg, env), opt, sched, env.amp, cfg.train.micro_batch)   # as the trainer
    step.net.train()
    augs, b, specs = model.view_augs(data.aug), cfg.train.batch_size, crop_specs(model, data.aug)
    if mode == "synthetic":
        g = torch.Generator().manual_seed(cfg.seed + 1)
        fixed = [torch.randn(b, 3, a.size, a.size, generator=g).to(device) for a in augs]
        if channels_last:
            fixed = [v.contiguous(memory_format=torch.channels_last) for v in fixed]
        fixed_index = data.make_schedule().next_batch(0, 1).to(device)

    def data_part(i):
        """The trainer's data path of step i -> (views, index on the device)."""
        if mode == "synthetic":
            return fixed, fixed_index
        batch = data.next(i, specs)
        return make_views(model, data, batch, channels_last), batch.index

    def train_part(views, index):
        return step.step(views, index)["loss"]

    return {"model": model, "augs": augs, "size": data.size, "data_part": data_part, "train_part": train_part}


def _timed_steps(device, steps: int, first: int, data_part, train_part) -> dict:
    """Steps first .. first + steps - 1, timed: {wall (s), step_ms and data_ms (per step), faults (minor
    page faults), loss (the last step's), base_mem (CUDA: bytes allocated before them), rss_peak (CPU:
    the RSS sampled every 5 ms)}. CUDA: from events recorded between the parts (no host sync)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        ev_end = torch.cuda.Event(enable_timing=True)
        probe = None
    else:
        base_mem = None
        probe = RssPeak(period=0.005).__enter__()
    cpu_marks = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        t0 = time.perf_counter()
        for i in range(steps):
            if cuda:
                ev[i][0].record()
                views, index = data_part(first + i)
                ev[i][1].record()
                loss = train_part(views, index)
            else:
                t_a = time.perf_counter()
                views, index = data_part(first + i)
                t_b = time.perf_counter()
                loss = train_part(views, index)
                cpu_marks.append((t_a, t_b))
        if cuda:
            ev_end.record()
        sync(device)
        wall = time.perf_counter() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
        if not cuda:
            cpu_marks.append((time.perf_counter(), None))
    finally:
        if probe is not None:
            probe.__exit__(None, None, None)
    if cuda:
        starts = [e[0] for e in ev] + [ev_end]
        step_ms = [starts[i].elapsed_time(starts[i + 1]) for i in range(steps)]
        data_ms = [ev[i][0].elapsed_time(ev[i][1]) for i in range(steps)]
    else:
        step_ms = [1e3 * (cpu_marks[i + 1][0] - cpu_marks[i][0]) for i in range(steps)]
        data_ms = [1e3 * (cpu_marks[i][1] - cpu_marks[i][0]) for i in range(steps)]
    return dict(wall=wall, step_ms=step_ms, data_ms=data_ms, faults=faults, loss=loss, base_mem=base_mem,
                rss_peak=None if probe is None else probe.peak)


def _step_peak(device, timed: dict, rss0: int, first: int, data_part, train_part) -> tuple:
    """(peak_mem_mib, tensor_peak_mib, last loss) of a step. CUDA: max_memory_allocated over the timed
    steps. CPU: two more, untimed steps from `first`: one's peak RSS growth (`StepRss`; the sampled RSS
    above `rss0` where it cannot measure), the other's peak tensor bytes (`tensor_peak`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, None, timed["loss"]
    gc.collect()
    with StepRss(restore=keep_freed_memory) as m:   # one more step, its own peak (see StepRss)
        train_part(*data_part(first))
    peak_mib = (m.peak if m.ok else max(0, timed["rss_peak"] - rss0)) / 2**20
    loss, tensor_bytes = tensor_peak(lambda: train_part(*data_part(first + 1)))   # and one more
    return peak_mib, None if tensor_bytes is None else tensor_bytes / 2**20, loss


def _measure_mode(mode, cfg, ds, env, steps, warmup, notes, prime_only=False):
    """Build the model, optimiser, step and data path as the trainer does and time `warmup + steps`
    steps of `mode`. `prime_only`: build and run the warm-up steps only (untimed), then free
    everything; returns None."""
    torch.manual_seed(cfg.seed)
    device = env.device
    rss0 = RssPeak().rss() if device.type == "cpu" else 0
    parts = _build_step(mode, cfg, ds, env)
    data_part, train_part, size = parts["data_part"], parts["train_part"], parts["size"]
    t0 = time.perf_counter()
    for i in range(warmup):
        train_part(*data_part(i))
    sync(device)
    warmup_s = time.perf_counter() - t0
    if not prime_only:
        timed = _timed_steps(device, steps, warmup, data_part, train_part)
        peak_mib, tensor_mib, loss = _step_peak(device, timed, rss0, warmup + steps, data_part, train_part)
        loss_v = float(loss.detach().float())
        if loss_v != loss_v or abs(loss_v) == float("inf"):
            notes.append(f"{mode}: the loss is not finite ({loss_v}) after the timed steps")
        augs, b, synthetic = parts["augs"], cfg.train.batch_size, mode == "synthetic"
        res = dict(views_per_s=steps * b * len(augs) / timed["wall"], ms_per_step=statistics.median(timed["step_ms"]),
                   ms_per_step_mean=1e3 * timed["wall"] / steps,
                   data_ms=0.0 if synthetic else statistics.median(timed["data_ms"]),
                   data_share=0.0 if synthetic else sum(timed["data_ms"]) / sum(timed["step_ms"]),
                   peak_mem_mib=peak_mib, tensor_peak_mib=tensor_mib,
                   base_mem_mib=None if timed["base_mem"] is None else timed["base_mem"] / 2**20,
                   warmup_s=warmup_s, minor_faults_per_step=timed["faults"] / steps, loss=loss_v,
                   view_sizes=[a.size for a in augs], n_views=len(augs),
                   **_flop_views(parts["model"], cfg, [a.size for a in augs]))
    # free this mode's state before the next one
    del data_part, train_part
    parts.clear()
    gc.collect()
    if prime_only:
        return None, size
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res, size


# ---------------------------------------------------------------- public API


def _check_settings(s: dict) -> tuple:
    """The modes of settings `s`; ValueError for an unknown mode or data, or a bad step count."""
    modes = tuple(s["modes"])
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; valid: {', '.join(MODES)}")
    if s["data"] not in ("preset", "synthetic"):
        raise ValueError(f"unknown data {s['data']!r}; valid: preset, synthetic")
    if int(s["steps"]) < 1 or int(s["warmup"]) < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {s['steps']}, {s['warmup']}")
    return modes


@contextmanager
def _torch_settings(cfg, device, cudnn_benchmark):
    """The trainer's torch settings for the block (`configure_torch`: threads, deterministic mode, cuDNN's
    autotuner, the CPU allocator), `cudnn_benchmark` (None: the trainer's choice) over them; yields the
    thread count before, and restores it, the autotuner and the deterministic mode after."""
    prev = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    configure_torch(cfg, device)
    if cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    try:
        yield prev[0]
    finally:
        torch.set_num_threads(prev[0])
        torch.backends.cudnn.benchmark = prev[1]
        torch.use_deterministic_algorithms(prev[2], warn_only=prev[3])


def _train_set(cfg, device, stream: bool):
    """The training set of the bench, on the device where the trainer would put it."""
    ds = _load_train_set(cfg, stream)
    if not stream and data_on_device(cfg, device):
        ds = ds.to(device)
    if len(ds) < cfg.train.batch_size:
        raise ValueError(f"dataset has {len(ds)} images, fewer than train.batch_size={cfg.train.batch_size}")
    return ds


def _measure_rows(s: dict, configs: list, modes: tuple, ds, env, notes: list) -> tuple[list[dict], int]:
    """One row per (configuration, mode), in order, and the image size. On CPU an untimed priming run
    (build + warm-up of the first mode) comes first: every timed mode then finds a warm heap."""
    rows, size = [], None
    if env.device.type == "cpu" and modes:
        _measure_mode(modes[0], configs[0], ds, env, 0, max(1, int(s["warmup"])), notes, prime_only=True)
    for c in configs:
        for mode in modes:
            r, size = _measure_mode(mode, c, ds, env, int(s["steps"]), int(s["warmup"]), notes)
            rows.append(dict(mode=mode, method=c.method, backbone=c.model.backbone, image_size=size,
                             batch=c.train.batch_size, micro_batch=c.train.micro_batch,
                             checkpointing=bool(c.model.checkpointing), **r))
            progress("throughput", mode=mode, micro_batch=c.train.micro_batch or "all",
                     checkpointing="on" if c.model.checkpointing else "off", views_per_s=r["views_per_s"],
                     peak_mem_mib=r["peak_mem_mib"], tensor_peak_mib=r["tensor_peak_mib"] or 0.0)
    return rows, size


def _add_flops(rows: list[dict], cfg) -> None:
    """gflop_per_view, gflop_per_step and tflops of every row, from the backbone's counted FLOPs."""
    backbone = build_method(cfg).backbone   # a fresh copy for counting (same architecture)
    flops = {v: count_backbone_flops(backbone, v) for r in rows for v in set(r["view_sizes"])}
    for r in rows:
        sizes = r["view_sizes"]
        per_image = 3 * sum(flops[v] for v in r.pop("trained_views")) + sum(flops[v] for v in r.pop("forward_views"))
        r["gflop_per_view"] = flops[sizes[0]] / 1e9
        r["gflop_per_step"] = per_image * r["batch"] / 1e9
        r["tflops"] = r["gflop_per_step"] * r["views_per_s"] / (r["batch"] * r["n_views"]) / 1e3


def _memory_notes(device) -> list[str]:
    """What the timing and memory columns of `device` mean."""
    if device.type == "cuda":
        return ["ms/step and data share from CUDA events between the parts (no extra host sync); views/s from "
                "the wall clock over the timed steps; peak_mem_mib = torch.cuda.max_memory_allocated over the "
                "timed steps (weights, optimiser state, dataset on device and activations)"]
    with StepRss(restore=keep_freed_memory) as m:
        pass
    if m.ok:
        rss = ("CPU: peak_mem_mib = the peak RSS growth of one more, untimed step after the timed ones "
               "(data part + training step: activations, gradients, temporaries) above the resident "
               "model and optimiser state: freed heap memory given back to the OS (malloc_trim), blocks "
               ">= 64 KiB mmapped so that a freed tensor leaves the RSS, and the kernel's high-water mark "
               "reset (/proc/self/clear_refs) before it; VmHWM after it minus the RSS before it. "
               "Comparable between rows; not the process's total (max_rss_mib); about +-10% between runs")
    else:
        rss = ("CPU: peak_mem_mib = increase of the process RSS (sampled every 5 ms) over its value before "
               "the mode's model was built; coarse (the allocator keeps freed memory)")
    return [rss,
            "CPU: tensor_peak_mib (tensor MiB) = the peak of the tensor bytes allocated at once during one "
            "more step, from the profiler's memory timeline (torch.profiler, profile_memory): activations, "
            "gradients and temporaries above the resident model and optimiser state, without the "
            "allocator's overhead and the noise of the RSS: the CPU counterpart of CUDA's peak",
            "CPU: an untimed priming run (build + warm-up of the first mode) comes first, so every timed mode "
            "finds the heap that an earlier run left: in a fresh process glibc malloc gives large freed "
            "blocks back to the OS and each step page-faults them in again (minor_faults_per_step; "
            "10-15% of the step for simclr-fmnist-cpu on 2 cores)"]


def _add_notes(notes: list, s: dict, cfg, configs: list, modes: tuple, device, stream: bool) -> None:
    """The notes that say what the rows measure and what they leave out."""
    if any(c.model.checkpointing for c in configs):
        notes.append("checkpointing: the backbone's stages run forward again in the backward (about 1/3 more "
                     "backbone compute); tflops counts the model's FLOPs, not the recomputation")
    notes.append("tflops = counted backbone FLOPs (FlopCounterMode, one forward, x3 for forward+backward of each "
                 "trained view; MoCo: x3 for the query view(s), x1 for the key encoder's view(s)) x steps/s; "
                 "the projection head, the loss, the optimiser and the augmentation are not counted, and x3 slightly "
                 "overstates the backward of the first conv (no input gradient)")
    notes.extend(_memory_notes(device))
    if "pipeline" in modes and not stream and cfg.data.name == "synthetic":
        notes.append("pipeline data: the procedural `synthetic` set (3-channel, in memory) at the requested size, "
                     "not the preset's dataset")
    notes.append("not measured: DDP, the trainer's non-finite guard (host sync per step when train.nonfinite != "
                 "stop), logging, checkpoints, the kNN monitor")
    if cfg.train.compile and int(s["warmup"]) == 0:
        notes.append("compile=true with warmup=0: compilation happens in the timed steps")


def _resolved_config(s: dict, configs: list, run: dict) -> dict:
    """The settings with what they resolved to (`run`: size, ds, stream, device, amp, prev_threads)."""
    cfg, device, amp = configs[0], run["device"], run["amp"]
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
    config.update(overrides=_overrides(s), micro_batch=list(dict.fromkeys(c.train.micro_batch for c in configs)),
                  checkpointing=list(dict.fromkeys(bool(c.model.checkpointing) for c in configs)),
                  method=cfg.method, backbone=cfg.model.backbone, cifar_stem=cfg.model.cifar_stem,
                  width=cfg.model.width if cfg.model.backbone == "resnet_small" else None,
                  batch=cfg.train.batch_size, image_size=run["size"], dataset=cfg.data.name, stream=run["stream"],
                  dataset_size=len(run["ds"]), optimizer=cfg.train.optimizer, device=str(device),
                  device_name=device_name(device), torch=torch.__version__,
                  precision=str(amp).replace("torch.", "") if amp is not None else "fp32",
                  compile=bool(cfg.train.compile), channels_last=bool(cfg.train.channels_last),
                  cudnn_benchmark=torch.backends.cudnn.benchmark if s["cudnn_benchmark"] is None
                  else bool(s["cudnn_benchmark"]),
                  threads=(cfg.train.threads or run["prev_threads"]) if device.type == "cpu" else None,
                  max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return config


def bench_throughput(settings: dict, notes: list | None = None) -> tuple[list[dict], dict]:
    """Measure every mode of `settings` (a complete dict of :data:`DEFAULTS` keys).

    Returns ``(rows, config)``: one row per mode (``mode, method, backbone, image_size, batch,
    n_views, views_per_s, ms_per_step`` (median), ``ms_per_step_mean``, ``data_ms`` (median),
    ``data_share``, ``peak_mem_mib`` (CUDA: max_memory_allocated; CPU: a step's peak RSS growth),
    ``tensor_peak_mib`` (CPU: a step's peak tensor bytes; None on CUDA), ``micro_batch``,
    ``checkpointing``, ``base_mem_mib`` (CUDA: allocated before the timed steps),
    ``gflop_per_view`` (backbone forward, one image), ``gflop_per_step`` (backbone, forward +
    backward), ``tflops``, ``warmup_s``, ``loss``) and the resolved configuration.
    """
    notes = notes if notes is not None else []
    s = settings
    modes = _check_settings(s)
    # one configuration per (micro-batch, checkpointing) pair; they differ in those two keys only
    configs = [_build_config(s, mb, ck)
               for mb, ck in itertools.product(micro_batches(s["micro_batch"]), checkpointings(s["checkpointing"]))]
    cfg = configs[0]
    device = resolve_device(cfg.device)
    stream = uses_stream(cfg.data)
    with _torch_settings(cfg, device, s["cudnn_benchmark"]) as prev_threads:
        ds = _train_set(cfg, device, stream)
        amp = autocast_dtype(cfg, device)
        env = Env(rank=0, local_rank=0, world=1, device=device, amp=amp)
        rows, size = _measure_rows(s, configs, modes, ds, env, notes)
    _add_flops(rows, cfg)
    _add_notes(notes, s, cfg, configs, modes, device, stream)
    run = dict(size=size, ds=ds, stream=stream, device=device, amp=amp, prev_threads=prev_threads)
    return rows, _resolved_config(s, configs, run)


COLUMNS = [("mode", 9, "mode"), ("method", 8, "method"), ("backbone", 12, "backbone"), ("size", 4, "image_size"),
           ("batch", 5, "batch"), ("micro", 5, lambda r: r.get("micro_batch") or "all"),
           ("ckpt", 4, lambda r: "on" if r.get("checkpointing") else "off"), ("views/s", 10, "views_per_s:.1f"),
           ("ms/step", 9, "ms_per_step:.2f"),
           ("data ms", 8, "data_ms:.2f"), ("data %", 6, lambda r: f"{100 * r['data_share']:.1f}"),
           ("peak MiB", 9, "peak_mem_mib:.1f"), ("tensor MiB", 10, "tensor_peak_mib:.1f"),
           ("GFLOP/v", 8, "gflop_per_view:.3f"), ("TFLOP/s", 8, "tflops:.3f")]


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of :func:`bench_throughput` rows."""
    return text_table(rows, COLUMNS)


def _measure(s: dict, notes: list) -> dict:
    if isinstance(s["modes"], str):
        s["modes"] = (s["modes"],)
    if isinstance(s["overrides"], str):
        s["overrides"] = (s["overrides"],)
    rows, config = bench_throughput(s, notes)
    return {"config": config, "rows": rows}


def _options(p) -> None:
    p.add_argument("--preset", help=f"preset name or YAML path (default {DEFAULTS['preset']})")
    p.add_argument("--overrides", nargs="+", metavar="KEY=VALUE", help="config overrides, e.g. model.backbone=resnet50")
    p.add_argument("--method")
    p.add_argument("--backbone")
    p.add_argument("--width", type=int, help="model.width (resnet_small)")
    p.add_argument("--batch", type=int, help="train.batch_size")
    p.add_argument("--image-size", type=int, dest="image_size", help="data.image_size")
    p.add_argument("--data", choices=["preset", "synthetic"],
                   help="pipeline data: the preset's dataset (default) or the procedural synthetic set")
    p.add_argument("--modes", nargs="+", choices=list(MODES))
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (train.threads)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="train.compile")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, dest="channels_last",
                   help="train.channels_last")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="train.precision")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None,
                   dest="cudnn_benchmark", help="torch.backends.cudnn.benchmark (default: as is, like the trainer)")
    p.add_argument("--seed", type=int)
    p.add_argument("--micro-batch", dest="micro_batch", metavar="M[,M...]",
                   help="train.micro_batch values to measure, comma-separated; none or 0 = the whole batch "
                        "(e.g. none,1024,256; default: the preset's)")
    p.add_argument("--checkpointing", metavar="off|on[,...]",
                   help="model.checkpointing values to measure, comma-separated (e.g. off,on; default: the preset's)")


BENCH = Bench(
    name="throughput",
    about="training step views/s, ms/step, peak memory, data share, FLOP/s: synthetic vs real pipeline",
    defaults=DEFAULTS, quick=QUICK,
    quick_help="CI-sized run (SimCLR, resnet_small width 8, 32 px, batch 16, synthetic data, 1 + 3 steps)",
    measure=_measure, table=format_table, options=_options)
run, main = BENCH.run, BENCH.main
