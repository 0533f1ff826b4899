"""Cosine-softmax instance classification over N rows, chunked and optionally sharded.

This module holds the numerical core of the instance classifier of PIC (Cao et
al. 2020) and of the one-million-way classifier (Liu et al. 2021; its sampled
negatives and smoothed labels on the hardest classes are the ``C`` and
``alpha, K`` below): functions of tensors, no module state.  The sections
below are the whole derivation: the loss and its gradient, chunking, sharding
and the gradient scaling under DDP.
:mod:`selfsup.instance.rows` holds the rows as a (sharded) module and the
recent-instance FIFO; :mod:`selfsup.instance.optim` the row update.

The loss
--------
For features ``z_i`` (``i`` over the GLOBAL batch of ``G = world * B``
samples), rows ``w_j`` (``j`` over a candidate set ``C``: all ``N`` rows, or a
sampled subset), temperature ``tau``::

    l_ij = cos(w_j, z_i) / tau
    L_i  = logsumexp_{j in C} l_ij - [(1 - alpha) l_{i,y_i} + (alpha / K) sum_k l_{i,s_ik}]
    L    = (1 / G) sum_i L_i

``y_i`` is the target row, ``s_i`` (``K`` entries) the smoothed-label rows
(``alpha = 0``: plain cross entropy).  The bracket is ``sum_j q_ij l_ij`` for
the target distribution ``q`` (``1 - alpha`` on ``y_i``, ``alpha / K`` on each
listed ``s_ik``; duplicates add up), so ``dL/dl_ij = (p_ij - q_ij) / G`` with
``p = softmax_C(l)``.

Chunking
--------
The ``G x |C|`` logit matrix is never materialised: the rows are processed in
chunks of ``chunk_size`` with an online max / sum-of-exp (forward), and the
backward recomputes each chunk's logits from the saved normalised features and
the (unnormalised) rows.  Peak extra memory is ``O(G * chunk_size)`` plus the
``(|C|, D)`` row gradient.

Sharding (hybrid parallelism)
-----------------------------
Under ``torch.distributed`` (world ``T > 1``) rank ``t`` holds the rows with
global ids ``[start, end) = shard_range(N, T, t)`` (or, for sampled negatives,
the members of ``C`` in that range).  Per step:

* features are all-gathered with
  :func:`~selfsup.parallel.distributed.all_gather_with_grad` (``G x D``); the
  targets and smoothed-label indices (:class:`Targets`) are those of the global
  batch already: the caller gathers them once per step, however many crops
  it classifies;
* local online max / sum-of-exp over the shard; global max by
  ``all_reduce(MAX)`` (``G`` values); the rescaled local sums, the target term
  (each sample's target / smoothed rows contribute on their owner rank, 0
  elsewhere) and two validation counts by one ``all_reduce(SUM)`` (``4G``
  values).  Communication is ``O(G * (D + K))``, independent of ``N``.
* backward: the gradient of the shard rows is computed locally and stays there
  (exclude the shard from DDP); the gradient wrt the gathered features is
  each rank's partial sum, all-reduced (SUM) by ``all_gather_with_grad``'s
  backward, and each rank keeps its own ``B`` rows.

Gradient scaling and DDP
------------------------
Every rank returns the same value: the global mean loss ``L`` over all ``G``
samples.  The shard rows receive exactly ``dL/dW_shard``.  The features
receive ``T * dL/dz_local`` when ``ddp_grad_scale=True`` (the default),
because DDP AVERAGES the encoder gradients over the ``T`` ranks:
``(1/T) sum_t T * dL/dtheta|_t = dL/dtheta``, the exact gradient of the global
loss.  (The same convention as SimCLR's NT-Xent over gathered candidates,
whose per-rank local-mean losses give ``T * dL/dz_local`` too.)  So the trainer just
calls ``loss.backward()`` with no extra scaling and must NOT multiply the loss
by ``T``: that would also scale the shard gradient.  With
``ddp_grad_scale=False`` the features receive exactly ``dL/dz_local`` (for
use without DDP or with gradient summing instead of averaging).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..losses import compute_dtype
from ..parallel.distributed import all_gather_no_grad, all_gather_with_grad, world_size

if TYPE_CHECKING:
    from .fused import RowUpdate

__all__ = ["Rows", "Targets", "cosine_softmax", "topk_similar", "DEFAULT_CHUNK", "host_checks", "no_host_checks"]

DEFAULT_CHUNK = 16384
_EPS = 1e-12  # as F.normalize
_HOST_CHECKS = [True]


def host_checks(device: torch.device | str) -> bool:
    """Whether the classifier's input checks that read a tensor back to the host run on ``device``: on a
    CPU (where a read costs nothing, and a bad target raises ``ValueError`` at once), not elsewhere (a GPU
    step never waits for the host: a bad target makes the loss NaN instead).  :func:`no_host_checks`
    turns them off on the CPU too: the CPU then runs the GPU's code path (the host-sync tests)."""
    return torch.device(device).type == "cpu" and _HOST_CHECKS[0]


