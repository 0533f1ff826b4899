"""Weighted kNN classifier on L2-normalised features (InstDisc / MoCo-demo protocol).

For a query q: s_i = <q, v_i> against every training feature, keep the top-k, weight each
neighbour by exp(s_i / temperature), sum weights per class, predict the argmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import eval_transform
from ..parallel.distributed import all_gather_no_grad, rank, world_size


def _vote(sim: Tensor, nb_labels: Tensor, temperature: float, num_classes: int) -> Tensor:
    """Class scores (q, num_classes): each neighbour (similarity `sim`, label `nb_labels`, both
    (q, k)) votes exp(sim / temperature) for its class."""
    weight = (sim / temperature).exp()
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weight.dtype)
    return scores.scatter_add_(1, nb_labels, weight)


def knn_scores(train_feats: Tensor, train_labels: Tensor, query: Tensor, k: int, temperature: float,
               num_classes: int, chunk: int = 512) -> Tensor:
    """Class scores (Q, num_classes) for `query` (Q, D) against `train_feats` (N, D).

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
def extract_features(encoder: nn.Module, images: Tensor, batch_size: int = 1024, device=None,
                     image_size: int | None = None, autocast_dtype=None, normalize: bool = True,
                     train_bn: bool = False) -> Tensor:
    """Encoder features (N, D) float32 of uint8 `images` (N, C, H, W) with the clean test transform.

    `images` may also be a file-backed set (:class:`selfsup.data.files.FileImageSet`): its images
    are then decoded batch by batch (shorter side to `image_size`, centre crop).

    Under torch.distributed every rank encodes a strided shard and the shards are all-gathered, so
    every rank returns the features of all N images in their original order.
    `train_bn=True` runs the encoder in training mode (BN normalises with each batch's statistics,
    as for an untrained network whose running statistics mean nothing; they are updated: pass a
    copy to keep them).
    """
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.train(train_bn)
    r, w = rank(), world_size()
    n = len(images)
    per_rank = -(-n // w)
    idx = torch.arange(r, per_rank * w, w) % n                        # pad by wrapping; dropped below
    if isinstance(images, Tensor):
        batches = (images[chunk.to(images.device)] for chunk in idx.split(batch_size))
    else:   # a file-backed set (FileImageSet): decoded in DataLoader workers
        from ..data.loader import clean_batches

        batches = clean_batches(images, idx, batch_size, image_size, getattr(images, "workers", 0))
    feats = []
    for batch in batches:
        x = eval_transform(batch.to(device, non_blocking=True), image_size)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            f = encoder(x)
        feats.append(f.float())
    feats = torch.cat(feats)
    if w > 1:   # rank-strided order -> original order
        feats = all_gather_no_grad(feats).view(w, per_rank, -1).transpose(0, 1).reshape(w * per_rank, -1)[:n]
    encoder.train(was_training)
    return F.normalize(feats, dim=1) if normalize else feats


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
