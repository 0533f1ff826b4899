import torch
import torch.nn.functional as F

from selfsup.eval.knn import knn_accuracy, knn_scores


def reference_knn_scores(train, labels, query, k, t, c):
    out = torch.zeros(len(query), c, dtype=torch.float64)
    for i, q in enumerate(query):
        sims = [(float(q @ v), int(y)) for v, y in zip(train, labels)]
        sims.sort(key=lambda s: -s[0])
        for s, y in sims[:k]:
            out[i, y] += torch.exp(torch.tensor(s / t, dtype=torch.float64))
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
