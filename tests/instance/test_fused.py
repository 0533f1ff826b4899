"""The fused classifier step (selfsup.instance.fused) equals the reference step in float32 to 1e-6.

The reference step is the unfused one: ``cosine_softmax`` leaves the dense row gradient, then
``row_sgd_`` moves the rows and their momentum.  The fused step's backward applies the same update
chunk by chunk.  Compared after two steps (the second one with momentum): the losses, the rows, the
momentum and the features' gradient; for the full softmax and sampled negatives, plain and smoothed
labels, several chunk / tile layouts, rows sharded over 2 gloo ranks, PIC through the engine's TrainStep
with and without train.micro_batch (gradient caching), and small crops on detached rows.
"""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import run_distributed
from selfsup.instance import InstanceClassifier, RowUpdate, Targets, fused_chunk_size, gather_rows, row_sgd_

F32, F64 = torch.float32, torch.float64
N, D, B, K = 3000, 8, 64, 3
LR, MOM, WD = 0.5, 0.9, 1e-3


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _data(step, n=N, b=B, d=D, dtype=F32, smooth=True, n_recent=500):
    g = torch.Generator().manual_seed(10 + step)
    z = torch.randn(b, d, generator=g, dtype=dtype)
    y = torch.randint(0, n, (b,), generator=g)
    s = torch.randint(0, n, (b, K), generator=g) if smooth else None
    recent = torch.randint(0, n, (n_recent,), generator=g)
    return z, y, s, recent


def _steps(fused, mode, alpha, dtype=F32, tau=0.2, chunk=None, steps=2, n=N):
    """Two head steps on one classifier: (losses, rows, momentum, the last step's feature gradient)."""
    clf = InstanceClassifier(n, D, temperature=tau, chunk_size=700, dtype=dtype, seed=1, fused_chunk_size=chunk)
    buf = torch.zeros_like(clf.weight)
    losses = []
    for step in range(steps):
        z, y, s, recent = _data(step, n=n, dtype=dtype, smooth=bool(alpha))
        z.requires_grad_()
        targets = Targets(y, s, alpha)
        rows = clf.shard() if mode == "full" else clf.select(torch.cat([y, recent] + ([s.flatten()] if alpha else [])))
        if fused:
            loss = clf(z, targets, rows, update=RowUpdate(clf.weight, buf, LR, MOM, WD))
            loss.backward()
            assert clf.weight.grad is None and rows.weight.grad is None   # no row gradient exists
        else:
            loss = clf(z, targets, rows)
            loss.backward()
            row_sgd_(clf.weight, buf, rows, LR, MOM, WD)
        losses.append(loss.detach())
    return torch.stack(losses), clf.weight.detach().clone(), buf, z.grad


@pytest.fixture
def two_threads():
    """Two torch threads (on a CPU the fused step runs one row range per thread; see fused._ranges)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["full", "sampled"])
@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("chunk", [None, (1000, 300), (3000, 3000)])   # (1000, 300): two ranges of rows
def test_fused_step_equals_the_reference_step_in_float32(mode, alpha, chunk, two_threads):
    ref = _steps(False, mode, alpha)
    got = _steps(True, mode, alpha, chunk=chunk)
    for a, b in zip(got, ref):
        _close(a, b)
    assert not torch.equal(ref[1], InstanceClassifier(N, D, seed=1).weight.detach())   # the rows really moved


@pytest.mark.parametrize("mode", ["full", "sampled"])
@pytest.mark.parametrize("tau", [0.15, 0.02])   # 0.02: 1/tau > 40, the running-maximum log-sum-exp
def test_fused_step_equals_the_reference_step_in_float64(mode, tau, two_threads):
    ref = _steps(False, mode, 0.2, dtype=F64, tau=tau, n=1000)
    got = _steps(True, mode, 0.2, dtype=F64, tau=tau, chunk=(300, 128), n=1000)
    for a, b in zip(got, ref):
        _close(a, b, 1e-12)


def test_row_ranges_run_in_threads_and_the_thread_count_is_restored(two_threads):
    from selfsup.instance import fused
    from selfsup.instance.fused import _ranges

    cpu = torch.device("cpu")
    assert _ranges(cpu, 3000, 300) == [(0, 1500), (1500, 3000)]
    assert _ranges(cpu, 3000, 1000) == [(0, 3000)]   # under two tiles per range: one range
    for fn in (fused._forward_rows, fused._backward_rows):   # the ranges' loops compile (no GIL in the loop)
        assert isinstance(fused._scripted(fn), torch.jit.ScriptFunction)
    one = _steps(True, "full", 0.2, chunk=(1000, 300))
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    single = _steps(True, "full", 0.2, chunk=(1000, 300))
    for a, b in zip(one, single):   # one range or two: the same step, to rounding
        _close(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_step_under_bf16_autocast_takes_bf16_products_as_the_reference(threads, two_threads):
    """Autocast picks bf16 inputs for the logit products in both paths (float32 softmax and update)."""
    torch.set_num_threads(threads)

    def run(fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _steps(fused, "full", 0.2, chunk=(1000, 300))

    ref, got, f32 = run(False), run(True), _steps(True, "full", 0.2, chunk=(1000, 300))
    for a, b, c in zip(got, ref, f32):
        assert a.dtype == torch.float32
        scale = c.abs().max()
        assert (a - b).abs().max() <= 0.02 * scale and (a - c).abs().max() <= 0.02 * scale   # bf16: ~3 digits
    assert not torch.equal(got[1], f32[1])   # the bf16 products really ran


def test_sampled_fused_step_leaves_other_rows_and_momentum_bit_identical():
    clf = InstanceClassifier(500, D, seed=2)
    buf = torch.randn(500, D)   # a non-zero momentum must not move rows outside the sample
    w0, b0 = clf.weight.detach().clone(), buf.clone()
    z, y, s, recent = _data(0, n=500, b=16, n_recent=20)
    rows = clf.select(torch.cat([y, recent]))
    clf(z, Targets(y), rows, update=RowUpdate(clf.weight, buf, LR, MOM, WD)).backward()
    outside = torch.isin(torch.arange(500), rows.local, invert=True)
    assert torch.equal(clf.weight.detach()[outside], w0[outside]) and torch.equal(buf[outside], b0[outside])
    assert not torch.equal(clf.weight.detach()[rows.local], w0[rows.local])


class _MaxNewNumel(TorchDispatchMode):
    """The largest tensor any aten op creates (outputs that share storage with an input, the in-place
    updates and views of the rows, excluded)."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
               if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                self.max = max(self.max, t.numel())
        return out


