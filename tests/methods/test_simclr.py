"""SimCLR: its loss over several processes (negatives gathered from every rank, gradients passed back)
equals one process on the whole batch, and DDP's gradients equal the global batch's."""
import functools

import pytest
import torch

from dist_utils import run_distributed
from selfsup.config import load_config
from selfsup.methods.simclr import SimCLR

NT_B, NT_D, NT_T = 4, 8, 0.1
DDP_B, DDP_DIN, DDP_D, DDP_T = 3, 6, 5, 0.2


def _data(world, b, d, seed):
    """Global batch, identical on every rank (same seed)."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(world * b, d, generator=g, dtype=torch.float64),
        torch.randn(world * b, d, generator=g, dtype=torch.float64),
    )


def linear_simclr(d_in, d, t):
    """SimCLR whose encoder is the identity and head one linear layer (no BN: ranks compare exactly)."""
    cfg = load_config(None, ["method=simclr", "model.head_layers=1", f"model.proj_dim={d}", f"simclr.temperature={t}"])
    torch.manual_seed(0)  # same initial weights on all ranks
    return SimCLR(cfg, torch.nn.Identity(), d_in).double()


def _ntxent_worker(rank, world, b, d, t):
    """SimCLR's loss on this rank's slice of a global batch (negatives gathered from every rank); the
    loss and the gradients of the inputs."""
    x1_all, x2_all = _data(world, b, d, seed=world * 10 + b)
    sl = slice(rank * b, (rank + 1) * b)
    x1 = x1_all[sl].clone().requires_grad_()
    x2 = x2_all[sl].clone().requires_grad_()
    loss = linear_simclr(d, d, t)([x1, x2], torch.arange(b))["loss"]
    loss.backward()
    return loss.item(), x1.grad, x2.grad


def _ddp_worker(rank, world, b, d_in, d, t):
    """SimCLR's head under DDP: parameter gradients equal those of the global-batch loss."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = linear_simclr(d_in, d, t)
    ddp = DDP(model)
    x1_all, x2_all = _data(world, b, d_in, seed=123)
    sl = slice(rank * b, (rank + 1) * b)
    ddp([x1_all[sl], x2_all[sl]], torch.arange(b))["loss"].backward()
    return model.head[0].weight.grad, model.head[0].bias.grad


def _all_checks_worker(rank, world, with_ddp):
    """One spawn per world size (process start-up dominates): every check, the ranks' results."""
    out = {"nt_xent": _ntxent_worker(rank, world, NT_B, NT_D, NT_T)}
    if with_ddp:  # constructing DDP imports torch._dynamo (~5 s on 2 cores): world 2 only
        out["ddp"] = _ddp_worker(rank, world, DDP_B, DDP_DIN, DDP_D, DDP_T)
    return out


@functools.lru_cache(maxsize=None)
def _results(world):
    """Spawn once per world size and share the per-rank results between the tests."""
    return run_distributed(_all_checks_worker, world, world == 2)


WORLDS = pytest.mark.parametrize("world", [2, 3])


@WORLDS
def test_distributed_simclr_loss_matches_single_process(world):
    results = _results(world)
    b, d, t = NT_B, NT_D, NT_T
    z1_all, z2_all = _data(world, b, d, seed=world * 10 + b)
    z1_all.requires_grad_(), z2_all.requires_grad_()
    single = linear_simclr(d, d, t)([z1_all, z2_all], torch.arange(world * b))["loss"]
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
    model = linear_simclr(DDP_DIN, DDP_D, DDP_T)
    x1, x2 = _data(world, DDP_B, DDP_DIN, seed=123)
    model([x1, x2], torch.arange(world * DDP_B))["loss"].backward()
    for res in results:
        gw, gb = res["ddp"]
        torch.testing.assert_close(gw, model.head[0].weight.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(gb, model.head[0].bias.grad, rtol=0, atol=1e-10)
