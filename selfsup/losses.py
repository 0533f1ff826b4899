"""Contrastive losses: equations only.

Every function here is pure: no state, no ``torch.distributed``. A method that draws its
negatives from every rank gathers them itself and passes them in (SimCLR:
:func:`nt_xent_local` with the gathered candidates). Each loss runs in float32 (float64 for
float64 inputs) with autocast off, whatever the precision of the network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["nt_xent", "nt_xent_local", "info_nce", "mocov3_contrastive", "nce_loss", "nce_normalizer",
           "instance_softmax", "compute_dtype"]


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half/bfloat16 are upcast)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def nt_xent_local(
    z1: Tensor,
    z2: Tensor,
    z1_all: Tensor,
    z2_all: Tensor,
    offset: int,
    temperature: float = 0.5,
) -> Tensor:
    """NT-Xent of local anchors against a given candidate set (pure function).

    Args:
        z1, z2: ``(B, D)`` local embeddings of the two views (any scale; they
            are L2-normalised here).  Row ``i`` of ``z1`` and of ``z2`` form a
            positive pair.
        z1_all, z2_all: ``(N, D)`` candidate embeddings of the two views
            (``N = world*B``), containing ``z1``/``z2`` at rows
            ``offset : offset+B``.
        offset: global index of this rank's first sample (``rank * B``).
        temperature: softmax temperature ``t``.

    Returns:
        Scalar: mean over the ``2B`` local anchors of
        ``-log(exp(s_ip/t) / sum_{k != i} exp(s_ik/t))`` where ``s`` is cosine
        similarity, ``k`` ranges over the ``2N`` candidates
        ``cat(z1_all, z2_all)`` and the anchor's own column is masked with
        ``-inf``.  Computed in float32 (float64 if an input is float64), with
        autocast disabled.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be (B, D) of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1_all.shape != z2_all.shape or z1_all.shape[1:] != z1.shape[1:]:
        raise ValueError(f"bad candidate shapes {tuple(z1_all.shape)}, {tuple(z2_all.shape)} for anchors "
                         f"{tuple(z1.shape)}")
    b, n = z1.shape[0], z1_all.shape[0]
    if not 0 <= offset <= n - b:
        raise ValueError(f"offset {offset} out of range for B={b}, N={n}")
    dtype = compute_dtype(z1, z2, z1_all, z2_all)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        anchors = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2B, D)
        cands = F.normalize(torch.cat([z1_all, z2_all]).to(dtype), dim=1)  # (2N, D)
        local = torch.arange(b, device=z1.device)
        self_idx = torch.cat([offset + local, n + offset + local])  # (2B,)
        pos_idx = torch.cat([n + offset + local, offset + local])  # (2B,)
        if anchors.shape[0] * cands.shape[0] > BLOCK_ELEMENTS:   # a large batch: no (2B, 2N) matrix at once
            return _BlockwiseCE.apply(anchors, cands, pos_idx, self_idx, temperature)
        logits = anchors @ cands.T / temperature  # (2B, 2N)
        rows = torch.arange(2 * b, device=z1.device)
        logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), dtype=dtype, device=z1.device))
        return F.cross_entropy(logits, pos_idx)


# the largest (anchors x candidates) similarity matrix NT-Xent builds at once (16 MiB in float32);
# above it the loss and its gradient go block by block (_BlockwiseCE)
BLOCK_ELEMENTS = 1 << 22


