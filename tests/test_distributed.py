import functools
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import DistributedTestError, run_distributed
from selfsup.losses import nt_xent
from selfsup.parallel import distributed as D


def _data(world, b, d, seed):
    """Global batch, identical on every rank (same seed)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(world * b, d, generator=g, dtype=torch.float64),
        torch.randn(world * b, d, generator=g, dtype=torch.float64),
    )


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


def _ntxent_worker(rank, world, b, d, t):
    """Distributed nt_xent on this rank's slice of a global batch; loss and input gradients."""
    z1_all, z2_all = _data(world, b, d, seed=world * 10 + b)
    sl = slice(rank * b, (rank + 1) * b)
    z1 = z1_all[sl].clone().requires_grad_()
    z2 = z2_all[sl].clone().requires_grad_()
    loss = nt_xent(z1, z2, t)
    loss.backward()
    return loss.item(), z1.grad, z2.grad


def _ddp_worker(rank, world, b, d_in, d, t):
    """DDP on a linear projector: parameter gradients equal those of the global-batch loss."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)  # same initial weights on all ranks
    model = torch.nn.Linear(d_in, d).double()
    ddp = DDP(model)
    x1_all, x2_all = _data(world, b, d_in, seed=123)
    sl = slice(rank * b, (rank + 1) * b)
    h = ddp(torch.cat([x1_all[sl], x2_all[sl]]))
    loss = nt_xent(h[:b], h[b:], t)
    loss.backward()
    return model.weight.grad, model.bias.grad


NT_B, NT_D, NT_T = 4, 8, 0.1
DDP_B, DDP_DIN, DDP_D, DDP_T = 3, 6, 5, 0.2


def _all_checks_worker(rank, world, with_ddp):
    """One spawn per world size (process start-up dominates): run every check, return results."""
    out = {"collectives": _collectives_worker(rank, world), "nt_xent": _ntxent_worker(rank, world, NT_B, NT_D, NT_T)}
    if with_ddp:  # constructing DDP imports torch._dynamo (~5 s on 2 cores): world 2 only
        out["ddp"] = _ddp_worker(rank, world, DDP_B, DDP_DIN, DDP_D, DDP_T)
    return out


def _failing_worker(rank, world):
    if rank == 1:
        raise RuntimeError("boom from rank 1")
    dist.barrier()  # rank 0 would block here forever


def _hanging_worker(rank, world):
    time.sleep(60)


# ---------------------------------------------------------------- tests


@functools.lru_cache(maxsize=None)
def _results(world):
    """Spawn once per world size and share the per-rank results between the tests."""
    return run_distributed(_all_checks_worker, world, world == 2)


WORLDS = pytest.mark.parametrize("world", [2, 3])


@WORLDS
def test_collectives(world):
    # the assertions run inside the ranks (all_gather_with_grad forward/backward,
    # all_gather_no_grad, all_reduce_mean, uneven-shape error); failures propagate
    results = _results(world)
    assert [r["collectives"] for r in results] == list(range(world))


@WORLDS
def test_distributed_nt_xent_matches_single_process(world):
    results = _results(world)
    b, d, t = NT_B, NT_D, NT_T
    z1_all, z2_all = _data(world, b, d, seed=world * 10 + b)
    z1_all.requires_grad_(), z2_all.requires_grad_()
    single = nt_xent(z1_all, z2_all, t)
    single.backward()

    # global mean loss == mean of the ranks' local-anchor means (equal B)
    losses = torch.tensor([r["nt_xent"][0] for r in results], dtype=torch.float64)
    assert abs(losses.mean().item() - single.item()) < 1e-12
    # each rank's gradient is d(sum_r L_r)/dz_r = world * dL/dz_r; DDP's 1/world averaging restores dL/dtheta
    for r, res in enumerate(results):
        _, g1, g2 = res["nt_xent"]
        sl = slice(r * b, (r + 1) * b)
        torch.testing.assert_close(g1, world * z1_all.grad[sl], rtol=0, atol=1e-10)
        torch.testing.assert_close(g2, world * z2_all.grad[sl], rtol=0, atol=1e-10)


def test_ddp_parameter_gradients_equal_global_loss_gradient():
    world = 2  # constructing DDP is slow (imports torch._dynamo): one world size only
    results = _results(world)
    torch.manual_seed(0)
    model = torch.nn.Linear(DDP_DIN, DDP_D).double()
    x1, x2 = _data(world, DDP_B, DDP_DIN, seed=123)
    nt_xent(model(x1), model(x2), DDP_T).backward()
    for res in results:
        gw, gb = res["ddp"]
        torch.testing.assert_close(gw, model.weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(gb, model.bias.grad, rtol=0, atol=1e-10)


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