def test_fused_step_makes_no_row_gradient_nor_normalised_copy():
    n, b, chunk, tile = 3000, 16, 512, 128
    clf = InstanceClassifier(n, D, seed=3, fused_chunk_size=(chunk, tile))
    buf = torch.zeros_like(clf.weight)
    z, y, s, _ = _data(0, n=n, b=b)
    z.requires_grad_()
    with _MaxNewNumel() as probe:
        clf(z, Targets(y, s, 0.2), update=RowUpdate(clf.weight, buf, LR, MOM, WD)).backward()
    # the chunk's rows (chunk x D), one logit tile (G x tile), the batch's target rows: nothing (N, D)
    assert probe.max <= max(chunk * D, b * tile, b * (1 + K) * D) < n * D
    with _MaxNewNumel() as probe:   # sanity: the probe sees the reference's (N, D) gradient
        clf(z, Targets(y)).backward()
    assert probe.max >= n * D


def test_chunk_size_per_device_and_bad_updates():
    assert fused_chunk_size("cpu", 1024, 128) == (16384, 2048)
    chunk, tile = fused_chunk_size("cpu", 64, 128)
    assert tile == 32768 and chunk == 8 * tile
    clf = InstanceClassifier(50, D)
    z, y, _, _ = _data(0, n=50, b=4)
    with pytest.raises(ValueError, match="equal shape"):
        clf(z, Targets(y), update=RowUpdate(clf.weight, torch.zeros(49, D), LR))
    with pytest.raises(ValueError, match="detach"):
        clf(z, Targets(y), detach=True, update=RowUpdate(clf.weight, torch.zeros(50, D), LR))
    other = InstanceClassifier(50, D)
    with pytest.raises(ValueError, match="this classifier's weight"):
        clf(z, Targets(y), update=RowUpdate(other.weight, torch.zeros(50, D), LR))


# ---------------------------------------------------------------- sharded over 2 gloo ranks

NS, BS = 2001, 8   # N not divisible by the world size; B per rank


def _sharded_worker(rank, world):
    from selfsup.parallel.distributed import all_gather_no_grad

    out = {}
    for mode in ("full", "sampled"):
        for alpha in (0.0, 0.2):
            res = {}
            for fused in (False, True):
                clf = InstanceClassifier(NS, D, temperature=0.15, seed=5, fused_chunk_size=(300, 100))
                buf = torch.zeros_like(clf.weight)
                losses = []
                for step in range(2):
                    z_all, y_all, s_all, recent = _data(step, n=NS, b=world * BS, n_recent=100)
                    sl = slice(rank * BS, (rank + 1) * BS)
                    z = z_all[sl].clone().requires_grad_()
                    gy = all_gather_no_grad(y_all[sl])   # the global batch's targets, gathered once
                    targets = Targets(gy, all_gather_no_grad(s_all[sl]) if alpha else None, alpha)
                    rows = clf.shard() if mode == "full" else clf.select(
                        torch.cat([gy, recent] + ([targets.smooth.flatten()] if alpha else [])))
                    if fused:
                        loss = clf(z, targets, rows, update=RowUpdate(clf.weight, buf, LR, MOM, WD))
                        loss.backward()
                    else:
                        loss = clf(z, targets, rows)
                        loss.backward()
                        row_sgd_(clf.weight, buf, rows, LR, MOM, WD)
                    losses.append(loss.detach())
                res[fused] = (torch.stack(losses), gather_rows(clf.weight, NS), gather_rows(buf, NS), z.grad)
            out[mode, alpha] = res
    return out


