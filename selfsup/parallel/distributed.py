"""Thin helpers around ``torch.distributed`` for contrastive losses and logging.

Every helper degrades gracefully to the single-process case (identity /
``(0, 0, 1)``) so that the same training code runs with and without
``torchrun``.

Gradient semantics of :func:`all_gather_with_grad`
--------------------------------------------------
Contrastive losses gather embeddings from all ranks so that each rank sees the
global batch as candidates (negatives).  Each rank ``r`` computes ``L_r``, the
mean loss over its LOCAL anchors against the gathered candidates.  The
gathered tensor depends on the embeddings of every rank, so in backward each
rank receives ``dL_r / d(gathered)``; summing (all-reduce SUM) these over ranks
and keeping this rank's slice gives ``d(sum_r L_r) / d(x_local)``.  DDP then
averages parameter gradients over ranks, so the parameters receive
``d(mean_r L_r) / d(theta)``, which (with equal local batch sizes) is exactly
the gradient of the global mean loss over all anchors of all ranks.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_dist",
    "world_size",
    "rank",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_mean",
    "setup_distributed",
    "cleanup_distributed",
    "is_timeout",
    "say",
]


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def say(line: str, file=None) -> None:
    """Print ``[selfsup] line`` on rank 0 only: the rank in the process group, or before one is made,
    torchrun's RANK (every process prints alone when there is neither). `file`: sys.stdout by default."""
    if (rank() == 0) if is_dist() else os.environ.get("RANK", "0").strip() in ("", "0"):
        print(f"[selfsup] {line}", file=file)


def _check_equal_shapes(x: Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` has the same shape on every rank.

    Costs one small all-gather of the shape vectors.
    """
    shape = torch.tensor([x.dim(), *x.shape], dtype=torch.long, device=x.device)
    # ranks may even disagree on ndim: pad the shape vector to a fixed length
    pad = torch.full((9,), -1, dtype=torch.long, device=x.device)
    pad[: min(9, shape.numel())] = shape[:9]
    shapes = [torch.empty_like(pad) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, pad)
    if any(not torch.equal(s, pad) for s in shapes):
        got = [tuple(s[1 : 1 + int(s[0])].tolist()) for s in shapes]
        raise ValueError(
            "all_gather requires tensors of identical shape on every rank "
            f"(use drop_last=True in the data loader); got shapes per rank: {got}"
        )


def _gather(x: Tensor, check_shapes: bool = True) -> Tensor:
    """Concatenate equally shaped ``(B, ...)`` tensors of all ranks -> ``(world*B, ...)``."""
    x = x.contiguous()
    if check_shapes:
        _check_equal_shapes(x)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward all-reduces (SUM) the gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, check_shapes: bool) -> Tensor:
        ctx.batch = x.shape[0]
        ctx.rank = dist.get_rank()
        return _gather(x, check_shapes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch], None


def all_gather_with_grad(x: Tensor, check_shapes: bool = True) -> Tensor:
    """Differentiable all-gather.

    Args:
        x: ``(B, ...)`` tensor; ``B`` (and all other dims) must be equal on all
            ranks, otherwise a ``ValueError`` listing the shapes is raised
            (uneven batches are not supported: use ``drop_last=True``).
        check_shapes: check that equality first (one small extra all-gather);
            ``False`` for a caller that has already established it this step.

    Returns:
        ``(world*B, ...)``: the ranks' tensors concatenated in rank order.  The
        backward pass all-reduces (SUM) the incoming gradient over ranks and
        returns this rank's ``B`` rows (see the module docstring for why this
        yields the gradient of the global mean loss under DDP).  Identity when
        not distributed or ``world == 1``.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x, check_shapes)


def all_gather_no_grad(x: Tensor, check_shapes: bool = True) -> Tensor:
    """Detached all-gather: ``(B, ...)`` per rank -> ``(world*B, ...)`` in rank order.

    Same equal-shape requirement and ``check_shapes`` as :func:`all_gather_with_grad`.
    Returns ``x.detach()`` when not distributed.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x.detach()
    with torch.no_grad():
        return _gather(x.detach(), check_shapes)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks (any shape; detached copy, e.g. for logging).

    With NCCL ``x`` must live on this rank's GPU.  Returns ``x.detach().clone()``
    when not distributed.
    """
    y = x.detach().clone()
    if not is_dist() or dist.get_world_size() == 1:
        return y
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def setup_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int, int]:
    """Initialise the default process group from ``torchrun`` environment variables.

    If ``WORLD_SIZE > 1`` is set, calls ``init_process_group`` with
    ``init_method="env://"`` (``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT`` come from the environment).  The backend follows the
    device the caller trains on (``"nccl"`` for CUDA tensors, ``"gloo"`` for
    CPU tensors; default ``"gloo"``); for NCCL the caller sets the current CUDA
    device first (``engine.setup.resolve_device``: ``LOCAL_RANK``).  If a group
    is already initialised, it is reused.

    ``timeout_s`` (config ``dist.timeout_s``; None: torch's default) bounds every
    collective: with gloo a collective that waits longer for a stuck or dead
    rank raises (see :func:`is_timeout`); with NCCL torch's watchdog aborts
    the process after it.

    Returns:
        ``(rank, local_rank, world_size)``; ``(0, 0, 1)`` when not distributed.
    """
    if is_dist():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    rank_ = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or "gloo"
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank_, world_size=world, timeout=timeout)
    return rank_, local_rank, world


def is_timeout(e: BaseException) -> bool:
    """Whether `e` is a collective that gave up waiting for another rank after the process group's
    timeout (gloo: "Timed out waiting ...ms for recv operation to complete")."""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("timed out" in text or "timeout" in text)


def cleanup_distributed() -> None:
    """Destroy the default process group if one is initialised (no-op otherwise)."""
    if is_dist():
        dist.destroy_process_group()
