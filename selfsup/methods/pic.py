"""PIC (Cao et al. 2020) and the one-million-way instance classifier (Liu et al. 2021).

Every training image is its own class: z = normalize(g(f(x))), a cosine-softmax classifier over the
N instances (:class:`~selfsup.instance.InstanceClassifier`, rows normalised in the forward,
temperature ``pic.temperature``), cross-entropy against the image's own index. Settings in
``cfg.pic`` (see ``PICConfig``); the one-million-way classifier is this method with
``pic.prior=true``, ``pic.smooth_alpha``/``pic.smooth_k`` and tau 0.15 (its presets set them).

* **Classifier rows** are sharded across the ranks of ``torch.distributed`` (hybrid parallelism:
  the encoder and head are data-parallel under DDP, each rank holds the rows
  ``shard_range(N, world, rank)``; features are all-gathered, the softmax max and sum are
  all-reduced, so communication per step is O(B D + B), independent of N). The shard, its momentum
  and the hard-class table are excluded from DDP (:meth:`ddp_ignored`).
* **The method updates the rows itself** (:meth:`optimizer_step`, :func:`~selfsup.instance.row_sgd_`),
  with the engine's lr (times ``pic.row_lr_scale``), ``train.momentum`` and ``train.weight_decay`` and
  torch SGD's rule ``buf = m buf + (g + wd w); w -= lr buf``. With the full
  softmax (``pic.negatives=0``) every row of the shard is updated each step. With sampled negatives
  (``pic.negatives=K``: the K most recent visits of all ranks plus the batch's positives and their
  hard classes) only the sampled rows and their momentum change: rows outside the set stay
  bit-identical (the weight-update correction) and a step's cost does not grow with N.
* **Multi-crop** (``pic.small_crops``): the large crop (the trainer's augmentation, or
  ``pic.large_size``) trains encoder and rows; each small crop (``pic.small_size``,
  ``pic.small_scale``) is classified by the detached rows, training the encoder only. The loss is
  the mean over the crops (open in the paper).
* **Contrastive prior** (``pic.prior``): at a fresh start the rows are the normalised head
  features of the untrained network, after one pass over the data (clean images) with BN in
  training mode to collect running statistics (cumulative average), then one in eval mode.
* **Smoothed labels** (``pic.smooth_alpha`` > 0, ``pic.smooth_k`` = K): target 1 - alpha on the own
  class, alpha / K on the K rows most similar to its row (cos(w_i, w_j)), refreshed before each
  step for the batch's targets (per-shard top-K merged across ranks; O(B N D / world) per step).
* **Fused head** (``pic.fused``): the large crop's backward applies the row update chunk by chunk
  (:mod:`selfsup.instance.fused`: no (N, D) gradient, each row read and written once per backward);
  the same step as the unfused one to float32 rounding. The lr comes from :meth:`before_step`; the
  small crops' heads run their backward first (they are built later), so they see the rows as they
  were. A moved row cannot be put back, so it needs ``train.nonfinite=stop``.
* **One gather per step**: the batch's instance ids are all-gathered once; the targets and smoothed
  labels of the global batch (:class:`~selfsup.instance.Targets`) serve the large crop and every
  small crop.

Checkpoints hold the full N-row weight and momentum (gathered from every shard), so a run resumes
on any number of ranks.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..data.augment import augment_from_config
from ..instance import InstanceClassifier, RecentInstances, RowUpdate, Targets, gather_rows, row_sgd_
from ..parallel import distributed as D
from .base import Encode, Method

SHARDED = ("clf.weight", "clf_momentum")   # (rows of this rank) in memory, (all N rows) in checkpoints


class PIC(Method):
    """PIC. forward(views=[large, *small], index) -> {"loss"}; optimizer_step updates the rows."""

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        c = cfg.pic
        self.n_views = 1 + c.small_crops
        self.temperature, self.chunk_size, self.smooth_k, self.prior = c.temperature, c.chunk_size, c.smooth_k, c.prior
        self.seed, self.dim = cfg.seed, cfg.model.proj_dim
        self.alpha = c.smooth_alpha if c.smooth_k else 0.0
        self.row_lr_scale, self.row_momentum, self.row_weight_decay = \
            c.row_lr_scale, cfg.train.momentum, cfg.train.weight_decay
        self.clf: InstanceClassifier | None = None   # sized in setup()
        self.recent = RecentInstances(c.negatives) if c.negatives else None
        self.small_aug = augment_from_config(cfg.aug, c.small_size, c.small_scale) if c.small_crops else None
        self.large_aug = augment_from_config(cfg.aug, c.large_size) if c.large_size else None
        self._pending = None
        self.fused, self._lr = c.fused, None   # pic.fused needs train.nonfinite=stop (checked with the config)
        self._register_load_state_dict_pre_hook(self._take_own_shard)

    def setup(self, num_samples: int) -> None:
        """The N-way classifier (this rank's shard when distributed) and its momentum buffer."""
        if self.smooth_k >= num_samples:
            raise ValueError(f"pic.smooth_k={self.smooth_k} must be smaller than the number of instances {num_samples}")
        self.clf = InstanceClassifier(num_samples, self.dim, self.temperature, self.chunk_size, self.smooth_k,
                                      seed=self.seed)
        self.register_buffer("clf_momentum", torch.zeros_like(self.clf.weight))

    def _take_own_shard(self, state_dict, prefix, *args):
        """Checkpoints hold all N rows: keep this rank's shard (any world size at save time). A model
        built without setup() (to read a checkpoint's encoder) takes N from the checkpoint."""
        if self.clf is None:
            if prefix + "clf.weight" not in state_dict:
                return
            self.setup(state_dict[prefix + "clf.weight"].shape[0])
        for name in SHARDED:
            v = state_dict.get(prefix + name)
            if v is not None and v.shape[0] == self.clf.num_classes != self.clf.weight.shape[0]:
                state_dict[prefix + name] = v[self.clf.start:self.clf.end]

    def gather_sharded_state(self, state: dict) -> dict:
        state = dict(state)
        for name in SHARDED:
            state[name] = gather_rows(state[name], self.clf.num_classes)
        return state

    def ddp_ignored(self) -> list[str]:
        if D.world_size() == 1:
            return []
        names = list(SHARDED) + (["clf.hard_classes"] if self.smooth_k else [])
        return names + ([f"recent.{n}" for n, _ in self.recent.named_buffers()] if self.recent else [])

    def own_parameters(self) -> list:
        return [self.clf.weight]

    def view_augs(self, aug):
        return [self.large_aug or aug] + [self.small_aug] * (self.n_views - 1)

    def embed(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def prepare(self, views, index, chunk=None):
        """The global batch's instances (gathered once per step), their targets and the rows of the step."""
        clf = self.clf
        if clf is None:
            raise RuntimeError("PIC classifier is not built: call setup(num_samples) before training")
        gidx = D.all_gather_no_grad(index)
        if self.alpha:
            clf.refresh_hard_classes_(gidx)
        targets = Targets(gidx, clf.smooth_index(gidx) if self.alpha else None, self.alpha)
        rows = clf.select(self.recent.candidates(gidx, targets.smooth)) if self.recent is not None else clf.shard()
        return gidx, targets, rows

    def encode(self, views):
        return [self.embed(v) for v in views]

    def loss(self, reps, ctx, index, part=slice(None)):
        # not per_sample_loss: under torch.distributed every call of the sharded classifier gathers and
        # all-reduces, so a micro-batched step computes it once, on every chunk's representations
        gidx, targets, rows = ctx
        update = None
        if self.fused and self._lr is not None and torch.is_grad_enabled():
            update = RowUpdate(self.clf.weight, self.clf_momentum, self._lr * self.row_lr_scale, self.row_momentum,
                               self.row_weight_decay)
        loss = self.clf(reps[0], targets, rows, update=update)
        for z in reps[1:]:   # small crops: the rows are detached, they train the encoder only
            loss = loss + self.clf(z, targets, rows, detach=True)
        self._pending = (rows, gidx, update.lr if update is not None else None)
        return {"loss": loss / len(reps)}

    def before_step(self, lr: float) -> None:
        self._lr = lr

    def optimizer_step(self, lr: float) -> None:
        """SGD with momentum and weight decay on the rows that took part in the step."""
        if self._pending is None:
            return
        rows, gidx, fused_lr = self._pending
        if fused_lr is None:
            row_sgd_(self.clf.weight, self.clf_momentum, rows, lr * self.row_lr_scale, self.row_momentum,
                     self.row_weight_decay)
        elif fused_lr != lr * self.row_lr_scale:   # the fused head moved the rows in the backward already
            raise RuntimeError(f"the fused head updated the rows at lr {fused_lr}, the step's lr is "
                               f"{lr * self.row_lr_scale}: before_step got another lr than optimizer_step")
        self._lr = None
        if self.recent is not None:
            self.recent.push(gidx)
        self._pending = None

    def discard_step(self) -> None:
        self._pending, self._lr = None, None
        self.clf.weight.grad = None

    @torch.no_grad()
    def init_from_data(self, encode: Encode) -> None:
        """``pic.prior``: rows = normalised head features of the untrained network (BN running
        statistics collected over the data first; on a copy, the model is untouched)."""
        if not self.prior:
            return
        net = copy.deepcopy(nn.Sequential(self.backbone, self.head))
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None   # cumulative average over the pass
        encode(net, train_bn=True)   # collects the statistics
        self.clf.init_from_features_(encode(net))   # eval mode, normalised
