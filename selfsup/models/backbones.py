"""Encoders f: torchvision ResNets without their classifier, an optional CIFAR stem, a small CPU ResNet,
and any timm model (``timm/<name>``, built with ``num_classes=0``: its pooled features).

Every backbone maps (B, 3, H, W) float images to (B, feat_dim) pooled features. The torchvision
ResNets keep torchvision's parameter names, so ``torchvision.models.resnet18().load_state_dict``
accepts an exported encoder with only ``fc.*`` missing.

Activation checkpointing (``model.checkpointing``, :func:`set_checkpointing`): in a training-mode
forward with gradients on, each ResNet stage (torchvision ``layer1..layer4``; each block of
``resnet_small``) runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: only its input
is kept, and the stage is run again in the backward (same RNG state). The recomputation would update
BatchNorm's running statistics a second time; it runs under :func:`frozen_bn_stats`, so they are
updated once, as without checkpointing. timm models use their own ``set_grad_checkpointing``.
"""
from __future__ import annotations

import contextlib

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import check_timm_name
from ..errors import ConfigError

TORCHVISION_RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
BACKBONES = sorted([*TORCHVISION_RESNETS, "resnet_small"])


_BN = nn.modules.batchnorm._BatchNorm


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module):
    """Inside, the training-mode BatchNorm layers of `module` leave their running statistics as they
    are: momentum 0 (running <- 1 * running + 0 * batch, exactly) and ``num_batches_tracked`` put back
    on exit. Batch statistics still normalise, so the outputs (and what autograd saves) are those of
    an ordinary forward; for running a forward a second time (a checkpoint's recomputation)."""
    bns = [m for m in module.modules() if isinstance(m, _BN) and m.training and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def run_stage(stage, x: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """``stage(x)``, checkpointed when `module` (default `stage`, a module) is training and gradients are
    on: only `x` is kept, and the stage runs again in the backward (RNG state preserved) under
    :func:`frozen_bn_stats` of `module`."""
    module = stage if module is None else module
    if not (module.training and torch.is_grad_enabled()):
        return stage(x)
    return checkpoint(stage, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), frozen_bn_stats(module)))


class _CheckpointedStage(nn.Sequential):
    """A torchvision ResNet stage (an ``nn.Sequential`` of blocks: the same children, so the same
    state_dict keys) whose forward goes through :func:`run_stage`."""

    def forward(self, x):
        return run_stage(super().forward, x, self)


def _torchvision_resnet(name: str, cifar_stem: bool) -> nn.Module:
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        # 32x32 inputs: 3x3 stride-1 conv1 and no max-pool (SimCLR/MoCo CIFAR setting).
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class SmallResNet(nn.Module):
    """A 4-stage ResNet with one basic block per stage and base width `width` (32 -> 256-d features).

    Made for 2-core CPU runs on 28x28 / 32x32 images. `cifar_stem` keeps full resolution in the
    first stage; without it the stem is a stride-2 3x3 conv. ``checkpointing``: run each stage
    (block) through :func:`run_stage`.
    """

    def __init__(self, width: int = 32, cifar_stem: bool = True):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1 if cifar_stem else 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.layers = nn.Sequential(_Block(w[0], w[0], 1), _Block(w[0], w[1], 2),
                                    _Block(w[1], w[2], 2), _Block(w[2], w[3], 2))
        self.out_dim = w[3]
        self.checkpointing = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.checkpointing:
            for block in self.layers:
                x = run_stage(block, x)
        else:
            x = self.layers(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _timm_model(name: str, args: dict | None) -> tuple[nn.Module, int]:
    """A timm model as an encoder: ``timm.create_model(name, pretrained=False, num_classes=0, **args)``,
    drop-path 0 unless `args` sets ``drop_path_rate``; checked on a probe batch to map (B, 3, H, W)
    to (B, D). Returns (model, D); D is ``num_features`` (``head_hidden_size`` for pre-logits heads)."""
    import timm   # only for timm backbones

    given = dict(args or {})
    args = {"drop_path_rate": 0.0, **given}   # MoCo v3: no drop-path during pre-training unless asked
    if not timm.is_model(name):
        check_timm_name(name)   # raises, with close matches (config.validate has normally done so already)
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, **args)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError, RuntimeError) as e:   # validate() names the key
        raise ConfigError(f"timm cannot build timm/{name} with model.backbone_args {given} ({type(e).__name__}: "
                          f"{e}): change or remove the value it names") from None
    patch = getattr(net, "patch_embed", None)
    size = tuple(getattr(patch, "img_size", None) or (64, 64))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, 3, *size))
    except Exception as e:  # noqa: BLE001 - any failure means it is not an image encoder we can use
        fix = (f"Check model.backbone_args {given} (in_chans 3, patch_size at most img_size) or choose an image "
               "classification" if given else "Choose an image classification")
        raise ConfigError(f"model.backbone=timm/{name} is not an image encoder: its forward on a (2, 3, {size[0]}, "
                          f"{size[1]}) batch failed ({type(e).__name__}: {e}). {fix} model (e.g. "
                          "timm/vit_small_patch16_224, timm/resnet50)") from None
    net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.backbone=timm/{name} is not an image encoder with pooled features: with "
                          f"num_classes=0 it maps a (2, 3, {size[0]}, {size[1]}) batch to {shape}, not (2, D). "
                          "Keep timm's global pooling (no global_pool='' in model.backbone_args) or choose "
                          "an image classification model")
    return net, int(out.shape[1])


