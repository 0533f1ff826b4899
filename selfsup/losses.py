"""Contrastive losses.

The numerical core (:func:`nt_xent_local`) is a pure function of its inputs;
:func:`nt_xent` adds the cross-rank gathering of candidates when running under
``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.parallel.distributed import all_gather_with_grad, is_dist, rank, world_size

__all__ = ["nt_xent", "nt_xent_local"]


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half/bfloat16 are upcast)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def nt_xent_local(
    z1: Tensor,
    z2: Tensor,
    z1_all: Tensor,
    z2_all: Tensor,
    offset: int,
    temperature: float = 0.5,
) -> Tensor:
    """NT-Xent of local anchors against a given candidate set (pure function).

    Args:
        z1, z2: ``(B, D)`` local embeddings of the two views (any scale; they
            are L2-normalised here).  Row ``i`` of ``z1`` and of ``z2`` form a
            positive pair.
        z1_all, z2_all: ``(N, D)`` candidate embeddings of the two views
            (``N = world*B``), containing ``z1``/``z2`` at rows
            ``offset : offset+B``.
        offset: global index of this rank's first sample (``rank * B``).
        temperature: softmax temperature ``t``.

    Returns:
        Scalar: mean over the ``2B`` local anchors of
        ``-log(exp(s_ip/t) / sum_{k != i} exp(s_ik/t))`` where ``s`` is cosine
        similarity, ``k`` ranges over the ``2N`` candidates
        ``cat(z1_all, z2_all)`` and the anchor's own column is masked with
        ``-inf``.  Computed in float32 (float64 if an input is float64), with
        autocast disabled.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be (B, D) of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1_all.shape != z2_all.shape or z1_all.shape[1:] != z1.shape[1:]:
        raise ValueError(f"bad candidate shapes {tuple(z1_all.shape)}, {tuple(z2_all.shape)} for anchors {tuple(z1.shape)}")
    b, n = z1.shape[0], z1_all.shape[0]
    if not 0 <= offset <= n - b:
        raise ValueError(f"offset {offset} out of range for B={b}, N={n}")
    dtype = _compute_dtype(z1, z2, z1_all, z2_all)
    with torch.autocast(device_type=z1.device.type, enabled=False):
        anchors = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2B, D)
        cands = F.normalize(torch.cat([z1_all, z2_all]).to(dtype), dim=1)  # (2N, D)
        logits = anchors @ cands.T / temperature  # (2B, 2N)
        local = torch.arange(b, device=z1.device)
        self_idx = torch.cat([offset + local, n + offset + local])  # (2B,)
        pos_idx = torch.cat([n + offset + local, offset + local])  # (2B,)
        rows = torch.arange(2 * b, device=z1.device)
        logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), dtype=dtype, device=z1.device))
        return F.cross_entropy(logits, pos_idx)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) loss of SimCLR.

    Args:
        z1, z2: ``(B, D)`` projections of two views; row ``i`` of each forms a
            positive pair.  Need not be normalised.  Any float dtype; the loss
            is computed in float32 (float64 for float64 inputs) even under
            autocast.
        temperature: softmax temperature.

    Returns:
        Scalar mean loss over the ``2B`` anchors (see :func:`nt_xent_local`).
        Under ``torch.distributed`` with ``world > 1`` the candidates
        (negatives) are gathered from all ranks with
        :func:`~selfsup.parallel.distributed.all_gather_with_grad`
        (``B`` must be equal on all ranks); the anchors are this rank's ``2B``
        and the value is the mean over these local anchors.  With DDP's
        gradient averaging this yields the gradient of the global mean loss.
    """
    if is_dist() and world_size() > 1:
        z1_all, z2_all = all_gather_with_grad(z1), all_gather_with_grad(z2)
        return nt_xent_local(z1, z2, z1_all, z2_all, rank() * z1.shape[0], temperature)
    return nt_xent_local(z1, z2, z1, z2, 0, temperature)
