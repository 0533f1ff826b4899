"""Multinomial logistic regression with an L2 penalty on precomputed features, solved by L-BFGS.

Objective, for weights W (C, D) and bias b (C,) on n training rows (x_i, y_i)::

    J(W, b) = (1/n) sum_i CE(W x_i + b, y_i) + (l2 / 2) ||W||_F^2        (the bias is not penalised)

scikit-learn's LogisticRegression (multinomial, lbfgs) minimises C * sum_i CE + (1/2) ||W||^2, i.e.
J / (C n) up to a constant factor: the same minimiser when C = 1 / (n * l2).

The l2 strength is picked from a log-spaced grid by accuracy on a class-stratified held-out part of
the train split (deterministic from a seed; ties go to the larger l2), then the model is refit on
the whole train split with it and evaluated on the test split. Features are standardised with the
train split's per-dimension mean/std (a label-free statistic of the whole train split, held-out part
included). Full-batch L-BFGS with strong-Wolfe line search, on the features' device (the GPU when
present), float32 by default; fits along the grid are warm-started from the previous (larger) l2.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.images import require_labels
from ..errors import ConfigError
from .features import extract_features
from .linear import standardize_features, topk_accuracy


def logreg_objective(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, l2: float) -> Tensor:
    """J(W, b) = mean cross-entropy of x W^T + b against y + l2/2 * ||W||^2 (bias unpenalised)."""
    return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def sklearn_C(l2: float, n: int) -> float:
    """scikit-learn's C with the same minimiser as `logreg_objective` with `l2` on n rows."""
    return 1.0 / (n * l2)


def fit_logreg(x: Tensor, y: Tensor, num_classes: int, l2: float, *, max_iter: int = 1000,
               tol: float | None = None, init: tuple[Tensor, Tensor] | None = None,
               history_size: int = 20) -> tuple[Tensor, Tensor]:
    """Minimise `logreg_objective` over (W, b) with full-batch L-BFGS (strong Wolfe), in x's dtype
    and on x's device, from zeros or from `init` = (W, b). Stops after `max_iter` iterations or when
    max |gradient| <= tol (default 1e-5 in float32, 1e-9 in float64). Returns (W, b)."""
    if tol is None:
        tol = 1e-9 if x.dtype == torch.float64 else 1e-5
    c, d = num_classes, x.shape[1]
    w = (init[0].clone() if init else x.new_zeros(c, d)).requires_grad_(True)
    b = (init[1].clone() if init else x.new_zeros(c)).requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=history_size, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = logreg_objective(w, b, x, y, l2)
        loss.backward()
        return loss

    opt.step(closure)
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise ValueError(f"logistic regression diverged at l2={l2}")
    return w.detach(), b.detach()


def stratified_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(fit, held-out) index tensors: from each class, round(fraction * its size) items chosen at
    random (seed `seed`) are held out, at least one and never all of a class with >= 2 items."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"held-out fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fit, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
        val.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def l2_grid(lo: float, hi: float, count: int) -> list[float]:
    """`count` log-spaced values from lo to hi (both > 0)."""
    if not (0 < lo <= hi) or count < 1:
        raise ConfigError(f"logreg l2 grid needs 0 < lo <= hi and count >= 1, got {lo}, {hi}, {count}")
    if count == 1:
        return [float(lo)]
    a, z = math.log10(lo), math.log10(hi)
    return [10 ** (a + (z - a) * i / (count - 1)) for i in range(count)]


def select_l2(x: Tensor, y: Tensor, num_classes: int, l2_values, val_fraction: float = 0.1, seed: int = 0,
              **fit_kwargs) -> tuple[float, list[dict]]:
    """Fit on the stratified fit part for every l2 (largest first, warm-started), score on the
    held-out part; returns (best l2, [{"l2", "val_top1"}, ...] in increasing l2). Ties: larger l2."""
    fit, val = stratified_split(y, val_fraction, seed)
    fit, val = fit.to(x.device), val.to(x.device)
    table, init = [], None
    for l2 in sorted(l2_values, reverse=True):
        init = fit_logreg(x[fit], y[fit], num_classes, l2, init=init, **fit_kwargs)
        pred = (x[val] @ init[0].T + init[1]).argmax(dim=1)
        table.append({"l2": l2, "val_top1": (pred == y[val]).float().mean().item()})
    best = max(table, key=lambda r: r["val_top1"])["l2"]   # first maximum = largest l2
    return best, table[::-1]


