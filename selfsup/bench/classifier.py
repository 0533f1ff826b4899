"""Benchmark of the instance-classifier head alone: full softmax vs sampled negatives, one rank vs sharded.

One measured step = what PIC runs for its head, on random features (``z`` is a
leaf: no encoder), for ``N`` classes of ``dim``-dim rows and a global batch of
``batch`` samples: the targets gathered once, the forward and backward of the
classifier, and the method's own row update (:func:`selfsup.instance.row_sgd_`,
SGD with momentum and weight decay):

* ``full``: softmax over all ``N`` rows, every row of the shard updated, i.e.
  ``O(N D)`` per step;
* ``sampled``: softmax over ``K`` recent instances (``K = min(num_recent, N)``,
  FIFO pre-filled with random ids) plus the batch's targets; only those rows and
  their momentum updated.

Each configuration runs both paths of the head (``paths``): ``fused``
(:mod:`selfsup.instance.fused`: the backward applies the row update chunk by
chunk, no ``(N, D)`` gradient, chunk and tile per device or ``fused_chunk``) and
``reference`` (the chunked softmax leaves the dense row gradient, then
``row_sgd_``).  Each row also says how busy the machine was while it was
measured: ``others`` (the share of all CPUs used by other processes, from
``/proc/stat``) and ``load`` (the 1-minute load average at its end): on a shared
CPU the step times are only comparable at a similar load.

``world = 1`` runs in this process; ``world = sharded_world`` spawns that many
processes (gloo on CPU, NCCL when there are enough GPUs), each holding a shard
and ``batch / world`` samples, with ``threads / world`` CPU threads each, so the
compared configurations use the same cores.  Reported per row: mean step time
(max over ranks), the head's resident state (weights + optimiser state + FIFO,
per rank) and the peak extra memory during a step (CUDA:
``max_memory_allocated`` above the state; CPU: sampled RSS increase, coarse).
Configurations whose estimated memory exceeds ``max_bytes`` are skipped with a
note.  Not part of the test suite.

Roofline (on by default, ``--no-roofline`` to skip): the device's memory
bandwidth (best of several ``dst.copy_(src)`` of a float32 tensor, 256 MiB on
CUDA, 64 MiB on CPU; ``2 * bytes / time``) and matmul rate (bf16 8192^3 on
CUDA, float32 2048^3 on CPU, where bf16 matmul is not representative) are
measured once, and each row gets ``bound_ms`` = the time to read and write the
softmax rows and their momentum once (``4 * rows * D * elem_size`` bytes, rows
= ``N`` (full) or the candidates (sampled)) at that bandwidth plus the logit
matmuls (``6 * G * rows * D`` flops: forward, and the two backward products) at
that rate, and ``ratio = step_ms / bound_ms``.  Sharded rows: the whole work on
the one measured CPU (the ranks share it), or one rank's share on CUDA (a GPU
per rank).  Issue 25's target for ``N = 1e6, D = 128, batch 1024``, full softmax,
one process, is ``ratio <= 2`` on the CPU and ``<= 3`` on a GPU; a note gives
each path's ratio and verdict.
On CUDA the head runs under bf16 autocast (``precision="auto"``, as the
trainer), so the logit matmuls take bf16 inputs.

Usage::

    from selfsup.bench.classifier import run
    res = run({"quick": True, "out": "bench.json"})   # -> {"config", "device", "rows", "notes", "table"}
    selfsup bench classifier --quick --out bench.json
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..instance import (DEFAULT_CHUNK, InstanceClassifier, RecentInstances, RowUpdate, Targets, fused_chunk_size,
                        row_sgd_)
from ..parallel.distributed import all_gather_no_grad
from .common import Bench, RssPeak, cpu_snapshot, others_share, progress, sync, text_table

__all__ = ["BENCH", "bench_classifier", "measure_roofline", "roofline_bound_ms", "run", "format_table", "main",
           "DEFAULTS", "QUICK"]

DEFAULTS = dict(ns=(10**4, 10**5, 10**6), dim=128, batch=1024, modes=("full", "sampled"), device="cpu",
                sharded_world=2, num_recent=65536, chunk_size=DEFAULT_CHUNK, warmup=1, repeats=None,
                threads=None, max_bytes=None, temperature=0.2, precision="auto", roofline=True, out=None,
                paths=("fused", "reference"), fused_chunk=None)
QUICK = dict(ns=(10**3, 10**4), dim=32, batch=64, num_recent=1024, chunk_size=2048, warmup=1, repeats=2)


# ---------------------------------------------------------------- memory probes


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _estimate_bytes(n: int, dim: int, batch: int, mode: str, world: int, num_recent: int, chunk: int,
                    path: str = "reference") -> int:
    """Rough per-rank memory.  Reference: rows + momentum (+ the dense gradient and the update's two
    temporaries of its size: full softmax) and two G x chunk float32 temporaries.  Fused: rows + momentum,
    the norms, the sampled rows' copy and a few chunk-sized buffers per thread (no (N, D) temporary)."""
    rows = -(-n // world)
    active = min(rows, num_recent + batch) if mode == "sampled" else rows
    if path == "fused":
        state = rows * dim * 4 * 2 + active * 4 + (active * dim * 4 if mode == "sampled" else 0)
        return state + 4 * (3 * (1 << 14) * dim * 4 + batch * (1 << 12) * 4) + batch * dim * 16
    state = rows * dim * 4 * (3 if mode == "full" else 2)
    return state + active * dim * 4 * 2 + 2 * batch * min(chunk, active) * 4 + batch * dim * 16


# ---------------------------------------------------------------- roofline


def _best_time(fn, device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn`` (after one untimed call), synchronised."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_roofline(device: str = "cpu") -> dict:
    """Memory bandwidth and matmul rate of ``device`` (CPU: with the current torch thread count).

    Returns ``{"device", "bandwidth_gbs", "copy_mib", "matmul_tflops", "matmul_dtype", "matmul_n"}``:
    bandwidth = ``2 * bytes / time`` of ``dst.copy_(src)`` (float32, 256 MiB on CUDA, 64 MiB on CPU),
    rate = ``2 n^3 / time`` of an ``n x n`` matmul (CUDA: bf16, float32 accumulation, n = 8192;
    CPU: float32, n = 2048); best of several repeats each.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    mib, n, dtype, reps = (256, 8192, torch.bfloat16, 10) if cuda else (64, 2048, torch.float32, 5)
    src = torch.rand(mib << 18, device=dev)  # mib MiB of float32
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), dev, reps)
    del src, dst
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    rate = 2 * n**3 / _best_time(lambda: a @ b, dev, reps)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    return dict(device=name, bandwidth_gbs=bw / 1e9, copy_mib=mib, matmul_tflops=rate / 1e12,
                matmul_dtype=str(dtype).replace("torch.", ""), matmul_n=n)


def roofline_bound_ms(row: dict, roof: dict, elem_size: int = 4, ranks: int = 1) -> float:
    """Roofline time of one step of ``row``: rows + momentum read and written once, plus the logit matmuls.

    ``(2 * 2 * rows * D * elem_size) / bandwidth + (6 * G * rows * D) / rate``, ``rows = row["candidates"]``
    (``N`` for the full softmax), ``G = row["batch"]``, divided by ``ranks`` (devices sharing the work).
    """
    rows, d, g = row["candidates"], row["dim"], row["batch"]
    t_mem = 2 * 2 * rows * d * elem_size / (roof["bandwidth_gbs"] * 1e9)
    t_mm = 6 * g * rows * d / (roof["matmul_tflops"] * 1e12)
    return 1e3 * (t_mem + t_mm) / ranks


def _target_note(rows: list[dict], device: torch.device) -> str:
    """Whether issue 25's target is met here: N = 1e6, D = 128, batch 1024, full softmax, one process, step
    within 2x of its roofline bound on a CPU, within 3x on a GPU; each path's ratio."""
    limit = 3 if device.type == "cuda" else 2
    head = (f"target: step <= {limit}x roofline bound for N=1e6, D=128, batch 1024, full softmax, one process "
            f"on {'a GPU' if device.type == 'cuda' else 'the CPU'}")
    key = (10**6, 128, 1024, "full", 1)
    got = {r.get("path", "reference"): r for r in rows
           if (r["n"], r["dim"], r["batch"], r["mode"], r["world"]) == key and "ratio" in r}
    if not got:
        return (f"{head}: not measured in this run (selfsup bench classifier --ns 1000000 --modes full"
                f"{' --device cuda' if device.type == 'cuda' else ''})")
    parts = [f"{p} ratio {r['ratio']:.2f} -> {'MET' if r['ratio'] <= limit else 'NOT met'}" for p, r in got.items()]
    if len(got) == 2:
        parts.append(f"fused {got['reference']['step_ms'] / got['fused']['step_ms']:.2f}x faster than the reference")
    return f"{head}: " + "; ".join(parts)


# ---------------------------------------------------------------- one configuration (one rank)


def _measure(n, dim, batch_local, mode, device, num_recent, chunk, warmup, repeats, temperature, amp=False,
             seed=0, path="reference", fused_chunk=None):
    """Time ``warmup + repeats`` head steps on this rank (distributed if a group is up). Returns a dict."""
    device = torch.device(device)
    step, state_bytes = _head_step(n, dim, batch_local, mode, device, num_recent, chunk, temperature, amp, seed,
                                   path == "fused", fused_chunk)
    for i in range(warmup):
        step(i)
    sync(device)
    res = _timed(step, warmup, repeats, device)
    tile = _fused_tile(device, batch_local, dim, fused_chunk) if path == "fused" else None
    return dict(**res, state_bytes=state_bytes, chunk=tile,
                load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)


def _head_step(n, dim, batch_local, mode, device, num_recent, chunk, temperature, amp, seed, fused, fused_chunk):
    """(step(i) -> loss, bytes of rows + momentum (+ FIFO)): PIC's head step on fixed random features and
    targets: targets gathered once, forward + backward, the row update (inside the backward when `fused`),
    the FIFO push (sampled mode)."""
    g = torch.Generator().manual_seed(seed + (dist.get_rank() if dist.is_initialized() else 0))
    clf = InstanceClassifier(n, dim, temperature=temperature, chunk_size=chunk, seed=seed, device=device,
                             fused_chunk_size=fused_chunk)
    momentum = torch.zeros_like(clf.weight)   # PIC's clf_momentum
    fifo = None
    if mode == "sampled":
        k = min(num_recent, n)
        fifo = RecentInstances(k, device=device)
        fifo.push(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].to(device))
    state_bytes = sum(t.numel() * t.element_size() for t in [clf.weight, momentum]
                      + ([fifo.buffer] if fifo is not None else []))
    zs = [torch.randn(batch_local, dim, generator=g).to(device) for _ in range(2)]
    ys = [torch.randint(0, n, (batch_local,), generator=g).to(device) for _ in range(2)]

    def step(i):
        z = zs[i % 2].clone().requires_grad_()
        targets = Targets(all_gather_no_grad(ys[i % 2]))
        rows = clf.select(fifo.candidates(targets.ids)) if fifo is not None else clf.shard()
        update = RowUpdate(clf.weight, momentum, lr=0.1, momentum=0.9, weight_decay=1e-4) if fused else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = clf(z, targets, rows, update=update)
        loss.backward()   # fused: the rows and their momentum have moved
        if not fused:
            row_sgd_(clf.weight, momentum, rows, lr=0.1, momentum=0.9, weight_decay=1e-4)
        if fifo is not None:
            fifo.push(targets.ids)
        return loss

    return step, state_bytes


def _timed(step, first: int, repeats: int, device) -> dict:
    """Steps first .. first + repeats - 1, each timed alone (ranks in step by a barrier): mean and min
    step seconds, the last loss, the peak extra memory (CUDA allocated; CPU RSS sampled), the CPU share
    other processes used meanwhile (`others`) and this process's (`own`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    probe = RssPeak() if device.type == "cpu" else None
    snap = cpu_snapshot()
    if probe is not None:
        probe.__enter__()
    try:
        for i in range(repeats):
            if dist.is_initialized():
                dist.barrier()
            t0 = time.perf_counter()
            loss = step(first + i)
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        if probe is not None:
            probe.__exit__(None, None, None)
    peak_extra = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else probe.peak - probe.base
    end, cpus = cpu_snapshot(), os.cpu_count() or 1
    own = None if snap is None or end is None else (end[2] - snap[2]) / max(1e-9, (end[0] - snap[0]) * cpus)
    return dict(step_s=sum(times) / len(times), min_step_s=min(times), peak_extra_bytes=max(0, peak_extra),
                loss=float(loss.detach()), others=others_share(snap, end, cpus), own=own)


def _fused_tile(device, batch_local: int, dim: int, fused_chunk) -> list:
    """[chunk, tile] as the fused step picks them (fused.fused_cosine_softmax)."""
    c, t = fused_chunk_size(device, batch_local * (dist.get_world_size() if dist.is_initialized() else 1), dim)
    if fused_chunk is None:
        return [c, t]
    return list(fused_chunk) if isinstance(fused_chunk, tuple) else [fused_chunk, min(t, fused_chunk)]


def _rank_main(rank, world, backend, store_dir, kwargs, threads, device_type):
    torch.set_num_threads(threads)
    name = f"result_{rank}.pkl"
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        device = "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        store = dist.FileStore(os.path.join(store_dir, "store"), world)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        try:
            res = [_measure(device=device, **kw) for kw in kwargs]
        finally:
            dist.destroy_process_group()
        payload = pickle.dumps(res)
    except BaseException:
        name, payload = f"error_{rank}.txt", traceback.format_exc().encode()
    with open(os.path.join(store_dir, name + ".tmp"), "wb") as f:
        f.write(payload)
    os.replace(os.path.join(store_dir, name + ".tmp"), os.path.join(store_dir, name))


def _measure_sharded(world, device, threads, jobs, timeout=3600):
    """Run :func:`_measure` for each kwargs dict of ``jobs`` in ONE spawn of ``world`` ranks.

    Returns one combined dict per job (max step time over ranks, max per-rank memory).
    """
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    d = tempfile.mkdtemp(prefix="selfsup_bench_")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, world, backend, d, jobs, threads, dev.type), daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        errs = [f for f in os.listdir(d) if f.startswith("error_")]
        if errs:
            with open(os.path.join(d, sorted(errs)[0])) as f:
                raise RuntimeError(f"sharded benchmark rank failed:\n{f.read()}")
        res = []
        for r in range(world):
            path = os.path.join(d, f"result_{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"sharded benchmark rank {r} produced no result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                res.append(pickle.load(f))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        shutil.rmtree(d, ignore_errors=True)
    return [dict(step_s=max(r[j]["step_s"] for r in res), min_step_s=max(r[j]["min_step_s"] for r in res),
                 state_bytes=max(r[j]["state_bytes"] for r in res),
                 peak_extra_bytes=max(r[j]["peak_extra_bytes"] for r in res), loss=res[0][j]["loss"],
                 others=_others_of_ranks([r[j] for r in res]), load=res[0][j]["load"], chunk=res[0][j]["chunk"])
            for j in range(len(jobs))]


def _others_of_ranks(parts: list[dict]) -> float | None:
    """Rank 0's share of the machine used by processes other than itself, less the other ranks' own shares:
    the share used by processes outside the benchmark (an estimate: the ranks' windows differ a little)."""
    if parts[0]["others"] is None or any(p["own"] is None for p in parts):
        return None
    return max(0.0, parts[0]["others"] - sum(p["own"] for p in parts[1:]))


# ---------------------------------------------------------------- public API


def bench_classifier(
    ns=DEFAULTS["ns"], dim: int = 128, batch: int = 1024, modes=("full", "sampled"), device: str = "cpu",
    sharded_world: int | None = 2, num_recent: int = 65536, chunk_size: int = DEFAULT_CHUNK, warmup: int = 1,
    repeats: int | None = None, threads: int | None = None, max_bytes: int | None = None,
    temperature: float = 0.2, precision: str = "auto", roofline: bool = True, notes: list | None = None,
    device_info: dict | None = None, paths=("fused", "reference"), fused_chunk=None,
) -> list[dict]:
    """Measure the head for every ``(N, mode, world in (1, sharded_world))``.

    Args:
        ns: class counts ``N``; dim: ``D``; batch: global batch ``G``
            (``G / world`` per rank when sharded; must divide).
        modes: subset of ``("full", "sampled")``.
        device: ``"cpu"`` or ``"cuda"``; sharded CUDA runs need
            ``sharded_world`` GPUs (NCCL), else they are skipped with a note.
        sharded_world: ranks of the sharded runs (``None``/``1``: none).
        num_recent: ``K`` of the sampled mode (capped at ``N``).
        chunk_size: softmax row chunk.
        warmup, repeats: untimed and timed steps (``repeats`` default: 1 on
            CPU, 5 on CUDA).
        threads: CPU threads in total (default ``torch.get_num_threads()``),
            split evenly between the sharded ranks.
        max_bytes: per-rank memory budget for the skip rule (default: half of
            the available host / GPU memory).
        precision: ``"auto"`` (bf16 autocast on CUDA, none on CPU, as the
            trainer), ``"bf16"`` or ``"fp32"``: autocast around the head's forward.
        roofline: measure the device (:func:`measure_roofline`) and add
            ``bound_ms`` and ``ratio`` to each row, and a note on the target.
        notes: list that receives a line per skipped configuration (and the
            target note).
        device_info: dict that receives the roofline figures and the precision.
        paths: subset of ``("fused", "reference")``: the fused step (row update in
            the backward) and the reference (dense row gradient, then ``row_sgd_``).
        fused_chunk: the fused step's rows per chunk (``int``) or ``(chunk, tile)``;
            ``None``: per device (:func:`~selfsup.instance.fused_chunk_size`).

    Returns:
        One dict per measured configuration: ``n, mode, world, path, dim, batch,
        candidates`` (rows in the softmax), ``step_ms``, ``min_step_ms``,
        ``state_mb`` (per rank), ``peak_extra_mb`` (per rank), ``loss``,
        ``others`` and ``load`` (how busy the machine was), ``chunk`` (the
        fused step's ``[chunk, tile]``), and with ``roofline`` ``bound_ms`` and
        ``ratio = step_ms / bound_ms``.
    """
    notes = notes if notes is not None else []
    device_info = device_info if device_info is not None else {}
    dev = torch.device(device)
    amp = _check_options(precision, paths, modes, dev, device_info)
    repeats = repeats or (5 if dev.type == "cuda" else 1)
    threads = threads or torch.get_num_threads()
    budget = max_bytes or _available_bytes(dev) // 2
    if isinstance(fused_chunk, (tuple, list)):   # the command line's one or two numbers
        fused_chunk = int(fused_chunk[0]) if len(fused_chunk) == 1 else tuple(int(x) for x in fused_chunk)
    worlds = [1] + ([sharded_world] if sharded_world and sharded_world > 1 else [])
    common = dict(dim=dim, num_recent=num_recent, chunk=chunk_size, warmup=warmup, repeats=repeats,
                  temperature=temperature, amp=amp, fused_chunk=fused_chunk)
    jobs = _plan_jobs([(n, m, w, p) for n in ns for m in modes for w in worlds for p in paths], batch, dev, budget,
                      common, notes)
    results = _run_jobs(jobs, device, threads, sharded_world, roofline, device_info)
    rows = [_row(stub, results[i], threads, sharded_world, dev, device_info if roofline else None)
            for i, (stub, _, _) in enumerate(jobs)]
    if roofline:
        notes.append(_target_note(rows, dev))
    return rows


def _check_options(precision: str, paths, modes, dev: torch.device, device_info: dict) -> bool:
    """Whether the head runs under bf16 autocast (recorded in `device_info`); a ValueError for an
    unknown precision, path or mode."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; valid: auto, bf16, fp32")
    amp = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    device_info["precision"] = "bf16 autocast" if amp else "fp32"
    for path in paths:
        if path not in ("fused", "reference"):
            raise ValueError(f"unknown path {path!r}; valid: fused, reference")
    for mode in modes:
        if mode not in ("full", "sampled"):
            raise ValueError(f"unknown mode {mode!r}; valid: full, sampled")
    return amp


def _plan_jobs(configs, batch: int, dev: torch.device, budget: int, common: dict, notes: list) -> list:
    """(row stub, _measure's kwargs: `common` plus the job's own, world) of each (n, mode, world, path)
    that can run; a note for each one skipped (batch not divisible, too few GPUs, over the memory budget)."""
    jobs = []
    for n, mode, world, path in configs:
        tag = f"N={n} mode={mode} world={world} path={path}"
        if batch % world:
            notes.append(f"{tag}: skipped, batch {batch} not divisible by world")
            continue
        if world > 1 and dev.type == "cuda" and torch.cuda.device_count() < world:
            notes.append(f"{tag}: skipped, needs {world} GPUs (have {torch.cuda.device_count()})")
            continue
        need = _estimate_bytes(n, common["dim"], batch, mode, world, common["num_recent"], common["chunk"], path)
        if need > budget:
            notes.append(f"{tag}: skipped, needs ~{need / 2**30:.1f} GiB per rank > budget "
                         f"{budget / 2**30:.1f} GiB")
            continue
        kw = dict(common, n=n, batch_local=batch // world, mode=mode, path=path)
        stub = dict(n=n, mode=mode, world=world, path=path, dim=common["dim"], batch=batch,
                    candidates=n if mode == "full" else min(n, common["num_recent"] + batch))
        jobs.append((stub, kw, world))
    return jobs


def _run_jobs(jobs: list, device: str, threads: int, sharded_world, roofline: bool, device_info: dict) -> dict:
    """{job index: _measure's result}: the one-rank jobs here with `threads` threads (after the
    roofline, when asked), then all sharded ones in one spawn."""
    results: dict[int, dict] = {}
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if roofline:
            device_info.update(measure_roofline(device))
        for i, (stub, kw, world) in enumerate(jobs):
            if world == 1:
                results[i] = _measure(device=device, **kw)
                progress("classifier", **{k: stub[k] for k in ("n", "mode", "world", "path")},
                         step_ms=1e3 * results[i]["step_s"], load=results[i]["load"])
    finally:
        torch.set_num_threads(prev)
    sharded = [i for i, (_, _, world) in enumerate(jobs) if world > 1]
    if sharded:  # one spawn for all sharded configurations (process start-up is seconds)
        for i, r in zip(sharded, _measure_sharded(sharded_world, device, max(1, threads // sharded_world),
                                                  [jobs[i][1] for i in sharded])):
            results[i] = r
    return results


def _row(stub: dict, r: dict, threads: int, sharded_world, dev: torch.device, roof: dict | None) -> dict:
    """The table row of one measured job; with the roofline figures `roof`, its bound_ms and ratio."""
    tpr = threads if stub["world"] == 1 else max(1, threads // sharded_world)
    row = dict(stub, threads_per_rank=tpr if dev.type == "cpu" else None, step_ms=1e3 * r["step_s"],
               min_step_ms=1e3 * r["min_step_s"],
               state_mb=r["state_bytes"] / 2**20, peak_extra_mb=r["peak_extra_bytes"] / 2**20,
               loss=r["loss"], others=r["others"], load=r["load"], chunk=r["chunk"])
    if roof is not None:
        ranks = row["world"] if dev.type == "cuda" else 1  # CUDA: a GPU per rank; CPU: shared
        row["bound_ms"] = roofline_bound_ms(row, roof, ranks=ranks)
        row["ratio"] = row["step_ms"] / row["bound_ms"]
    return row

COLUMNS = [("N", 10, "n"), ("mode", 8, "mode"), ("world", 5, "world"), ("path", 9, "path"),
           ("thr", 4, "threads_per_rank"), ("cands", 9, "candidates"), ("step ms", 10, "step_ms:.1f"),
           ("bound ms", 9, "bound_ms:.3f"), ("ratio", 7, "ratio:.2f"), ("state MB", 10, "state_mb:.1f"),
           ("peak+ MB", 10, "peak_extra_mb:.1f"), ("others", 7, "others:.0%"), ("load", 5, "load:.1f")]


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of :func:`bench_classifier` rows."""
    return text_table(rows, COLUMNS)


def _measure_all(cfg: dict, notes: list) -> dict:
    device_info: dict = {}
    rows = bench_classifier(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}, notes=notes,
                            device_info=device_info)
    if "bandwidth_gbs" in device_info:
        d = device_info
        notes.insert(0, f"device {d['device']}: copy bandwidth {d['bandwidth_gbs']:.1f} GB/s, {d['matmul_dtype']} "
                        f"matmul {d['matmul_tflops']:.2f} TFLOP/s; head precision {d['precision']}")
    config = {**cfg, "ns": list(cfg["ns"]), "modes": list(cfg["modes"]), "paths": list(cfg["paths"]),
              "torch": torch.__version__,
              "threads": cfg["threads"] or torch.get_num_threads()}
    return {"config": config, "device": device_info, "rows": rows}


def _options(p) -> None:
    p.add_argument("--ns", type=int, nargs="+", help="class counts N (default 1e4 1e5 1e6)")
    p.add_argument("--dim", type=int)
    p.add_argument("--batch", type=int, help="global batch")
    p.add_argument("--modes", nargs="+", choices=["full", "sampled"])
    p.add_argument("--device")
    p.add_argument("--sharded-world", type=int, dest="sharded_world")
    p.add_argument("--num-recent", type=int, dest="num_recent")
    p.add_argument("--chunk-size", type=int, dest="chunk_size")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    p.add_argument("--paths", nargs="+", choices=["fused", "reference"],
                   help="the fused step (row update in the backward) and/or the reference (default both)")
    p.add_argument("--fused-chunk", type=int, nargs="+", dest="fused_chunk", metavar="N",
                   help="the fused step's rows per chunk, or chunk and tile (default: per device)")
    p.add_argument("--max-bytes", type=float, dest="max_bytes",
                   help="per-rank memory budget in bytes for the skip rule (default: half the available memory)")
    p.add_argument("--no-roofline", dest="roofline", action="store_false", default=None,
                   help="skip the bandwidth / matmul-rate measurement and the bound_ms, ratio columns")


BENCH = Bench(
    name="classifier",
    about="the instance-classifier head alone (step time, peak memory; full vs sampled, one rank vs sharded, "
          "fused vs reference)",
    defaults=DEFAULTS, quick=QUICK, quick_help="CI-sized run (N 1e3/1e4, D 32, batch 64)",
    measure=_measure_all, table=format_table, options=_options)
run, main = BENCH.run, BENCH.main
