"""L2 logistic regression by L-BFGS (selfsup.eval.logreg), checked against scikit-learn."""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from selfsup.config import ConfigError
from selfsup.eval.logreg import (fit_logreg, l2_grid, logreg_objective, logreg_probe, sklearn_C, stratified_split)


def problem(n, seed, num_classes=6, dim=40):
    """Gaussian classes with 10 low-noise dimensions: the best l2 is inside the grid, not at an end."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)) * 0.3
    scale = torch.ones(dim)
    scale[:10] = 0.3
    y = torch.arange(n) % num_classes
    return centres[y] + torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale, y


def sk_fit(x, y, l2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=sklearn_C(l2, len(y)), tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())


def test_matches_sklearn_accuracy_and_chosen_l2():
    x, y = problem(300, seed=1)
    xt, yt = problem(3000, seed=2)
    grid = l2_grid(1e-4, 10, 11)
    res = logreg_probe(x, y, xt, yt, 6, grid, val_fraction=0.3, seed=0, standardize=False)   # float32
    # the same selection with scikit-learn at the equivalent C, on the same held-out split
    fit, val = stratified_split(y, 0.3, 0)
    val_acc = [sk_fit(x[fit], y[fit], l2).score(x[val].numpy(), y[val].numpy()) for l2 in grid]
    ours = [r["val_top1"] for r in res["logreg_val"]]
    assert [r["l2"] for r in res["logreg_val"]] == grid
    assert np.allclose(ours, val_acc, atol=1.5 / len(val))   # at most one held-out item apart per value
    sk_best = max(range(len(grid)), key=lambda i: (val_acc[i], i))   # ties -> larger l2, as ours
    assert abs(grid.index(res["logreg_l2"]) - sk_best) <= 1
    assert 0 < grid.index(res["logreg_l2"]) < len(grid) - 1   # an interior optimum: the check means something
    sk = sk_fit(x, y, res["logreg_l2"])
    assert res["logreg_top1"] == pytest.approx(sk.score(xt.numpy(), yt.numpy()), abs=0.005)
    assert res["logreg_C"] == pytest.approx(sk.C)
    assert {"logreg_top5", "logreg_train_top1", "logreg_val_top1", "feature_dim"} <= set(res)


def reference_objective(w, b, x, y, l2):
    """Plain numpy: mean softmax cross-entropy + l2/2 ||W||^2."""
    z = x @ w.T + b
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean() + 0.5 * l2 * (w ** 2).sum()


def test_objective_gradient_and_minimum_float64():
    x, y = problem(120, seed=3, num_classes=4, dim=8)
    x = x.double()
    l2 = 1e-2
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    assert logreg_objective(w0, b0, x, y, l2).item() == pytest.approx(
        reference_objective(w0.numpy(), b0.numpy(), x.numpy(), y.numpy(), l2), rel=1e-12)
    w, b = fit_logreg(x, y, 4, l2)
    w.requires_grad_(True)
    b.requires_grad_(True)
    obj = logreg_objective(w, b, x, y, l2)
    gw, gb = torch.autograd.grad(obj, (w, b))
    assert gw.abs().max() < 1e-7 and gb.abs().max() < 1e-7
    # analytic gradient: X^T (softmax - onehot) / n + l2 W, and sum of softmax - onehot for b
    with torch.no_grad():
        r = torch.softmax(x @ w.T + b, dim=1) - torch.nn.functional.one_hot(y, 4).double()
        assert torch.allclose(r.T @ x / len(y) + l2 * w, gw, atol=1e-12)
        assert torch.allclose(r.mean(0), gb, atol=1e-12)
        for _ in range(5):   # a minimum: every small step goes up
            dw, db = torch.randn_like(w) * 1e-3, torch.randn_like(b) * 1e-3
            assert logreg_objective(w + dw, b + db, x, y, l2) > obj
    sk = sk_fit(x, y, l2)   # the same minimiser at C = 1 / (n l2), float64
    assert np.allclose(w.detach().numpy(), sk.coef_, atol=1e-4)
    assert np.allclose((b - b.mean()).detach().numpy(), sk.intercept_ - sk.intercept_.mean(), atol=1e-4)


def test_stratified_split():
    y = torch.arange(100) % 4
    fit, val = stratified_split(y, 0.2, seed=0)
    assert len(val) == 20 and torch.bincount(y[val]).tolist() == [5, 5, 5, 5]
    assert set(fit.tolist()).isdisjoint(val.tolist()) and len(fit) + len(val) == 100
    assert torch.equal(val, stratified_split(y, 0.2, seed=0)[1])
    assert not torch.equal(val, stratified_split(y, 0.2, seed=1)[1])
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="fraction"):
            stratified_split(y, bad)


def test_l2_grid():
    grid = l2_grid(1e-6, 1.0, 13)
    assert len(grid) == 13 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1.0)
    assert all(math.isclose(b / a, 10 ** 0.5) for a, b in zip(grid, grid[1:]))
    assert l2_grid(1e-3, 1, 1) == [1e-3]
    with pytest.raises(ConfigError):
        l2_grid(0, 1, 5)