@contextmanager
def no_host_checks():
    """Within the block, :func:`host_checks` is False on every device."""
    before, _HOST_CHECKS[0] = _HOST_CHECKS[0], False
    try:
        yield
    finally:
        _HOST_CHECKS[0] = before


@dataclass
class Rows:
    """Classifier rows held by this rank.

    Attributes:
        weight: ``(m, D)`` the rows (no bias; normalised in the forward pass).
        ids: ``(m,)`` sorted int64 global ids of the rows (sampled negatives),
            or ``None``: the rows are the contiguous ids ``offset .. offset+m-1``
            (a whole shard; single process: all ``N`` rows, ``offset=0``).
        offset: see ``ids``.
        local: for a selection from a shard (:meth:`InstanceClassifier.select`),
            the rows' positions in the shard; ``weight`` is then a leaf copy
            whose ``.grad`` the row update reads.  ``None`` for a whole shard.
    """

    weight: Tensor
    ids: Tensor | None = None
    offset: int = 0
    local: Tensor | None = None


@dataclass
class Targets:
    """What each sample of the GLOBAL batch (``G = world * B``, identical on every rank) is trained towards.

    Attributes:
        ids: ``(G,)`` int64 global row ids (the instance indices, all-gathered).
        smooth: ``(G, K)`` int64 global row ids of each sample's smoothed-label
            classes, or ``None``.
        alpha: label-smoothing mass: target ``1 - alpha`` on ``ids``,
            ``alpha / K`` on each ``smooth`` entry (0: plain cross entropy).
    """

    ids: Tensor
    smooth: Tensor | None = None
    alpha: float = 0.0


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _local_positions(ids: Tensor, m: int, row_ids: Tensor | None, offset: int) -> Tensor:
    """Position of each global id among this rank's ``m`` rows, ``-1`` where not held here.

    ``row_ids=None``: the rows are the contiguous ids ``offset..offset+m-1``;
    otherwise ``row_ids`` is the sorted ``(m,)`` tensor of their global ids.
    """
    if m == 0:
        return torch.full_like(ids, -1)
    if row_ids is None:
        p = ids - offset
        ok = (p >= 0) & (p < m)
    else:
        p = torch.searchsorted(row_ids, ids)
        ok = (p < m) & (row_ids[p.clamp(max=m - 1)] == ids)
    return torch.where(ok, p, torch.full_like(p, -1))


def _target_term(zs: Tensor, rows: Tensor, tpos: Tensor, spos: Tensor | None, alpha: float) -> Tensor:
    """``(G,)``: this rank's part of ``(1-alpha) l_{i,y_i} + alpha/K sum_k l_{i,s_ik}``.

    ``zs`` are the normalised features divided by ``tau``; positions ``-1``
    (row held elsewhere) contribute 0.
    """
    if rows.shape[0] == 0:
        return zs.new_zeros(zs.shape[0])
    wt = _normalize(rows[tpos.clamp(min=0)].to(zs.dtype))  # (G, D)
    t = (wt * zs).sum(1) * (tpos >= 0)
    if spos is not None and alpha != 0.0:
        ws = _normalize(rows[spos.clamp(min=0)].to(zs.dtype))  # (G, K, D)
        ls = torch.einsum("gkd,gd->gk", ws, zs) * (spos >= 0)
        t = (1.0 - alpha) * t + (alpha / spos.shape[1]) * ls.sum(1)
    return t


