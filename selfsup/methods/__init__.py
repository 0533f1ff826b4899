"""Method registry: name -> Method subclass, and `build_method` (backbone + method) for a config."""
from ..models.backbones import build_backbone
from .base import Method
from .instdisc import InstDisc
from .moco import MoCo
from .pic import PIC
from .simclr import SimCLR

METHODS = {"simclr": SimCLR, "moco": MoCo, "instdisc": InstDisc, "pic": PIC}

__all__ = ["METHODS", "Method", "build_method", "SimCLR", "MoCo", "InstDisc", "PIC"]


def build_method(cfg) -> Method:
    """The method module of `cfg` (encoder, head and the method's own state), on the CPU, not yet
    `setup` (call `setup(N)` with the training set's size before training)."""
    backbone, feat_dim = build_backbone(cfg.model.backbone, cfg.model.cifar_stem, cfg.model.width)
    return METHODS[cfg.method](cfg, backbone, feat_dim)
