"""Weighted kNN classifier on L2-normalised features (InstDisc / MoCo-demo protocol): scoring only.

For a query q: s_i = <q, v_i> against every training feature, keep the top-k, weight each
neighbour by exp(s_i / temperature), sum weights per class, predict the argmax (computed as
exp((s_i - max_j s_j) / temperature): the same ranking, and no overflow at small temperatures). The
features come from :mod:`selfsup.eval.features`; the training-time monitor is :mod:`selfsup.eval.monitor`.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["knn_scores", "knn_accuracy", "knn_sweep"]


def _vote(sim: Tensor, nb_labels: Tensor, temperature: float, num_classes: int) -> Tensor:
    """Class scores (q, num_classes): each neighbour (similarity `sim`, label `nb_labels`, both
    (q, k)) votes exp(sim / temperature) for its class, divided by exp(max sim / temperature) of its
    query: the same ratios, without the float32 overflow (exp(200) at t=0.005) that ties the classes."""
    weight = ((sim - sim.amax(dim=1, keepdim=True)) / temperature).exp()
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weight.dtype)
    return scores.scatter_add_(1, nb_labels, weight)


def knn_scores(train_feats: Tensor, train_labels: Tensor, query: Tensor, k: int, temperature: float,
               num_classes: int, chunk: int = 512) -> Tensor:
    """Class scores (Q, num_classes) for `query` (Q, D) against `train_feats` (N, D), relative to each
    query's nearest neighbour (which votes 1).

    Features must already be L2-normalised. k is clipped to N.
    """
    k = min(k, train_feats.shape[0])
    out = []
    for q in query.split(chunk):
        sim, idx = (q @ train_feats.T).topk(k, dim=1)                    # (q, k)
        out.append(_vote(sim, train_labels[idx], temperature, num_classes))
    return torch.cat(out)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 k: int = 200, temperature: float = 0.1, num_classes: int | None = None) -> dict:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy of the weighted kNN classifier."""
    num_classes = num_classes or int(train_labels.max()) + 1
    scores = knn_scores(train_feats, train_labels, test_feats, k, temperature, num_classes)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == test_labels[:, None]
    res = {"knn_top1": hit[:, 0].float().mean().item()}
    if num_classes > 5:
        res["knn_top5"] = hit.any(dim=1).float().mean().item()
    return res


@torch.no_grad()
def knn_sweep(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
              ks, temperatures, num_classes: int | None = None, chunk: int = 512) -> list[dict]:
    """Weighted kNN accuracy for every (k, temperature) pair in one pass over the features.

    One top-max(k) similarity search per chunk of queries; every pair is then scored from those
    neighbours, with the same arithmetic as `knn_accuracy` (so each row equals it). Features must be
    L2-normalised; each k is clipped to N. Returns [{"k", "t", "top1", "top5"}, ...] in the order
    ks x temperatures; top5 is None with 5 classes or fewer (as `knn_accuracy` leaves it out).
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    ks, ts = [int(k) for k in ks], [float(t) for t in temperatures]
    if not ks or not ts or min(ks) < 1 or min(ts) <= 0:
        raise ValueError(f"knn_sweep needs k >= 1 and t > 0, got k={ks} t={ts}")
    n = train_feats.shape[0]
    kmax = min(max(ks), n)
    hits = {(i, j): [] for i in range(len(ks)) for j in range(len(ts))}     # per pair: (q, <=5) bools
    for q, y in zip(test_feats.split(chunk), test_labels.split(chunk)):
        sim, idx = (q @ train_feats.T).topk(kmax, dim=1)                # (q, kmax), sorted
        nb_labels = train_labels[idx]
        for i, k in enumerate(ks):
            k = min(k, n)
            for j, t in enumerate(ts):
                scores = _vote(sim[:, :k], nb_labels[:, :k], t, num_classes)
                hits[i, j].append(scores.topk(min(5, num_classes), dim=1).indices == y[:, None])
    table = []
    for (i, j), h in hits.items():
        h = torch.cat(h)
        table.append({"k": ks[i], "t": ts[j], "top1": h[:, 0].float().mean().item(),
                      "top5": h.any(dim=1).float().mean().item() if num_classes > 5 else None})
    return table
