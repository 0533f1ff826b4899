"""Method registry: name -> Method subclass, and `build_method` (backbone + method) for a config."""
from omegaconf import DictConfig, OmegaConf

from ..errors import CheckpointError
from ..models.backbones import build_backbone
from .base import Method
from .instdisc import InstDisc
from .moco import MoCo
from .mocov3 import MoCoV3
from .pic import PIC
from .simclr import SimCLR

METHODS = {"simclr": SimCLR, "moco": MoCo, "mocov3": MoCoV3, "instdisc": InstDisc, "pic": PIC}

__all__ = ["METHODS", "Method", "build_method", "load_encoder_state", "SimCLR", "MoCo", "MoCoV3", "InstDisc", "PIC"]


def build_method(cfg, encoder_state: dict | None = None, source: str = "") -> Method:
    """The method module of `cfg` (encoder, head and the method's own state), on the CPU, not yet
    `setup` (call `setup(N)` with the training set's size before training). `encoder_state`: weights
    (an export, read from `source`) loaded into the backbone before the method copies it (key encoders)."""
    m = cfg.model
    args = m.get("backbone_args") or {}
    args = OmegaConf.to_container(args) if isinstance(args, DictConfig) else dict(args)
    backbone, feat_dim = build_backbone(m.backbone, m.cifar_stem, m.width, args, m.get("checkpointing", False))
    if encoder_state is not None:
        load_encoder_state(backbone, encoder_state, source, m.backbone)
    return METHODS[cfg.method](cfg, backbone, feat_dim)


def load_encoder_state(encoder, state: dict, source: str, backbone: str) -> None:
    """Load exported encoder weights: a classifier (fc.*) the encoder lacks is ignored, and BN counters
    an export left out (num_batches_tracked: a detection export) keep the encoder's own values."""
    own = encoder.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith("fc.")}
    state.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"the encoder in '{source}' does not match this config's model, model.backbone="
                              f"{backbone} (exported from another backbone, or a CIFAR stem / width that differs?):"
                              f"\n{e}") from None
