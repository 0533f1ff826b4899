"""The instance classifier (selfsup.instance): chunked / sharded cosine softmax, sampled negatives,
the row update PIC runs, recent-instance FIFO, top-K hardest classes, contrastive prior.

References are written plainly in float64 (``cosine_softmax_reference``: F.normalize +
log_softmax over the whole logit matrix, plain autograd; ``torch.optim.SGD``; a brute-force
top-K).  The sharded checks run in 2 and 3 gloo processes (one spawn per world size).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist_utils import run_distributed
from selfsup.instance import (
    InstanceClassifier,
    RecentInstances,
    Rows,
    Targets,
    cosine_softmax,
    gather_rows,
    row_sgd_,
    shard_range,
    sparse_sgd_,
    topk_similar,
)

F64 = torch.float64


def cosine_softmax_reference(z, weight, target, temperature, smooth_index=None, alpha=0.0, candidates=None):
    """Plain-autograd reference of cosine_softmax (one process, materialises ``B x |C|``).

    Args:
        z: ``(B, D)`` features; weight: ``(N, D)`` all rows; target: ``(B,)``.
        smooth_index, alpha: smoothed-label ids (B, K) and their mass.
        candidates: optional ``(S,)`` global row ids (softmax restricted to
            these rows; must contain the targets and smoothed-label indices).

    Returns:
        Scalar mean over the batch of ``-sum_j q_ij log_softmax(cos(w_j, z_i) / tau)_j``.
    """
    dtype = torch.promote_types(torch.promote_types(z.dtype, weight.dtype), torch.float32)
    ids = torch.arange(weight.shape[0], device=z.device) if candidates is None else torch.unique(candidates)
    logits = F.normalize(z.to(dtype), dim=1) @ F.normalize(weight[ids].to(dtype), dim=1).T / temperature
    logp = torch.log_softmax(logits, dim=1)
    q = torch.zeros_like(logp)
    rows_ = torch.arange(z.shape[0], device=z.device)
    q[rows_, torch.searchsorted(ids, target)] += 1.0 - (alpha if smooth_index is not None else 0.0)
    if smooth_index is not None and alpha != 0.0:
        k = smooth_index.shape[1]
        q.index_put_((rows_[:, None].expand_as(smooth_index), torch.searchsorted(ids, smooth_index)),
                     torch.full(smooth_index.shape, alpha / k, dtype=dtype, device=z.device), accumulate=True)
    return -(q * logp).sum(1).mean()


def cs(z, w, y, tau, s=None, alpha=0.0, ids=None, **kw):
    """cosine_softmax on rows `w` (global ids `ids`, or 0..m-1) and targets y (smoothed: s, alpha)."""
    return cosine_softmax(z, Rows(w, ids=ids), Targets(y, s, alpha), tau, **kw)


def _problem(b, n, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=g, dtype=F64)
    w = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randint(0, n, (b,), generator=g)
    s = torch.randint(0, n, (b, k), generator=g)
    return z, w, y, s


def _grads(loss_fn, z, w):
    z, w = z.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(z, w)
    gz, gw = torch.autograd.grad(loss, (z, w))
    return loss.detach(), gz, gw


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=0, atol=tol)


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_chunked_loss_and_gradients_match_float64_reference(alpha):
    z, w, y, s = _problem(7, 23, 5, 3, seed=1)
    si = s if alpha else None
    ref = _grads(lambda z, w: cosine_softmax_reference(z, w, y, 0.15, si, alpha), z, w)
    # the reference really is the plain formula: -sum_j q_ij log softmax_j
    logits = F.normalize(z, dim=1) @ F.normalize(w, dim=1).T / 0.15
    q = torch.zeros_like(logits)
    for i in range(7):
        q[i, y[i]] += 1 - alpha
        for j in s[i]:
            q[i, j] += alpha / 3
    _close(ref[0], -(q * logits.log_softmax(1)).sum(1).mean())
    for chunk in (1, 4, 7, 22, 23, 1000):  # N = 23 is not a multiple of 4, 7, 22
        got = _grads(lambda z, w: cs(z, w, y, 0.15, si, alpha, chunk_size=chunk), z, w)
        for a, b in zip(got, ref):
            _close(a, b, 1e-12)


def test_gradcheck_tiny():
    z, w, y, s = _problem(3, 5, 4, 2, seed=2)
    z.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z, w: cs(z, w, y, 0.5, s, 0.3, chunk_size=2), (z, w))


def test_sampled_negatives_equal_softmax_restricted_to_candidates():
    z, w, y, s = _problem(6, 40, 5, 2, seed=3)
    cand = torch.unique(torch.cat([y, s.flatten(), torch.tensor([0, 7, 13, 39])]))
    for alpha, si in ((0.0, None), (0.25, s)):
        ref = _grads(lambda z, w: cosine_softmax_reference(z, w, y, 0.2, si, alpha, candidates=cand), z, w)
        got = _grads(lambda z, r: cs(z, r, y, 0.2, si, alpha, ids=cand, chunk_size=3), z, w[cand])
        _close(got[0], ref[0], 1e-12)
        _close(got[1], ref[1], 1e-12)
        _close(got[2], ref[2][cand], 1e-12)
        assert ref[2][torch.isin(torch.arange(40), cand, invert=True)].abs().max() == 0


def test_float32_and_bfloat16_inputs():
    z, w, y, _ = _problem(8, 30, 16, 1, seed=4)
    ref = cosine_softmax_reference(z, w, y, 0.2)
    out = cs(z.float(), w.float(), y, 0.2, chunk_size=8)
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 1e-5
    out = cs(z.bfloat16(), w.float(), y, 0.2, chunk_size=8)
    assert out.dtype == torch.float32 and abs(out.item() - ref.item()) < 0.05


def test_bf16_matmul_path_matches_float32_and_follows_autocast():
    z, w, y, s = _problem(32, 300, 16, 3, seed=9)
    z, w = z.float(), w.float()

    def run(**kw):
        return _grads(lambda z, w: cs(z, w, y, 0.2, s, 0.2, chunk_size=64, **kw), z, w)

    ref = run()
    got = run(matmul_dtype=torch.bfloat16)  # bf16 inputs of the three logit matmuls, float32 softmax / sums
    assert got[0].dtype == torch.float32
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()  # bf16: ~3 significant digits
    assert not torch.equal(got[2], ref[2])  # the bf16 path really ran
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the same path (backward inside too)
        auto = run()
    for a, b in zip(auto, got):
        assert torch.equal(a, b)
    z64, w64, _, _ = _problem(32, 300, 16, 3, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 inputs: autocast leaves them alone
        _close(cs(z64, w64, y, 0.2), cosine_softmax_reference(z64, w64, y, 0.2), 1e-12)


def test_target_check_without_host_sync_gives_nan_loss():
    z, w, y, _ = _problem(4, 10, 3, 1, seed=10)
    bad = torch.tensor([0, 1, 2, 10])
    assert torch.isnan(cs(z, w, bad, 0.2, check_targets=False))  # the default off CPU (CUDA)
    assert torch.isfinite(cs(z, w, y, 0.2, check_targets=False))
    with pytest.raises(ValueError, match="not among"):
        cs(z, w, bad, 0.2, check_targets=True)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any aten op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_chunked_path_never_materialises_the_logit_matrix():
    b, n, d, chunk = 16, 3000, 4, 64
    z, w, y, s = _problem(b, n, d, 2, seed=5)
    z.requires_grad_(), w.requires_grad_()
    with _MaxNumel() as mode:
        cs(z, w, y, 0.2, s, 0.1, chunk_size=chunk).backward()
    assert mode.max <= n * d  # the (N, D) row gradient; the full logits would be b * n = 12 * n * d
    with _MaxNumel() as mode:
        cosine_softmax_reference(z, w, y, 0.2).backward()
    assert mode.max >= b * n  # sanity: the probe sees the reference's full matrix


def test_bad_inputs_raise_value_errors():
    z, w, y, s = _problem(4, 10, 3, 2, seed=6)
    with pytest.raises(ValueError, match="equal D"):
        cs(z, w[:, :2], y, 0.2)
    with pytest.raises(ValueError, match="targets.ids"):   # not the global batch's B targets
        cs(z, w, y[:3], 0.2)
    with pytest.raises(ValueError, match="targets.smooth"):
        cs(z, w, y, 0.2, s[:, 0], 0.1)
    with pytest.raises(ValueError, match="needs targets.smooth"):
        cs(z, w, y, 0.2, None, 0.1)
    with pytest.raises(ValueError, match="rows.ids"):
        cs(z, w, y, 0.2, ids=torch.arange(9))
    with pytest.raises(ValueError, match="not among"):
        cs(z, w, torch.tensor([0, 1, 2, 10]), 0.2)
    cand = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="not among"):  # target outside the sampled set
        cs(z, w[cand], torch.tensor([0, 1, 2, 5]), 0.2, ids=cand)
    with pytest.raises(ValueError, match="not among"):  # smoothed-label class outside the sampled set
        cs(z, w[cand], torch.tensor([0, 1, 2, 3]), 0.2, torch.tensor([[1], [2], [3], [9]]), 0.1, ids=cand)
    clf = InstanceClassifier(10, 3, smooth_k=2)
    with pytest.raises(ValueError, match="refresh_hard_classes_"):
        clf.smooth_index(y)
    with pytest.raises(ValueError, match="features"):
        clf.init_from_features_(torch.zeros(9, 3))
    with pytest.raises(ValueError, match="candidate ids"):
        clf.select(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="world"):
        InstanceClassifier(10, 3, world=2, rank=0)(z.float(), Targets(y))


def test_shard_range_tiles_rows_evenly():
    for n in (0, 1, 5, 23, 24):
        for world in (1, 2, 3, 7):
            ranges = [shard_range(n, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        shard_range(5, 2, 2)


def test_initialisation_is_shard_invariant_and_unit_norm():
    n = 70_000  # crosses an init block boundary (65536 rows)
    full = InstanceClassifier(n, 2, seed=3).weight.detach()
    _close(full.double().norm(dim=1), torch.ones(n, dtype=F64), 1e-6)
    for r in range(3):
        part = InstanceClassifier(n, 2, seed=3, world=3, rank=r)
        assert torch.equal(part.weight.detach(), full[part.start : part.end])


def test_contrastive_prior_init_equals_normalised_features():
    feats = torch.randn(11, 4, dtype=F64)
    clf = InstanceClassifier(11, 4, dtype=F64).init_from_features_(feats)
    _close(clf.weight.detach(), F.normalize(feats, dim=1), 0)
    shard = InstanceClassifier(11, 4, dtype=F64, world=3, rank=1)
    s, e = shard.start, shard.end
    _close(shard.init_from_features_(feats).weight.detach(), F.normalize(feats[s:e], dim=1), 0)
    _close(shard.init_from_features_(feats[s:e] * 3).weight.detach(), F.normalize(feats[s:e], dim=1), 1e-15)


def _dense_sgd_reference(w, buf, grad, lr, momentum, wd):
    """torch.optim.SGD on the restricted problem (rows in S only), starting from the given momentum."""
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, weight_decay=wd)
    if buf is not None:
        opt.state[p]["momentum_buffer"] = buf.clone()
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt.state[p]["momentum_buffer"]


def test_sampled_row_update_touches_only_sampled_rows_and_matches_dense_sgd():
    n, d, lr, wd = 30, 4, 0.5, 1e-2
    clf = InstanceClassifier(n, d, dtype=F64, seed=1)
    buf = torch.zeros_like(clf.weight)
    z, _, y, _ = _problem(5, n, d, 1, seed=7)
    recent = torch.tensor([3, 4, 20, 21, 22])
    for step, extra in enumerate((recent, recent + 1)):  # overlapping sets: second step has momentum
        sel = clf.select(torch.cat([y, extra]))
        assert torch.equal(sel.ids, torch.unique(torch.cat([y, extra]))) and torch.equal(sel.local, sel.ids)
        clf(z, Targets(y), sel).backward()
        w0, b0 = clf.weight.detach().clone(), buf.clone()
        ref_w, ref_b = _dense_sgd_reference(w0[sel.local], b0[sel.local] if step else None,
                                            sel.weight.grad, lr, 0.9, wd)
        row_sgd_(clf.weight, buf, sel, lr, 0.9, wd)
        outside = torch.isin(torch.arange(n), sel.local, invert=True)
        assert torch.equal(clf.weight.detach()[outside], w0[outside])  # bit-identical, weights
        assert torch.equal(buf[outside], b0[outside])  # and momentum
        _close(clf.weight.detach()[sel.local], ref_w, 1e-15)
        _close(buf[sel.local], ref_b, 1e-15)
    # rows that took no part in a step (no gradient): nothing moves
    before, b_before = clf.weight.detach().clone(), buf.clone()
    row_sgd_(clf.weight, buf, clf.select(y), lr, 0.9, wd)
    row_sgd_(clf.weight, buf, clf.shard(), lr, 0.9, wd)
    assert torch.equal(clf.weight.detach(), before) and torch.equal(buf, b_before)


def test_sparse_sgd_function_rule():
    w = torch.randn(6, 3, dtype=F64)
    buf = torch.randn(6, 3, dtype=F64)
    idx, g = torch.tensor([4, 1]), torch.randn(2, 3, dtype=F64)
    w0, b0 = w.clone(), buf.clone()
    sparse_sgd_(w, buf, idx, g, lr=0.1, momentum=0.9, weight_decay=0.01)
    exp_b = 0.9 * b0[idx] + g + 0.01 * w0[idx]
    _close(buf[idx], exp_b, 1e-15)
    _close(w[idx], w0[idx] - 0.1 * exp_b, 1e-15)
    with pytest.raises(ValueError, match="bad shapes"):
        sparse_sgd_(w, buf, idx, g[:1], lr=0.1)


def test_full_softmax_row_update_is_torch_sgd_on_the_reference_gradient():
    n, d = 12, 4
    clf = InstanceClassifier(n, d, temperature=0.2, chunk_size=5, dtype=F64)
    w0 = clf.weight.detach().clone()
    z, _, y, _ = _problem(6, n, d, 1, seed=8)
    buf = torch.zeros_like(clf.weight)
    for step in range(2):   # the second step has momentum
        w_before, b_before = clf.weight.detach().clone(), buf.clone()
        clf(z, Targets(y)).backward()
        ref = _grads(lambda z, w: cosine_softmax_reference(z, w, y, 0.2), z, w_before)
        ref_w, ref_b = _dense_sgd_reference(w_before, b_before if step else None, ref[2], 0.3, 0.9, 1e-4)
        row_sgd_(clf.weight, buf, clf.shard(), 0.3, 0.9, 1e-4)
        assert clf.weight.grad is None   # consumed
        _close(clf.weight.detach(), ref_w, 1e-14)
        _close(buf, ref_b, 1e-14)
    assert not torch.equal(clf.weight.detach(), w0)
    # small crops: detached rows train the encoder only
    zz = z.clone().requires_grad_()
    clf(zz, Targets(y), detach=True).backward()
    assert clf.weight.grad is None and zz.grad is not None


def test_recent_instances_fifo_order_candidates_and_state_dict():
    fifo = RecentInstances(5)
    assert len(fifo) == 0 and fifo.recent().numel() == 0
    fifo.push(torch.tensor([1, 2, 3]))
    assert fifo.recent().tolist() == [1, 2, 3]
    fifo.push(torch.tensor([4, 5, 6]))  # wraps: 1 is the oldest and goes
    assert fifo.recent().tolist() == [2, 3, 4, 5, 6] and len(fifo) == 5
    fifo.push(torch.tensor([7, 2]))
    assert fifo.recent().tolist() == [4, 5, 6, 7, 2]
    assert fifo.candidates(torch.tensor([9, 4]), None, torch.tensor([[0, 9]])).tolist() == [0, 2, 4, 5, 6, 7, 9]
    fifo.push(torch.arange(10, 22))  # longer than the FIFO: the last 5 remain
    assert fifo.recent().tolist() == [17, 18, 19, 20, 21]
    fifo.push(torch.tensor([30, 31]))
    restored = RecentInstances(5)
    restored.load_state_dict(fifo.state_dict())
    assert restored.recent().tolist() == fifo.recent().tolist() == [19, 20, 21, 30, 31]
    restored.push(torch.tensor([40]))
    fifo.push(torch.tensor([40]))
    assert restored.recent().tolist() == fifo.recent().tolist()
    with pytest.raises(ValueError):
        fifo.push(torch.tensor([1.0]))


def _topk_bruteforce(w, k):
    wn = F.normalize(w, dim=1)
    sims = wn @ wn.T
    sims.fill_diagonal_(float("-inf"))
    return sims.topk(k, dim=1)


def test_topk_hardest_classes_match_bruteforce():
    w = torch.randn(37, 6, dtype=F64)
    rv, ri = _topk_bruteforce(w, 4)
    q = torch.tensor([0, 5, 36, 17])
    v, i = topk_similar(w, q, 4, chunk_size=5)
    assert torch.equal(i, ri[q]) and not (i == q[:, None]).any()
    _close(v, rv[q], 1e-14)
    clf = InstanceClassifier(37, 6, dtype=F64, smooth_k=4, chunk_size=5)
    clf.init_from_features_(w)
    clf.refresh_hard_classes_(q)
    assert torch.equal(clf.hard_classes[q], ri[q]) and (clf.hard_classes[1] == -1).all()
    clf.refresh_hard_classes_(query_chunk=8)  # all rows
    assert torch.equal(clf.hard_classes, ri)
    assert torch.equal(clf.smooth_index(torch.tensor([3, 3])), ri[[3, 3]])
    with pytest.raises(ValueError, match="k must be"):
        topk_similar(w, q, 37)


# ---------------------------------------------------------------- sharded (gloo processes)

B, N, D, K, TAU, CHUNK, ALPHA = 4, 23, 6, 3, 0.15, 4, 0.2  # N = 23: not divisible by 2 or 3
RECENT = [5, 6, 7, 8, 2, 19, 20]


def _global_data(world):
    g = torch.Generator().manual_seed(100 + world)
    z = torch.randn(world * B, D, generator=g, dtype=F64)
    y = torch.randint(0, N, (world * B,), generator=g)
    y[1] = y[0]  # a duplicate target in the global batch
    s = torch.randint(0, N, (world * B, K), generator=g)
    feats = torch.randn(N, D, generator=g, dtype=F64)
    return z, y, s, feats


def _sharded_worker(rank, world, with_ddp):
    from selfsup.parallel.distributed import all_gather_no_grad

    z_all, y_all, s_all, feats = _global_data(world)
    sl = slice(rank * B, (rank + 1) * B)
    out = {}
    clf = InstanceClassifier(N, D, temperature=TAU, chunk_size=CHUNK, smooth_k=K, seed=7, dtype=F64)
    assert (clf.world, clf.rank) == (world, rank)
    out["range"] = (clf.start, clf.end)
    out["init"] = clf.weight.detach().clone()
    gy = all_gather_no_grad(y_all[sl])   # the global batch's targets, gathered once (as PIC does)
    assert torch.equal(gy, y_all)
    for alpha in (0.0, ALPHA):
        targets = Targets(gy, all_gather_no_grad(s_all[sl]) if alpha else None, alpha)
        for scale in (True, False):  # full softmax
            z = z_all[sl].clone().requires_grad_()
            clf.weight.grad = None
            loss = clf(z, targets, ddp_grad_scale=scale)
            loss.backward()
            out["full", alpha, scale] = (loss.item(), z.grad, clf.weight.grad.clone())
        # sampled negatives: FIFO of recent ids + the global batch's targets (+ smoothed-label classes)
        fifo = RecentInstances(6)
        fifo.push(torch.tensor(RECENT))
        cand = fifo.candidates(targets.ids, targets.smooth)
        sel = clf.select(cand)
        z = z_all[sl].clone().requires_grad_()
        loss = clf(z, targets, sel, ddp_grad_scale=False)
        loss.backward()
        out["sampled", alpha] = (loss.item(), z.grad, sel.ids, sel.weight.grad, cand)
    # the sampled row update on the shard, then the full weight / momentum reassembled
    buf = torch.zeros_like(clf.weight)
    row_sgd_(clf.weight, buf, sel, 0.5, 0.9, 0.01)
    out["after_step"] = (gather_rows(clf.weight, N), gather_rows(buf, N))
    # a target outside the sampled set: every rank raises (nobody hangs)
    try:
        clf(z_all[sl], Targets(torch.zeros(world * B, dtype=torch.long)), clf.select(torch.tensor([1, 2, 3])))
    except ValueError as e:
        out["error"] = str(e)
    # top-K hardest classes: per-shard top-K + global merge
    clf.init_from_features_(feats)
    out["prior"] = clf.weight.detach().clone()
    clf.refresh_hard_classes_(y_all[:3])
    out["topk_q"] = clf.hard_classes.clone()
    clf.refresh_hard_classes_(query_chunk=5)
    out["topk_all"] = clf.hard_classes.clone()
    if with_ddp:
        out["ddp"] = _ddp_part(rank, world, clf)
    return out


def _ddp_part(rank, world, clf):
    """Encoder under DDP + sharded classifier outside it: grads equal the one-process global-batch grads."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    enc = torch.nn.Linear(5, D).double()
    ddp = DDP(enc)
    g = torch.Generator().manual_seed(5)
    x_all = torch.randn(world * B, 5, generator=g, dtype=F64)
    _, y_all, s_all, _ = _global_data(world)
    sl = slice(rank * B, (rank + 1) * B)
    clf.weight.grad = None
    loss = clf(ddp(x_all[sl]), Targets(y_all, s_all, ALPHA))  # default ddp_grad_scale=True
    loss.backward()
    return loss.item(), enc.weight.grad, enc.bias.grad, clf.weight.grad.clone()


