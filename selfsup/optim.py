"""Optimisers (LARS, SGD, AdamW) and per-step learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["LARS", "param_groups", "build_optimizer", "warmup_cosine", "build_scheduler"]


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling as used by SimCLR.

    For every parameter ``p`` with gradient ``g`` (per param group settings)::

        if not lars_exclude:
            g = g + weight_decay * p
            trust = trust_coefficient * ||p|| / (||g|| + eps)   if ||p|| > 0 and ||g|| > 0
                    1                                           otherwise
            g = g * trust
        v = momentum * v + g             # momentum applied after the scaling
        p = p - lr * (g + momentum * v)  if nesterov else  p - lr * v

    Param groups with ``lars_exclude=True`` (biases, BatchNorm) get neither
    weight decay nor trust-ratio scaling (see :func:`param_groups`).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        momentum: momentum factor.
        weight_decay: L2 penalty added to the gradient (non-excluded params).
        trust_coefficient: LARS ``eta``.
        eps: added to ``||g||`` in the trust ratio denominator.
        nesterov: use Nesterov momentum.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if momentum < 0:
            raise ValueError(f"invalid momentum {momentum}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Perform one optimisation step; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            m, wd, tc, eps = group["momentum"], group["weight_decay"], group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                g = p.grad
                if not group["lars_exclude"]:
                    if wd != 0:
                        g = g.add(p, alpha=wd)
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (p_norm > 0) & (g_norm > 0), tc * p_norm / (g_norm + eps), torch.ones_like(p_norm)
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"]
                v.mul_(m).add_(g)
                update = g.add(v, alpha=m) if group["nesterov"] else v
                p.add_(update, alpha=-group["lr"])
        return loss


# Vision-transformer tensors kept out of weight decay (as timm, MAE, MoCo v3): position embeddings and
# the class / register / distillation tokens, by the name's end; plus any module's `no_weight_decay()`.
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that the modules of `model` (timm models) list in `no_weight_decay()`."""
    names = set()
    for prefix, mod in model.named_modules():
        fn = getattr(mod, "no_weight_decay", None)
        if not callable(fn):
            continue
        try:
            listed = fn()
        except TypeError:
            continue
        names |= {f"{prefix}.{n}" if prefix else n for n in listed}
    return names


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool = True) -> list[dict]:
    """Split a model's trainable parameters into optimiser param groups.

    Returns ``[{"params": weights with ndim > 1, "weight_decay": weight_decay},
    {"params": ndim <= 1 tensors (biases, BN/LN scales and shifts) and ViT position embeddings and
    class/register/distillation tokens (names ending in NO_DECAY_SUFFIXES, or listed by a timm
    module's ``no_weight_decay()``), "weight_decay": 0.0, "lars_exclude": True}]``; empty groups are
    dropped. With ``exclude_bn_bias=False`` a single group with all parameters and
    ``weight_decay`` is returned.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not exclude_bn_bias:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    listed = _no_decay_names(model)

    def excluded_(name: str, p) -> bool:
        return p.ndim <= 1 or name in listed or name.endswith(NO_DECAY_SUFFIXES)

    decay = [p for n, p in named if not excluded_(n, p)]
    excluded = [p for n, p in named if excluded_(n, p)]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups


OPTIMIZERS = ("lars", "sgd", "adamw")


def build_optimizer(
    model_or_params: nn.Module | Iterable,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
) -> Optimizer:
    """Build an optimiser by name (``"lars"``, ``"sgd"`` or ``"adamw"``).

    A module is split with :func:`param_groups` (no weight decay / LARS
    adaptation for biases and norm parameters); an iterable of parameters or
    group dicts is used as given with ``weight_decay`` as the default.
    ``momentum``/``nesterov`` apply to LARS and SGD, ``betas`` to AdamW.

    Raises:
        ValueError: unknown ``name``.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}")
    if isinstance(model_or_params, nn.Module):
        params = param_groups(model_or_params, weight_decay)
    else:
        params = list(model_or_params)
    if key == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int, final_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up then cosine decay.

    ``f(step) = (step + 1) / warmup_steps`` for ``step < warmup_steps``; then
    ``final + (1 - final) * 0.5 * (1 + cos(pi * progress))`` with
    ``progress = (step - warmup_steps) / (total_steps - warmup_steps)``
    clamped to ``[0, 1]``, so ``f(warmup_steps) = 1`` and
    ``f(step) = final_lr_ratio`` for ``step >= total_steps``.
    """
    if total_steps <= 0 or warmup_steps < 0:
        raise ValueError(f"need total_steps > 0 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up ``(step + 1) / warmup_steps``, then 1."""

    def f(step: int) -> float:
        return (step + 1) / warmup_steps if step < warmup_steps else 1.0

    return f


SCHEDULERS = ("cosine", "constant")


def build_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    kind: str = "cosine",
    final_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimisation-step LR schedule (call ``scheduler.step()`` after each ``optimizer.step()``).

    ``kind``: ``"cosine"`` (:func:`warmup_cosine`) or ``"constant"`` (linear
    warm-up, then constant).  Raises ``ValueError`` for other kinds.
    """
    if kind == "cosine":
        fn = warmup_cosine(total_steps, warmup_steps, final_lr_ratio)
    elif kind == "constant":
        fn = _warmup_constant(warmup_steps)
    else:
        raise ValueError(f"unknown scheduler kind {kind!r}; valid kinds: {', '.join(SCHEDULERS)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
