import pytest
import torch
import torch.nn.functional as F

from selfsup.eval.knn import knn_accuracy, knn_scores, knn_sweep


def reference_knn_scores(train, labels, query, k, t, c, relative=True):
    """float64 weighted-kNN class scores; `relative`: divided by the nearest neighbour's exp(s/t)."""
    out = torch.zeros(len(query), c, dtype=torch.float64)
    for i, q in enumerate(query):
        sims = [(float(q @ v), int(y)) for v, y in zip(train, labels)]
        sims.sort(key=lambda s: -s[0])
        top = sims[0][0] if relative else 0.0
        for s, y in sims[:k]:
            out[i, y] += torch.exp(torch.tensor((s - top) / t, dtype=torch.float64))
    return out


def test_knn_scores_match_plain_reference():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(50, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    query = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=1)
    for k, t in [(1, 0.1), (5, 0.07), (50, 0.5), (200, 0.1)]:
        got = knn_scores(train, labels, query, k, t, 4, chunk=3)
        torch.testing.assert_close(got, reference_knn_scores(train, labels, query, min(k, 50), t, 4))


def test_knn_accuracy_on_clusters():
    g = torch.Generator().manual_seed(1)
    centers = F.normalize(torch.randn(10, 16, generator=g), dim=1)
    ytr, yte = torch.arange(200) % 10, torch.arange(50) % 10
    tr = F.normalize(centers[ytr] + 0.05 * torch.randn(200, 16, generator=g), dim=1)
    te = F.normalize(centers[yte] + 0.05 * torch.randn(50, 16, generator=g), dim=1)
    res = knn_accuracy(tr, ytr, te, yte, k=20, temperature=0.1)
    assert res["knn_top1"] == 1.0 and res["knn_top5"] == 1.0
    wrong = knn_accuracy(tr, (ytr + 1) % 10, te, yte, k=20, temperature=0.1)
    assert wrong["knn_top1"] == 0.0


def test_small_temperatures_match_a_float64_reference():
    """exp(s / 0.005) overflows float32 (exp(200) = inf): every near class tied and top-1 fell below
    1-NN's. Features in float32, the reference in float64 without any shift."""
    g = torch.Generator().manual_seed(2)
    centers = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    ytr, yte = torch.arange(300) % 5, torch.arange(100) % 5
    tr = F.normalize(centers[ytr] + 0.4 * torch.randn(300, 16, generator=g), dim=1)
    te = F.normalize(centers[yte] + 0.4 * torch.randn(100, 16, generator=g), dim=1)
    ref = reference_knn_scores(tr.double(), ytr, te.double(), 20, 0.005, 5, relative=False)
    assert torch.isfinite(ref).all() and (tr @ te.T).max() / 0.005 > 89   # past float32's exp range
    want = (ref.argmax(1) == yte).double().mean().item()
    assert knn_accuracy(tr, ytr, te, yte, k=20, temperature=0.005)["knn_top1"] == pytest.approx(want)
    rows = {(r["k"], r["t"]): r["top1"] for r in knn_sweep(tr, ytr, te, yte, [1, 20], [0.05, 0.005])}
    assert rows[20, 0.005] == pytest.approx(want) and abs(want - rows[1, 0.005]) <= 0.02   # about 1-NN's