@functools.lru_cache(maxsize=None)
def _sharded(world):
    return run_distributed(_sharded_worker, world, world == 2)  # DDP import is slow: world 2 only


def _single_weight():
    clf = InstanceClassifier(N, D, temperature=TAU, chunk_size=CHUNK, seed=7, dtype=F64)
    return clf.weight.detach().clone()


WORLDS = pytest.mark.parametrize("world", [2, 3])


@WORLDS
def test_sharded_full_softmax_equals_one_process(world):
    res = _sharded(world)
    z_all, y_all, s_all, _ = _global_data(world)
    w = _single_weight()
    assert [r["range"] for r in res] == [shard_range(N, world, r) for r in range(world)]
    for alpha in (0.0, ALPHA):
        loss, gz, gw = _grads(lambda z, w: cosine_softmax_reference(z, w, y_all, TAU, s_all if alpha else None,
                                                                    alpha), z_all, w)
        for r, out in enumerate(res):
            s, e = out["range"]
            assert torch.equal(out["init"], w[s:e])  # shard = slice of the one-process init
            for scale in (True, False):
                l_r, gz_r, gw_r = out["full", alpha, scale]
                assert abs(l_r - loss.item()) < 1e-12  # every rank: the global mean loss
                # features: world * dL/dz (DDP averages it back) or exactly dL/dz
                _close(gz_r, (world if scale else 1) * gz[r * B : (r + 1) * B], 1e-10)
                _close(gw_r, gw[s:e], 1e-10)  # shard rows: exact, never scaled


