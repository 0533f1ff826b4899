"""torch.distributed helpers (selfsup.parallel.distributed) on gloo processes, and the test harness."""
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import DistributedTestError, run_distributed
from selfsup.parallel import distributed as D


# ---------------------------------------------------------------- workers (run in child processes)


def _collectives_worker(rank, world):
    assert D.is_dist() and D.world_size() == world and D.rank() == rank
    assert D.setup_distributed() == (rank, 0, world)  # already initialised: reused

    b = 3
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(b, 2, 4, generator=g, dtype=torch.float64) for _ in range(world)]
    ws = [torch.randn(world * b, 2, 4, generator=g, dtype=torch.float64) for _ in range(world)]

    # forward: concatenation in rank order
    x = xs[rank].clone().requires_grad_()
    y = D.all_gather_with_grad(x)
    assert y.shape == (world * b, 2, 4)
    assert torch.equal(y.detach(), torch.cat(xs))
    # backward: d(sum_r <w_r, y>)/dx_r = sum over ranks of the incoming gradient's slice
    (ws[rank] * y).sum().backward()
    expected = sum(w[rank * b : (rank + 1) * b] for w in ws)
    torch.testing.assert_close(x.grad, expected, rtol=1e-14, atol=1e-14)

    # no-grad gather
    z = D.all_gather_no_grad(x)
    assert not z.requires_grad and torch.equal(z, torch.cat(xs))

    # mean over ranks (for logging); input untouched
    v = torch.tensor([float(rank), 2.0 * rank + 1], dtype=torch.float64)
    m = D.all_reduce_mean(v)
    torch.testing.assert_close(m, torch.tensor([(world - 1) / 2, float(world)], dtype=torch.float64))
    assert v[0].item() == rank

    # uneven batch sizes: every rank gets a clear error (and nobody hangs)
    try:
        D.all_gather_with_grad(torch.zeros(2 + rank, 4))
    except ValueError as e:
        assert "identical shape" in str(e), e
    else:
        raise AssertionError("uneven batch did not raise")
    dist.barrier()
    return rank


def _failing_worker(rank, world):
    if rank == 1:
        raise RuntimeError("boom from rank 1")
    dist.barrier()  # rank 0 would block here forever


def _hanging_worker(rank, world):
    time.sleep(60)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 3])
def test_collectives(world):
    # the assertions run inside the ranks (all_gather_with_grad forward/backward,
    # all_gather_no_grad, all_reduce_mean, uneven-shape error); failures propagate
    assert run_distributed(_collectives_worker, world) == list(range(world))


def test_run_distributed_propagates_errors():
    with pytest.raises(DistributedTestError, match="boom from rank 1"):
        run_distributed(_failing_worker, 2, timeout=60)


def test_run_distributed_times_out():
    with pytest.raises(DistributedTestError, match="timed out"):
        run_distributed(_hanging_worker, 2, timeout=4)


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not D.is_dist() and D.world_size() == 1 and D.rank() == 0
    assert D.setup_distributed() == (0, 0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    y = D.all_gather_no_grad(x)
    assert not y.requires_grad and torch.equal(y, x.detach())
    torch.testing.assert_close(D.all_reduce_mean(x), x.detach())
    D.cleanup_distributed()  # no-op
