"""Features of a split under an encoder, with the clean test transform, for every evaluation.

Works on an in-memory uint8 tensor or a file-backed set (decoded in DataLoader workers), on one
process or sharded over the ranks of ``torch.distributed`` (every rank gets all features, in order).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import eval_transform
from ..data.loader import clean_batches
from ..parallel.distributed import all_gather_no_grad, rank, world_size
from ..progress import Progress

__all__ = ["extract_features"]


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
        batches = clean_batches(images, idx, batch_size, image_size, getattr(images, "workers", 0))
    feats = []
    # a long extraction (a kNN monitor or evaluation on a CPU) shows in a log, never as a bar: quiet when short
    bar = Progress(len(idx), "features", enabled=r == 0 and not sys.stdout.isatty(), tty=False, unit="image",
                   final_line=False)
    for batch in batches:
        x = eval_transform(batch.to(device, non_blocking=True), image_size)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            f = encoder(x)
        feats.append(f.float())
        bar.update(len(x))
    bar.close()
    feats = torch.cat(feats)
    if w > 1:   # rank-strided order -> original order
        feats = all_gather_no_grad(feats).view(w, per_rank, -1).transpose(0, 1).reshape(w * per_rank, -1)[:n]
    encoder.train(was_training)
    return F.normalize(feats, dim=1) if normalize else feats
