"""The kNN monitor of a training run: weighted kNN of the encoder on clean features, each number
stored beside the protocol that measured it.

A method that keeps its own features of the training set (InstDisc's memory bank) also gets a
second kNN with those rows as the training features (``knn_bank_*``).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..data.splits import pixels
from .features import extract_features
from .knn import knn_accuracy

__all__ = ["knn_protocol", "knn_eval", "monitor_eval"]


def knn_protocol(cfg, n_train: int | None = None) -> str:
    """How a kNN number was measured, stored beside it; k as used (at most the `n_train` items)."""
    k = cfg.eval.knn_k if n_train is None else min(cfg.eval.knn_k, n_train)
    clipped = f" (eval.knn_k={cfg.eval.knn_k} clipped to the {n_train} training items)" if k != cfg.eval.knn_k else ""
    return (f"weighted kNN k={k}{clipped} t={cfg.eval.knn_temperature} on clean (test-transform) "
            f"features, {cfg.eval.train_split} -> {cfg.eval.test_split}")


def knn_eval(encoder: nn.Module, cfg, train_ds, test_ds, device, amp) -> dict:
    """Weighted kNN top-1/top-5 of `encoder` on clean (test-transform) features of train and test."""
    size = cfg.data.image_size
    ftr = extract_features(encoder, pixels(train_ds), cfg.eval.batch_size, device, size, amp)
    fte = extract_features(encoder, pixels(test_ds), cfg.eval.batch_size, device, size, amp)
    return knn_accuracy(ftr, train_ds.labels.to(device), fte, test_ds.labels.to(device),
                        cfg.eval.knn_k, cfg.eval.knn_temperature, train_ds.num_classes)


def monitor_eval(model, cfg, train_ds, test_ds, device, amp, bank_valid: bool) -> dict:
    """The kNN monitor: `knn_eval` of `model.encoder`, its protocol, and, for a method that keeps a
    memory bank of the training set (`model.monitor_bank()`; `bank_valid`: the monitor's train split
    is the training set), a second kNN with the bank rows as training features and head-space test
    features."""
    res = {**knn_eval(model.encoder, cfg, train_ds, test_ds, device, amp), "protocol": knn_protocol(cfg, len(train_ds))}
    bank = model.monitor_bank()
    if bank is not None and bank_valid:
        fte = extract_features(nn.Sequential(model.backbone, model.head), pixels(test_ds), cfg.eval.batch_size,
                               device, cfg.data.image_size, amp)
        r = knn_accuracy(F.normalize(bank.float(), dim=1), train_ds.labels.to(device), fte,
                         test_ds.labels.to(device), cfg.eval.knn_k, cfg.eval.knn_temperature, train_ds.num_classes)
        res.update({k.replace("knn_", "knn_bank_"): v for k, v in r.items()})
        res["protocol_bank"] = (f"weighted kNN k={cfg.eval.knn_k} t={cfg.eval.knn_temperature}: training "
                                f"features = the method's memory bank ({cfg.model.proj_dim}-d head space, "
                                f"momentum average of augmented views), test = clean head-space features, "
                                f"{cfg.data.train_split} -> {cfg.eval.test_split}")
    return res
