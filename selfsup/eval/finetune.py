"""Semi-supervised fine-tuning (SimCLR): the whole network plus a new linear classifier, trained on a
class-balanced 1% / 10% labelled subset of the train split, evaluated on the test split.

Recipe (SimCLR): SGD with Nesterov momentum 0.9, no weight decay, random-resized-crop + flip
augmentation only, BN in training mode, cosine lr decay without warm-up; lr 0.05 * batch / 256,
60 epochs for 1% and 30 for 10% unless set. ``from_head_layer=k`` keeps the first k hidden layers
(Linear-BN-ReLU) of the projection head under the classifier (SimCLR v2 fine-tunes from the first).

Layer-wise lr decay (``eval.layer_decay`` = d < 1, as MAE/BEiT fine-tune ViTs): a parameter of layer
i gets lr x d^(L - i). A timm ViT: patch_embed / cls_token / pos_embed (and reg/dist tokens) are
layer 0, blocks.k is layer k + 1, everything after (final norm, head layers, the new classifier)
is L = depth + 1. A ResNet (torchvision, timm or resnet_small): the stem is 0, stage k (layer1..4,
or resnet_small's layers.0..3) is k, everything after is L = 5.

Subsets: the same number of items from every class, round(fraction * N / num_classes), chosen at
random from a seed (fraction 1: the whole split); they index the train split, never the test split.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import write_text
from ..data.augment import crop_flip_augment, eval_transform
from ..data.images import require_labels
from ..errors import ConfigError
from ..progress import Progress
from .features import extract_features
from .linear import new_classifier, sgd_with_schedule, topk_accuracy


def balanced_subset(labels: Tensor, fraction: float, seed: int = 0, num_classes: int | None = None) -> Tensor:
    """Sorted indices of a class-balanced subset: round(fraction * N / num_classes) items (at least
    one) drawn at random (seed `seed`) from every class; fraction in (0, 1], 1 meaning every item."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}")
    labels = labels.cpu()
    if fraction == 1.0:
        return torch.arange(len(labels))
    num_classes = num_classes or int(labels.max()) + 1
    per_class = max(1, round(fraction * len(labels) / num_classes))
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        if len(idx) < per_class:
            raise ConfigError(f"class {c} has {len(idx)} items, fewer than the {per_class} per class that a "
                              f"balanced {fraction:g} subset needs")
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(out).sort().values


def fraction_tag(fraction: float) -> str:
    """'1pct' for 0.01, '10pct' for 0.1: the name of a fraction in result keys and file names."""
    return f"{fraction * 100:g}pct"


def default_epochs(fraction: float) -> int:
    """SimCLR's fine-tuning epochs: 60 for 1% of the labels or fewer, 30 above."""
    return 60 if fraction <= 0.01 + 1e-12 else 30


def classifier_net(encoder: nn.Module, num_classes: int, probe: Tensor, head: nn.Module | None = None,
                   from_head_layer: int = 0, seed: int = 0) -> nn.Sequential:
    """A copy of `encoder` (+ the first `from_head_layer` Linear-BN-ReLU blocks of the projection
    `head`) followed by a new linear classifier. `probe`: a small float input batch (eval transform),
    used to find the feature dimension."""
    mods = [copy.deepcopy(encoder)]
    if from_head_layer:
        hidden = 0 if head is None else sum(isinstance(m, nn.ReLU) for m in head)
        if not 0 < from_head_layer <= hidden:
            raise ConfigError(f"eval.finetune_from_head_layer={from_head_layer}, but the projection head has "
                              f"{hidden} hidden layer(s) (model.head_layers=2 has 1, 3 has 2)")
        mods += [copy.deepcopy(m) for m in list(head)[:3 * from_head_layer]]
    device = next(encoder.parameters()).device
    net = nn.Sequential(*mods).to(device).eval()   # the head's layers follow the encoder
    with torch.no_grad():
        dim = net(probe.to(device)).shape[1]
    net.append(new_classifier(dim, num_classes, seed).to(device))
    return net