def test_sharded_fused_step_equals_the_reference_step_and_one_process():
    outs = run_distributed(_sharded_worker, 2)
    for mode in ("full", "sampled"):
        for alpha in (0.0, 0.2):
            # one process, the whole batch, the reference step
            clf = InstanceClassifier(NS, D, temperature=0.15, seed=5, chunk_size=300)
            buf = torch.zeros_like(clf.weight)
            for step in range(2):
                z_all, y_all, s_all, recent = _data(step, n=NS, b=2 * BS, n_recent=100)
                targets = Targets(y_all, s_all if alpha else None, alpha)
                rows = clf.shard() if mode == "full" else clf.select(
                    torch.cat([y_all, recent] + ([s_all.flatten()] if alpha else [])))
                clf(z_all, targets, rows).backward()
                row_sgd_(clf.weight, buf, rows, LR, MOM, WD)
            for out in outs:
                ref, got = out[mode, alpha][False], out[mode, alpha][True]
                for a, b in zip(got, ref):   # fused == reference on every rank
                    _close(a, b)
                _close(got[1], clf.weight.detach())   # == one process
                _close(got[2], buf)


# ---------------------------------------------------------------- PIC through the engine's step

def _pic(overrides, n=40):
    from selfsup.config import load_config
    from selfsup.methods.pic import PIC

    cfg = load_config(None, ["method=pic", "device=cpu", "model.head_layers=1", "model.proj_dim=4",
                             "train.optimizer=sgd", "train.lr=0.5", "train.warmup_epochs=0",
                             "train.weight_decay=1e-3", "pic.temperature=0.2", *overrides])
    torch.manual_seed(0)
    model = PIC(cfg, nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), 6)   # BN-free: exact under micro-batching
    model.setup(n)
    return cfg, model.train()


def _pic_steps(cfg, model, micro, steps=2, b=8, n=40, size=2):
    from selfsup.engine.step import TrainStep, make_optimizer

    opt, sched = make_optimizer(model, cfg, 10)
    step = TrainStep(model, model, opt, sched, None, micro)
    g = torch.Generator().manual_seed(1)
    losses, fused = [], []
    for _ in range(steps):
        views = [torch.randn(b, 3, size, size, generator=g) for _ in range(model.n_views)]
        out = step.forward_backward(views, torch.randperm(n, generator=g)[:b])
        fused.append(model._pending[2] is not None)   # the row update ran in the backward
        losses.append(out["loss"].detach())
        step.update()
    return torch.stack(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}, fused


@pytest.mark.parametrize("extra", [[], ["pic.negatives=10", "pic.smooth_k=3", "pic.smooth_alpha=0.2"]],
                         ids=["full", "sampled-smoothed"])
@pytest.mark.parametrize("micro", [None, 3])
def test_pic_fused_steps_equal_the_reference_steps_with_and_without_micro_batch(extra, micro):
    cfg, model = _pic(extra)
    fcfg, fmodel = _pic(extra + ["pic.fused=true"])
    ref = _pic_steps(cfg, model, None)
    got = _pic_steps(fcfg, fmodel, micro)
    assert got[2] == [True, True] and ref[2] == [False, False]
    _close(got[0], ref[0])
    assert got[1].keys() == ref[1].keys()
    for k in ref[1]:
        if ref[1][k].is_floating_point():
            _close(got[1][k], ref[1][k])
        else:
            assert torch.equal(got[1][k], ref[1][k]), k
    assert not torch.equal(got[1]["clf.weight"], _pic(extra)[1].clf.weight.detach())


@pytest.mark.parametrize("extra", [[], ["pic.negatives=10"]], ids=["full", "sampled"])
def test_pic_fused_with_small_crops_on_detached_rows(extra):
    """The small crops' heads read the rows in their backward, which runs before the large crop's (the
    fused update): the same step as the reference."""
    crops = ["pic.small_crops=2", "pic.small_size=2", "pic.small_scale=[0.5,1.0]"]
    cfg, model = _pic(extra + crops)
    fcfg, fmodel = _pic(extra + crops + ["pic.fused=true"])
    ref = _pic_steps(cfg, model, None)
    got = _pic_steps(fcfg, fmodel, None)
    assert got[2] == [True, True]
    _close(got[0], ref[0])
    for k in ("clf.weight", "clf_momentum"):
        _close(got[1][k], ref[1][k])


def test_pic_fused_needs_nonfinite_stop():
    from selfsup.errors import ConfigError

    with pytest.raises(ConfigError, match="nonfinite=stop"):
        _pic(["pic.fused=true", "train.nonfinite=skip"])
    _, model = _pic(["pic.fused=true"])   # called without the engine's before_step: the unfused path
    model([torch.randn(4, 3, 2, 2)], torch.arange(4))["loss"].backward()
    assert model.clf.weight.grad is not None
    model.optimizer_step(0.1)
    assert model.clf.weight.grad is None
