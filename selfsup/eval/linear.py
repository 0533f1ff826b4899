"""Linear evaluation of a frozen encoder: one `nn.Linear` on its pooled backbone features.

Two modes (``eval.linear_mode``):

* ``features`` (default): the clean (test-transform) features of the train and test splits are
  computed once, standardised per dimension with the train split's mean and std (not L2-normalised),
  and the linear layer is trained on those tensors with SGD (momentum 0.9) in minibatches.
* ``augment`` (the MoCo protocol): every step encodes a fresh random-resized-crop + flip view of the
  batch with the frozen encoder (eval mode: BN uses its running statistics; no gradient reaches it)
  and trains the linear layer on the raw features; MoCo's settings are lr 30, momentum 0.9, wd 0,
  step schedule (x0.1 at 60% and 80% of the steps). Test and train accuracy use clean features.

The classifier starts from weights N(0, 0.01^2) and zero bias (as MoCo's).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import crop_flip_augment
from ..data.images import require_labels
from ..errors import ConfigError
from ..optim import warmup_cosine
from ..progress import Progress
from .features import extract_features

SCHEDULES = ("cosine", "step")


def topk_accuracy(scores: Tensor, labels: Tensor, num_classes: int, prefix: str) -> dict:
    """{prefix_top1, prefix_top5} of class `scores` (N, C) against `labels` (N,); top-5 only when
    there are more than 5 classes."""
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == labels.to(top.device)[:, None]
    res = {f"{prefix}_top1": hit[:, 0].float().mean().item()}
    if num_classes > 5:
        res[f"{prefix}_top5"] = hit.any(dim=1).float().mean().item()
    return res


def lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Per-step lr multiplier: 'cosine' (1 -> 0, no warm-up) or 'step' (x0.1 at 60%, x0.01 at 80%)."""
    if schedule == "cosine":
        return warmup_cosine(max(total_steps, 1), 0)
    if schedule == "step":
        return lambda s: 0.1 ** ((s >= 0.6 * total_steps) + (s >= 0.8 * total_steps))
    raise ConfigError(f"linear schedule {schedule!r} is not valid. Choose one of: {', '.join(SCHEDULES)}")


def new_classifier(dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """A linear layer dim -> num_classes with weights N(0, 0.01^2) drawn from `seed`, zero bias."""
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * 0.01)
        head.bias.zero_()
    return head


def sgd_with_schedule(params, lr: float, weight_decay: float, momentum: float, schedule: str, total_steps: int,
                      nesterov: bool = False):
    """(SGD optimiser, per-step LambdaLR with `lr_factor(schedule, total_steps)`)."""
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(schedule, total_steps))


def standardize_features(train_feats: Tensor, *others: Tensor) -> list[Tensor]:
    """(x - mean) / std per dimension with the mean and std of `train_feats`, applied to it and to
    `others`; dimensions that are constant on the train split get std 1."""
    mean = train_feats.mean(dim=0)
    std = train_feats.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(f - mean) / std for f in (train_feats, *others)]


