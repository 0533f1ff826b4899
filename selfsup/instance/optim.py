"""The row update PIC runs: SGD with momentum and weight decay on the classifier rows of a step.

The method updates its rows itself (they are kept out of the encoder's optimiser and out of DDP):
with the full softmax every row of the shard moves, as torch's SGD would move it; with sampled
negatives only the sampled rows and their momentum change (the weight-update correction: rows
outside the set stay bit-identical, and a step's cost does not grow with N).
`selfsup bench classifier` times this same function.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .softmax import Rows

__all__ = ["row_sgd_", "sparse_sgd_"]


@torch.no_grad()
def row_sgd_(weight: Tensor, momentum_buffer: Tensor, rows: Rows, lr: float, momentum: float = 0.9,
             weight_decay: float = 0.0) -> None:
    """One SGD step ``buf = m buf + (g + wd w); w -= lr buf`` on the rows that took part in a step.

    Args:
        weight, momentum_buffer: ``(n, D)`` this rank's shard and its momentum.
        rows: what the step classified against: the whole shard (``rows.local is None``; the
            gradient is ``weight.grad``, cleared here) or a selection (``rows.local``: the rows'
            positions in the shard; the gradient is ``rows.weight.grad``; see :func:`sparse_sgd_`).
            No gradient (the rows took no part): nothing changes.
        lr, momentum, weight_decay: as torch.optim.SGD (dampening 0, no Nesterov).
    """
    if rows.local is None:   # full softmax: every row of the shard (same rule as torch SGD)
        if weight.grad is not None:
            momentum_buffer.mul_(momentum).add_(weight.grad + weight_decay * weight)
            weight.add_(momentum_buffer, alpha=-lr)
            weight.grad = None
    elif rows.weight.grad is not None:
        sparse_sgd_(weight, momentum_buffer, rows.local, rows.weight.grad, lr, momentum, weight_decay)


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