class _BlockwiseCE(torch.autograd.Function):
    """``mean_i CE(a_i c^T / t, pos_i)`` with column ``self_i`` of row i masked, for unit rows ``a`` (A, D)
    and ``c`` (C, D), computed in blocks of at most BLOCK_ELEMENTS // C anchors: the (A, C) logits never
    exist whole (memory O(block x C) instead of O(A x C); the backward computes each block's logits
    again). The same numbers as the plain formula up to the order of the sums."""

    @staticmethod
    def forward(ctx, a, c, pos, self_idx, t):
        n, step = a.shape[0], max(1, BLOCK_ELEMENTS // c.shape[0])
        lse, total = a.new_empty(n), a.new_zeros(())
        for s in range(0, n, step):
            logits, rows = _masked_logits(a, c, self_idx, t, s, step)
            lse[s:s + step] = torch.logsumexp(logits, dim=1)
            total += (lse[s:s + step] - logits[rows, pos[s:s + step]]).sum()
        ctx.save_for_backward(a, c, pos, self_idx, lse)
        ctx.t, ctx.step = t, step
        return total / n

    @staticmethod
    def backward(ctx, g):
        a, c, pos, self_idx, lse = ctx.saved_tensors
        t, step, n = ctx.t, ctx.step, a.shape[0]
        ga, gc = torch.empty_like(a), torch.zeros_like(c)
        with torch.autocast(device_type=a.device.type, enabled=False):
            for s in range(0, n, step):
                logits, rows = _masked_logits(a, c, self_idx, t, s, step)
                p = torch.exp(logits - lse[s:s + step, None])   # softmax; the masked column is 0
                p[rows, pos[s:s + step]] -= 1
                p *= g / (n * t)                                # d loss / d (a_i . c_j)
                ga[s:s + step] = p @ c
                gc += p.T @ a[s:s + step]
        return ga, gc, None, None, None


def _masked_logits(a, c, self_idx, t, s, step):
    """(logits of anchors s..s+step against every candidate with each anchor's own column at -inf, rows)."""
    logits = a[s:s + step] @ c.T / t
    rows = torch.arange(logits.shape[0], device=a.device)
    logits[rows, self_idx[s:s + step]] = float("-inf")
    return logits, rows


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) loss of SimCLR on one batch.

    Args:
        z1, z2: ``(B, D)`` projections of two views; row ``i`` of each forms a
            positive pair.  Need not be normalised.  Any float dtype; the loss
            is computed in float32 (float64 for float64 inputs) even under
            autocast.
        temperature: softmax temperature.

    Returns:
        Scalar mean loss over the ``2B`` anchors, each against the other
        ``2B - 1`` embeddings (:func:`nt_xent_local` with the batch as its own
        candidate set).  Under data parallelism the method passes the
        candidates of every rank to :func:`nt_xent_local` instead.
    """
    return nt_xent_local(z1, z2, z1, z2, 0, temperature)


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.1) -> Tensor:
    """InfoNCE loss of MoCo with a queue of negatives (pure function).

    Args:
        q: ``(B, D)`` queries; k: ``(B, D)`` their positive keys (row ``i`` of
            ``k`` is the positive of row ``i`` of ``q``); queue: ``(K, D)``
            negative keys.  All are L2-normalised here (need not be on input).
        temperature: softmax temperature ``t``.

    Returns:
        Scalar: mean over the ``B`` queries of
        ``-log(exp(q.k/t) / (exp(q.k/t) + sum_j exp(q.queue_j/t)))``, i.e.
        cross entropy of the ``(B, 1+K)`` logits with label 0.  Computed in
        float32 (float64 if an input is float64) with autocast disabled.
    """
    if q.dim() != 2 or q.shape != k.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, queue {tuple(queue.shape)}")
    dtype = compute_dtype(q, k, queue)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=1)
        k = F.normalize(k.to(dtype), dim=1)
        queue = F.normalize(queue.to(dtype), dim=1)
        pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
        neg = q @ queue.T  # (B, K)
        logits = torch.cat([pos, neg], dim=1) / temperature  # (B, 1+K)
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


def mocov3_contrastive(q: Tensor, k_all: Tensor, offset: int, temperature: float = 0.2) -> Tensor:
    """InfoNCE of MoCo v3 against the keys of the whole (global) batch, no queue (pure function).

    Args:
        q: ``(B, D)`` local queries (predictor outputs); k_all: ``(N, D)`` keys of every rank
            (``N = world*B``, no gradient expected), holding this rank's keys at rows
            ``offset : offset+B``.  Both are L2-normalised here.
        offset: global index of this rank's first sample (``rank * B``).
        temperature: softmax temperature ``t``.

    Returns:
        Scalar ``2 t * cross_entropy(q @ k_all.T / t, offset + arange(B))`` (mean over the ``B``
        queries; the ``2 t`` factor is MoCo v3's).  Computed in float32 (float64 if an input is
        float64) with autocast disabled.
    """
    if q.dim() != 2 or k_all.dim() != 2 or k_all.shape[1] != q.shape[1]:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k_all {tuple(k_all.shape)}")
    b, n = q.shape[0], k_all.shape[0]
    if not 0 <= offset <= n - b:
        raise ValueError(f"offset {offset} out of range for B={b}, N={n}")
    dtype = compute_dtype(q, k_all)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=1)
        k_all = F.normalize(k_all.to(dtype), dim=1)
        labels = offset + torch.arange(b, device=q.device)
        return F.cross_entropy(q @ k_all.T / temperature, labels) * (2 * temperature)


def _nce_scores(f: Tensor, bank_pos: Tensor, bank_noise: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Scaled similarities ``(B,)`` of f to its positive and ``(B, K)`` to the noise rows."""
    pos = (f * bank_pos).sum(dim=1) / temperature
    if bank_noise.dim() == 2:  # (K, D) shared by the whole batch
        noise = f @ bank_noise.T / temperature
    else:  # (B, K, D) per-sample noise
        noise = torch.einsum("bd,bkd->bk", f, bank_noise) / temperature
    return pos, noise


