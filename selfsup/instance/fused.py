"""The fused classifier step: the backward's chunk loop applies the row update as it goes.

The reference step (:func:`~selfsup.instance.softmax.cosine_softmax`, then
:func:`~selfsup.instance.optim.row_sgd_`) writes a dense ``(|C|, D)`` row gradient in the backward,
and the update then reads that gradient, the rows and their momentum again.  Here the backward
takes the update with it (:class:`RowUpdate`, SGD with momentum and weight decay, the rule of
:func:`~selfsup.instance.optim.row_sgd_`): each chunk's row gradient is computed, pushed through
the normalisation, applied to its rows and their momentum at once and dropped.  No ``(N, D)``
gradient exists; the forward keeps the ``(|C|, 1)`` row norms, not normalised copies; the extra
memory of a step is ``O(G * tile + chunk * D)`` per worker plus ``O(|C|)`` (the norms).

Per tile of ``t`` rows (``G`` the global batch): forward, one ``(G, D) x (D, t)`` product, ``exp``
and its row sums; backward, the same product again (the softmax needs the global log-sum-exp, so
every row is read twice per step: four products in all where the roofline bound counts three),
``exp`` and the two gradient products.  With ``tau >= 1/40`` the logits are bounded by
``|l| <= 1/tau``, so neither pass needs a running maximum: the forward sums ``exp(l)`` and the
backward folds ``exp(-lse_i)`` into the row-gradient operand and the feature gradient's scale
(smaller ``tau``: the running maximum, as the reference).  Per chunk of tiles: the normalised
rows once, the gradient's normalisation and the update in a few whole-chunk operations.  The
row gradient's sparse target terms (``-q``, on at most ``G (1 + K)`` rows) are pushed through the
normalisation before the loop, from the rows as they were, and added to the momentum and the
rows after it: the update is linear in the gradient, so this is the same step, rounded
differently (float32: about 1e-7 relative).

On a CPU the rows are split into one contiguous range per torch thread, each run single-threaded
in its own Python thread by a TorchScript-compiled loop (no GIL, no thread wake-up per
operation; plain Python where scripting fails); on a GPU one range, the plain loop.

Exactness: the fused step equals the reference step (loss, rows, momentum) to rounding, for the
full softmax and sampled negatives, smoothed labels, rows sharded over ranks, and under
``train.micro_batch`` (tests/instance/test_fused.py).  The rows are written inside the backward:
another use of the same rows in the same graph that runs later in the backward (PIC's detached
small crops, under the full softmax) would see them changed, and autograd raises for it (the
rows' version counter) rather than computing with new rows; the small crops' heads are built
after the large crop's, so their backward runs first.

Chunk and tile: :func:`fused_chunk_size`, per device.
"""
from __future__ import annotations

import functools
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .softmax import _global_loss, _target_term

__all__ = ["RowUpdate", "fused_chunk_size", "fused_cosine_softmax"]

BOUNDED_INV_TAU = 40.0   # 1/tau up to this: exp(l) in [e^-40, e^40] for |l| <= 1/tau, no running max needed


@dataclass
class RowUpdate:
    """The row update a fused step applies in its backward: ``row_sgd_``'s rule on the rows of the step.

    Attributes:
        weight: ``(n, D)`` this rank's shard of the rows (updated in place).  With the full
            softmax it is the step's ``rows.weight`` itself; with sampled negatives the step's
            rows are a copy (:meth:`InstanceClassifier.select`) and ``rows.local`` says where
            they live in ``weight``.
        momentum_buffer: ``(n, D)`` its momentum (updated in place).
        lr, momentum, weight_decay: as :func:`~selfsup.instance.optim.row_sgd_` (torch SGD,
            dampening 0, no Nesterov).
    """

    weight: Tensor
    momentum_buffer: Tensor
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0


