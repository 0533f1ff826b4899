"""What every method shares: an encoder f, a projection head g, and the hooks the engine calls.

A method owns only what differs between methods: its extra state, its loss (`forward`), and its
after-step hook. The engine knows nothing of any one method. A method reads its settings from the
config once, when it is built, and keeps them as attributes.

The hooks, in the order the engine calls them:

* ``setup(N)`` once, then ``init_from_data(encode)`` on a fresh start (not on resume);
* each step: ``make_views`` -> ``forward(views, index)`` -> backward -> the engine's optimiser
  step -> ``optimizer_step(lr)`` -> ``after_step()``; a step dropped by the non-finite guard calls
  ``discard_step()`` instead of the last three;
* ``forward`` is ``loss(encode(views), prepare(views, index), index)``, three parts the engine also
  calls one by one under ``train.micro_batch`` (gradient caching, :mod:`selfsup.engine.step`):
  ``prepare`` (no gradient, once per step: keys, noise rows, targets, the gathers), ``encode`` (the
  trained representations, row i from sample i only) and ``loss`` (on all rows, or on a part of the
  batch when ``per_sample_loss``);
* under DDP: ``ddp_ignored()`` (per-rank state) and ``rank_identical_buffers()`` are kept out of
  DDP's broadcasts;
* checkpoints: ``gather_sharded_state`` (collective) when ``ddp_ignored()`` is not empty;
* the kNN monitor: ``encoder`` and ``monitor_bank()``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from ..models.heads import projection_head

# encode(net, train_bn=False) -> (N, D) unit-norm features of the training images in dataset order,
# clean (test-transform) views, computed by the engine: what a method needs to start from its data
Encode = Callable[..., Tensor]


class Method(nn.Module):
    """Base class. Subclasses set `n_views` and implement `encode`, `loss` and, when they need one,
    `prepare` (the parts of `forward(views, index) -> dict`).

    forward returns a dict with at least "loss" (a scalar tensor) and "embedding" (the first view's
    representation, detached: the collapse alarm's input); other entries are logged.
    `views` is a list of `n_views` float tensors (B, 3, H, W); `index` the (B,) instance indices.
    """

    n_views: int = 2
    # the loss is a mean of per-sample terms once `prepare` has run (no term reads another sample's
    # representation): under train.micro_batch each chunk's loss is backpropagated as it comes
    per_sample_loss: bool = False

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        m = cfg.model
        # a method with heads of its own passes its head: model.head_* then build (and draw) nothing
        self.head = head if head is not None else \
            projection_head(feat_dim, m.head_hidden or feat_dim, m.proj_dim, m.head_layers, m.head_out_bn)

    def forward(self, views: list[Tensor], index: Tensor, encode_only: bool = False):
        """The step's outputs {"loss", ...}; with `encode_only`, only ``encode(views)`` (the engine's
        gradient-caching passes go through here, so DDP sees each of them)."""
        if encode_only:
            return self.encode(views)
        ctx = self.prepare(views, index)
        reps = self.encode(views)
        return {**self.loss(reps, ctx, index), "embedding": reps[0].detach()}

    def prepare(self, views: list[Tensor], index: Tensor, chunk: int | None = None):
        """What the loss needs besides the representations, computed once per step without a gradient
        (keys of a momentum encoder, noise rows, targets; every collective of the step but the loss's
        own): the step's context for `loss`. `chunk`: run any encoder on at most this many images at
        once. None by default."""

    def encode(self, views: list[Tensor]) -> list[Tensor]:  # pragma: no cover - abstract
        """The trained representations of `views`: a list of (b, ...) tensors whose row i depends on
        sample i of the views only (and on BatchNorm's batch statistics)."""
        raise NotImplementedError

    def loss(self, reps: list[Tensor], ctx, index: Tensor, part: slice = slice(None)) -> dict:  # pragma: no cover
        """The outputs ("loss" and logged extras) for the samples `part` of the batch: `reps` are those
        samples' representations, `ctx` and `index` the whole batch's. `part` is the whole batch unless
        `per_sample_loss`."""
        raise NotImplementedError

    @property
    def encoder(self) -> nn.Module:
        """The representation network f used downstream (kNN, linear eval, export)."""
        return self.backbone

    def setup(self, num_samples: int) -> None:
        """Called by the engine once, before the optimiser is built, with the training set's size
        N (methods with per-instance state size it here). No-op by default."""

    def init_from_data(self, encode: Encode) -> None:
        """Called on a fresh start (not on resume), after `setup` and the move to the device, with
        `encode(net, train_bn=False)`: the unit-norm features of the training images under `net`.
        For state that starts from the data. No-op by default."""

    def view_augs(self, aug) -> list:
        """The augmentation of each of the `n_views` views: the engine's `aug` for every view by
        default; multi-crop methods override this."""
        return [aug] * self.n_views

    def make_views(self, images, aug, generator, precropped: bool = False) -> list[Tensor]:
        """The step's views of uint8 `images` (B, C, H, W), one draw of each of `view_augs(aug)`.
        `precropped`: `images` is a list holding each view's random-resized crops, cut while decoding
        (streamed data); only the rest of each augmentation is applied."""
        augs = self.view_augs(aug)
        if precropped:
            return [a(x, generator, crop=False) for a, x in zip(augs, images)]
        return [a(images, generator) for a in augs]

    def own_parameters(self) -> list:
        """Parameters the method updates itself in `optimizer_step` (PIC's classifier rows); the
        engine's optimiser leaves them out. Empty by default."""
        return []

    def before_step(self, lr: float) -> None:
        """Called before each step's forward with the learning rate its optimiser step will use (PIC's
        fused head updates its rows inside the backward). No-op by default."""

    def optimizer_step(self, lr: float) -> None:
        """Called right after the engine's optimiser step, with the learning rate that step used:
        update `own_parameters()` here. No-op by default."""

    def after_step(self) -> None:
        """Called once after each optimiser step (EMA updates, queues, banks)."""

    def discard_step(self) -> None:
        """Forget what `forward` left for `optimizer_step` and `after_step` (a step dropped by the
        non-finite guard)."""

    def ddp_ignored(self) -> list[str]:
        """Names of parameters and buffers that differ between ranks (classifier shards): DDP neither
        broadcasts nor synchronises them. Empty by default."""
        return []

    def rank_identical_buffers(self) -> list[str]:
        """Names of buffers every rank updates identically from gathered data (InstDisc's bank, MoCo's
        queue): made equal once when DDP wraps the model, then never broadcast again (DDP would
        otherwise send them from rank 0 at every forward). Empty by default."""
        return []

    def gather_sharded_state(self, state: dict) -> dict:
        """The full state dict (every rank's shard) for a checkpoint; collective, called on every
        rank when `ddp_ignored()` is not empty."""
        return state

    def monitor_bank(self) -> Tensor | None:
        """Training-set features the method keeps itself, (N, D) unit rows in dataset order, in the
        space of `head(backbone(x))` (InstDisc's memory bank); the kNN monitor then reports a second
        kNN on them. None (the default) when the method keeps none."""
        return None


def chunks(b: int, m: int) -> list[slice]:
    """The fewest parts of at most `m` of a batch of `b`, their sizes differing by at most one (no small
    last part: BatchNorm's groups stay alike); train.micro_batch's chunks."""
    n = -(-b // m)
    size, extra = divmod(b, n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int | None) -> Tensor:
    """``fn(x)`` computed on the fewest parts of at most `chunk` rows (sizes differing by at most one,
    as the engine's micro-batches), concatenated; on all of `x` at once when `chunk` is None."""
    if not chunk or chunk >= x.shape[0]:
        return fn(x)
    return torch.cat([fn(x[p]) for p in chunks(x.shape[0], chunk)])


class KeyEncoder(nn.Module):
    """The momentum ("key") encoder of MoCo v1-v3: ``forward(x) = head(backbone(x))`` with frozen copies
    of the query's backbone and head, moved toward them by ``update(m)`` (an EMA: theta_k <- m theta_k +
    (1 - m) theta_q, BN running statistics too) and never by gradients. Its BatchNorm layers get
    momentum 0, so its own forwards (train mode: batch statistics) leave their running statistics alone:
    those are exactly an EMA of the query's. `has_bn`: whether it has any BatchNorm (shuffle BN needs it).

    State-dict names: ``key_encoder.backbone.*`` and ``key_encoder.head.*``; a method holding one
    registers :func:`rename_old_key_encoder` so checkpoints with the older ``key_backbone.*`` /
    ``key_head.*`` names still load."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = copy.deepcopy(backbone), copy.deepcopy(head)
        self.requires_grad_(False)
        self._query = (backbone, head)   # a plain tuple: not registered, not in the state dict
        self.has_bn = False
        for mod in self.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.momentum = 0.0
                self.has_bn = True

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def update(self, m: float) -> None:
        """Move the key encoder toward the query's backbone and head with momentum `m`."""
        ema_update_(((self._query[0], self.backbone), (self._query[1], self.head)), m)


def rename_old_key_encoder(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook: ``key_backbone.*`` / ``key_head.*`` (MoCo checkpoints written before
    :class:`KeyEncoder`) renamed to ``key_encoder.backbone.*`` / ``key_encoder.head.*`` in place."""
    for old, new in (("key_backbone.", "key_encoder.backbone."), ("key_head.", "key_encoder.head.")):
        for k in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + k[len(prefix + old):]] = state_dict.pop(k)


@torch.no_grad()
def ema_update_(pairs, m: float) -> None:
    """For each (src, dst) module pair: theta_dst <- m theta_dst + (1 - m) theta_src for parameters and
    floating buffers (BN running statistics); integer buffers copied. The key encoders of MoCo v1-v3."""
    for src, dst in pairs:
        for pq, pk in zip(src.parameters(), dst.parameters()):
            pk.mul_(m).add_(pq.detach() * (1.0 - m))
        for bq, bk in zip(src.buffers(), dst.buffers()):
            if bk.is_floating_point():
                bk.mul_(m).add_(bq * (1.0 - m))
            else:
                bk.copy_(bq)