def nce_normalizer(f: Tensor, bank_pos: Tensor, bank_noise: Tensor, temperature: float, n_data: int) -> Tensor:
    """Monte-Carlo estimate of the InstDisc partition function ``Z = sum_i exp(v_i.f/t)``.

    ``Z ~= N * mean(exp(v.f/t))`` over the positive and noise rows of one batch
    (Wu et al. 2018 estimate it once, on the first batch, and keep it fixed).
    Shapes as in :func:`nce_loss`; ``f`` is L2-normalised here.  Returns a
    detached scalar (float32, float64 for float64 inputs).
    """
    dtype = compute_dtype(f, bank_pos, bank_noise)
    with torch.no_grad(), torch.autocast(device_type=f.device.type, enabled=False):
        f = F.normalize(f.to(dtype), dim=1)
        pos, noise = _nce_scores(f, bank_pos.to(dtype), bank_noise.to(dtype), temperature)
        return torch.cat([pos.exp(), noise.exp().flatten()]).mean() * n_data


def nce_loss(f: Tensor, bank_pos: Tensor, bank_noise: Tensor, Z, temperature: float, n_data: int) -> Tensor:
    """Noise-contrastive estimation loss of InstDisc (Wu et al. 2018), pure function.

    With ``P(i|f) = exp(v_i.f/t) / Z``, ``m = K`` noise samples from the uniform
    noise distribution ``Pn = 1/N`` and ``h(i, f) = P(i|f) / (P(i|f) + m Pn)``::

        loss = mean over the batch of  -log h(pos) - sum_{j=1..K} log(1 - h(noise_j))

    evaluated in the log domain (``log(P + m Pn)`` by logaddexp, no epsilon).

    Args:
        f: ``(B, D)`` embeddings (L2-normalised here; gradients flow through f).
        bank_pos: ``(B, D)`` memory-bank rows of the samples' own instances
            (unit norm, no gradient expected).
        bank_noise: ``(K, D)`` noise rows shared by the batch, or
            ``(B, K, D)`` per-sample noise rows (unit norm).
        Z: the normaliser (float or scalar tensor, see :func:`nce_normalizer`).
        temperature: ``t``.
        n_data: ``N``, the number of instances (memory-bank rows).

    Returns:
        Scalar loss, float32 (float64 for float64 inputs), autocast disabled.
    """
    if f.dim() != 2 or bank_pos.shape != f.shape or bank_noise.shape[-1] != f.shape[1]:
        raise ValueError(f"bad shapes f {tuple(f.shape)}, bank_pos {tuple(bank_pos.shape)}, "
                         f"bank_noise {tuple(bank_noise.shape)}")
    dtype = compute_dtype(f, bank_pos, bank_noise)
    with torch.autocast(device_type=f.device.type, enabled=False):
        f = F.normalize(f.to(dtype), dim=1)
        pos, noise = _nce_scores(f, bank_pos.to(dtype), bank_noise.to(dtype), temperature)
        log_z = torch.log(torch.as_tensor(Z, dtype=dtype, device=f.device))
        log_mpn = math.log(noise.shape[1] / n_data)  # log(m * Pn)
        log_p_pos, log_p_noise = pos - log_z, noise - log_z
        log_h_pos = log_p_pos - torch.logaddexp(log_p_pos, torch.full_like(log_p_pos, log_mpn))
        log_1mh_noise = log_mpn - torch.logaddexp(log_p_noise, torch.full_like(log_p_noise, log_mpn))
        return -(log_h_pos + log_1mh_noise.sum(dim=1)).mean()


def instance_softmax(f: Tensor, bank: Tensor, index: Tensor, temperature: float = 0.07) -> Tensor:
    """Full non-parametric softmax of InstDisc over the memory bank (pure function).

    Args:
        f: ``(B, D)`` embeddings (L2-normalised here).
        bank: ``(N, D)`` memory bank (unit-norm rows, no gradient expected).
        index: ``(B,)`` int64 instance indices (the labels).
        temperature: ``t``.

    Returns:
        Scalar ``cross_entropy(f @ bank.T / t, index)`` (mean over B), float32
        (float64 for float64 inputs), autocast disabled.
    """
    dtype = compute_dtype(f, bank)
    with torch.autocast(device_type=f.device.type, enabled=False):
        f = F.normalize(f.to(dtype), dim=1)
        return F.cross_entropy(f @ bank.to(dtype).T / temperature, index)
