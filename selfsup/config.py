"""Typed configuration: one dataclass tree, YAML presets shipped in the package, `key=value` overrides.

Every key has exactly one default, here. Presets (``selfsup/configs/*.yaml``) only override.
Unknown keys anywhere (preset, YAML file or command line) are errors that list the valid keys.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    root: Optional[str] = None          # None: the dataset's default search paths
    train_split: str = "train"          # split used for self-supervised training
    download: bool = False              # torchvision download where the network allows
    image_size: Optional[int] = None    # None: native size of the dataset
    num_workers: int = 0                # decode workers for file-backed datasets
    on_device: bool = True              # keep the uint8 dataset resident on the accelerator
    on_error: str = "raise"             # corrupt images: raise | skip
    sampler: str = "epoch"              # epoch (shuffled epochs) | sliding_window (PIC's scheduler)
    window: int = 131072                # sliding window W (PIC ImageNet: 2^17)
    stride: int = 16384                 # sliding-window stride S (PIC ImageNet: 2^14)
    stream: Optional[bool] = None       # read images from files during training (None: yes for imagenet-zip)
    file_list: Optional[str] = None     # imagefolder: a list of "path[<TAB>label]" lines ("{split}" expands)
    index_cache: Optional[str] = "~/.cache/selfsup/index"   # imagefolder file-index cache (null: none)
    cache_mode: str = "none"            # streamed sets: none | full (all bytes in RAM) | part (this rank's share)
    decode: str = "cpu"                 # streamed sets: cpu (PIL in workers) | device (torchvision.io on the GPU)
    prefetch: int = 4                   # batches each loader worker prepares ahead


@dataclass
class AugConfig:
    preset: str = "simclr"              # simclr | mocov2 | mocov1
    strength: float = 0.5               # SimCLR colour strength s (0.5 CIFAR, 1.0 ImageNet)
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    blur: Optional[bool] = None         # None: on for images >= 64 px
    jitter_p: float = 0.8
    gray_p: float = 0.2
    solarize_p: float = 0.0


@dataclass
class ModelConfig:
    backbone: str = "resnet18"          # resnet18 | resnet34 | resnet50 | resnet_small
    cifar_stem: bool = True             # 3x3 stride-1 conv1, no max-pool (32x32 inputs)
    width: int = 32                     # base width of resnet_small only
    head_layers: int = 2                # 2: SimCLR v1 head, 3: SimCLR v2 head
    head_hidden: Optional[int] = None   # None: the backbone's feature dim
    proj_dim: int = 128


@dataclass
class SimCLRConfig:
    temperature: float = 0.5


@dataclass
class MoCoConfig:                       # defaults: the MoCo CIFAR-10 demo
    queue_size: int = 4096              # K negatives in the FIFO queue
    momentum: float = 0.99              # key encoder EMA m
    temperature: float = 0.1
    symmetric: bool = False             # L(q1, k2) + L(q2, k1), both key sets enqueued
    shuffle_bn: bool = True             # cross-rank shuffle BN; split BN on one device
    bn_splits: int = 8                  # sub-batches of split BN (one device only)


@dataclass
class InstDiscConfig:
    loss: str = "nce"                   # nce | softmax
    nce_k: int = 4096                   # noise samples per step (NCE)
    temperature: float = 0.07
    bank_momentum: float = 0.5          # v <- normalize(m v + (1 - m) f)
    bank_init: str = "random"           # random (the paper) | features (of the untrained network)


@dataclass
class PICConfig:                        # PIC (Cao et al. 2020); one-million-way (Liu et al. 2021) options
    temperature: float = 0.2            # cosine softmax tau (PIC 0.2, one-million-way 0.15)
    chunk_size: int = 16384             # classifier rows per chunk (memory O(batch x chunk))
    negatives: int = 0                  # 0: full softmax over N; K > 0: the K most recent visits + the batch
    small_crops: int = 0                # multi-crop: small crops per image (PIC ImageNet: 3)
    small_size: int = 96                # their size in pixels
    small_scale: List[float] = field(default_factory=lambda: [0.05, 0.14])
    large_size: Optional[int] = None    # the large crop's size; None: the trainer's (data) size
    row_lr_scale: float = 1.0           # lr multiplier of the classifier rows (1: PIC's single lr)
    prior: bool = False                 # contrastive prior: rows = features of the untrained network
    smooth_alpha: float = 0.0           # label smoothing mass on the top-K hardest classes (one-million-way 0.2)
    smooth_k: int = 0                   # K hardest classes (by cos(w_i, w_j)); refreshed for each batch's targets


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: Optional[int] = None     # stop early after this many steps
    batch_size: int = 512               # global batch (split over ranks)
    optimizer: str = "lars"             # lars | sgd | adamw
    lr: Optional[float] = None          # absolute lr; None: base_lr * batch_size / 256
    base_lr: float = 0.3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    schedule: str = "cosine"            # cosine | constant
    checkpoint_every: Optional[int] = None  # steps; None: each epoch's end
    log_every: int = 50                 # steps
    precision: str = "auto"             # auto (bf16 on cuda) | bf16 | fp32
    channels_last: bool = True          # NHWC activations (faster with cuDNN and with oneDNN on CPU)
    compile: bool = False
    threads: Optional[int] = None       # torch CPU threads; None: torch default
    deterministic: bool = False
    sync_bn: bool = True                # synchronised (global) BN when distributed on GPUs (per-rank BN on CPU)
    nonfinite: str = "stop"             # a NaN/Inf loss or gradient: stop | skip (the step) | rollback
                                        # (to the last checkpoint); skip/rollback also scale the lr
    nonfinite_lr_factor: float = 0.5    # lr multiplier applied at each skip / rollback
    nonfinite_max: int = 5              # stop after this many skips / rollbacks in a run


@dataclass
class EvalConfig:
    every: int = 1                      # epochs; 0 turns the kNN monitor off
    knn_k: int = 200
    knn_temperature: float = 0.1
    batch_size: int = 1024
    train_split: str = "train"          # labelled split whose clean features are the kNN memory
    test_split: str = "test"
    # linear / logreg / finetune protocols (`selfsup eval linear|logreg|finetune`)
    seed: int = 0                       # their randomness: init, shuffles, held-out split, label subsets
    aug_crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # crop area, linear augment + finetune
    linear_mode: str = "features"       # features (clean, standardised, once) | augment (MoCo: crop+flip each step)
    linear_epochs: int = 100            # epochs of the linear classifier over the train split
    linear_lr: Optional[float] = None   # None: 0.1 (features) / 30 (augment, MoCo)
    linear_schedule: Optional[str] = None  # cosine | step (x0.1 at 60%, 80%); None: cosine (features) / step (augment)
    linear_batch_size: int = 256        # minibatch of the linear classifier
    linear_weight_decay: float = 0.0    # SGD weight decay of the linear classifier (MoCo: 0)
    logreg_l2_range: List[float] = field(default_factory=lambda: [1e-6, 1.0])  # l2 grid ends, log-spaced
    logreg_l2_count: int = 13           # grid size (13: every half decade from 1e-6 to 1)
    logreg_val_fraction: float = 0.1    # class-stratified held-out part of the train split that picks l2
    logreg_max_iter: int = 1000         # L-BFGS iterations per fit
    finetune_fractions: List[float] = field(default_factory=lambda: [0.01, 0.1])  # labelled fractions, in (0, 1]
    finetune_epochs: Optional[int] = None   # None: 60 for fractions <= 1%, 30 above (SimCLR)
    finetune_lr: Optional[float] = None     # None: 0.05 * finetune_batch_size / 256 (SimCLR)
    finetune_batch_size: int = 256      # minibatch of fine-tuning (capped at the subset's size)
    finetune_from_head_layer: int = 0   # 0: classifier on the backbone; k: after k hidden head layers (SimCLR v2: 1)


@dataclass
class Config:
    run_dir: Optional[str] = None       # None: runs/<preset>-<timestamp>
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    method: str = "simclr"
    preset: Optional[str] = None        # name of the preset this config came from (informational)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    instdisc: InstDiscConfig = field(default_factory=InstDiscConfig)
    pic: PICConfig = field(default_factory=PICConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, bad value, unknown preset."""