_VIT_STEM = ("patch_embed", "cls_token", "pos_embed", "reg_token", "dist_token")


def encoder_layers(encoder: nn.Module) -> tuple[int, Callable[[str], int]]:
    """(L, layer_id): the number of layers of `encoder` for layer-wise lr decay and the layer of a
    parameter name relative to it (0 .. L; L for anything after the last block). A timm ViT (blocks
    + patch_embed) or a ResNet; other encoders raise ConfigError."""
    blocks = getattr(encoder, "blocks", None)
    if blocks is not None and hasattr(encoder, "patch_embed"):
        num = len(blocks) + 1

        def vit(name: str) -> int:
            if name.startswith(_VIT_STEM):
                return 0
            if name.startswith("blocks."):
                return int(name.split(".")[1]) + 1
            return num
        return num, vit
    if hasattr(encoder, "conv1") and (all(hasattr(encoder, f"layer{k}") for k in range(1, 5))
                                      or hasattr(encoder, "layers")):
        def resnet(name: str) -> int:
            first = name.split(".")[0]
            if first in ("conv1", "bn1", "act1"):
                return 0
            if first.startswith("layer") and first[5:].isdigit():
                return int(first[5:])
            if first == "layers":   # resnet_small: layers.0..3 are its stages 1..4
                return int(name.split(".")[1]) + 1
            return 5
        return 5, resnet
    raise ConfigError(f"eval.layer_decay < 1 works for timm ViTs and ResNets, not a {type(encoder).__name__} "
                      "encoder: set eval.layer_decay=1")


def layer_decay_groups(net: nn.Sequential, lr: float, layer_decay: float) -> list[dict]:
    """Param groups of a `classifier_net` (encoder first) with lr x layer_decay^(L - layer id); the
    layers after the encoder (head layers, classifier) are layer L and keep `lr`."""
    num, layer_id = encoder_layers(net[0])
    groups: dict[int, list] = {}
    for name, p in net.named_parameters():
        first, _, rest = name.partition(".")
        i = layer_id(rest) if first == "0" else num
        groups.setdefault(i, []).append(p)
    return [{"params": ps, "lr": lr * layer_decay ** (num - i), "layer_id": i} for i, ps in sorted(groups.items())]


