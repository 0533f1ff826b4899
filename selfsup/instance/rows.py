"""The instance classifier's rows as a module: ``N`` cosine-softmax rows, sharded across ranks.

* :class:`InstanceClassifier`: ``N`` rows ``W`` (``D``-dim, no bias), cosine softmax with
  temperature ``tau`` (:func:`~selfsup.instance.softmax.cosine_softmax`, chunked); under
  ``torch.distributed`` each rank holds the contiguous shard ``shard_range(N, world, rank)`` of the
  rows (hybrid parallelism).  Optional smoothed labels on the top-K hardest classes
  (``hard_classes`` table).
* :class:`RecentInstances`: FIFO of the ``K`` most recently visited instance ids; its
  :meth:`~RecentInstances.candidates` give the sampled negatives.
* :func:`shard_range`, :func:`gather_rows`: the shard layout, and whole tensors from shards.

One step with sampled negatives (every rank; ``index`` = this rank's instance ids)::

    gidx = all_gather_no_grad(index)                       # the global batch, gathered once per step
    targets = Targets(gidx, clf.smooth_index(gidx), alpha) # smooth_index: (G, K) or None
    rows = clf.select(recent.candidates(gidx, targets.smooth))   # identical candidates on every rank
    loss = clf(z, targets, rows)                           # global mean loss
    loss.backward()                                        # encoder (via DDP) + rows.weight.grad
    row_sgd_(clf.weight, momentum, rows, lr)               # instance.optim: only those rows move
    recent.push(gidx)

Full softmax: ``rows = clf.shard()``; ``clf.weight`` then gets the gradient.  In both cases
``clf.weight`` must not be synchronised by DDP (see :class:`InstanceClassifier`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parallel.distributed import all_gather_no_grad, world_size
from ..parallel.distributed import rank as dist_rank
from .fused import RowUpdate
from .softmax import DEFAULT_CHUNK, Rows, Targets, cosine_softmax, host_checks, topk_similar

__all__ = ["InstanceClassifier", "RecentInstances", "shard_range", "gather_rows"]

_INIT_BLOCK = 1 << 16  # rows per independently seeded init block (shard-invariant init)


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous rows ``[start, end)`` of ``n`` rows held by ``rank`` of ``world``.

    The first ``n % world`` ranks hold one row more than the others (sizes
    differ by at most one; a shard is empty when ``n < world``).  The shards of
    ranks ``0..world-1`` tile ``[0, n)`` in order.
    """
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need n >= 0, world >= 1 and 0 <= rank < world, got n={n}, world={world}, rank={rank}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def gather_rows(x: Tensor, n: int) -> Tensor:
    """Reassemble row shards (``shard_range`` layout) into the full ``(n, ...)`` tensor on every rank.

    Args:
        x: ``(end - start, ...)`` this rank's shard of an ``(n, ...)`` tensor
            (e.g. the classifier weight or its momentum buffer).
        n: total number of rows.

    Returns:
        The full tensor (a copy of ``x`` with one process).  Shards are padded
        to ``ceil(n / world)`` rows for the all-gather.  Memory ``O(n)`` per
        rank: meant for checkpoints / evaluation, not for every step.
    """
    world = world_size()
    start, end = shard_range(n, world, dist_rank())
    if x.shape[0] != end - start:
        raise ValueError(f"shard has {x.shape[0]} rows, expected {end - start} (n={n}, world={world})")
    if world == 1:
        return x.detach().clone()
    size = math.ceil(n / world)
    pad = x.new_zeros((size, *x.shape[1:]))
    pad[: x.shape[0]] = x.detach()
    parts = all_gather_no_grad(pad).reshape(world, size, *x.shape[1:])
    sizes = [e - s for s, e in (shard_range(n, world, r) for r in range(world))]
    return torch.cat([parts[r][: sizes[r]] for r in range(world)])


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
        fused_chunk_size: rows per chunk of the fused step (``forward(..., update=)``);
            ``None``: :func:`~selfsup.instance.fused.fused_chunk_size` of the device.
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
        Exclude it from the encoder's optimiser and update it with
        :func:`~selfsup.instance.optim.row_sgd_`.  Under sharding each rank's
        ``state_dict`` holds only its shard: :func:`gather_rows` gives the full
        tensors for a world-size-independent checkpoint.
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
        fused_chunk_size: int | None = None,
    ):
        super().__init__()
        if num_classes < 1 or dim < 1 or temperature <= 0 or chunk_size < 1 or not 0 <= smooth_k < num_classes:
            raise ValueError(f"bad classifier settings: num_classes={num_classes}, dim={dim}, "
                             f"temperature={temperature}, chunk_size={chunk_size}, smooth_k={smooth_k}")
        self.num_classes, self.dim = num_classes, dim
        self.temperature, self.chunk_size = float(temperature), int(chunk_size)
        self.fused_chunk_size = fused_chunk_size   # the fused step's chunk (None: per device)
        self.world = world if world is not None else world_size()
        self.rank = rank if rank is not None else dist_rank()
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
        w = world_size()
        if w != self.world:
            raise ValueError(f"classifier was built for world {self.world} but the process group has {w} ranks")

    def forward(self, z: Tensor, targets: Targets, rows: Rows | None = None, *, detach: bool = False,
                ddp_grad_scale: bool = True, update: RowUpdate | None = None) -> Tensor:
        """Global mean cosine-softmax loss of this rank's features.

        Args:
            z: ``(B, D)`` this rank's features (normalised here); ``B`` equal on all ranks.
            targets: the global batch's :class:`~selfsup.instance.softmax.Targets`
                (``G = world * B`` ids, optional smoothed-label ids and alpha).
            rows: ``None`` (or :meth:`shard`) for the full softmax over all ``N``
                rows, or a selection from :meth:`select` (built from the SAME
                candidate ids on every rank) for sampled negatives.
            detach: no gradient to the rows (PIC's small crops train the encoder only).
            ddp_grad_scale: see :func:`~selfsup.instance.softmax.cosine_softmax`.
            update: the fused step (:mod:`selfsup.instance.fused`): ``RowUpdate(self.weight,
                momentum, lr, ...)``; the backward moves the rows (and their momentum) chunk by
                chunk instead of leaving a gradient (chunks of ``fused_chunk_size`` rows, or
                per device).  Not with ``detach``.

        Returns:
            Scalar global mean loss over all ranks' samples (same on every
            rank).  Backward: exact gradient for the rows; ``world * dL/dz``
            for the features, which DDP's averaging turns into the exact
            encoder gradient (call ``loss.backward()`` unscaled).
        """
        self._check_world()
        rows = rows if rows is not None else self.shard()
        if detach:
            if update is not None:
                raise ValueError("detach=True trains no rows: no update")
            rows = dataclasses.replace(rows, weight=rows.weight.detach())
        if update is not None and update.weight is not self.weight:
            raise ValueError("update.weight must be this classifier's weight")
        return cosine_softmax(z, rows, targets, self.temperature,
                              chunk_size=self.chunk_size if update is None else self.fused_chunk_size,
                              ddp_grad_scale=ddp_grad_scale, update=update)

    def shard(self) -> Rows:
        """All rows of this rank (the full softmax): ``weight``, global ids ``start .. end-1``."""
        return Rows(self.weight, offset=self.start)

    def select(self, candidates: Tensor) -> Rows:
        """This rank's rows among the global candidate ids (sampled negatives).

        Args:
            candidates: ``(S,)`` int64 global ids (e.g. from
                :meth:`RecentInstances.candidates`), identical on every rank;
                sorted and deduplicated here.

        Returns:
            :class:`~selfsup.instance.softmax.Rows` with the sorted global ``ids``
            held here, their shard positions ``local`` and ``weight`` a fresh leaf
            copy of those rows (``O(|S ∩ shard| * D)``, independent of ``N``),
            whose ``.grad`` after backward is the exact gradient of the loss.
        """
        if candidates.dim() != 1 or candidates.dtype != torch.long:
            raise ValueError(f"candidates must be a 1-D int64 tensor, got {candidates.dtype} {tuple(candidates.shape)}")
        ids = torch.unique(candidates.to(self.weight.device))
        # range check on CPU only (two host reads; host_checks); elsewhere ids outside [0, N) fall outside every shard
        # and are dropped below, and a target among them makes the loss NaN (see cosine_softmax)
        if host_checks(ids.device) and ids.numel() and (int(ids[0]) < 0 or int(ids[-1]) >= self.num_classes):
            raise ValueError(f"candidate ids must lie in [0, {self.num_classes}), got [{int(ids[0])}, {int(ids[-1])}]")
        ids = ids[(ids >= self.start) & (ids < self.end)]
        local = ids - self.start
        weight = self.weight.detach().index_select(0, local).requires_grad_(True)
        return Rows(weight, ids=ids, local=local)

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

    def smooth_index(self, target: Tensor) -> Tensor | None:
        """``hard_classes[target]`` ``(..., K)`` (for the global batch's ids: the
        :class:`~selfsup.instance.softmax.Targets` ``smooth``); ``None`` when ``smooth_k == 0``.

        Raises ``ValueError`` if a row of the table was never computed (checked on
        CPU; on CUDA without a host sync: the ``-1`` entries make the loss NaN).
        """
        if not self.smooth_k:
            return None
        idx = self.hard_classes[target]
        if host_checks(idx.device) and bool((idx < 0).any()):
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
        self._host_count = None   # (the count tensor, its version, its value): count without a device read

    def __len__(self) -> int:
        return self.filled()

    def filled(self) -> int:
        """``int(count)``, read from the device only when the buffer is not the one :meth:`push` last
        counted (a new tensor after ``.to()``, or written by ``load_state_dict`` or another in-place op);
        otherwise from a host-side copy: no host sync in a steady-state step."""
        buf, cached = self.count, self._host_count
        if cached is None or cached[0] is not buf or cached[1] != buf._version:
            cached = self._host_count = (buf, buf._version, int(buf))
        return cached[2]

    @torch.no_grad()
    def push(self, index: Tensor) -> None:
        """Append ``(B,)`` visited ids in order, overwriting the oldest; ``O(B)``, no host sync."""
        if index.dim() != 1 or index.dtype != torch.long:
            raise ValueError(f"index must be a 1-D int64 tensor, got {index.dtype} {tuple(index.shape)}")
        index = index.to(self.buffer.device)[-self.size :]
        b = index.numel()
        filled = self.filled()
        slots = (self.ptr + torch.arange(b, device=self.buffer.device)) % self.size
        self.buffer.index_copy_(0, slots, index)
        self.ptr.copy_((self.ptr + b) % self.size)
        self.count.copy_((self.count + b).clamp(max=self.size))
        self._host_count = (self.count, self.count._version, min(filled + b, self.size))

    def recent(self) -> Tensor:
        """``(len(self),)`` stored ids, oldest first."""
        n, ptr = self.filled(), int(self.ptr)
        if n < self.size:
            return self.buffer[:n].clone()
        return torch.cat([self.buffer[ptr:], self.buffer[:ptr]])

    def candidates(self, *extra: Tensor | None) -> Tensor:
        """Sorted unique ids of the FIFO plus ``extra`` tensors (batch targets, smoothed-label ids;
        ``None`` skipped)."""
        parts = [self.buffer[: self.filled()]]
        parts += [e.reshape(-1).to(self.buffer.device) for e in extra if e is not None]
        return torch.unique(torch.cat(parts))
