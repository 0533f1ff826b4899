"""Benchmark of the batched augmentation against torchvision's per-image pipeline (images/s).

Two ways to produce one SimCLR view of ``batch`` images, timed at each output ``size``:

* ``batched``: :class:`~selfsup.data.augment.BatchAugment`
  (``simclr_augment(size, strength=1.0 if size >= 64 else 0.5)``) called on a uint8
  ``(batch, 3, S, S)`` tensor already on the device; one call = one view of the batch;
* ``torchvision``: the same augmentation per image with ``torchvision.transforms.v2``
  (RandomResizedCrop antialias, flip, RandomApply(ColorJitter) p=0.8, RandomGrayscale 0.2,
  GaussianBlur p=0.5 when size >= 64, ToDtype float32 scaled, Normalize; the jitter
  strengths and blur kernel are taken from the ``BatchAugment`` so both do the same work)
  inside a ``torch.utils.data.DataLoader`` with ``num_workers`` in ``workers`` over an
  in-memory uint8 tensor, collated to a batch.  On ``cuda`` the batches are pinned and
  copied with ``.to("cuda", non_blocking=True)``: CPU workers feeding the GPU.

Both read the same random uint8 source images, ``S = size`` below 128 px and
``round(size * 256 / 224)`` above (224 -> 256, so the crop downsamples).  A repeat = ``batches``
batches (torchvision: one epoch of ``max(batches, workers)`` batches, so that every worker has one,
from persistent workers, the prefetch queue empty at its start);
``warmup`` repeats are not timed (worker start-up); the device is synchronised at both ends.
Reported: median images/s over the repeats, ms per batch, and for ``batched`` rows ``speedup``
over the best torchvision setting at the same size and device.  Only the ``quick`` run is part
of the test suite.

Usage::

    from selfsup.bench.augment import run
    res = run({"quick": True, "out": "bench.json"})   # -> {"config", "rows", "notes", "table"}
    selfsup bench augment --sizes 32 96 224 --batch 256 --workers 0 2 --out augment.json
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from ..data.augment import BatchAugment, simclr_augment
from .common import Bench, cpu_snapshot, others_share, progress, sync, text_table

__all__ = ["BENCH", "bench_augment", "source_size", "torchvision_pipeline", "run", "format_table", "main", "DEFAULTS",
           "QUICK"]

DEFAULTS = dict(sizes=(32, 96, 224), batch=256, workers=(0, 2), batches=2, repeats=3, warmup=1, device=None,
                threads=None, seed=0, out=None)
QUICK = dict(sizes=(32,), batch=64, workers=(0,), batches=1, repeats=2, warmup=1)


def source_size(size: int) -> int:
    """Side of the source images for output ``size``: ``size`` below 128, else ``size * 256 / 224``."""
    return size if size < 128 else int(round(size * 256 / 224))


def torchvision_pipeline(aug: BatchAugment):
    """The per-image ``torchvision.transforms.v2`` equivalent of ``aug`` (uint8 CHW -> float32 CHW)."""
    from torchvision.transforms import v2

    b, c, s, h = aug.jitter
    ts = [v2.RandomResizedCrop(aug.size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
          v2.RandomHorizontalFlip(aug.flip_p),
          v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=aug.jitter_p),
          v2.RandomGrayscale(aug.gray_p)]
    if aug.blur_p > 0 and aug.blur_kernel > 1:
        ts.append(v2.RandomApply([v2.GaussianBlur(aug.blur_kernel, sigma=aug.blur_sigma)], p=aug.blur_p))
    ts += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(aug.mean), list(aug.std))]
    return v2.Compose(ts)


class _Images(torch.utils.data.Dataset):
    """``length`` items cycling over the uint8 images ``src`` (N, 3, S, S), each through ``transform``."""

    def __init__(self, src, transform, length):
        self.src, self.transform, self.length = src, transform, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.transform(self.src[i % len(self.src)])


def _time_repeats(one_repeat, dev, warmup, repeats) -> list[float]:
    for _ in range(warmup):
        one_repeat()
    sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_repeat()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def bench_augment(sizes=DEFAULTS["sizes"], batch=256, workers=(0, 2), batches=2, repeats=3, warmup=1,
                  devices=("cpu",), threads=None, seed=0, notes=None) -> list[dict]:
    """Time both pipelines for every size and device (torchvision: every number of workers). Rows as documented."""
    notes = notes if notes is not None else []
    threads = threads or torch.get_num_threads()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        notes.append("torchvision is not installed: torchvision rows skipped")
        workers = ()
    rows = []
    for size in sizes:
        aug = simclr_augment(size, strength=1.0 if size >= 64 else 0.5)
        src_side = source_size(size)
        g = torch.Generator().manual_seed(seed)
        src = torch.randint(0, 256, (batch, 3, src_side, src_side), dtype=torch.uint8, generator=g)
        for dev in map(torch.device, devices):
            stub = dict(device=dev.type, size=size, source_size=src_side, batch=batch, threads=threads)
            x = src.to(dev)

            def batched():
                for _ in range(batches):
                    aug(x)

            res = [dict(stub, pipeline="batched", workers=None, batches=batches,
                        times=_time_repeats(batched, dev, warmup, repeats))]
            del x
            for w in workers:
                nb = max(batches, w)
                ds = _Images(src, torchvision_pipeline(aug), batch * nb)
                loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=w, persistent_workers=w > 0,
                                                     pin_memory=dev.type == "cuda")

                def tv():
                    for xb in loader:
                        xb.to(dev, non_blocking=True)

                res.append(dict(stub, pipeline="torchvision", workers=w, batches=nb,
                                times=_time_repeats(tv, dev, max(warmup, 1 if w else 0), repeats)))
                del loader  # stops the persistent workers
            for r in res:
                t = statistics.median(r.pop("times"))
                r.update(images_per_s=batch * r["batches"] / t, ms_per_batch=1e3 * t / r["batches"])
                progress("augment", pipeline=r["pipeline"], device=dev.type, size=size, workers=r["workers"],
                         images_per_s=r["images_per_s"])
            best = max((r["images_per_s"] for r in res if r["pipeline"] == "torchvision"), default=None)
            res[0]["speedup"] = res[0]["images_per_s"] / best if best else None
            rows += res
    return rows


COLUMNS = [("pipeline", 11, "pipeline"), ("device", 6, "device"), ("size", 5, "size"), ("src", 5, "source_size"),
           ("batch", 6, "batch"), ("workers", 7, "workers"), ("thr", 4, "threads"),
           ("images/s", 10, "images_per_s:.0f"), ("ms/batch", 10, "ms_per_batch:.1f"),
           ("speedup", 8, lambda r: f"{r['speedup']:.1f}x" if r.get("speedup") else "-")]


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of :func:`bench_augment` rows."""
    return text_table(rows, COLUMNS)


