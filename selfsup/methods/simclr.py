"""SimCLR v1/v2: two views, z = g(f(x)), NT-Xent over all 2B embeddings (negatives from all ranks)."""
from __future__ import annotations

import torch

from ..losses import nt_xent, nt_xent_local
from ..parallel import distributed as D
from .base import Method


class SimCLR(Method):
    """SimCLR. v1 head: model.head_layers=2; v2 head: model.head_layers=3. Settings: cfg.simclr."""

    n_views = 2

    def __init__(self, cfg, backbone, feat_dim: int):
        super().__init__(cfg, backbone, feat_dim)
        self.temperature = cfg.simclr.temperature

    def encode(self, views):
        z = self.head(self.backbone(torch.cat(views)))   # one pass: BN statistics over both views
        return list(z.chunk(len(views)))

    def loss(self, reps, ctx, index, part=slice(None)):
        z1, z2 = reps
        if D.world_size() == 1:
            return {"loss": nt_xent(z1, z2, self.temperature)}
        # the anchors are this rank's 2B; the candidates every rank's, gathered with their gradient:
        # with DDP's averaging this is the gradient of the global mean loss
        z1_all, z2_all = D.all_gather_with_grad(z1), D.all_gather_with_grad(z2)
        return {"loss": nt_xent_local(z1, z2, z1_all, z2_all, D.rank() * z1.shape[0], self.temperature)}
