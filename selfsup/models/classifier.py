"""Parametric instance classifier head (PIC, one-million-way instance classifier).

Pieces (the numerical core lives in :mod:`selfsup.parallel.sharded_classifier`):

* :class:`InstanceClassifier`: ``N`` rows ``W`` (``D``-dim, no bias), cosine
  softmax with temperature ``tau``, computed in row chunks; under
  ``torch.distributed`` each rank holds the contiguous shard
  ``shard_range(N, world, rank)`` of the rows (hybrid parallelism).  Optional
  smoothed labels on the top-K hardest classes (``hard_classes`` table).
* :class:`RecentInstances`: FIFO of the ``K`` most recently visited instance
  ids; its :meth:`~RecentInstances.candidates` give the sampled negatives.
* :class:`SparseRowSGD`: SGD with momentum and weight decay that updates only
  the sampled rows and their momentum (the "weight-update correction").

Typical sampled-negative step (every rank; ``index`` = this rank's instance ids)::

    gidx = all_gather_no_grad(index)                       # (G,), identical on all ranks
    smooth = clf.smooth_index(gidx)                        # (G, K) or None
    cand = recent.candidates(gidx, smooth)                 # sorted unique ids, identical on all ranks
    sel = clf.select(cand)                                 # this rank's candidate rows (leaf copy)
    loss = clf(z, index, rows=sel, alpha=0.2)              # global mean loss
    loss.backward()                                        # encoder (via DDP) + sel.rows.grad
    encoder_opt.step(); row_opt.step(sel)                  # row_opt = SparseRowSGD(clf.weight, ...)
    recent.push(gidx)

Full softmax: ``loss = clf(z, index)``; ``clf.weight`` gets a dense gradient
and may use a plain ``torch.optim.SGD``.  In both cases ``clf.weight`` must
not be synchronised by DDP (see :class:`InstanceClassifier`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.parallel.distributed import is_dist, rank as dist_rank, world_size
from selfsup.parallel.sharded_classifier import (
    DEFAULT_CHUNK,
    cosine_softmax,
    gather_rows,
    shard_range,
    topk_similar,
)

__all__ = [
    "InstanceClassifier",
    "RowSelection",
    "RecentInstances",
    "SparseRowSGD",
    "sparse_sgd_",
    "shard_range",
]

_INIT_BLOCK = 1 << 16  # rows per independently seeded init block (shard-invariant init)


@dataclass
class RowSelection:
    """This rank's members of a sampled candidate set (see :meth:`InstanceClassifier.select`).

    Attributes:
        ids: ``(m,)`` sorted global row ids held by this rank.
        local: ``(m,)`` their positions in the shard (``ids - start``).
        rows: ``(m, D)`` leaf copy of ``weight[local]`` with ``requires_grad``;
            after ``backward`` its ``.grad`` is the exact gradient of the loss
            wrt these rows, consumed by :meth:`SparseRowSGD.step`.
    """

    ids: Tensor
    local: Tensor
    rows: Tensor


class InstanceClassifier(nn.Module):
    """Cosine-softmax classifier over ``num_classes`` instances, rows sharded across ranks.

    Args:
        num_classes: ``N``.
        dim: ``D``.
        temperature: ``tau`` (PIC 0.2, one-million-way 0.15).
        chunk_size: rows per chunk of the softmax (memory ``O(G * chunk_size)``
            for the global batch ``G``).
        smooth_k: ``K > 0`` registers the ``hard_classes`` buffer ``(N, K)``
            (int64, ``-1`` = not yet computed) of the top-K hardest classes
            for label smoothing (:meth:`refresh_hard_classes_`).
        world, rank: shard layout; default: the process group's (1, 0 without
            one).  The rows held are ``[start, end) = shard_range(N, world, rank)``.
        seed: initial rows are unit-norm Gaussian rows drawn in blocks of 65536
            rows, block ``b`` from ``torch.Generator().manual_seed(seed + b)``,
            so a shard equals the same slice of the unsharded initialisation.

    Parameters / buffers:
        ``weight`` ``(end - start, D)`` (nn.Parameter): this rank's shard.
        It must NOT be averaged by DDP: either keep the classifier outside the
        module wrapped by ``DistributedDataParallel`` (simplest), or, before
        wrapping, call
        ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ["<prefix>.weight"])`` (fully qualified names within ``model``;
        also list ``<prefix>.hard_classes`` so DDP does not broadcast it).
        Exclude it from the encoder's optimiser; use ``torch.optim.SGD([clf.weight])``
        (full softmax) or :class:`SparseRowSGD` (sampled negatives).  Under
        sharding each rank's ``state_dict`` holds only its shard:
        :meth:`gather_weight` / :func:`~selfsup.parallel.sharded_classifier.gather_rows`
        give the full tensors for a world-size-independent checkpoint.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        temperature: float = 0.2,
        chunk_size: int = DEFAULT_CHUNK,
        smooth_k: int = 0,
        *,
        world: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if num_classes < 1 or dim < 1 or temperature <= 0 or chunk_size < 1 or not 0 <= smooth_k < num_classes:
            raise ValueError(f"bad classifier settings: num_classes={num_classes}, dim={dim}, "
                             f"temperature={temperature}, chunk_size={chunk_size}, smooth_k={smooth_k}")
        self.num_classes, self.dim = num_classes, dim
        self.temperature, self.chunk_size = float(temperature), int(chunk_size)
        self.world = world if world is not None else (world_size() if is_dist() else 1)
        self.rank = rank if rank is not None else (dist_rank() if is_dist() else 0)
        self.start, self.end = shard_range(num_classes, self.world, self.rank)
        w = torch.empty(self.end - self.start, dim, dtype=dtype)
        for b in range(self.start // _INIT_BLOCK, (self.end - 1) // _INIT_BLOCK + 1 if self.end > self.start else 0):
            b0 = b * _INIT_BLOCK
            blk = torch.randn(min(_INIT_BLOCK, num_classes - b0), dim, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(seed + b))
            lo, hi = max(b0, self.start), min(b0 + blk.shape[0], self.end)
            w[lo - self.start : hi - self.start] = F.normalize(blk[lo - b0 : hi - b0], dim=1).to(dtype)
        self.weight = nn.Parameter(w.to(device))
        self.smooth_k = smooth_k
        if smooth_k:
            self.register_buffer("hard_classes", torch.full((num_classes, smooth_k), -1, dtype=torch.long,
                                                            device=device))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, temperature={self.temperature}, "
                f"shard=[{self.start}, {self.end}) of world {self.world}, chunk_size={self.chunk_size}, "
                f"smooth_k={self.smooth_k}")

    def _check_world(self) -> None:
        w = world_size() if is_dist() else 1
        if w != self.world:
            raise ValueError(f"classifier was built for world {self.world} but the process group has {w} ranks")

    def forward(
        self,
        z: Tensor,
        target: Tensor,
        *,
        rows: RowSelection | None = None,
        smooth_index: Tensor | None = None,
        alpha: float = 0.0,
        detach_weight: bool = False,
        ddp_grad_scale: bool = True,
    ) -> Tensor:
        """Global mean cosine-softmax loss of this rank's features.

        Args:
            z: ``(B, D)`` this rank's features (normalised here); ``B`` equal on all ranks.
            target: ``(B,)`` int64 global instance ids.
            rows: ``None`` for the full softmax over all ``N`` rows, or a
                :class:`RowSelection` (from :meth:`select`, built from the SAME
                candidate ids on every rank) for sampled negatives.
            smooth_index: ``(B, K)`` smoothed-label class ids for this rank's
                samples; default with ``alpha != 0``: ``hard_classes[target]``.
            alpha: label-smoothing mass (0: plain cross entropy).
            detach_weight: no gradient to the rows (e.g. PIC's small crops,
                which train the encoder only).
            ddp_grad_scale: see :func:`~selfsup.parallel.sharded_classifier.cosine_softmax`.

        Returns:
            Scalar global mean loss over all ranks' samples (same on every
            rank).  Backward: exact gradient for the rows; ``world * dL/dz``
            for the features, which DDP's averaging turns into the exact
            encoder gradient (call ``loss.backward()`` unscaled).
        """
        self._check_world()
        if alpha != 0.0 and smooth_index is None:
            smooth_index = self.smooth_index(target)
        if rows is None:
            w = self.weight.detach() if detach_weight else self.weight
            return cosine_softmax(z, w, target, self.temperature, offset=self.start, smooth_index=smooth_index,
                                  alpha=alpha, chunk_size=self.chunk_size, ddp_grad_scale=ddp_grad_scale)
        w = rows.rows.detach() if detach_weight else rows.rows
        return cosine_softmax(z, w, target, self.temperature, row_ids=rows.ids, smooth_index=smooth_index,
                              alpha=alpha, chunk_size=self.chunk_size, ddp_grad_scale=ddp_grad_scale)

    def select(self, candidates: Tensor) -> RowSelection:
        """This rank's rows among the global candidate ids (sampled negatives).

        Args:
            candidates: ``(S,)`` int64 global ids (e.g. from
                :meth:`RecentInstances.candidates`), identical on every rank;
                sorted and deduplicated here.

        Returns:
            A :class:`RowSelection` whose ``rows`` is a fresh leaf copy
            (``O(|S ∩ shard| * D)``, independent of ``N``).
        """
        if candidates.dim() != 1 or candidates.dtype != torch.long:
            raise ValueError(f"candidates must be a 1-D int64 tensor, got {candidates.dtype} {tuple(candidates.shape)}")
        ids = torch.unique(candidates.to(self.weight.device))
        # range check on CPU only (two host reads); elsewhere ids outside [0, N) fall outside every shard
        # and are dropped below, and a target among them makes the loss NaN (see cosine_softmax)
        if ids.device.type == "cpu" and ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= self.num_classes):
            raise ValueError(f"candidate ids must lie in [0, {self.num_classes}), got [{int(ids[0])}, {int(ids[-1])}]")
        ids = ids[(ids >= self.start) & (ids < self.end)]
        local = ids - self.start
        rows = self.weight.detach().index_select(0, local).requires_grad_(True)
        return RowSelection(ids=ids, local=local, rows=rows)

    @torch.no_grad()
    def init_from_features_(self, features: Tensor) -> InstanceClassifier:
        """Contrastive prior: ``weight = normalize(features[start:end])``.

        Args:
            features: ``(N, D)`` features of all instances (e.g. from a fixed
                random network with running BN statistics), or ``(end-start, D)``
                features of this shard's instances only.

        The caller should also reset the rows' optimiser state.  Returns self.
        """
        n_local = self.end - self.start
        if features.dim() != 2 or features.shape[1] != self.dim or features.shape[0] not in (self.num_classes, n_local):
            raise ValueError(f"features must be ({self.num_classes}, {self.dim}) or ({n_local}, {self.dim}), "
                             f"got {tuple(features.shape)}")
        if features.shape[0] == self.num_classes:
            features = features[self.start : self.end]
        self.weight.copy_(F.normalize(features.to(self.weight), dim=1))
        return self

    def gather_weight(self) -> Tensor:
        """The full ``(N, D)`` weight on every rank (collective under sharding; ``O(N D)`` memory)."""
        self._check_world()
        return gather_rows(self.weight, self.num_classes)

    @torch.no_grad()
    def load_full_weight_(self, weight: Tensor) -> InstanceClassifier:
        """Copy this rank's rows from a full ``(N, D)`` weight (e.g. from :meth:`gather_weight`
        saved under another world size), unchanged.  Returns self."""
        if weight.shape != (self.num_classes, self.dim):
            raise ValueError(f"weight must be ({self.num_classes}, {self.dim}), got {tuple(weight.shape)}")
        self.weight.copy_(weight[self.start : self.end])
        return self

    def smooth_index(self, target: Tensor) -> Tensor | None:
        """``hard_classes[target]`` ``(..., K)``; ``None`` when ``smooth_k == 0``.

        Raises ``ValueError`` if a row of the table was never computed (checked on
        CPU; on CUDA without a host sync: the ``-1`` entries make the loss NaN).
        """
        if not self.smooth_k:
            return None
        idx = self.hard_classes[target]
        if idx.device.type == "cpu" and bool((idx < 0).any()):
            raise ValueError("hard_classes not computed for some targets: call refresh_hard_classes_ first")
        return idx

    @torch.no_grad()
    def refresh_hard_classes_(self, query_ids: Tensor | None = None, query_chunk: int = 4096) -> None:
        """Recompute ``hard_classes[q]`` = the ``K`` rows most similar to row ``q`` (``cos(w_q, w_j)``, ``j != q``).

        Args:
            query_ids: ``(Q,)`` global ids, identical on every rank (e.g. the
                all-gathered batch targets, cost ``O(Q N D / world)`` per call);
                ``None``: all ``N`` rows (``O(N^2 D / world)``, e.g. once per epoch).
            query_chunk: queries per pass (memory ``O(query_chunk * chunk_size)``).

        Collective under sharding (per-shard top-K, then a global merge); the
        table ends up identical on every rank.
        """
        if not self.smooth_k:
            raise ValueError("refresh_hard_classes_ needs smooth_k > 0")
        self._check_world()
        dev = self.weight.device
        if query_ids is None:
            query_ids = torch.arange(self.num_classes, device=dev)
        query_ids = torch.unique(query_ids.to(dev))
        for q0 in range(0, query_ids.numel(), query_chunk):
            q = query_ids[q0 : q0 + query_chunk]
            _, idx = topk_similar(self.weight, q, self.smooth_k, offset=self.start, num_rows=self.num_classes,
                                  chunk_size=self.chunk_size)
            self.hard_classes[q] = idx


