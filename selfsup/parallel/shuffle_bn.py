"""Shuffle BN (MoCo): run an encoder so that BatchNorm statistics come from a random sub-batch.

Computing keys with BN over the same samples as the queries lets the model "cheat" through the
batch statistics. MoCo breaks this link on the key branch:

* under ``torch.distributed`` (world > 1): the key inputs of all ranks are gathered, shuffled by
  one random permutation shared by every rank, each rank encodes its slice of the shuffled global
  batch (BN over that slice), and the keys are gathered and put back in the original order;
* on one device: the batch is shuffled and split into ``splits`` sub-batches whose BN
  statistics are computed separately (the encoder is called on each chunk), then un-shuffled.

Both draw the permutation from the global torch RNG (``torch.randperm``), which the trainer
checkpoints, so a resumed run draws the same permutations.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed as D

__all__ = ["split_bn_forward", "shuffle_bn_forward"]


def split_bn_forward(encoder: Callable[[Tensor], Tensor], x: Tensor, splits: int) -> Tensor:
    """One-device shuffle BN: encode a shuffled ``x`` in ``splits`` chunks, return rows in x's order.

    Args:
        encoder: ``(b, ...) -> (b, D)``, typically a module in train mode (BN uses batch statistics).
        x: ``(B, ...)`` inputs.
        splits: number of sub-batches (clamped to ``[1, B]``); sizes differ by at most one
            (``torch.tensor_split``), so B need not be divisible by ``splits``.

    Returns:
        ``(B, D)``: row ``i`` is the encoding of ``x[i]`` computed within its random sub-batch.
    """
    b = x.shape[0]
    perm = torch.randperm(b, device=x.device)
    chunks = x[perm].tensor_split(max(1, min(splits, b)))
    y = torch.cat([encoder(c) for c in chunks])
    out = torch.empty_like(y)
    out[perm] = y   # un-shuffle: the row computed for x[perm[j]] goes back to position perm[j]
    return out


def shuffle_bn_forward(encoder: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Cross-rank shuffle BN (MoCo): encode a slice of the shuffled global batch, return own rows.

    Args:
        encoder: ``(B, ...) -> (B, D)``; called once per rank on B shuffled inputs.
        x: ``(B, ...)`` this rank's inputs; B equal on every rank.

    Returns:
        ``(B, D)``: row ``i`` is the encoding of ``x[i]``, computed in the sub-batch
        ``x_all[perm[r*B:(r+1)*B]]`` of rank ``r`` (``x_all`` = inputs of all ranks in rank order).
        The permutation is drawn on every rank (keeping the ranks' RNG streams in step) and rank
        0's is broadcast, so all ranks use the same one. No gradient flows (keys need none).
        When not distributed this is ``encoder(x)``.
    """
    if not D.is_dist() or D.world_size() == 1:
        return encoder(x)
    b, world, r = x.shape[0], D.world_size(), D.rank()
    x_all = D.all_gather_no_grad(x)                                     # (world*B, ...)
    perm = torch.randperm(world * b, device=x.device)
    dist.broadcast(perm, src=0)
    y = encoder(x_all[perm[r * b:(r + 1) * b]])                        # (B, D)
    y_all = D.all_gather_no_grad(y)                                     # (world*B, D), shuffled order
    out = torch.empty_like(y_all)
    out[perm] = y_all
    return out[r * b:(r + 1) * b]
