"""The two numbers every kNN result needs beside it: raw pixels and the same encoder untrained.

``selfsup eval knn --baselines`` scores, with the run's own kNN protocol (k, temperature, splits):

* ``baseline_pixels``: the clean (test-transform) images themselves as features, flattened, centred
  by the training split's mean image, L2-normalised. Images over 64 px are first average-pooled to
  32 px (a 224 px ImageNet image would be a 150,528-d feature); the protocol says so.
* ``baseline_random_init``: the run's encoder architecture at its random initialisation, built with
  the run's seed exactly as training builds it, BN running statistics at their initial values (the
  network a run with ``train.max_steps=0`` evaluates).

A trained encoder that does not clear both has learnt nothing worth its training time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.splits import pixels
from ..methods import build_method
from .features import extract_features
from .knn import knn_accuracy

__all__ = ["PixelEncoder", "pixel_baseline", "random_init_baseline", "baselines", "gains", "gains_line"]
BASELINES = {"pixels": "raw pixels", "random_init": "random init"}

POOL_ABOVE, POOL_TO = 64, 32   # pixels: images larger than POOL_ABOVE px are pooled to POOL_TO px


class PixelEncoder(nn.Module):
    """(B, 3, H, W) normalised images -> (B, 3 H W) flattened pixels (average-pooled to `POOL_TO` px first
    when H or W exceeds `POOL_ABOVE`). No parameters."""

    def forward(self, x: Tensor) -> Tensor:
        if max(x.shape[-2:]) > POOL_ABOVE:
            x = F.adaptive_avg_pool2d(x, POOL_TO)
        return x.flatten(1)


def _knn(cfg, train_feats: Tensor, test_feats: Tensor, train_ds, test_ds, device) -> dict:
    return knn_accuracy(train_feats, train_ds.labels.to(device), test_feats, test_ds.labels.to(device),
                        cfg.eval.knn_k, cfg.eval.knn_temperature, train_ds.num_classes)


@torch.no_grad()
def pixel_baseline(cfg, train_ds, test_ds, device) -> dict:
    """kNN top-1 (top-5) of centred raw pixels: {"baseline_pixels_top1", ..., "protocol_baseline_pixels"}."""
    enc, size = PixelEncoder(), cfg.data.image_size
    ftr = extract_features(enc, pixels(train_ds), cfg.eval.batch_size, device, size, normalize=False)
    fte = extract_features(enc, pixels(test_ds), cfg.eval.batch_size, device, size, normalize=False)
    mean = ftr.mean(0, keepdim=True)
    ftr = F.normalize(ftr.sub_(mean), dim=1)
    fte = F.normalize(fte.sub_(mean), dim=1)
    res = _knn(cfg, ftr, fte, train_ds, test_ds, device)
    return {**{k.replace("knn_", "baseline_pixels_"): v for k, v in res.items()},
            "protocol_baseline_pixels": f"raw pixels: the clean (test-transform) images as {ftr.shape[1]}-d vectors "
                                        f"(average-pooled to {POOL_TO} px when over {POOL_ABOVE} px), centred by the "
                                        f"{cfg.eval.train_split} split's mean image, L2-normalised; same kNN"}


@torch.no_grad()
def random_init_baseline(cfg, train_ds, test_ds, device, amp) -> dict:
    """kNN top-1 (top-5) of the run's encoder at its random initialisation (seed `cfg.seed`, built as the
    trainer builds it): {"baseline_random_init_top1", ..., "protocol_baseline_random_init"}."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):   # the caller's random stream is left as it was
        torch.manual_seed(cfg.seed)
        encoder = build_method(cfg).encoder.to(device)
    size = cfg.data.image_size
    ftr = extract_features(encoder, pixels(train_ds), cfg.eval.batch_size, device, size, amp)
    fte = extract_features(encoder, pixels(test_ds), cfg.eval.batch_size, device, size, amp)
    res = _knn(cfg, ftr, fte, train_ds, test_ds, device)
    return {**{k.replace("knn_", "baseline_random_init_"): v for k, v in res.items()},
            "protocol_baseline_random_init": f"the same encoder ({cfg.model.backbone}) at its random initialisation "
                                             f"(seed {cfg.seed}, as the run started), same kNN"}


def baselines(cfg, train_ds, test_ds, device, amp) -> dict:
    """Both baselines' results (:func:`pixel_baseline`, :func:`random_init_baseline`) in one dict."""
    return {**pixel_baseline(cfg, train_ds, test_ds, device),
            **random_init_baseline(cfg, train_ds, test_ds, device, amp)}


def gains(res: dict, key: str = "knn_top1") -> dict:
    """{baseline name: (baseline top-1, res[key] - it)} for each baseline measured in `res` (a knn.json)."""
    out = {}
    for name in BASELINES:
        base = res.get(f"baseline_{name}_top1")
        if base is not None and res.get(key) is not None:
            out[name] = (base, res[key] - base)
    return out


def gains_line(res: dict) -> str:
    """One line: the kNN top-1 and its gain over each baseline, e.g. ``kNN top-1 0.8712 (raw pixels 0.8238:
    +0.0474; random init 0.7750: +0.0962)``."""
    parts = [f"{BASELINES[n]} {b:.4f}: {g:+.4f}" for n, (b, g) in gains(res).items()]
    return f"kNN top-1 {res['knn_top1']:.4f}" + (f" ({'; '.join(parts)})" if parts else "")