def set_checkpointing(net: nn.Module, enable: bool = True, name: str = "") -> nn.Module:
    """Turn activation checkpointing of backbone `net` (built by :func:`build_backbone` as `name`) on
    or off, in place; parameters, buffers and state_dict keys do not change. ResNets: each stage via
    :func:`run_stage`; timm models: ``set_grad_checkpointing(enable)``, and their BatchNorm layers
    keep their running statistics while run in a backward (the recomputation). A timm model without
    support raises ConfigError. Returns `net`."""
    if isinstance(net, SmallResNet):
        net.checkpointing = bool(enable)
    elif isinstance(net, torchvision.models.ResNet):
        for i in range(1, 5):
            stage = getattr(net, f"layer{i}")
            new = (_CheckpointedStage if enable else nn.Sequential)(*stage)
            setattr(net, f"layer{i}", new.train(stage.training))
    elif hasattr(net, "set_grad_checkpointing") or name.startswith("timm/"):
        try:
            net.set_grad_checkpointing(bool(enable))
        except (AssertionError, AttributeError, NotImplementedError) as e:
            raise ConfigError(f"model.checkpointing=true: model.backbone={name or type(net).__name__} does not support "
                              f"activation checkpointing (timm's set_grad_checkpointing: {e or 'not supported'}); "
                              "set model.checkpointing=false or choose another backbone") from None
        _guard_bn_in_backward(net)
    else:
        raise ConfigError(f"model.checkpointing=true: no activation checkpointing for {name or type(net).__name__}")
    return net


def _bn_pre_hook(bn, args):
    if bn.training and torch._C._current_graph_task_id() != -1:   # a forward inside a backward: a recomputation
        bn._selfsup_frozen = frozen_bn_stats(bn)
        bn._selfsup_frozen.__enter__()


def _bn_post_hook(bn, args, out):
    frozen = bn.__dict__.pop("_selfsup_frozen", None)
    if frozen is not None:
        frozen.__exit__(None, None, None)


def _guard_bn_in_backward(net: nn.Module) -> None:
    """timm checkpoints inside its own forward (no context_fn to pass): hooks on `net`'s BatchNorm layers
    apply :func:`frozen_bn_stats` to a BN forward that runs during a backward, i.e. a recomputation
    (idempotent; harmless without checkpointing, where no forward runs in a backward)."""
    for bn in net.modules():
        if isinstance(bn, _BN) and _bn_pre_hook not in bn._forward_pre_hooks.values():
            bn.register_forward_pre_hook(_bn_pre_hook)
            bn.register_forward_hook(_bn_post_hook, always_call=True)


def build_backbone(name: str, cifar_stem: bool = True, width: int = 32,
                   backbone_args: dict | None = None, checkpointing: bool = False) -> tuple[nn.Module, int]:
    """Return (encoder, feat_dim) for `name` in BACKBONES or ``timm/<name>`` (`backbone_args` go to
    ``timm.create_model``; `cifar_stem` and `width` do not apply to timm models); unknown names raise
    ValueError (ConfigError for timm names, with close matches). `checkpointing`: activation
    checkpointing on (:func:`set_checkpointing`)."""
    if name.startswith("timm/"):
        net, dim = _timm_model(name[len("timm/"):], backbone_args)
    elif backbone_args:
        raise ConfigError(f"model.backbone_args are for timm/<name> backbones, not model.backbone={name}")
    elif name in TORCHVISION_RESNETS:
        net, dim = _torchvision_resnet(name, cifar_stem), TORCHVISION_RESNETS[name]
    elif name == "resnet_small":
        net = SmallResNet(width, cifar_stem)
        dim = net.out_dim
    else:
        raise ValueError(f"unknown backbone '{name}'. Valid backbones: {', '.join(BACKBONES)}, timm/<name>")
    if checkpointing:
        set_checkpointing(net, True, name)
    return net, dim