def logreg_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 num_classes: int, l2_values, *, val_fraction: float = 0.1, seed: int = 0,
                 standardize: bool = True, dtype=torch.float32, **fit_kwargs) -> dict:
    """Choose l2 on a held-out part of the train features, refit on all of them, evaluate on test.

    Returns {logreg_top1, logreg_top5 (more than 5 classes), logreg_train_top1, logreg_l2, logreg_C
    (scikit-learn's equivalent for the refit), logreg_val_top1 (of the chosen l2), logreg_val
    (per l2), feature_dim}.
    """
    if standardize:
        train_feats, test_feats = standardize_features(train_feats, test_feats)
    xtr, xte = train_feats.to(dtype), test_feats.to(dtype)
    ytr, yte = train_labels.to(xtr.device), test_labels.to(xtr.device)
    l2, table = select_l2(xtr, ytr, num_classes, l2_values, val_fraction, seed, **fit_kwargs)
    w, b = fit_logreg(xtr, ytr, num_classes, l2, **fit_kwargs)
    res = topk_accuracy(xte @ w.T + b, yte, num_classes, "logreg")
    res["logreg_train_top1"] = topk_accuracy(xtr @ w.T + b, ytr, num_classes, "t")["t_top1"]
    res.update({"logreg_l2": l2, "logreg_C": sklearn_C(l2, len(ytr)),
                "logreg_val_top1": next(r["val_top1"] for r in table if r["l2"] == l2),
                "logreg_val": table, "feature_dim": xtr.shape[1]})
    return res


def logreg_eval(encoder, cfg, train_ds, test_ds, device, amp) -> dict:
    """`logreg_probe` on the clean features of `encoder` with the settings of `cfg.eval`; the result
    carries a `protocol` string."""
    e = cfg.eval
    require_labels(train_ds, e.train_split, "logistic regression")
    require_labels(test_ds, e.test_split, "logistic regression")
    if not 0.0 < e.logreg_val_fraction < 1.0:
        raise ConfigError(f"eval.logreg_val_fraction must be in (0, 1), got {e.logreg_val_fraction}")
    if e.logreg_max_iter < 1 or len(e.logreg_l2_range) != 2:
        raise ConfigError("eval.logreg_max_iter must be >= 1 and eval.logreg_l2_range a pair [lo, hi]")
    grid = l2_grid(*e.logreg_l2_range, e.logreg_l2_count)
    size = cfg.data.image_size
    ftr = extract_features(encoder, getattr(train_ds, "images", train_ds), e.batch_size, device, size, amp,
                           normalize=False)
    fte = extract_features(encoder, getattr(test_ds, "images", test_ds), e.batch_size, device, size, amp,
                           normalize=False)
    res = logreg_probe(ftr, train_ds.labels, fte, test_ds.labels, train_ds.num_classes, grid,
                       val_fraction=e.logreg_val_fraction, seed=e.seed, max_iter=e.logreg_max_iter)
    res["protocol"] = (
        f"logreg: multinomial logistic regression on {res['feature_dim']}-d clean (test-transform) backbone "
        f"features standardised with the {e.train_split} split's mean/std; objective mean CE + l2/2 ||W||^2 "
        f"(bias unpenalised; scikit-learn C = 1/(n l2)); full-batch L-BFGS (strong Wolfe, <= {e.logreg_max_iter} "
        f"iterations, float32, {device.type}); l2 from {len(grid)} log-spaced values in "
        f"[{grid[0]:g}, {grid[-1]:g}] by accuracy on a class-stratified {e.logreg_val_fraction:g} held-out "
        f"part of {e.train_split} (seed {e.seed}), then refit on all of {e.train_split}; "
        f"{e.train_split} -> {e.test_split}")
    return res
