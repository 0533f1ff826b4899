"""Encoders f: torchvision ResNets without their classifier, an optional CIFAR stem, a small CPU ResNet,
and any timm model (``timm/<name>``, built with ``num_classes=0``: its pooled features).

Every backbone maps (B, 3, H, W) float images to (B, feat_dim) pooled features. The torchvision
ResNets keep torchvision's parameter names, so ``torchvision.models.resnet18().load_state_dict``
accepts an exported encoder with only ``fc.*`` missing.
"""
from __future__ import annotations


import torch
import torchvision
from torch import nn

from ..config import check_timm_name
from ..errors import ConfigError

TORCHVISION_RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
BACKBONES = sorted([*TORCHVISION_RESNETS, "resnet_small"])


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
    first stage; without it the stem is a stride-2 3x3 conv.
    """

    def __init__(self, width: int = 32, cifar_stem: bool = True):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1 if cifar_stem else 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.layers = nn.Sequential(_Block(w[0], w[0], 1), _Block(w[0], w[1], 2),
                                    _Block(w[1], w[2], 2), _Block(w[2], w[3], 2))
        self.out_dim = w[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(x), 1), 1)


def _timm_model(name: str, args: dict | None) -> tuple[nn.Module, int]:
    """A timm model as an encoder: ``timm.create_model(name, pretrained=False, num_classes=0, **args)``,
    drop-path 0 unless `args` sets ``drop_path_rate``; checked on a probe batch to map (B, 3, H, W)
    to (B, D). Returns (model, D); D is ``num_features`` (``head_hidden_size`` for pre-logits heads)."""
    import timm   # only for timm backbones

    args = dict(args or {})
    args.setdefault("drop_path_rate", 0.0)   # MoCo v3: no drop-path during pre-training unless asked
    if not timm.is_model(name):
        check_timm_name(name)   # raises, with close matches (config.validate has normally done so already)
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, **args)
    except TypeError as e:
        raise ConfigError(f"model.backbone=timm/{name} does not take model.backbone_args {dict(args)}: {e}") from None
    patch = getattr(net, "patch_embed", None)
    size = tuple(getattr(patch, "img_size", None) or (64, 64))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(2, 3, *size))
    except Exception as e:  # noqa: BLE001 - any failure means it is not an image encoder we can use
        raise ConfigError(f"model.backbone=timm/{name} is not an image encoder: its forward on a (2, 3, {size[0]}, "
                          f"{size[1]}) batch failed ({type(e).__name__}: {e}). Choose an image classification "
                          "model (e.g. timm/vit_small_patch16_224, timm/resnet50)") from None
    net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.backbone=timm/{name} is not an image encoder with pooled features: with "
                          f"num_classes=0 it maps a (2, 3, {size[0]}, {size[1]}) batch to {shape}, not (2, D). "
                          "Keep timm's global pooling (no global_pool='' in model.backbone_args) or choose "
                          "an image classification model")
    return net, int(out.shape[1])


def build_backbone(name: str, cifar_stem: bool = True, width: int = 32,
                   backbone_args: dict | None = None) -> tuple[nn.Module, int]:
    """Return (encoder, feat_dim) for `name` in BACKBONES or ``timm/<name>`` (`backbone_args` go to
    ``timm.create_model``; `cifar_stem` and `width` do not apply to timm models); unknown names raise
    ValueError (ConfigError for timm names, with close matches)."""
    if name.startswith("timm/"):
        return _timm_model(name[len("timm/"):], backbone_args)
    if backbone_args:
        raise ConfigError(f"model.backbone_args are for timm/<name> backbones, not model.backbone={name}")
    if name in TORCHVISION_RESNETS:
        return _torchvision_resnet(name, cifar_stem), TORCHVISION_RESNETS[name]
    if name == "resnet_small":
        net = SmallResNet(width, cifar_stem)
        return net, net.out_dim
    raise ValueError(f"unknown backbone '{name}'. Valid backbones: {', '.join(BACKBONES)}, timm/<name>")
