"""Run a function in several CPU processes joined by a gloo process group (for tests).

Usage::

    from dist_utils import run_distributed

    def check(rank, world_size, x):      # top level of a test module
        ...                               # torch.distributed is initialised here
        return some_picklable_result

    def test_something():
        results = run_distributed(check, 2, 3.0)   # [result of rank 0, result of rank 1]

``fn`` must be a top-level function of an importable module (processes are
started with the 'spawn' method and receive ``fn`` by qualified name).
Tensors in results are returned by value (pickled to files).
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback

import torch.multiprocessing as mp

__all__ = ["run_distributed", "DistributedTestError"]


class DistributedTestError(RuntimeError):
    """A rank raised, crashed or timed out; the message carries the child's traceback."""


def _worker(rank: int, world_size: int, fn, args: tuple, workdir: str) -> None:
    import torch
    import torch.distributed as dist

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(os.path.join(workdir, "store"), world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        payload, name = pickle.dumps(result), f"result_{rank}.pkl"
    except BaseException:
        payload, name = traceback.format_exc().encode(), f"error_{rank}.txt"
    tmp = os.path.join(workdir, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, os.path.join(workdir, name))  # atomic: the parent never reads partial files


def run_distributed(fn, world_size: int, *args, timeout: float = 120) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    The default process group (gloo, CPU, FileStore rendezvous) is initialised
    before ``fn`` runs and destroyed afterwards.

    Returns:
        The list of the ranks' (picklable) return values, in rank order.

    Raises:
        DistributedTestError: a rank raised (its traceback is included), died
            without a result, or the processes did not finish within
            ``timeout`` seconds.  Remaining processes are killed in all cases.
    """
    ctx = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="selfsup_dist_")
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, fn, args, workdir), daemon=True)
        for r in range(world_size)
    ]
    ok = False
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while True:
            errors = sorted(f for f in os.listdir(workdir) if f.startswith("error_") and f.endswith(".txt"))
            if errors:
                msgs = []
                for f in errors:
                    with open(os.path.join(workdir, f)) as fh:
                        msgs.append(f"--- rank {f[6:-4]} ---\n{fh.read()}")
                raise DistributedTestError(f"{fn.__name__} failed:\n" + "\n".join(msgs))
            results = [os.path.join(workdir, f"result_{r}.pkl") for r in range(world_size)]
            if all(os.path.exists(f) for f in results):
                out = []
                for f in results:
                    with open(f, "rb") as fh:
                        out.append(pickle.load(fh))
                ok = True
                return out
            for r, p in enumerate(procs):
                if not p.is_alive() and not os.path.exists(results[r]):
                    # the result/error file is written before exit; allow a moment for races
                    time.sleep(0.2)
                    if not any(os.path.exists(os.path.join(workdir, f"{k}_{r}.{e}"))
                               for k, e in (("result", "pkl"), ("error", "txt"))):
                        raise DistributedTestError(
                            f"{fn.__name__}: rank {r} exited with code {p.exitcode} without a result"
                        )
            if time.monotonic() > deadline:
                raise DistributedTestError(f"{fn.__name__}: timed out after {timeout} s (world_size={world_size})")
            time.sleep(0.02)
    finally:
        # on success the children are exiting: let them finish; otherwise kill at once
        grace = time.monotonic() + (5 if ok else 0)
        for p in procs:
            if p.pid is not None:
                p.join(timeout=max(0.0, grace - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def assert_same_as_one_process(outs, model, loss, world: int) -> None:
    """Each rank's (mean loss share, {name: grad}, ...) from a DDP worker against `model` and `loss`
    of one process on the whole batch: the rank losses average to it, every rank's gradients equal it."""
    import torch

    assert abs(sum(o[0] for o in outs) / world - loss.item()) < 1e-12
    for name, p in model.named_parameters():
        if p.requires_grad:
            for o in outs:
                torch.testing.assert_close(o[1][name], p.grad, rtol=1e-10, atol=1e-12)