def finetune(net: nn.Module, train_ds, idx: Tensor, *, epochs: int, lr: float, batch_size: int = 256,
             crop_scale=(0.08, 1.0), image_size: int | None = None, device=None, amp=None, seed: int = 0,
             layer_decay: float = 1.0) -> nn.Module:
    """Train all of `net` (in place, BN in training mode) on the items `idx` of `train_ds` with
    crop + flip views, SGD Nesterov momentum 0.9, no weight decay, cosine lr (with layer-wise
    decay `layer_decay` < 1: see :func:`layer_decay_groups`); returns it."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    images, labels = train_ds.images, train_ds.labels.to(device)
    n = len(idx)
    bs = min(batch_size, n)
    if bs < 2:
        raise ConfigError(f"the labelled subset has {n} item(s); BN in training mode needs batches of >= 2")
    steps_per_epoch = n // bs   # full batches only (BN statistics of a tiny last batch are noise)
    aug = crop_flip_augment(image_size or images.shape[-1], crop_scale)
    params = layer_decay_groups(net, lr, layer_decay) if layer_decay < 1 else net.parameters()
    opt, sched = sgd_with_schedule(params, lr, 0.0, 0.9, "cosine", epochs * steps_per_epoch, nesterov=True)
    g = torch.Generator().manual_seed(seed + 1)
    net.to(device).train()
    bar = Progress(epochs * steps_per_epoch, f"finetune ({n} labels)")
    for _ in range(epochs):
        perm = idx[torch.randperm(n, generator=g)]
        for s in range(steps_per_epoch):
            b = perm[s * bs:(s + 1) * bs]
            x = aug(images[b.to(images.device)].to(device, non_blocking=True), g)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(net(x).float(), labels[b.to(device)])
            if not torch.isfinite(loss):
                raise ValueError(f"fine-tuning diverged (loss {loss.item()}); lower eval.finetune_lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar.due():
                bar.set(loss=loss.item())
            bar.update()
    bar.close()
    return net


def finetune_eval(encoder: nn.Module, cfg, train_ds, test_ds, device, amp, head: nn.Module | None = None,
                  out_dir: str | Path | None = None) -> dict:
    """Fine-tune `encoder` (and the first `eval.finetune_from_head_layer` layers of `head`) on each
    fraction of `eval.finetune_fractions`; report finetune_<N>pct_{top1,top5,train_top1,labels}
    and a `protocol`. Each subset's indices are written to OUT_DIR/finetune_subset_<N>pct.json."""
    e = cfg.eval
    require_labels(train_ds, e.train_split, "fine-tuning")
    require_labels(test_ds, e.test_split, "fine-tuning")
    if train_ds is test_ds:   # subsets index the train split only (validate checked the split names)
        raise ConfigError(f"the train and test sets are the same object ('{e.test_split}'): the labelled "
                          "subsets must come from a split disjoint from the test split")
    fractions = list(e.finetune_fractions)   # ranges and batch checked by config.validate
    lr = e.finetune_lr if e.finetune_lr is not None else 0.05 * e.finetune_batch_size / 256
    size = cfg.data.image_size
    probe = eval_transform(train_ds.images[:2].cpu(), size)
    base = classifier_net(encoder, train_ds.num_classes, probe, head, e.finetune_from_head_layer, e.seed)
    decay = e.get("layer_decay", 1.0)
    if decay < 1:
        encoder_layers(base[0])   # an encoder it does not fit fails before any training
    res, runs = {}, []
    for fraction in fractions:
        tag = fraction_tag(fraction)
        idx = balanced_subset(train_ds.labels, fraction, e.seed, train_ds.num_classes)
        assert int(idx.max()) < len(train_ds) and e.train_split != e.test_split   # train split only
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / f"finetune_subset_{tag}.json", json.dumps(
                {"split": e.train_split, "fraction": fraction, "seed": e.seed,
                 "per_class": len(idx) // train_ds.num_classes, "indices": idx.tolist()}) + "\n")
        epochs = e.finetune_epochs or default_epochs(fraction)
        net = finetune(copy.deepcopy(base), train_ds, idx, epochs=epochs, lr=lr, batch_size=e.finetune_batch_size,
                       crop_scale=e.aug_crop_scale, image_size=size, device=device, amp=amp, seed=e.seed,
                       layer_decay=e.get("layer_decay", 1.0))
        logits = extract_features(net, test_ds.images, e.batch_size, device, size, amp, normalize=False)
        r = topk_accuracy(logits, test_ds.labels, test_ds.num_classes, f"finetune_{tag}")
        sub = extract_features(net, train_ds.images[idx.to(train_ds.images.device)], e.batch_size, device,
                               size, amp, normalize=False)
        r[f"finetune_{tag}_train_top1"] = topk_accuracy(sub, train_ds.labels[idx], train_ds.num_classes,
                                                        "t")["t_top1"]
        r[f"finetune_{tag}_labels"] = len(idx)
        res.update(r)
        runs.append(f"{tag}: {len(idx)} labels, {epochs} epochs")
    lo, hi = e.aug_crop_scale
    start = (f"backbone + first {e.finetune_from_head_layer} projection-head layer(s)"
             if e.finetune_from_head_layer else "backbone")
    res["protocol"] = (
        f"finetune: {start} + new linear classifier, all trained on class-balanced labelled subsets of "
        f"{e.train_split} (seed {e.seed}; {'; '.join(runs)}); SGD Nesterov momentum 0.9, lr {lr:g}, no weight "
        f"decay{f', layer-wise lr decay {decay:g}' if decay < 1 else ''}, batch {e.finetune_batch_size}, cosine "
        "schedule without warm-up, random-resized-crop "
        f"(scale {lo}-{hi}) + flip only, BN in training mode; tested on clean {e.test_split} images")
    return res