class RecentInstances(nn.Module):
    """FIFO of the ``size`` most recent instance visits (recent negative sampling).

    Buffers (in ``state_dict``, so a checkpoint restores them): ``buffer``
    ``(size,)`` int64 (``-1`` = empty), ``ptr`` (next slot) and ``count``
    (filled slots).  Under data parallelism push the ALL-GATHERED batch ids on
    every rank so that all ranks hold the same FIFO and candidate set.  The
    size counts visits: an instance visited twice within ``size`` visits
    occupies two slots (the candidate set is deduplicated).
    """

    def __init__(self, size: int, device: torch.device | str | None = None):
        super().__init__()
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("buffer", torch.full((size,), -1, dtype=torch.long, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def push(self, index: Tensor) -> None:
        """Append ``(B,)`` visited ids in order, overwriting the oldest; ``O(B)``, no host sync."""
        if index.dim() != 1 or index.dtype != torch.long:
            raise ValueError(f"index must be a 1-D int64 tensor, got {index.dtype} {tuple(index.shape)}")
        index = index.to(self.buffer.device)[-self.size :]
        b = index.numel()
        slots = (self.ptr + torch.arange(b, device=self.buffer.device)) % self.size
        self.buffer.index_copy_(0, slots, index)
        self.ptr.copy_((self.ptr + b) % self.size)
        self.count.copy_((self.count + b).clamp(max=self.size))

    def recent(self) -> Tensor:
        """``(len(self),)`` stored ids, oldest first."""
        n, ptr = int(self.count), int(self.ptr)
        if n < self.size:
            return self.buffer[:n].clone()
        return torch.cat([self.buffer[ptr:], self.buffer[:ptr]])

    def candidates(self, *extra: Tensor | None) -> Tensor:
        """Sorted unique ids of the FIFO plus ``extra`` tensors (batch targets, smoothed-label ids; ``None`` skipped)."""
        parts = [self.buffer[: int(self.count)]] + [e.reshape(-1).to(self.buffer.device) for e in extra if e is not None]
        return torch.unique(torch.cat(parts))


@torch.no_grad()
def sparse_sgd_(
    weight: Tensor,
    momentum_buffer: Tensor,
    index: Tensor,
    grad: Tensor,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> None:
    """In-place SGD step on the rows ``index`` only (weight-update correction).

    For each row ``r`` in ``index`` (must be unique)::

        g      = grad_r + weight_decay * w_r
        buf_r  = momentum * buf_r + g
        w_r    = w_r - lr * buf_r

    (torch.optim.SGD's rule with dampening 0, no Nesterov; a zero buffer makes
    the first step ``buf = g`` as in torch).  Rows not in ``index`` and their
    buffer entries are not touched (bit-identical); cost ``O(|index| D)``.

    Args:
        weight, momentum_buffer: ``(n, D)``; index: ``(m,)`` int64 unique row
        positions; grad: ``(m, D)``.
    """
    if index.dim() != 1 or grad.shape != (index.shape[0], *weight.shape[1:]) or momentum_buffer.shape != weight.shape:
        raise ValueError(f"bad shapes: weight {tuple(weight.shape)}, buffer {tuple(momentum_buffer.shape)}, "
                         f"index {tuple(index.shape)}, grad {tuple(grad.shape)}")
    w = weight.index_select(0, index)
    buf = momentum_buffer.index_select(0, index)
    g = grad.to(w.dtype)
    if weight_decay != 0:
        g = g.add(w, alpha=weight_decay)
    buf.mul_(momentum).add_(g)
    w.add_(buf, alpha=-lr)
    weight.index_copy_(0, index, w)
    momentum_buffer.index_copy_(0, index, buf)


class SparseRowSGD(torch.optim.Optimizer):
    """SGD (momentum, weight decay) for the classifier shard that updates only sampled rows.

    ``step(selection)`` applies :func:`sparse_sgd_` to ``selection.local``
    with ``selection.rows.grad``; rows outside the selection and their
    momentum stay bit-identical and the cost is ``O(|selection| D)``.  One
    param group holding ``weight``, so ``lr`` lives in ``param_groups[0]["lr"]``
    and LR schedulers (``LambdaLR``) work as usual.  The momentum buffer
    (``(n_local, D)``, created at construction) is in ``state_dict``.

    Args:
        weight: the shard (``InstanceClassifier.weight``).
        lr, momentum, weight_decay: as in torch.optim.SGD.
    """

    def __init__(self, weight: Tensor, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"need lr, momentum, weight_decay >= 0, got {lr}, {momentum}, {weight_decay}")
        super().__init__([weight], dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.state[weight]["momentum_buffer"] = torch.zeros_like(weight, memory_format=torch.contiguous_format)

    @torch.no_grad()
    def step(self, selection: RowSelection | None = None, closure=None):  # noqa: D401 - optimiser API
        """Update the selected rows from ``selection.rows.grad`` (no-op without a gradient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if selection is None or selection.rows.grad is None:
            return loss
        group = self.param_groups[0]
        w = group["params"][0]
        sparse_sgd_(w, self.state[w]["momentum_buffer"], selection.local, selection.rows.grad, group["lr"],
                    group["momentum"], group["weight_decay"])
        return loss
