"""MoCo v3 (Chen, Xie and He 2021): query encoder with a prediction head, momentum key encoder,
symmetric InfoNCE against the keys of the whole global batch (no queue).

* query: ``predictor(head(backbone(x)))``; key: ``key_encoder(x)`` (no predictor), an
  EMA of ``head(backbone(.))``. Heads are MoCo v3's MLPs (:func:`mocov3_mlp`): the projection head
  ``mocov3.proj_layers`` layers (3 for ViT, 2 for ResNet in the paper's code) with a last BN
  without affine, the predictor 2 layers without a last BN. ``model.head_*`` and ``model.proj_dim``
  do not apply (``mocov3.proj_*``, ``mocov3.pred_hidden`` do): MoCo v3 hands its head to the base
  class, which then builds (and draws from the RNG for) nothing else.
* loss ``ctr(q1, k2) + ctr(q2, k1)``, ``ctr`` = :func:`selfsup.losses.mocov3_contrastive` with
  the keys of every rank gathered (no gradient) and this rank's queries as anchors.
* momentum ``m_t = 1 - (1 - m0) (cos(pi t / T) + 1) / 2``: ``m0 = mocov3.momentum`` at t=0 rising
  to 1 at t=T, the run's ``train.epochs * (N // train.batch_size)`` steps (set in :meth:`setup`).
  The EMA runs in :meth:`after_step` of step t (0-based) with ``m_{t+1}``: MoCo v3 updates at the
  start of step t+1 with that value, so the key encoder of every forward is the same as theirs.
  The count of steps done is the buffer ``ema_step`` (checkpointed: a resume continues the schedule);
  the step reads it from a host-side copy (:meth:`steps_done`), so a steady-state step never waits
  for the device to read it back (one read after the buffer is loaded, moved or written elsewhere).
  Key BN: running statistics are EMA'd like the parameters (BN momentum 0 in the key encoder), as
  in :mod:`selfsup.methods.moco`.
* ``mocov3.freeze_patch_embed`` (default true): a backbone with a ``patch_embed`` module (timm
  ViTs) keeps its random patch projection fixed (requires_grad=False), MoCo v3's trick for
  stability. For a backbone without one (ResNets) it is a no-op, with a one-line note.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..losses import mocov3_contrastive
from ..models.heads import mlp
from ..parallel import distributed as D
from .base import KeyEncoder, Method, in_chunks, rename_old_key_encoder


def mocov3_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: (Linear(no bias) -> BN -> ReLU) x (layers - 1) -> Linear(no bias), then
    BN(affine=False) when `last_bn` (the projection head; the predictor has none)."""
    return mlp(in_dim, hidden_dim, out_dim, layers, out_bn=last_bn, out_bias=False)


def cosine_momentum(m0: float, step: int, total: int) -> float:
    """``1 - (1 - m0) (cos(pi step / total) + 1) / 2``: m0 at step 0, 1 at step `total` (and after)."""
    if total <= 0:
        return m0
    t = min(step, total) / total
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * t) + 1.0) / 2.0


class MoCoV3(Method):
    """MoCo v3. forward(views=[x1, x2], index) -> {"loss", "momentum"}; after_step: EMA update."""

    n_views = 2
    per_sample_loss = True   # each query's term reads the (gradient-free) keys, not other queries

    def __init__(self, cfg, backbone: nn.Module, feat_dim: int):
        c = cfg.mocov3
        hidden = c.proj_hidden or feat_dim   # its own heads: model.head_* do not apply to MoCo v3
        super().__init__(cfg, backbone, feat_dim, head=mocov3_mlp(feat_dim, hidden, c.proj_dim, c.proj_layers))
        self.predictor = mocov3_mlp(c.proj_dim, c.pred_hidden or hidden, c.proj_dim, 2, last_bn=False)
        self.temperature, self.base_momentum = c.temperature, c.momentum
        self.batch_size, self.epochs = cfg.train.batch_size, cfg.train.epochs
        self.total_steps = 0   # set by setup(N); 0: constant momentum m0
        if c.freeze_patch_embed:
            if hasattr(backbone, "patch_embed"):
                for p in backbone.patch_embed.parameters():
                    p.requires_grad_(False)
            else:
                D.say("mocov3.freeze_patch_embed: the backbone has no patch_embed (not a ViT): nothing to freeze")
        self.key_encoder = KeyEncoder(self.backbone, self.head)   # BN running stats only from the EMA
        self._register_load_state_dict_pre_hook(rename_old_key_encoder, with_module=True)
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        self._host_step = None   # (the buffer tensor, its version, its value): ema_step without a device read

    def setup(self, num_samples: int) -> None:
        self.total_steps = self.epochs * (num_samples // self.batch_size)

    def rank_identical_buffers(self) -> list[str]:
        return ["ema_step"]

    def steps_done(self) -> int:
        """``int(ema_step)``, read from the device only when the buffer is not the one this module last
        counted (a new tensor after ``.to()``, or written by ``load_state_dict`` or another in-place op:
        its version moved); otherwise from the host-side copy, no host sync."""
        buf, cached = self.ema_step, self._host_step
        if cached is None or cached[0] is not buf or cached[1] != buf._version:
            cached = self._host_step = (buf, buf._version, int(buf))
        return cached[2]

    def momentum_at(self, step: int) -> float:
        """The EMA momentum after `step` steps (cosine from mocov3.momentum to 1 over the run)."""
        return cosine_momentum(self.base_momentum, step, self.total_steps)

    def query(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) queries: predictor(head(backbone(x))), not normalised."""
        return self.predictor(self.head(self.backbone(x)))

    @torch.no_grad()
    def keys(self, x: Tensor, chunk: int | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, D) keys of the momentum encoder (no gradient), not normalised; in parts of
        at most `chunk` images (BN statistics per part)."""
        return in_chunks(self.key_encoder, x, chunk)

    def prepare(self, views, index, chunk=None):
        """The keys of both views from every rank (gathered once)."""
        x1, x2 = views
        return D.all_gather_no_grad(self.keys(x1, chunk)), D.all_gather_no_grad(self.keys(x2, chunk))

    def encode(self, views):
        return [self.query(x) for x in views]

    def loss(self, reps, ctx, index, part=slice(None)):
        (q1, q2), (k1, k2) = reps, ctx
        offset, t = D.rank() * index.shape[0] + (part.start or 0), self.temperature
        loss = mocov3_contrastive(q1, k2, offset, t) + mocov3_contrastive(q2, k1, offset, t)
        return {"loss": loss, "momentum": self.momentum_at(self.steps_done())}

    def momentum_update(self, m: float) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for parameters and float buffers; int buffers copied."""
        self.key_encoder.update(m)

    def after_step(self) -> None:
        """Count the step, then EMA-update the key encoder with the momentum of the next step."""
        step = self.steps_done() + 1
        self.ema_step += 1   # on the device; the host-side copy follows without reading it back
        self._host_step = (self.ema_step, self.ema_step._version, step)
        self.momentum_update(self.momentum_at(step))