def _global_loss(m_run: Tensor, s_run: Tensor, t: Tensor, tpos: Tensor, spos: Tensor | None, distributed: bool,
                 check: bool, same_max: bool = False) -> tuple[Tensor, Tensor]:
    """(the global mean loss, the ``(G,)`` log-sum-exp) from this rank's running max ``m_run`` and sum of
    ``exp(l - m_run)`` ``s_run`` over its rows and its part ``t`` of the target term.

    One ``all_reduce(MAX)`` of the maxima (none with ``same_max``: ``m_run`` is the same on every rank,
    a fixed shift) and one ``all_reduce(SUM)`` of ``4G`` values under ``distributed``.  ``check``: raise
    ``ValueError`` on every rank when a target or smoothed-label id is held by no rank (one host sync),
    else the loss is NaN.
    """
    g = t.shape[0]
    found_t = (tpos >= 0).to(t.dtype)
    found_s = (spos >= 0).sum(1).to(t.dtype) if spos is not None else torch.zeros_like(found_t)
    if distributed and not same_max:
        big_m = m_run.clone()
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX)
    else:
        big_m = m_run
    # ranks without rows have m_run = -inf, s_run = 0: their term is 0 * exp(-inf) = 0
    scaled = torch.where(s_run > 0, s_run * torch.exp(m_run - big_m), torch.zeros_like(s_run))
    packed = torch.stack([scaled, t, found_t, found_s])  # (4, G)
    if distributed:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    total, t, found_t, found_s = packed
    k = spos.shape[1] if spos is not None else 0
    valid = ((found_t == 1) & (found_s == k)).all()  # identical on every rank
    if check and not bool(valid):  # all ranks raise (nobody hangs)
        bad = int((found_t != 1).sum())
        raise ValueError(
            f"{bad} of {g} targets (and/or some smoothed-label indices) are not among the classifier's "
            "candidate rows (a target must lie in [0, N) and, with sampled negatives, in the candidate set)"
        )
    lse = big_m + torch.log(total)
    loss = (lse - t).mean()
    if not check:  # no host sync: a bad target makes the loss NaN (the trainer's finite check sees it)
        loss = torch.where(valid, loss, torch.full_like(loss, float("nan")))
    return loss, lse