def _machine_note() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"machine: {cpus} CPUs usable ({os.cpu_count()} total, {platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, GPU: {gpu}")


def _others_note(start, end) -> str | None:
    """A warning when other processes used over a quarter of the usable CPUs during the run (Linux)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = others_share(start, end, cpus)
    if share is not None and share > 0.25:
        return (f"other processes kept {100 * share:.0f}% of the {cpus} CPUs busy during the run: the CPU figures "
                "are unreliable (multi-threaded ones most; oversubscribed OpenMP threads stall)")
    return None


def _measure(cfg: dict, notes: list) -> dict:
    devices = cfg["device"] or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [devices] if isinstance(devices, str) else list(devices)
    bad = [d for d in devices if d not in ("cpu", "cuda")]
    if bad:
        raise ValueError(f"unknown device {bad}; valid: cpu, cuda")
    if any(s <= 0 for s in cfg["sizes"]) or any(w < 0 for w in cfg["workers"]) or min(
            cfg["batch"], cfg["batches"], cfg["repeats"]) <= 0 or cfg["warmup"] < 0:
        raise ValueError("sizes, batch, batches and repeats must be positive, workers and warmup >= 0")
    notes.append(_machine_note())
    start = cpu_snapshot()
    if "cuda" in devices and not torch.cuda.is_available():
        notes.append("cuda: skipped, no GPU available")
        devices.remove("cuda")
    prev = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    try:
        rows = bench_augment(cfg["sizes"], cfg["batch"], cfg["workers"], cfg["batches"], cfg["repeats"],
                             cfg["warmup"], devices, cfg["threads"], cfg["seed"], notes)
    finally:
        torch.set_num_threads(prev)
    notes += [n for n in [_others_note(start, cpu_snapshot())] if n]
    notes.append("threads = torch threads of the main process; DataLoader workers run 1 torch thread each")
    return {"config": {**cfg, "sizes": list(cfg["sizes"]), "workers": list(cfg["workers"]), "device": devices,
                       "torch": torch.__version__}, "rows": rows}


def _options(p) -> None:
    p.add_argument("--sizes", type=int, nargs="+", help="output sizes (default 32 96 224)")
    p.add_argument("--batch", type=int, help="images per batch (default 256)")
    p.add_argument("--workers", type=int, nargs="+", help="DataLoader workers of the torchvision pipeline")
    p.add_argument("--batches", type=int, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, help="timed repeats (the median is reported)")
    p.add_argument("--warmup", type=int, help="untimed repeats")
    p.add_argument("--device", nargs="+", choices=["cpu", "cuda"], help="default: cpu, plus cuda if available")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the main process")
    p.add_argument("--seed", type=int)


BENCH = Bench(
    name="augment",
    about="batched augmentation vs torchvision per-image pipeline in DataLoader workers (images/s)",
    defaults=DEFAULTS, quick=QUICK, quick_help="CI-sized run (size 32, batch 64, workers 0)",
    measure=_measure, table=format_table, options=_options)
run, main = BENCH.run, BENCH.main