def _preset_dir():
    return resources.files("selfsup") / "configs"


def list_presets() -> list[str]:
    """Names of the YAML presets shipped inside the package, sorted."""
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        name = f"{prefix}{k}"
        keys.extend(_valid_keys(v, name + ".") if isinstance(v, DictConfig) else [name])
    return keys


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        valid = _valid_keys(OmegaConf.structured(Config))
        close = difflib.get_close_matches(str(key), valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {source}.{hint}\nValid keys: {', '.join(valid)}") from None
    except ValidationError as e:
        raise ConfigError(f"bad value in {source}: {e.msg if hasattr(e, 'msg') else e}") from None


def load_config(preset_or_yaml: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Build the config: defaults <- preset (name or YAML path) <- `key=value` overrides.

    Returns a structured, typed OmegaConf DictConfig. Raises ConfigError naming the problem.
    """
    cfg = OmegaConf.structured(Config)
    if preset_or_yaml:
        path = Path(preset_or_yaml)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist")
            cfg = _merge(cfg, OmegaConf.load(path), str(path))
        else:
            if preset_or_yaml not in list_presets():
                close = difflib.get_close_matches(preset_or_yaml, list_presets(), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown preset '{preset_or_yaml}'.{hint}\n"
                                  f"Valid presets: {', '.join(list_presets())} (or a path to a YAML file)")
            text = (_preset_dir() / f"{preset_or_yaml}.yaml").read_text()
            cfg = _merge(cfg, OmegaConf.create(text), f"preset {preset_or_yaml}")
            cfg.preset = preset_or_yaml
    return _apply_overrides(cfg, overrides)


def config_from_text(text: str, overrides: list[str] | None = None, source: str = "config") -> DictConfig:
    """A config from YAML text (e.g. the copy stored inside a checkpoint) plus overrides."""
    return _apply_overrides(_merge(OmegaConf.structured(Config), OmegaConf.create(text), source), overrides)


def _apply_overrides(cfg: DictConfig, overrides: list[str] | None) -> DictConfig:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=10)")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check values that the type system cannot; raise ConfigError listing the valid choices."""
    from .methods import METHODS

    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method '{cfg.method}'. Valid methods: {', '.join(sorted(METHODS))}")
    choices = {
        "device": ("auto", "cpu", "cuda"),
        "train.optimizer": ("lars", "sgd", "adamw"),
        "train.schedule": ("cosine", "constant"),
        "train.precision": ("auto", "bf16", "fp32"),
        "data.on_error": ("raise", "skip"),
        "instdisc.loss": ("nce", "softmax"),
        "instdisc.bank_init": ("random", "features"),
        "data.sampler": ("epoch", "sliding_window"),
        "data.cache_mode": ("none", "full", "part"),
        "data.decode": ("cpu", "device"),
        "train.nonfinite": ("stop", "skip", "rollback"),
    }
    for key, valid in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid. Choose one of: {', '.join(valid)}")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be at least 2 (contrastive losses need negatives)")
    if cfg.train.epochs < 1 and cfg.train.max_steps is None:
        raise ConfigError("train.epochs must be >= 1 (or set train.max_steps)")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