def _addmm_(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out += a @ b``; ``a``, ``b`` may be of a lower precision than ``out`` (e.g. bf16 into float32)."""
    return out.addmm_(a, b) if a.dtype == out.dtype else out.add_(a @ b)


class _ChunkedCosineSoftmax(torch.autograd.Function):
    """Global mean cosine-softmax loss of gathered normalised features against local rows.

    forward(zh (G, D) unit rows, rows (m, D), tpos (G,), spos (G, K) or None,
    alpha, tau, chunk, feature_scale, distributed, matmul_dtype, check) -> scalar.
    The backward returns this rank's partial ``dL/dzh`` (times
    ``feature_scale``) and the exact ``dL/drows``; nothing is communicated in
    backward.  ``matmul_dtype`` (e.g. bf16, or None): the three logit-sized
    matmuls take inputs in that dtype (the GEMMs accumulate in float32; the
    products come back in that dtype and are widened); the log-sum-exp,
    softmax and the gradients accumulate in ``zh.dtype``.  Forward and
    backward run with autocast off (the caller's autocast picks
    ``matmul_dtype`` in :func:`cosine_softmax`).  ``check``:
    raise on targets outside the rows (one host sync), else a NaN loss.
    """

    @staticmethod
    def forward(ctx, zh, rows, tpos, spos, alpha, tau, chunk, feature_scale, distributed, matmul_dtype, check):
        g = zh.shape[0]
        zs = zh / tau
        zq = zs.to(matmul_dtype or zs.dtype)  # the matmul operand (no copy without matmul_dtype)
        m_run = zh.new_full((g,), float("-inf"))
        s_run = zh.new_zeros(g)
        for c0 in range(0, rows.shape[0], chunk):
            wc = _normalize(rows[c0 : c0 + chunk].to(zh.dtype))
            logits = (zq @ wc.to(zq.dtype).T).to(zh.dtype)  # (G, c): the only G x c temporary
            new_m = torch.maximum(m_run, logits.max(dim=1).values)
            s_run = s_run * torch.exp(m_run - new_m) + logits.sub_(new_m[:, None]).exp_().sum(1)
            m_run = new_m
            del logits
        t = _target_term(zs, rows, tpos, spos, alpha)
        loss, lse = _global_loss(m_run, s_run, t, tpos, spos, distributed, check)
        ctx.save_for_backward(zh, rows, tpos, spos if spos is not None else tpos.new_empty(0), lse)
        ctx.has_s = spos is not None and alpha != 0.0
        ctx.alpha, ctx.tau, ctx.chunk, ctx.feature_scale = alpha, tau, chunk, feature_scale
        ctx.matmul_dtype = matmul_dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # dtypes are explicit, as in forward
            return _ChunkedCosineSoftmax._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        zh, rows, tpos, spos, lse = ctx.saved_tensors
        need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g, m = zh.shape[0], rows.shape[0]
        alpha, tau = ctx.alpha, ctx.tau
        coef = grad_out.to(zh.dtype) / g  # dL/dl_ij = coef * (p_ij - q_ij)
        zs = zh / tau
        md = ctx.matmul_dtype or zh.dtype
        zq, zhq = zs.to(md), zh.to(md)  # matmul operands (no copies without matmul_dtype)
        grad_zh = torch.zeros_like(zh) if need_z else None
        grad_wh = rows.new_zeros(rows.shape, dtype=zh.dtype) if need_w and m > 0 else None

        # target terms (-q): sparse, added first.  Rows held elsewhere (position -1) get weight 0 at
        # position 0 instead of a boolean mask: no data-dependent shapes, no host sync.
        if m > 0:
            wq = torch.where(tpos >= 0, coef / tau * (1.0 - alpha if ctx.has_s else 1.0), torch.zeros_like(lse))
            if need_z:
                grad_zh -= wq[:, None] * _normalize(rows[tpos.clamp(min=0)].to(zh.dtype))
            if need_w:
                grad_wh.index_add_(0, tpos.clamp(min=0), -(wq[:, None] * zh))
            if ctx.has_s:
                k = spos.shape[1]
                ws = (coef / tau * alpha / k) * (spos >= 0).to(zh.dtype)  # (G, K)
                if need_z:
                    wsn = _normalize(rows[spos.clamp(min=0)].to(zh.dtype))  # (G, K, D)
                    grad_zh -= torch.einsum("gk,gkd->gd", ws, wsn)
                if need_w:
                    upd = -(ws[:, :, None] * zh[:, None])  # (G, K, D)
                    grad_wh.index_add_(0, spos.clamp(min=0).reshape(-1), upd.reshape(-1, zh.shape[1]))

        # softmax terms (+p), chunk by chunk; finish each chunk's row gradient through the normalisation
        for c0 in range(0, m, ctx.chunk):
            raw = rows[c0 : c0 + ctx.chunk].to(zh.dtype)
            norm = raw.norm(dim=1, keepdim=True).clamp_min(_EPS)
            wc = raw / norm
            wcq = wc.to(md)
            p = (zq @ wcq.T).to(zh.dtype).sub_(lse[:, None]).exp_().mul_(coef / tau)  # (G, c)
            pq = p.to(md)
            if need_z:
                _addmm_(grad_zh, pq, wcq)
            if need_w:
                gw = grad_wh[c0 : c0 + ctx.chunk]
                _addmm_(gw, pq.T, zhq)
                gw.sub_((gw * wc).sum(1, keepdim=True) * wc).div_(norm)  # d normalize(w) / dw
            del p
        if need_z and ctx.feature_scale != 1:
            grad_zh.mul_(ctx.feature_scale)
        grad_rows = grad_wh.to(rows.dtype) if grad_wh is not None else (torch.zeros_like(rows) if need_w else None)
        return grad_zh, grad_rows, None, None, None, None, None, None, None, None, None


def cosine_softmax(
    z: Tensor,
    rows: Rows,
    targets: Targets,
    temperature: float,
    *,
    chunk_size: int | None = DEFAULT_CHUNK,
    ddp_grad_scale: bool = True,
    matmul_dtype: torch.dtype | None = None,
    check_targets: bool | None = None,
    update: RowUpdate | None = None,
) -> Tensor:
    """Chunked (and, under ``torch.distributed``, row-sharded) cosine-softmax loss.

    Args:
        z: ``(B, D)`` this rank's features (any scale; L2-normalised here).
            ``B`` must be equal on all ranks (the caller's gather of the
            targets has checked it, so the features are gathered without a
            second shape check).
        rows: this rank's rows (:class:`Rows`): the whole shard, or the sampled
            candidates held here.  With sampled negatives the candidate set is
            the union over ranks of ``rows.ids`` and must contain every target
            and smoothed-label id (else ``ValueError`` on every rank).
        targets: the global batch's :class:`Targets` (``G = world * B`` ids).
        temperature: ``tau``.
        chunk_size: rows per chunk (memory ``O(G * chunk_size)``); with ``update``, ``None`` picks it
            per device (:func:`~selfsup.instance.fused.fused_chunk_size`).
        ddp_grad_scale: multiply the features' gradient by the world size so
            that DDP's gradient averaging yields the exact gradient of the
            global loss (module docstring).  No effect with one process.
        matmul_dtype: dtype of the inputs of the logit matmuls (forward and
            the two backward ones), e.g. ``torch.bfloat16``; default: the
            autocast dtype when autocast is on for ``z``'s device and the
            compute dtype is float32, else none (matmuls in the compute dtype).
            Normalisation, log-sum-exp, softmax and gradient accumulation stay
            in float32 (float64).
        check_targets: raise ``ValueError`` when a target / smoothed-label id
            is not among the rows (one host sync per call); ``False``: no
            sync, the returned loss is NaN instead.  Default: :func:`host_checks`
            (on CPU, unless :func:`no_host_checks`; not on other devices: CUDA
            has no host sync inside the step).

    Returns:
        Scalar: the global mean loss over all ranks' ``G`` samples (same value
        on every rank), float32 (float64 if ``z`` or the rows are float64).
        update: a :class:`~selfsup.instance.fused.RowUpdate`: the fused step
            (:mod:`selfsup.instance.fused`): the backward applies the row update
            (``row_sgd_``'s rule) chunk by chunk and the rows get no gradient.
            ``rows`` must be the shard ``update.weight`` itself (``rows.local``
            None) or a selection from it (``rows.local``: positions in it).

        Gradients: exact ``dL/drows``; features ``world * dL/dz``
        (``ddp_grad_scale``) or ``dL/dz``.
    """
    w, ids, world = rows.weight, rows.ids, world_size()
    target, smooth, alpha = targets.ids, targets.smooth, float(targets.alpha)
    if z.dim() != 2 or w.dim() != 2 or z.shape[1] != w.shape[1]:
        raise ValueError(f"need z (B, D) and rows (m, D) with equal D, got {tuple(z.shape)} and {tuple(w.shape)}")
    g = z.shape[0] * world
    if target.shape != (g,) or target.dtype != torch.long:
        raise ValueError(f"targets.ids must be the int64 ids of the global batch, shape ({g},) = world {world} x "
                         f"B {z.shape[0]}; got {target.dtype} {tuple(target.shape)}")
    use_s = smooth is not None and alpha != 0.0
    if use_s and (smooth.dim() != 2 or smooth.shape[0] != g or smooth.shape[1] == 0 or smooth.dtype != torch.long):
        raise ValueError(f"targets.smooth must be int64 (G={g}, K>=1), got {smooth.dtype} {tuple(smooth.shape)}")
    if alpha != 0.0 and smooth is None:
        raise ValueError("targets.alpha != 0 needs targets.smooth")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if ids is not None and (ids.shape != (w.shape[0],) or ids.dtype != torch.long):
        raise ValueError(f"rows.ids must be int64 of shape ({w.shape[0]},), got {ids.dtype} {tuple(ids.shape)}")
    if (update is None and (chunk_size is None or chunk_size < 1)) or temperature <= 0:
        raise ValueError(f"need chunk_size >= 1 and temperature > 0, got {chunk_size}, {temperature}")
    dtype = compute_dtype(z, w)
    dev = z.device.type
    if matmul_dtype is None and dtype == torch.float32 and torch.is_autocast_enabled(dev):
        matmul_dtype = torch.get_autocast_dtype(dev)
    if matmul_dtype == dtype:
        matmul_dtype = None
    check = host_checks(z.device) if check_targets is None else bool(check_targets)
    with torch.autocast(device_type=dev, enabled=False):
        zh = F.normalize(z.to(dtype), dim=1, eps=_EPS)
        if world > 1:
            zh = all_gather_with_grad(zh, check_shapes=False)
        m = w.shape[0]
        tpos = _local_positions(target, m, ids, rows.offset)
        spos = _local_positions(smooth, m, ids, rows.offset) if use_s else None
        if update is not None:
            from .fused import fused_cosine_softmax
            return fused_cosine_softmax(zh, w, rows.local, tpos, spos, alpha, float(temperature), chunk_size,
                                        float(world if ddp_grad_scale else 1), world > 1, matmul_dtype, check, update)
        return _ChunkedCosineSoftmax.apply(zh, w, tpos, spos, alpha, float(temperature), int(chunk_size),
                                           float(world if ddp_grad_scale else 1), world > 1, matmul_dtype, check)


@torch.no_grad()
def topk_similar(
    weight: Tensor,
    query_ids: Tensor,
    k: int,
    *,
    offset: int = 0,
    num_rows: int | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """The ``k`` rows most similar (cosine) to each query row, the query itself excluded.

    Args:
        weight: ``(m, D)`` this rank's rows, global ids ``offset .. offset+m-1``
            (single process: all ``N`` rows, ``offset=0``).
        query_ids: ``(Q,)`` int64 global ids of the query rows, identical on
            every rank (e.g. the all-gathered batch targets).
        k: neighbours per query (``k <= N - 1``).
        offset: global id of ``weight[0]``.
        num_rows: total ``N`` (default: the sum of the shard sizes, one
            small all-reduce); only used to check ``k``.
        chunk_size: rows per chunk (memory ``O(Q * (chunk_size + k))``).

    Under ``torch.distributed`` the query rows are assembled from their owners
    by one ``all_reduce(SUM)`` of ``(Q, D)``, each rank keeps a running top-k
    over its shard, and the ``(Q, k)`` candidates (value, global id) of all
    ranks are all-gathered and merged by a final top-k.  Cost
    ``O(Q * N * D / world)`` flops per rank, ``O(Q * (D + world*k))`` traffic.

    Returns:
        ``(values, indices)``, each ``(Q, k)``, sorted by decreasing cosine;
        ``indices`` are global row ids.  Same on every rank.
    """
    world = world_size()
    if weight.dim() != 2 or query_ids.dim() != 1 or query_ids.dtype != torch.long:
        raise ValueError(f"need weight (m, D) and int64 query_ids (Q,), got {tuple(weight.shape)}, "
                         f"{query_ids.dtype} {tuple(query_ids.shape)}")
    m, d = weight.shape
    if num_rows is None:
        num_rows = m
        if world > 1:
            n_t = torch.tensor([m], device=weight.device)
            dist.all_reduce(n_t)
            num_rows = int(n_t)
    if not 1 <= k <= num_rows - 1:
        raise ValueError(f"k must be in [1, N-1] = [1, {num_rows - 1}], got {k}")
    dtype = compute_dtype(weight)
    own = (query_ids >= offset) & (query_ids < offset + m)
    q = torch.zeros(query_ids.shape[0], d, dtype=dtype, device=weight.device)
    q[own] = _normalize(weight[query_ids[own] - offset].to(dtype))
    if world > 1:
        dist.all_reduce(q)
    best_v = torch.full((q.shape[0], k), float("-inf"), dtype=dtype, device=weight.device)
    best_i = torch.full((q.shape[0], k), -1, dtype=torch.long, device=weight.device)
    for c0 in range(0, m, chunk_size):
        wc = _normalize(weight[c0 : c0 + chunk_size].to(dtype))
        ids = torch.arange(offset + c0, offset + c0 + wc.shape[0], device=weight.device)
        with torch.autocast(weight.device.type, enabled=False):   # ranks in `dtype` under the trainer's bf16 too
            sims = q @ wc.T  # (Q, c)
        sims.masked_fill_(query_ids[:, None] == ids[None, :], float("-inf"))
        v, j = torch.cat([best_v, sims], 1).topk(k, dim=1)
        best_i = torch.cat([best_i, ids.expand(q.shape[0], -1)], 1).gather(1, j)
        best_v = v
    if world > 1:
        vs = all_gather_no_grad(best_v[None])  # (world, Q, k)
        is_ = all_gather_no_grad(best_i[None])
        v, j = torch.cat(list(vs), 1).topk(k, dim=1)
        best_i = torch.cat(list(is_), 1).gather(1, j)
        best_v = v
    return best_v, best_i