@WORLDS
def test_sharded_sampled_negatives_equal_one_process(world):
    res = _sharded(world)
    z_all, y_all, s_all, _ = _global_data(world)
    w = _single_weight()
    for alpha in (0.0, ALPHA):
        cand = res[0]["sampled", alpha][4]
        expected = set(RECENT[-6:]) | set(y_all.tolist()) | (set(s_all.flatten().tolist()) if alpha else set())
        assert cand.tolist() == sorted(expected)
        loss, gz, gw = _grads(lambda z, w: cosine_softmax_reference(z, w, y_all, TAU, s_all if alpha else None,
                                                                    alpha, candidates=cand), z_all, w)
        ids_seen = []
        for r, out in enumerate(res):
            l_r, gz_r, ids, grows, cand_r = out["sampled", alpha]
            s, e = out["range"]
            assert torch.equal(cand_r, cand) and ((ids >= s) & (ids < e)).all()
            ids_seen.append(ids)
            assert abs(l_r - loss.item()) < 1e-12
            _close(gz_r, gz[r * B : (r + 1) * B], 1e-10)
            _close(grows, gw[ids], 1e-10)
        assert torch.equal(torch.cat(ids_seen), cand)  # every candidate handled by exactly one rank


@WORLDS
def test_sharded_sparse_step_equals_one_process_step(world):
    res = _sharded(world)
    z_all, y_all, s_all, _ = _global_data(world)
    clf = InstanceClassifier(N, D, temperature=TAU, chunk_size=CHUNK, seed=7, dtype=F64)
    cand = res[0]["sampled", ALPHA][4]
    sel = clf.select(cand)
    clf(z_all, Targets(y_all, s_all, ALPHA), sel).backward()
    buf = torch.zeros_like(clf.weight)
    row_sgd_(clf.weight, buf, sel, 0.5, 0.9, 0.01)
    for out in res:
        w_r, b_r = out["after_step"]
        _close(w_r, clf.weight.detach(), 1e-10)
        _close(b_r, buf, 1e-10)
    assert all("not among" in out["error"] for out in res)


