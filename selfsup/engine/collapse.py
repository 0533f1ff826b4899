"""The collapse alarm: is the encoder still telling images apart?

At each log step the trainer measures the batch's embeddings (the first view's output of the
method's head, as the loss sees it) two ways:

* ``embed_std``: the standard deviation over the batch of each dimension of the L2-normalised
  embeddings, averaged over the D dimensions. Embeddings spread over the sphere give about
  1/sqrt(D); a collapse to one point gives 0 (Chen and He 2021, SimSiam's measure).
* ``embed_rank``: the effective rank of the (B, D) matrix of normalised embeddings, exp of the
  entropy of its normalised singular values (Roy and Vetterli 2007; RankMe, Garrido et al. 2023).
  1 when every row is the same point, up to min(B, D) when the embeddings use every direction;
  a dimensional collapse (a few directions only) shows here while embed_std can still look fine.

`CollapseAlarm` prints one warning, once per run, when either falls below its threshold
(log.collapse_std as a fraction of 1/sqrt(D), log.collapse_rank) at a log step after the first
epoch (a network at its random initialisation often maps every image to nearly one point). Under
torchrun the figures are rank 0's share of the batch.
"""
from __future__ import annotations

import math

import torch

__all__ = ["embedding_stats", "CollapseAlarm"]


@torch.no_grad()
def embedding_stats(z: torch.Tensor) -> dict:
    """{"embed_std", "embed_rank"} of embeddings `z` (B, D): per-dimension std of the unit rows, averaged
    over dimensions, and the effective rank of the unit rows (computed in float32)."""
    z = torch.nn.functional.normalize(z.detach().float().flatten(1), dim=1)
    std = z.std(dim=0).mean() if z.shape[0] > 1 else z.new_zeros(())
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12)
    rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"embed_std": float(std), "embed_rank": float(rank)}


class CollapseAlarm:
    """Warns once when the embeddings collapse: `check(stats, epoch, dim)` returns the warning line (printed
    by the caller) the first time, from epoch `after` on, that embed_std < `std_frac`/sqrt(dim) or
    embed_rank < `min_rank`; None otherwise. A threshold of 0 turns that test off."""

    def __init__(self, std_frac: float, min_rank: float, after: int = 1):
        self.std_frac, self.min_rank, self.after = std_frac, min_rank, after
        self.fired = False

    def check(self, stats: dict, epoch: float, dim: int) -> str | None:
        if self.fired or epoch < self.after:
            return None
        healthy = 1.0 / math.sqrt(dim)
        low_std = stats["embed_std"] < self.std_frac * healthy
        low_rank = stats["embed_rank"] < self.min_rank
        if not (low_std or low_rank):
            return None
        self.fired = True
        what = []
        if low_std:
            what.append(f"embed_std {stats['embed_std']:.4f} (about {healthy:.4f} = 1/sqrt({dim}) when healthy, "
                        "0 when every image maps to one point)")
        if low_rank:
            what.append(f"embed_rank {stats['embed_rank']:.2f} (the embeddings use about that many of "
                        f"{dim} directions)")
        return ("collapse alarm: " + "; ".join(what) + ". Likely causes: a learning rate too high (try half) or a "
                "warm-up too short; a temperature too high; augmentations too weak for the task (views too alike) "
                "or too strong; weight decay too large; a MoCo momentum too low or a missing predictor; a batch too "
                "small for the loss. Curves: embed_std and embed_rank in metrics.jsonl, TensorBoard and the "
                "report; thresholds: log.collapse_std, log.collapse_rank (0 turns a test off)")
