"""Benchmark of the image readers: images/s at 224x224 with the SimCLR augmentation, by DataLoader workers.

For every reader, decode mode and number of workers the training data path of a streamed set is
timed (:class:`~selfsup.data.loader.StreamLoader` on the ``epoch`` index schedule, two SimCLR views
``(224, (0.08, 1.0), (3/4, 4/3))`` cut while decoding):

* readers: ``folder`` (a folder of JPEGs, :func:`~selfsup.data.files.open_imagefolder`, with its
  cached file index), ``zip`` (``train.zip`` + ``train_map.txt``,
  :func:`~selfsup.data.files.open_imagenet_zip`, members read without extracting) and
  ``zip-cached`` (the same, its encoded bytes kept in RAM by ``FileImageSet.cache``);
* decode modes: ``cpu`` (the workers decode and crop with PIL, JPEG DCT scaling) and ``device``
  (the workers ship the bytes, the main process decodes them with ``torchvision.io``: nvJPEG on
  CUDA; on a CPU device it is ``decode_image`` on the CPU, one image after the other);
* workers: DataLoader worker processes (0: the main process reads).

Two passes per configuration: the loader alone (uint8 views delivered on the device), and end to
end, the loader plus the batched rest of the SimCLR augmentation (flip, colour jitter, grayscale,
blur; :func:`~selfsup.data.augment.simclr_augment` ``(224, strength=1.0)``, ``crop=False``) of both
views on the device.  Warm-up batches are not timed: ``warmup`` plus one per worker (the workers'
first round arrives at once), end to end only ``warmup`` when the augmentation alone is over twice
as slow as the loader (the workers then run ahead anyway); the device is synchronised at both ends
of the timed part.  The loader-only pass, cheap, times at least 8 batches and 4 rounds of the
workers.  With ``repeats`` > 1 the whole grid is measured that many times, in rounds, and each
configuration keeps its fastest time.  On the CPU the time per batch is the median of the timed
batches where they do not arrive in bursts (0 workers, or end to end with the loader ahead), which
keeps a shared machine's hiccups out; otherwise it is the mean over the timed window.  ``images/s``
counts batch items (one image, two views), ``views/s`` is twice that.  The augmentation alone on a
fixed batch is timed too, so the table shows where the time goes.

The source set is generated once with :func:`~selfsup.data.fake.make_fake_imagenet` (ImageNet-like
sizes by default: 8 classes x 100 images, sides 300-500 px; written in chunks to bound memory) in
a temporary folder, or in ``data`` when that folder is empty or missing, and reused afterwards;
``data`` may also name a real set in either layout (readers whose layout is missing are skipped
with a note).  Files are read through the OS page cache, warm (the items the passes use, the same
in every pass, are read once before timing): the speed of the disk is not measured.  Only the
``quick`` run is part of the test suite.

Usage::

    from selfsup.bench.data import run
    res = run({"quick": True, "out": "bench.json"})   # -> {"config", "rows", "notes", "table"}
    selfsup bench data --workers 0 2 4 --readers zip zip-cached --out data.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
import zipfile

import torch

from ..config import DEFAULT_INDEX_CACHE
from ..data.augment import simclr_augment
from ..data.fake import make_fake_imagenet
from ..data.files import decode_bytes, open_imagefolder, open_imagenet_zip
from ..data.images import IMAGE_EXTENSIONS
from ..data.loader import StreamLoader
from ..data.samplers import build_index_schedule
from .common import Bench, cpu_snapshot, device_name, others_share, progress, sync, text_table

__all__ = ["BENCH", "bench_data", "make_source_set", "default_workers", "run", "format_table", "main", "DEFAULTS",
           "QUICK", "READERS", "DECODES"]

READERS = ("folder", "zip", "zip-cached")
DECODES = ("cpu", "device")
DEFAULTS = dict(data=None, readers=READERS, decodes=DECODES, workers=None, batch=64, steps=None, warmup=1,
                repeats=1, size=224, device="auto", threads=None, prefetch=4, classes=8, per_class=100, min_size=300,
                max_size=500, seed=0, out=None)
QUICK = dict(classes=2, per_class=16, min_size=200, max_size=300, batch=8, steps=2, warmup=1, workers=(0,))

_MARKER = ".selfsup_bench_data.json"
_CHUNK_PIXELS = 3 * 10**7   # pixels per generation chunk (make_fake_imagenet holds float copies of all)


# ---------------------------------------------------------------- machine


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(cpus: int | None = None) -> list[int]:
    """0, 2, 4, 8, 16 below the CPU count, plus the CPU count (at most 16); with fewer than three
    entries 1 is added (2 CPUs: [0, 1, 2])."""
    n = cpus or _cpu_count()
    ws = sorted({w for w in (0, 2, 4, 8, 16) if w < n} | {min(n, 16)})
    if len(ws) < 3:
        ws = sorted(set(ws) | {1})
    return ws


def _resolve_device(name: str) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return dev


# ---------------------------------------------------------------- source set


def _layouts(root: str) -> dict:
    """Which layouts `root` holds: {"folder": bool, "zip": bool}."""
    has_zip = os.path.isfile(os.path.join(root, "train.zip")) and os.path.isfile(os.path.join(root, "train_map.txt"))
    has_folder = os.path.isdir(os.path.join(root, "train"))
    if not has_folder and os.path.isdir(root):   # a folder of class folders (or of images) is a train split too
        for e in os.scandir(root):
            if e.name.startswith(".") or e.name in ("val", "test"):
                continue
            if e.is_dir() or e.name.lower().endswith(IMAGE_EXTENSIONS):
                has_folder = True
                break
    return {"folder": has_folder, "zip": has_zip}


def _append_chunk(cdir: str, tmp: str, split: str, out: tuple, counts: dict) -> None:
    """Append the images of one generated chunk's `split` (in `cdir`) to the set in `tmp`, renumbered:
    to its zip and map (`out`) and to its folder layout."""
    z, m = out
    with zipfile.ZipFile(os.path.join(cdir, f"{split}.zip")) as cz, open(os.path.join(cdir, f"{split}_map.txt")) as f:
        for line in f:
            name, label = line.rstrip("\n").split("\t")
            wnid = name.split("/")[0]
            new = f"{wnid}/{wnid}_{counts[split]:06d}.JPEG"
            counts[split] += 1
            data = cz.read(name)
            z.writestr(new, data)
            m.write(f"{new}\t{label}\n")
            path = os.path.join(tmp, split, new)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as g:
                g.write(data)


def make_source_set(root: str, classes: int, per_class: int, min_size: int, max_size: int, seed: int = 0) -> dict:
    """Write an ImageNet-like set (both layouts: ``train/<wnid>/*.JPEG``, ``train.zip`` +
    ``train_map.txt``, and a small val split) into `root` with
    :func:`~selfsup.data.fake.make_fake_imagenet`, in chunks of about ``_CHUNK_PIXELS`` pixels
    (the generator holds float copies of every image of a call). The set is built in a sibling
    temporary folder and renamed into place, so a concurrent or interrupted run never sees half
    a set. Returns the marker's dict (the settings and the build time)."""
    root = os.path.abspath(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp", dir=parent)
    t0 = time.perf_counter()
    try:
        chunk_pc = max(1, min(per_class, _CHUNK_PIXELS // (max_size * max_size * classes)))
        val_pc = max(1, per_class // 10)
        outs = {s: (zipfile.ZipFile(os.path.join(tmp, f"{s}.zip"), "w", zipfile.ZIP_STORED),
                    open(os.path.join(tmp, f"{s}_map.txt"), "w")) for s in ("train", "val")}
        counts = {"train": 0, "val": 0}
        try:
            done, j = 0, 0
            while done < per_class:
                n = min(chunk_pc, per_class - done)
                cdir = os.path.join(tmp, f".chunk{j}")
                make_fake_imagenet(cdir, classes=classes, train_per_class=n, val_per_class=val_pc if j == 0 else 1,
                                   min_size=min_size, max_size=max_size, seed=seed * 1000 + j, layouts=("zip",))
                for split in ("train", "val") if j == 0 else ("train",):
                    _append_chunk(cdir, tmp, split, outs[split], counts)
                shutil.rmtree(cdir)
                done, j = done + n, j + 1
        finally:
            for z, m in outs.values():
                z.close()
                m.close()
        info = dict(classes=classes, per_class=per_class, min_size=min_size, max_size=max_size, seed=seed,
                    train=counts["train"], val=counts["val"], build_s=round(time.perf_counter() - t0, 1))
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump(info, f)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isfile(os.path.join(root, _MARKER)):   # not a concurrent build of the same set
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def _source(cfg: dict, notes: list) -> tuple[str, dict, bool]:
    """(root, layouts, generated) of the source set: `data` when it holds a set, else a generated
    one (in `data` when given, else a temporary folder named by the settings)."""
    spec = dict(classes=cfg["classes"], per_class=cfg["per_class"], min_size=cfg["min_size"],
                max_size=cfg["max_size"], seed=cfg["seed"])
    root = cfg["data"]
    if root is None:
        root = os.path.join(tempfile.gettempdir(), "selfsup_bench_data",
                            "fake_{classes}x{per_class}_{min_size}-{max_size}_s{seed}".format(**spec))
    root = os.path.abspath(os.path.expanduser(str(root)))
    marker = os.path.join(root, _MARKER)
    if os.path.isdir(root) and os.listdir(root):
        lay = _layouts(root)
        if not (lay["folder"] or lay["zip"]):
            raise ValueError(f"data folder {root} holds neither an image folder (train/<class>/*.jpg) nor "
                             "train.zip with train_map.txt; name an empty or new folder to generate a set there")
        if os.path.isfile(marker):
            with open(marker) as f:
                info = json.load(f)
            notes.append(f"source set: generated earlier in {root} (make_fake_imagenet, {info['classes']} classes "
                         f"x {info['per_class']} images, sides {info['min_size']}-{info['max_size']} px), reused")
            return root, lay, True
        notes.append(f"source set: {root} (given)")
        return root, lay, False
    progress("data", generating=root, **spec)
    info = make_source_set(root, **spec)
    notes.append(f"source set: generated in {root} (make_fake_imagenet, {info['classes']} classes x "
                 f"{info['per_class']} images, sides {info['min_size']}-{info['max_size']} px, "
                 f"{info['build_s']} s); reused by later runs")
    return root, _layouts(root), True


def _image_stats(dset, limit: int = 256) -> str:
    """Sizes of up to `limit` evenly spaced images of `dset` (headers only)."""
    n = len(dset)
    idx = sorted({int(i * n / min(n, limit)) for i in range(min(n, limit))})
    ws, hs, kb = [], [], []
    for i in idx:
        data = dset.read_bytes(i)
        w, h = decode_bytes(data, dset.where(i)).size
        ws.append(w)
        hs.append(h)
        kb.append(len(data) / 1024)
    short = [min(a, b) for a, b in zip(ws, hs)]
    mp = [a * b / 1e6 for a, b in zip(ws, hs)]
    return (f"source images ({len(idx)} of {n} sampled): mean {statistics.mean(ws):.0f}x{statistics.mean(hs):.0f} "
            f"px (WxH; ImageNet ~400x350), width {min(ws)}-{max(ws)}, height {min(hs)}-{max(hs)}, shorter side "
            f"median {statistics.median(short):.0f}, mean {statistics.mean(mp):.3f} MPix, "
            f"mean {statistics.mean(kb):.0f} KB per file (ImageNet ~110 KB)")


def _open(reader: str, root: str, index_cache):
    if reader == "folder":
        return open_imagefolder(root, "train", index_cache=index_cache or DEFAULT_INDEX_CACHE)
    return open_imagenet_zip(root, "train")


# ---------------------------------------------------------------- one configuration


def _loader_steps(steps: int, workers: int) -> int:
    """Timed batches of the loader-only pass (cheap): at least 8 and 4 rounds of the workers."""
    return max(steps, 8, 4 * workers)


def _preread(dset, batch: int, seed: int, batches: int) -> None:
    """Read the bytes of the items of the schedule's first `batches` batches (page-cache warm-up)."""
    sched = build_index_schedule("epoch", len(dset), batch, seed)
    seen = set()
    for _ in range(batches):
        seen.update(sched.next_batch().tolist())
        if len(seen) == len(dset):
            break
    for i in sorted(seen):
        dset.read_bytes(i)


def _timed_pass(dset, specs, batch, steps, warmup, workers, device, decode, prefetch, seed, aug=None,
                per_batch=False):
    """Iterate warmup + steps batches; returns (seconds, images, per-batch seconds) of the last `steps`
    batches (per-batch times only with `per_batch`, on the CPU: no device synchronisation per batch)."""
    sched = build_index_schedule("epoch", len(dset), batch, seed)
    loader = StreamLoader(dset, specs, sched, total=warmup + steps, seed=seed, workers=workers, device=device,
                          decode=decode, on_error="raise", prefetch=prefetch)
    gen = torch.Generator(device=device).manual_seed(seed)
    it = iter(loader)

    def consume(views):
        if aug is not None:
            for v in views:
                aug(v, gen, crop=False)

    try:
        for _ in range(warmup):
            _, views, _ = next(it)
            consume(views)
        sync(device)
        t0 = tick = time.perf_counter()
        images, times = 0, []
        for index, views, _ in it:
            consume(views)
            images += len(index)
            if per_batch:
                now = time.perf_counter()
                times.append(now - tick)
                tick = now
        sync(device)
        return time.perf_counter() - t0, images, times
    finally:
        del it   # shuts the workers down


def _aug_only(aug, batch, size, device, reps, seed) -> float:
    """Seconds per batch of the augmentation of two uint8 views alone (median of `reps`)."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
             for _ in range(2)]
    gen = torch.Generator(device=device).manual_seed(seed)
    for _ in range(2):   # first calls: allocator and kernel warm-up
        for v in views:
            aug(v, gen, crop=False)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for v in views:
            aug(v, gen, crop=False)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- public API


def _check_names(readers, decodes) -> None:
    for r in readers:
        if r not in READERS:
            raise ValueError(f"unknown reader {r!r}; valid: {', '.join(READERS)}")
    for d in decodes:
        if d not in DECODES:
            raise ValueError(f"unknown decode mode {d!r}; valid: {', '.join(DECODES)}")


def _open_sets(root: str, layouts: dict, readers, index_cache, preread: tuple, notes: list) -> list:
    """(reader, set) of every reader that opens the set in `root`, with a note for each (how long it took,
    or why it was skipped) and one of the images. `preread` (batch, seed, warmup, workers, steps): what
    the passes will read, read once here, untimed (zip-cached: every encoded byte cached instead)."""
    batch, seed, warmup, workers, steps = preread
    dsets, stats_done = [], False
    for reader in readers:
        need = "folder" if reader == "folder" else "zip"
        if not layouts.get(need):
            notes.append(f"reader {reader}: skipped, {root} has no "
                         + ("image folder" if need == "folder" else "train.zip with train_map.txt"))
            continue
        try:
            t0 = time.perf_counter()
            dset = _open(reader, root, index_cache)
            open_s = time.perf_counter() - t0
            if reader == "zip-cached":
                t0 = time.perf_counter()
                nbytes = dset.cache(range(len(dset)))
                notes.append(f"zip-cached: {nbytes / 2**20:.1f} MiB of encoded bytes ({len(dset)} images) cached "
                             f"in RAM in {time.perf_counter() - t0:.2f} s")
            else:
                notes.append(f"{reader}: opened {dset.source} ({len(dset)} images) in {open_s:.2f} s")
                # every pass reads the same items (same seed): read them once, untimed
                _preread(dset, batch, seed, warmup + max(workers) + max(steps, _loader_steps(steps, max(workers))))
        except Exception as e:   # noqa: BLE001  (a broken reader must not hide the others)
            notes.append(f"reader {reader}: cannot open the set: {type(e).__name__}: {e}")
            continue
        if not stats_done:
            notes.append(_image_stats(dset))
            stats_done = True
        dsets.append((reader, dset))
    return dsets


def _measure_one(best: dict, kw: dict, steps: int, warmup: int, aug, aug_s: float, notes: list) -> None:
    """Time one (reader, decode, workers) configuration (`kw`: `_timed_pass`'s arguments but the steps):
    the loader alone, then loader + augmentation. `best[(reader, decode, workers)]` keeps the faster of
    this round and the earlier ones (None: it failed, with a note, and is not measured again)."""
    reader, decode, w, batch, device = kw.pop("reader"), kw["decode"], kw["workers"], kw["batch"], kw["device"]
    key, cpu, lo_steps = (reader, decode, w), device.type == "cpu", _loader_steps(steps, w)
    try:
        lo_s, _, lo_t = _timed_pass(**kw, steps=lo_steps, warmup=warmup + w, per_batch=cpu and w == 0)
        lo_batch = statistics.median(lo_t) if lo_t else lo_s / lo_steps
        # the per-worker warm-up lets the workers' first round (W batches at once) pass; when the
        # augmentation is much slower than the loader, the workers run ahead anyway: not needed
        ahead = aug_s > 2 * lo_s / lo_steps
        e2e_s, _, e2e_t = _timed_pass(**kw, steps=steps, warmup=warmup + (0 if ahead else w), aug=aug,
                                      per_batch=cpu and (w == 0 or ahead))
        e2e_batch = statistics.median(e2e_t) if e2e_t else e2e_s / steps
    except Exception as e:   # noqa: BLE001
        if key not in best:
            notes.append(f"reader={reader} decode={decode} workers={w}: failed: {type(e).__name__}: {e}")
            best[key] = None
        return
    row = best.get(key)
    if row is None:
        if key in best:   # failed in an earlier round
            return
        row = best[key] = dict(reader=reader, decode=decode, device=device.type, workers=w,
                               batch=batch, steps=steps, loader_steps=lo_steps, ms_per_batch=math.inf,
                               loader_ms_per_batch=math.inf, e2e_stat="median" if e2e_t else "mean",
                               loader_stat="median" if lo_t else "mean")
    row["ms_per_batch"] = min(row["ms_per_batch"], 1e3 * e2e_batch)
    row["loader_ms_per_batch"] = min(row["loader_ms_per_batch"], 1e3 * lo_batch)
    progress("data", reader=reader, decode=decode, workers=w, images_per_s=batch / e2e_batch,
             loader_only_images_per_s=batch / lo_batch)


def _final_rows(best: dict, batch: int, aug_s: float) -> list[dict]:
    """The rows of the configurations that ran, with their rates."""
    rows = []
    for row in best.values():
        if row is None:
            continue
        row.update(images_per_s=1e3 * batch / row["ms_per_batch"], views_per_s=2e3 * batch / row["ms_per_batch"],
                   loader_only_images_per_s=1e3 * batch / row["loader_ms_per_batch"],
                   aug_only_images_per_s=batch / aug_s)
        rows.append(row)
    return rows


def bench_data(root: str, layouts: dict, readers=READERS, decodes=DECODES, workers=(0,), batch: int = 64,
               steps: int = 10, warmup: int = 1, size: int = 224, device="cpu", prefetch: int = 4, seed: int = 0,
               repeats: int = 1, index_cache: str | None = None, notes: list | None = None) -> list[dict]:
    """Measure every (reader, decode, workers) on the set in `root` (see the module docstring).

    Returns one dict per configuration: ``reader, decode, device, workers, batch, steps,
    loader_steps, images_per_s, views_per_s, loader_only_images_per_s, ms_per_batch,
    loader_ms_per_batch, e2e_stat, loader_stat`` (``"median"`` of the per-batch times or ``"mean"``
    over the timed window), ``aug_only_images_per_s``. A configuration that fails gets a note
    instead of a row.
    """
    notes = notes if notes is not None else []
    device = torch.device(device)
    _check_names(readers, decodes)
    specs = [(size, (0.08, 1.0), (3 / 4, 4 / 3))] * 2
    aug = simclr_augment(size, strength=1.0)
    aug_s = math.inf
    dsets = _open_sets(root, layouts, readers, index_cache, (batch, seed, warmup, workers, steps), notes)
    best: dict = {}   # (reader, decode, workers) -> row, the fastest of the rounds
    for _ in range(max(1, repeats)):
        aug_s = min(aug_s, _aug_only(aug, batch, size, device, 3, seed))
        for reader, dset in dsets:
            for decode in decodes:
                for w in workers:
                    kw = dict(reader=reader, dset=dset, specs=specs, batch=batch, workers=w, device=device,
                              decode=decode, prefetch=prefetch, seed=seed)
                    _measure_one(best, kw, steps, warmup, aug, aug_s, notes)
        aug_s = min(aug_s, _aug_only(aug, batch, size, device, 3, seed))   # at both ends of the round
    rows = _final_rows(best, batch, aug_s)
    notes.append(f"augmentation alone (both views, batched on {device.type}, crop=False; median of 3, the "
                 f"better of before and after each round): {1e3 * aug_s:.1f} ms per batch of "
                 f"{batch} = {batch / aug_s:.1f} images/s")
    return rows


COLUMNS = [("reader", 10, "reader"), ("decode", 6, "decode"), ("dev", 4, "device"), ("wrk", 3, "workers"),
           ("batch", 5, "batch"), ("loader img/s", 12, "loader_only_images_per_s:.1f"),
           ("e2e img/s", 10, "images_per_s:.1f"), ("views/s", 9, "views_per_s:.1f"),
           ("ms/batch", 9, "ms_per_batch:.1f"), ("loader ms", 9, "loader_ms_per_batch:.1f")]


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of :func:`bench_data` rows."""
    return text_table(rows, COLUMNS)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:   # noqa: BLE001
        return "?"


def _measure(cfg: dict, notes: list) -> dict:
    device = _resolve_device(cfg["device"])
    cpus = _cpu_count()
    workers = [int(w) for w in (cfg["workers"] if cfg["workers"] is not None else default_workers(cpus))]
    if not workers or any(w < 0 for w in workers):
        raise ValueError(f"workers must be a non-empty list of counts >= 0, got {workers}")
    steps = int(cfg["steps"] or (20 if device.type == "cuda" else 3))
    threads = int(cfg["threads"] or torch.get_num_threads())
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    notes.append(f"machine: {cpus} CPUs ({device_name()}), torch {torch.__version__}, torchvision "
                 f"{_version('torchvision')}, Pillow {_version('PIL')}" + (f", GPU {gpu}" if gpu else ", no GPU used")
                 + f"; {threads} torch threads in the main process, 1 per worker")
    root, layouts, generated = _source(cfg, notes)
    if device.type == "cpu" and "device" in cfg["decodes"]:
        notes.append("decode=device on cpu: torchvision.io.decode_image in the main process, image after image "
                     "(no nvJPEG); the workers only read the bytes and parse the headers")
    notes.append(f"timed: {steps} batches end to end (loader alone: max({steps}, 8, 4 x workers)) after "
                 f"{cfg['warmup']} + <workers> warm-up batches (end to end: {cfg['warmup']} when the augmentation "
                 "alone is over twice as slow as the loader, which then runs ahead); per batch: the median of the "
                 "timed batches on the CPU where batches do not arrive in bursts (0 workers, or end to end with the "
                 "loader ahead; rows' e2e_stat / loader_stat), else the mean over the window; images/s = batch items "
                 "per second (two views each); e2e = loader + augmentation of both views; the items used are read "
                 "once before timing: files come from the OS page cache, disk speed is not measured")
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    snap = cpu_snapshot()
    try:
        rows = bench_data(root, layouts, readers=tuple(cfg["readers"]), decodes=tuple(cfg["decodes"]),
                          workers=workers, batch=int(cfg["batch"]), steps=steps, warmup=int(cfg["warmup"]),
                          size=int(cfg["size"]), device=device, prefetch=int(cfg["prefetch"]), seed=int(cfg["seed"]),
                          repeats=int(cfg["repeats"]),
                          index_cache=os.path.join(root, ".index") if generated else None, notes=notes)
    finally:
        torch.set_num_threads(prev)
    others = others_share(snap, cpu_snapshot(), cpus)
    if others is not None:
        notes.append(f"other processes used {100 * others:.0f}% of the {cpus} CPUs during the measurements"
                     + (": the numbers are disturbed; rerun on a quiet machine or with --repeats 2+"
                        if others > 0.1 else ""))
    return {"config": {**cfg, "data": root, "generated": generated, "readers": list(cfg["readers"]),
                      "decodes": list(cfg["decodes"]), "workers": workers, "steps": steps, "threads": threads,
                      "device": device.type, "device_name": gpu or device_name(), "cpus": cpus,
                      "torch": torch.__version__, "others_cpu_share": others},
            "rows": rows}


def _options(p) -> None:
    p.add_argument("--data", help="a set in either layout, or an empty/new folder to generate the fake set in "
                   "(default: a temporary folder, reused)")
    p.add_argument("--readers", nargs="+", choices=READERS)
    p.add_argument("--decodes", nargs="+", choices=DECODES)
    p.add_argument("--workers", type=int, nargs="+", help=f"DataLoader workers (default here: {default_workers()})")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, help="timed batches end to end (default 3 on cpu, 20 on cuda)")
    p.add_argument("--warmup", type=int, help="untimed batches per pass, plus one per worker")
    p.add_argument("--repeats", type=int, help="rounds over all configurations; each keeps its fastest (default 1; "
                   "2 or more on a busy machine)")
    p.add_argument("--size", type=int, help="crop size (224)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch threads of the main process")
    p.add_argument("--prefetch", type=int, help="batches prefetched per worker")
    p.add_argument("--classes", type=int, help="generated set: classes")
    p.add_argument("--per-class", type=int, dest="per_class", help="generated set: train images per class")
    p.add_argument("--min-size", type=int, dest="min_size", help="generated set: smallest side")
    p.add_argument("--max-size", type=int, dest="max_size", help="generated set: largest side")
    p.add_argument("--seed", type=int)


BENCH = Bench(
    name="data",
    about="images/s of each image reader (folder, zip, cached zip; CPU / device decode) by number of workers",
    defaults=DEFAULTS, quick=QUICK, quick_help="CI-sized run (2 x 16 small images, batch 8, workers 0)",
    measure=_measure, table=format_table, options=_options)
run, main = BENCH.run, BENCH.main
