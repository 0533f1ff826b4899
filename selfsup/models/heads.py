"""Projection heads g."""
from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, hidden_dim: int, out_dim: int = 128, layers: int = 2,
                    out_bn: bool | None = None) -> nn.Sequential:
    """MLP projection head mapping (B, in_dim) -> (B, out_dim).

    layers=1: a linear layer (MoCo v1). layers=2: SimCLR v1, Linear -> BN -> ReLU -> Linear.
    layers=3: SimCLR v2, [Linear -> BN -> ReLU] x 2 -> Linear -> BN (no affine shift on the last BN).
    `out_bn`: end with that output BatchNorm (no affine parameters, the last Linear without bias; as
    SimCLR v2's and lightly's heads) whatever the depth; None: only for layers=3.
    """
    if layers not in (1, 2, 3):
        raise ValueError(f"projection head layers must be 1, 2 or 3, got {layers}")
    out_bn = layers == 3 if out_bn is None else out_bn
    return mlp(in_dim, hidden_dim, out_dim, layers, out_bn)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, out_bn: bool = False,
        out_bias: bool | None = None) -> nn.Sequential:
    """The MLP of every head: (Linear(no bias) -> BN -> ReLU) x (layers - 1) -> Linear, then
    BatchNorm1d(affine=False) when `out_bn`. `out_bias`: the last Linear's bias (default: not `out_bn`,
    a BN after it would cancel it; MoCo v3's predictor has none either)."""
    if layers < 1:
        raise ValueError(f"MLP layers must be >= 1, got {layers}")
    mods, d = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        d = hidden_dim
    mods.append(nn.Linear(d, out_dim, bias=not out_bn if out_bias is None else out_bias))
    if out_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)