def fused_chunk_size(device: torch.device | str, g: int, d: int, elem_size: int = 4) -> tuple[int, int]:
    """``(chunk, tile)``: rows per chunk and rows per logit tile of the fused step, for a global batch ``g``
    of ``d``-dim features on ``device``.

    A chunk's rows are normalised, and get their gradient's normalisation and their update, in a
    few whole-chunk operations (memory ``O(chunk * d)``); its logits are made, exponentiated and
    read by the two gradient products tile by tile (memory ``O(g * tile)``).  CPU: tiles of about
    ``2**21`` logits (8 MB in float32: the tile stays in the caches between the product that
    writes it and the two that read it; on the project's CPU, single-threaded, G = 1024, D = 128,
    tiles of 1024-2048 rows run the four products at 140 GFLOP/s, 4096 at 133, 8192 and more at
    100) and chunks of 8 tiles.  CUDA: one tile per chunk, up to ``2**26`` logits (256 MB), at most
    a sixteenth of the memory free at the first call.
    """
    dev = torch.device(device)
    g = max(1, g)
    if dev.type == "cuda":
        return _cuda_chunk(dev.index if dev.index is not None else torch.cuda.current_device(), g, elem_size)
    t = max(256, min(1 << 16, (1 << 21) // g))
    t = 1 << (t.bit_length() - 1)   # a power of two
    return 8 * t, t


@functools.lru_cache(maxsize=None)
def _cuda_chunk(index: int, g: int, elem_size: int) -> tuple[int, int]:
    """The CUDA chunk, from the free memory at the first call (then fixed: the same chunking every step)."""
    free = torch.cuda.mem_get_info(index)[0]
    t = max(1024, min(1 << 20, min(1 << 26, free // (16 * elem_size)) // g))
    t = 1 << (t.bit_length() - 1)
    return t, t


def _ranges(device: torch.device, m: int, tile: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per worker: on a CPU one per torch thread (each range runs single-threaded
    in its own Python thread: the products and exponentials of a tile are milliseconds of work, and
    splitting each of them over the threads costs a thread wake-up per operation, which a loaded
    machine makes slow), at least two tiles each; elsewhere one range."""
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    workers = max(1, min(workers, m // (2 * tile)))
    if workers == 1:
        return [(0, m)]
    per = -(-m // (workers * tile)) * tile   # whole tiles per range, the last range shorter
    return [(lo, min(lo + per, m)) for lo in range(0, m, per)]


def _run(ranges: list, fn, *args) -> list:
    """``[fn(lo, hi, *args) for (lo, hi) in ranges]``.  Several ranges run in parallel Python threads with one
    torch thread each (the thread count is put back afterwards), and ``fn`` TorchScript-compiled when it
    compiles: a scripted call runs its whole loop without the GIL, where a Python loop takes the GIL back
    between operations (on the loaded 2-core CPU the four products ran at 140 GFLOP/s in two Python
    threads and at 250 scripted).  One range runs plain Python, in this thread."""
    if len(ranges) == 1:
        return [fn(*ranges[0], *args)]
    fn = _scripted(fn)

    def work(r):
        with torch.no_grad():   # grad mode is per thread: a new thread starts with it on
            return fn(*r, *args)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(ranges)) as ex:
            return list(ex.map(work, ranges))
    finally:
        torch.set_num_threads(threads)


_SCRIPTED: dict = {}


def _scripted(fn):
    """``torch.jit.script(fn)``, once per function; ``fn`` itself where scripting fails (its deprecation
    warning silenced)."""
    if fn not in _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _SCRIPTED[fn] = torch.jit.script(fn)
        except Exception:   # noqa: BLE001 - any scripting failure: the same function, run by Python
            _SCRIPTED[fn] = fn
    return _SCRIPTED[fn]


class _FusedCosineSoftmax(torch.autograd.Function):
    """Global mean cosine-softmax loss whose backward applies the row update (see the module docstring).

    forward(zh (G, D) unit rows, rows (m, D), local (m,) shard positions or None, tpos, spos, alpha, tau,
    chunk, tile, feature_scale, distributed, matmul_dtype, check, update) -> scalar.  The backward
    returns this rank's partial ``dL/dzh`` (times ``feature_scale``) and no row gradient: the rows
    and their momentum in ``update`` have moved instead.
    """

    @staticmethod
    def forward(ctx, zh, rows, local, tpos, spos, alpha, tau, chunk, tile, feature_scale, distributed, matmul_dtype,
                check, update):
        g, m = zh.shape[0], rows.shape[0]
        dt = zh.dtype
        md = matmul_dtype or dt
        zs = zh / tau
        zq = zs.to(md)
        bounded = 1.0 / tau <= BOUNDED_INV_TAU
        norms = zh.new_empty(m, 1)
        # bounded: the same fixed shift 0 on every rank (a rank without rows has s_run = 0 and adds nothing)
        m_run = zh.new_zeros(g) if bounded else zh.new_full((g,), float("-inf"))
        s_run = zh.new_zeros(g)
        if m > 0:
            chunk, tile = min(chunk, m), min(tile, chunk, m)
            parts = _run(_ranges(zh.device, m, tile), _forward_rows, zq, rows, norms, chunk, tile, md, dt, bounded)
            if bounded:
                for _, s_w in parts:
                    s_run += s_w
            else:
                m_run = torch.stack([m_w for m_w, _ in parts]).amax(0)
                for m_w, s_w in parts:
                    s_run += torch.where(s_w > 0, s_w * torch.exp(m_w - m_run), torch.zeros_like(s_w))
        t = _target_term(zs, rows, tpos, spos, alpha)
        loss, lse = _global_loss(m_run, s_run, t, tpos, spos, distributed, check, same_max=bounded)
        ctx.save_for_backward(zh, rows, norms, tpos, spos if spos is not None else tpos.new_empty(0), lse,
                              local if local is not None else tpos.new_empty(0))
        ctx.has_s = spos is not None and alpha != 0.0
        ctx.sampled, ctx.bounded = local is not None, bounded
        ctx.alpha, ctx.tau, ctx.chunk, ctx.tile, ctx.feature_scale = alpha, tau, chunk, tile, feature_scale
        ctx.matmul_dtype, ctx.update = matmul_dtype, update
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False), torch.no_grad():
            return _FusedCosineSoftmax._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        zh, rows, norms, tpos, spos, lse, local = ctx.saved_tensors
        up: RowUpdate = ctx.update
        if up is None:
            raise RuntimeError("the fused classifier step's backward ran twice: its rows have moved already")
        ctx.update = None
        need_z = ctx.needs_input_grad[0]
        g, m, d = zh.shape[0], rows.shape[0], zh.shape[1]
        dt = zh.dtype
        md = ctx.matmul_dtype or dt
        alpha, tau = ctx.alpha, ctx.tau
        scale = grad_out.to(dt) / g / tau   # dL/dl_ij = (scale * tau) (p_ij - q_ij); l = zh.w / tau
        grad_zh = torch.zeros_like(zh) if need_z else None
        nones = (None,) * 13
        if m == 0:
            return (grad_zh,) + nones
        w_all, b_all = up.weight, up.momentum_buffer
        lr = float(up.lr)

        # target terms (-q), sparse: their feature gradient, and their row gradient through the normalisation
        # of the rows AS THEY ARE NOW (before the loop moves them); the rows get it after the loop.
        wq = torch.where(tpos >= 0, scale * (1.0 - alpha if ctx.has_s else 1.0), torch.zeros_like(lse))
        pos, vec = [tpos.clamp(min=0)], [-(wq[:, None] * zh)]
        if need_z:
            grad_zh -= wq[:, None] * (rows[pos[0]].to(dt) / norms[pos[0]])
        if ctx.has_s:
            k = spos.shape[1]
            ws = (scale * alpha / k) * (spos >= 0).to(dt)  # (G, K)
            sp = spos.clamp(min=0)
            if need_z:
                grad_zh -= torch.einsum("gk,gkd->gd", ws, rows[sp].to(dt) / norms[sp])
            pos.append(sp.reshape(-1))
            vec.append(-(ws[:, :, None] * zh[:, None]).reshape(-1, d))
        pos_t, vec_t = torch.cat(pos), torch.cat(vec)   # (E,), (E, D): E = G (1 + K) entries
        n_t = norms[pos_t]
        w_t = rows[pos_t].to(dt) / n_t
        g_t = vec_t.addcmul_((vec_t * w_t).sum(1, keepdim=True), w_t, value=-1).div_(n_t)  # d normalize(w)/dw
        g_t = g_t.to(w_all.dtype)
        dest_t = local[pos_t] if ctx.sampled else pos_t

        # softmax terms (+p), range by range, chunk by chunk: p = exp(l - lse).  Bounded logits: exp(l) as in the
        # forward, and exp(-lse) (per sample) goes into the row-gradient operand and the feature gradient's scale.
        zq = (zh / tau).to(md)
        if ctx.bounded:
            e_lse = torch.exp(-lse)
            zr, zscale = (zh * (scale * e_lse)[:, None]).to(md), scale * e_lse
        else:
            zr, zscale = (zh * scale).to(md), scale
        chunk, tile = min(ctx.chunk, m), min(ctx.tile, ctx.chunk, m)
        accs = _run(_ranges(zh.device, m, tile), _backward_rows, zq, zr, lse, rows, norms,
                    local if ctx.sampled else None, w_all, b_all, lr, float(up.momentum), float(up.weight_decay),
                    chunk, tile, md, dt, ctx.bounded, need_z)
        # the target terms' share of the same step: buf += g_t, w -= lr g_t (the step is linear in the gradient)
        b_all.index_add_(0, dest_t, g_t)
        w_all.index_add_(0, dest_t, g_t, alpha=-lr)
        if need_z:
            acc = accs[0]
            for a in accs[1:]:
                acc += a
            grad_zh.addcmul_(acc, zscale[:, None] if zscale.dim() else zscale)
            if ctx.feature_scale != 1:
                grad_zh.mul_(ctx.feature_scale)
        return (grad_zh,) + nones


def _forward_rows(lo: int, hi: int, zq: Tensor, rows: Tensor, norms: Tensor, chunk: int, tile: int,
                  md: torch.dtype, dt: torch.dtype, bounded: bool) -> tuple[Tensor, Tensor]:
    """The forward over rows ``[lo, hi)``: their clamped norms into ``norms``; returns ``(m_run, s_run)``, the
    running maximum (bounded: 0) and sum of ``exp(l - m_run)`` per sample.  (TorchScript-compilable.)"""
    g, d = zq.shape[0], zq.shape[1]
    chunk = min(chunk, hi - lo)
    tile = min(tile, chunk)
    wbuf = torch.empty([chunk, d], dtype=dt, device=zq.device)
    ebuf = torch.empty([g, tile], dtype=dt, device=zq.device)
    ones = torch.ones([tile], dtype=dt, device=zq.device)
    s_run = torch.zeros([g], dtype=dt, device=zq.device)
    if bounded:
        m_run = torch.zeros([g], dtype=dt, device=zq.device)
    else:
        m_run = torch.full([g], float("-inf"), dtype=dt, device=zq.device)
    for c0 in range(lo, hi, chunk):
        c1 = min(c0 + chunk, hi)
        raw = rows[c0:c1].to(dt)
        n_c = norms[c0:c1]
        n_c.copy_(torch.linalg.vector_norm(raw, dim=[1], keepdim=True).clamp_min_(1e-12))   # _EPS (a literal: scripted)
        wq = torch.div(raw, n_c, out=wbuf[: c1 - c0]).to(md)
        for t0 in range(0, c1 - c0, tile):
            t1 = min(t0 + tile, c1 - c0)
            e = ebuf[:, : t1 - t0]
            if md == dt:
                torch.mm(zq, wq[t0:t1].t(), out=e)
            else:
                e.copy_(torch.mm(zq, wq[t0:t1].t()))
            if bounded:   # |l| <= 1/tau <= 40: exp(l) neither overflows nor underflows, shift 0
                s_run.addmv_(e.exp_(), ones[: t1 - t0])
            else:
                new_m = torch.maximum(m_run, e.amax(dim=1))
                s_run = s_run * torch.exp(m_run - new_m) + e.sub_(new_m.unsqueeze(1)).exp_().sum(1)
                m_run = new_m
    return m_run, s_run


def _backward_rows(lo: int, hi: int, zq: Tensor, zr: Tensor, lse: Tensor, rows: Tensor, norms: Tensor,
                   local: Optional[Tensor], w_all: Tensor, b_all: Tensor, lr: float, mom: float, wd: float,
                   chunk: int, tile: int, md: torch.dtype, dt: torch.dtype, bounded: bool,
                   need_z: bool) -> Optional[Tensor]:
    """The backward's softmax part over rows ``[lo, hi)``: each chunk's row gradient, through the
    normalisation, applied to its rows (``w_all``, at ``local`` or in place) and their momentum ``b_all``
    and dropped.  Returns this range's part of ``sum_j exp(l_ij [- lse_i]) w^_j`` (``(G, D)``; None
    without ``need_z``).  (TorchScript-compilable.)"""
    g, d = zq.shape[0], zq.shape[1]
    chunk = min(chunk, hi - lo)
    tile = min(tile, chunk)
    wbuf = torch.empty([chunk, d], dtype=dt, device=zq.device)
    gbuf = torch.empty([chunk, d], dtype=dt, device=zq.device)
    ebuf = torch.empty([g, tile], dtype=dt, device=zq.device)
    acc = torch.zeros([g, d], dtype=dt, device=zq.device)
    nlse = lse.neg().unsqueeze(1)
    for c0 in range(lo, hi, chunk):
        c1 = min(c0 + chunk, hi)
        n_c = norms[c0:c1]
        wc = torch.div(rows[c0:c1].to(dt), n_c, out=wbuf[: c1 - c0])
        wcq = wc.to(md)
        gw = gbuf[: c1 - c0]
        for t0 in range(0, c1 - c0, tile):
            t1 = min(t0 + tile, c1 - c0)
            e = ebuf[:, : t1 - t0]
            w_t = wcq[t0:t1]
            if md == dt:
                if bounded:
                    torch.mm(zq, w_t.t(), out=e)
                else:
                    torch.addmm(nlse, zq, w_t.t(), out=e)
                e.exp_()   # (G, t): the softmax of the tile (bounded: times exp(lse) per sample)
                if need_z:
                    acc.addmm_(e, w_t)
                torch.mm(e.t(), zr, out=gw[t0:t1])
            else:
                if bounded:
                    e.copy_(torch.mm(zq, w_t.t()))
                else:
                    torch.sub(torch.mm(zq, w_t.t()), lse.unsqueeze(1), out=e)
                eq = e.exp_().to(md)
                if need_z:
                    acc.add_(torch.mm(eq, w_t))
                gw[t0:t1].copy_(torch.mm(eq.t(), zr))
        # dL/dw = (g - (g.w^) w^) / |w| for the gradient g of the normalised rows w^
        gw.addcmul_((gw * wc).sum(1, keepdim=True), wc, value=-1.0)
        if local is not None:   # sparse_sgd_'s rule on the candidates' rows of the shard
            idx = local[c0:c1]
            w = w_all.index_select(0, idx)
            b = b_all.index_select(0, idx)
        else:                   # row_sgd_'s rule on the whole shard
            idx = local
            w = w_all[c0:c1]
            b = b_all[c0:c1]
        b.mul_(mom).addcdiv_(gw.to(b.dtype), n_c.to(b.dtype))
        if wd != 0.0:
            b.add_(w, alpha=wd)
        w.add_(b, alpha=-lr)
        if idx is not None:
            w_all.index_copy_(0, idx, w)
            b_all.index_copy_(0, idx, b)
    if need_z:
        return acc
    return None


def fused_cosine_softmax(zh: Tensor, rows: Tensor, local: Tensor | None, tpos: Tensor, spos: Tensor | None,
                         alpha: float, tau: float, chunk: int | tuple[int, int] | None, feature_scale: float,
                         distributed: bool, matmul_dtype: torch.dtype | None, check: bool, update: RowUpdate) -> Tensor:
    """The fused step on prepared inputs (called by :func:`~selfsup.instance.softmax.cosine_softmax` when
    it is given an ``update``).  ``chunk=None``: :func:`fused_chunk_size`; an explicit ``chunk`` keeps
    the device's tile (at most ``chunk``), a pair ``(chunk, tile)`` sets both."""
    w, b = update.weight, update.momentum_buffer
    if b.shape != w.shape or w.dim() != 2 or w.shape[1] != rows.shape[1]:
        raise ValueError(f"update: need weight and momentum_buffer of equal shape (n, {rows.shape[1]}), got "
                         f"{tuple(w.shape)} and {tuple(b.shape)}")
    if local is None and rows.shape[0] and (rows.shape != w.shape or rows.data_ptr() != w.data_ptr()):
        raise ValueError("update: with the whole shard (rows.local None) the step's rows must be update.weight")
    auto_chunk, tile = fused_chunk_size(zh.device, zh.shape[0], zh.shape[1])
    if isinstance(chunk, (tuple, list)):
        chunk, tile = (int(x) for x in chunk)
    chunk = auto_chunk if chunk is None else int(chunk)
    if chunk < 1 or tile < 1:
        raise ValueError(f"need chunk >= 1 and tile >= 1, got {chunk}, {tile}")
    return _FusedCosineSoftmax.apply(zh, rows, local, tpos, spos, alpha, tau, chunk, min(tile, chunk), feature_scale,
                                     distributed, matmul_dtype, check, update)
