"""SimCLR v1/v2: two views, z = g(f(x)), NT-Xent over all 2B embeddings (negatives from all ranks)."""
from __future__ import annotations

import torch

from ..losses import nt_xent
from .base import Method


class SimCLR(Method):
    """SimCLR. v1 head: model.head_layers=2; v2 head: model.head_layers=3."""

    n_views = 2

    def forward(self, views, index):
        z = self.head(self.backbone(torch.cat(views)))   # one pass: BN statistics over both views
        z1, z2 = z.chunk(2)
        return {"loss": nt_xent(z1, z2, self.cfg.simclr.temperature)}