def train_linear(train_feats: Tensor, train_labels: Tensor, num_classes: int, *, epochs: int = 100,
                 lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9,
                 schedule: str = "cosine", seed: int = 0) -> nn.Linear:
    """Train a linear classifier on fixed features (N, D) with minibatch SGD (shuffled each epoch,
    last partial batch kept) and a per-step schedule; returns it on the features' device."""
    n, dim = train_feats.shape
    device = train_feats.device
    head = new_classifier(dim, num_classes, seed).to(device)
    steps = epochs * -(-n // batch_size)
    opt, sched = sgd_with_schedule(head.parameters(), lr, weight_decay, momentum, schedule, steps)
    g = torch.Generator().manual_seed(seed + 1)
    labels = train_labels.to(device)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).to(device).split(batch_size):
            loss = F.cross_entropy(head(train_feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


def linear_probe_features(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                          num_classes: int, *, standardize: bool = True, **train_kwargs) -> dict:
    """Linear evaluation on precomputed features: `train_linear` on (optionally standardised) train
    features, then {linear_top1, linear_top5, linear_train_top1, feature_dim} on test / train."""
    if standardize:
        train_feats, test_feats = standardize_features(train_feats, test_feats)
    head = train_linear(train_feats, train_labels, num_classes, **train_kwargs)
    with torch.no_grad():
        res = topk_accuracy(head(test_feats), test_labels, num_classes, "linear")
        res["linear_train_top1"] = topk_accuracy(head(train_feats), train_labels, num_classes, "t")["t_top1"]
    res["feature_dim"] = train_feats.shape[1]
    return res


def linear_probe_augment(encoder: nn.Module, train_ds, test_ds, *, epochs: int = 100, lr: float = 30.0,
                         batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9,
                         schedule: str = "step", crop_scale=(0.08, 1.0), image_size: int | None = None,
                         eval_batch_size: int = 1024, device=None, amp=None, seed: int = 0) -> dict:
    """Linear evaluation with augmentation (MoCo): the frozen `encoder` (eval mode, no gradient)
    encodes a random-resized-crop + flip view of each batch, the linear layer learns on those raw
    features. Returns {linear_top1, linear_top5, linear_train_top1, feature_dim} (clean features
    for both accuracies). The encoder's parameters and BN statistics are left unchanged."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    images, labels = train_ds.images, train_ds.labels.to(device)
    size = image_size or images.shape[-1]
    aug = crop_flip_augment(size, crop_scale)
    was_training = encoder.training
    encoder.eval()
    g = torch.Generator().manual_seed(seed + 1)
    n = images.shape[0]

    def encode(x):
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return encoder(x).float()

    head = None
    steps = epochs * -(-n // batch_size)
    bar = Progress(steps, "linear (augment)")
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            f = encode(aug(images[idx.to(images.device)].to(device, non_blocking=True), g))
            if head is None:   # the feature dim is known after the first batch
                head = new_classifier(f.shape[1], train_ds.num_classes, seed).to(device)
                opt, sched = sgd_with_schedule(head.parameters(), lr, weight_decay, momentum, schedule, steps)
            loss = F.cross_entropy(head(f), labels[idx.to(device)])
            if not torch.isfinite(loss):
                raise ValueError(f"linear evaluation diverged (loss {loss.item()}); lower eval.linear_lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar.due():
                bar.set(loss=loss.item())
            bar.update()
    bar.close()
    encoder.train(was_training)
    with torch.no_grad():
        res = {}
        for ds, prefix in ((test_ds, "linear"), (train_ds, "t")):
            f = extract_features(encoder, ds.images, eval_batch_size, device, image_size, amp, normalize=False)
            res.update(topk_accuracy(head(f), ds.labels.to(device), ds.num_classes, prefix))
    res["linear_train_top1"] = res.pop("t_top1")
    res.pop("t_top5", None)
    res["feature_dim"] = head.in_features
    return res


def linear_settings(cfg) -> dict:
    """The linear-evaluation settings of `cfg.eval` with the mode-dependent defaults filled in (the values
    as `config.validate` checked them)."""
    e = cfg.eval
    augment = e.linear_mode == "augment"
    s = {"epochs": e.linear_epochs, "batch_size": e.linear_batch_size, "weight_decay": e.linear_weight_decay,
         "lr": e.linear_lr if e.linear_lr is not None else (30.0 if augment else 0.1),
         "schedule": e.linear_schedule or ("step" if augment else "cosine"), "seed": e.seed}
    return s


def linear_eval(encoder: nn.Module, cfg, train_ds, test_ds, device, amp) -> dict:
    """Linear evaluation of `encoder` with the settings of `cfg.eval` (see the module docstring);
    the result carries a `protocol` string that says what was measured."""
    e = cfg.eval
    s = linear_settings(cfg)
    require_labels(train_ds, e.train_split, "linear evaluation")
    require_labels(test_ds, e.test_split, "linear evaluation")
    size = cfg.data.image_size
    if e.linear_mode == "features":
        ftr = extract_features(encoder, getattr(train_ds, "images", train_ds), e.batch_size, device, size, amp,
                               normalize=False)
        fte = extract_features(encoder, getattr(test_ds, "images", test_ds), e.batch_size, device, size, amp,
                               normalize=False)
        res = linear_probe_features(ftr, train_ds.labels.to(device), fte, test_ds.labels.to(device),
                                    train_ds.num_classes, **s)
        what = (f"{res['feature_dim']}-d clean (test-transform) backbone features computed once, standardised "
                f"with the {e.train_split} split's per-dimension mean/std")
    else:
        res = linear_probe_augment(encoder, train_ds, test_ds, **s, crop_scale=tuple(e.aug_crop_scale),
                                   image_size=size, eval_batch_size=e.batch_size, device=device, amp=amp)
        lo, hi = e.aug_crop_scale
        what = (f"{res['feature_dim']}-d raw backbone features of a random-resized-crop (scale {lo}-{hi}) + "
                f"flip view per step, encoder frozen in eval mode (BN running statistics); accuracies on "
                f"clean features")
    res["protocol"] = (f"linear ({e.linear_mode}): nn.Linear on {what}; SGD momentum 0.9, lr {s['lr']}, wd "
                       f"{s['weight_decay']}, batch {s['batch_size']}, {s['epochs']} epochs, {s['schedule']} "
                       f"schedule, seed {s['seed']}; {e.train_split} -> {e.test_split}")
    return res