@WORLDS
def test_sharded_topk_merge_and_prior_equal_unsharded(world):
    res = _sharded(world)
    _, y_all, _, feats = _global_data(world)
    _, ri = _topk_bruteforce(feats, K)
    q = torch.unique(y_all[:3])
    for out in res:
        s, e = out["range"]
        _close(out["prior"], F.normalize(feats[s:e], dim=1), 0)
        assert torch.equal(out["topk_q"][q], ri[q])
        assert (out["topk_q"][torch.isin(torch.arange(N), q, invert=True)] == -1).all()
        assert torch.equal(out["topk_all"], ri)


def test_ddp_encoder_and_shard_gradients_equal_global_batch_gradients():
    world = 2
    res = _sharded(world)
    z_all, y_all, s_all, feats = _global_data(world)
    torch.manual_seed(0)
    enc = torch.nn.Linear(5, D).double()
    x_all = torch.randn(world * B, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    w = F.normalize(feats, dim=1).requires_grad_()  # the ranks ran this after init_from_features_
    loss = cosine_softmax_reference(enc(x_all), w, y_all, TAU, s_all, ALPHA)
    loss.backward()
    for out in res:
        l_r, gw_enc, gb_enc, g_shard = out["ddp"]
        s, e = out["range"]
        assert abs(l_r - loss.item()) < 1e-12
        _close(gw_enc, enc.weight.grad, 1e-10)  # DDP average of world * dL/dz_local: exact, no extra scaling
        _close(gb_enc, enc.bias.grad, 1e-10)
        _close(g_shard, w.grad[s:e], 1e-10)


# ---------------------------------------------------------------- benchmark entry point (smoke only)


def test_bench_classifier_run_smoke(tmp_path):
    from selfsup.bench.classifier import run

    out = tmp_path / "bench.json"
    res = run({"quick": True, "ns": [50], "dim": 4, "batch": 8, "num_recent": 16, "sharded_world": 1,
               "repeats": 1, "out": str(out)})
    assert [(r["n"], r["mode"], r["world"], r["path"], r["candidates"]) for r in res["rows"]] == [
        (50, "full", 1, "fused", 50), (50, "full", 1, "reference", 50),
        (50, "sampled", 1, "fused", 24), (50, "sampled", 1, "reference", 24)]
    assert out.exists() and "step ms" in res["table"] and "ratio" in res["table"] and "path" in res["table"]
    for r in res["rows"]:
        assert r["bound_ms"] > 0 and r["ratio"] > 0
        assert (r["chunk"] is not None) == (r["path"] == "fused")
    for fused, ref in zip(res["rows"][::2], res["rows"][1::2]):   # the same first steps: the same loss
        assert abs(fused["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
    dev = res["device"]
    assert dev["bandwidth_gbs"] > 0 and dev["matmul_tflops"] > 0 and dev["matmul_dtype"] == "float32"
    assert any(n.startswith("target:") for n in res["notes"])
    with pytest.raises(ValueError, match="unknown benchmark settings"):
        run({"bogus": 1})
