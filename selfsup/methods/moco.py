"""MoCo v1/v2: query encoder, EMA key encoder, FIFO queue of negative keys, InfoNCE, shuffle BN.

v1: ``model.head_layers=1`` (linear 128-d head), aug preset mocov1. v2: ``model.head_layers=2``
(MLP head), aug preset mocov2, cosine lr. Settings in ``cfg.moco`` (see ``MoCoConfig``).

State (all in ``state_dict``, so checkpointed and restored): the key encoder
(``key_encoder``, a :class:`~selfsup.methods.base.KeyEncoder`), ``queue`` (K, D) of unit-norm keys, ``queue_ptr`` (the
next row to write) and ``queue_src`` (the rank that produced each row; -1 before it is written).

Choices where the sources leave room:

* The EMA ``theta_k <- m theta_k + (1 - m) theta_q`` runs in :meth:`after_step`, i.e. right
  after the optimiser step, which equals MoCo's update at the start of the next forward.
* BN buffers of the key encoder are EMA-updated like the parameters (float buffers:
  running mean/var); integer buffers (``num_batches_tracked``) are copied. The key encoder's
  BN momentum is set to 0, so its own forwards (train mode: batch statistics) leave its
  running statistics untouched: they are exactly an EMA of the query encoder's.
* Keys are enqueued in :meth:`after_step` (all ranks' keys, gathered in rank order), so the
  loss of a step uses the queue as it was before that step, as in MoCo.
* Shuffle BN (``moco.shuffle_bn``): across ranks under torch.distributed (each rank one
  sub-batch of the shuffled global batch); on one device split BN into ``moco.bn_splits``
  shuffled sub-batches. See :mod:`selfsup.parallel.shuffle_bn`. With ``train.sync_bn=true``
  under torch.distributed the key encoder's BN is synchronised too, which undoes the shuffle:
  the MoCo presets set ``train.sync_bn: false``. A key encoder without BatchNorm (a timm ViT with
  a BN-free head) has no batch statistics to shuffle: shuffle BN and ``moco.bn_splits`` are then
  no-ops (keys computed on the whole batch at once, no permutation drawn).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import info_nce
from ..parallel import distributed as D
from ..parallel.shuffle_bn import shuffle_bn_forward, split_bn_forward
from .base import KeyEncoder, Method, in_chunks, rename_old_key_encoder


class MoCo(Method):
    """MoCo. forward(views=[x1, x2], index) -> {"loss"}; after_step: EMA + enqueue."""

    n_views = 2
    per_sample_loss = True   # each query's term reads its key and the queue, not other queries

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        c = cfg.moco
        self.momentum, self.temperature, self.symmetric = c.momentum, c.temperature, c.symmetric
        self.shuffle_bn, self.bn_splits = c.shuffle_bn, c.bn_splits
        self.key_encoder = KeyEncoder(self.backbone, self.head)   # BN running stats only from the EMA
        self._register_load_state_dict_pre_hook(rename_old_key_encoder, with_module=True)
        self.shuffle_bn = self.shuffle_bn and self.key_encoder.has_bn   # nothing to shuffle without BN (a ViT)
        dim = cfg.model.proj_dim
        self.register_buffer("queue", F.normalize(torch.randn(c.queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # the rank that produced each queue row (-1: still the random initial row), for checks
        self.register_buffer("queue_src", torch.full((c.queue_size,), -1, dtype=torch.long))
        self._pending_keys: list[Tensor] = []

    def rank_identical_buffers(self) -> list[str]:
        return ["queue", "queue_ptr", "queue_src"]   # written in after_step from all ranks' keys

    def query(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) query embeddings (not normalised)."""
        return self.head(self.backbone(x))

    @torch.no_grad()
    def keys(self, x: Tensor, chunk: int | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, D) unit-norm keys from the key encoder, in x's order (shuffle BN). `chunk`:
        without shuffle BN, encode at most this many images at once (split BN already does)."""
        enc = self.key_encoder
        if not self.shuffle_bn:
            k = in_chunks(enc, x, chunk)
        elif D.world_size() > 1:
            k = shuffle_bn_forward(enc, x)
        else:
            k = split_bn_forward(enc, x, self.bn_splits)
        return F.normalize(k.to(self.queue.dtype), dim=1)

    def prepare(self, views, index, chunk=None):
        """This step's keys (k2, then k1 when symmetric); they are enqueued in after_step."""
        x1, x2 = views
        keys = [self.keys(x2, chunk)] + ([self.keys(x1, chunk)] if self.symmetric else [])
        self._pending_keys = keys[::-1]
        return keys

    def encode(self, views):
        return [self.query(x) for x in (views if self.symmetric else views[:1])]

    def loss(self, reps, ctx, index, part=slice(None)):
        # the queue holds keys of earlier steps; this step's keys are enqueued in after_step
        t, queue = self.temperature, self.queue
        loss = info_nce(reps[0], ctx[0][part], queue, t)
        if self.symmetric:
            loss = loss + info_nce(reps[1], ctx[1][part], queue, t)
        return {"loss": loss}

    @torch.no_grad()
    def enqueue(self, keys: Tensor, src: Tensor | None = None) -> None:
        """Write (n, D) keys into the FIFO queue at the pointer, wrapping around; any n.

        With n > K only the last K keys are kept (they land where a row-by-row write would
        leave them). The pointer advances by n modulo K. `src` (n,): the rank each key came
        from (default 0), kept in ``queue_src``.
        """
        k_size, n = self.queue.shape[0], keys.shape[0]
        if src is None:
            src = torch.zeros(n, dtype=torch.long, device=keys.device)
        ptr = self.queue_ptr   # pointer arithmetic stays on the device: no host sync per step
        if n > k_size:
            ptr, keys, src = (ptr + n - k_size) % k_size, keys[n - k_size:], src[n - k_size:]
        rows = (ptr + torch.arange(keys.shape[0], device=ptr.device)) % k_size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_src[rows] = src.to(self.queue_src.device)
        self.queue_ptr.copy_((ptr + keys.shape[0]) % k_size)

    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for parameters and float buffers; int buffers copied."""
        self.key_encoder.update(self.momentum)

    def discard_step(self) -> None:
        self._pending_keys = []

    def after_step(self) -> None:
        """Enqueue this step's keys from all ranks (rank order; both key sets when symmetric),
        then EMA-update the key encoder."""
        for k in self._pending_keys:
            src = torch.arange(D.world_size(), device=k.device).repeat_interleave(k.shape[0])
            self.enqueue(D.all_gather_no_grad(k), src)
        self._pending_keys = []
        self.momentum_update()
