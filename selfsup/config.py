"""Typed configuration: one dataclass tree, YAML presets shipped in the package, `key=value` overrides.

Every key has exactly one default, here. Presets (``selfsup/configs/*.yaml``) only override.
Unknown keys anywhere (preset, YAML file or command line) are errors that list the valid keys.
:func:`validate` checks everything that needs no data (choices, ranges, combinations, the batch
against the number of processes), so a bad config fails in well under a second, before torch or
any dataset is loaded. This module imports nothing of the project but :mod:`selfsup.errors`.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "config_from_text", "validate", "list_presets", "to_yaml",
           "METHODS", "DATASETS", "STREAMABLE", "BACKBONES", "DEFAULT_INDEX_CACHE"]

# The names the registries of the layers above accept (methods.METHODS, data.datasets.DATASETS,
# models.backbones.BACKBONES) and the data layer's STREAMABLE and DEFAULT_INDEX_CACHE (data.files),
# listed here so that the config is checked without importing them (and data/ does not import the
# config); a test keeps them equal.
METHODS = ("instdisc", "moco", "mocov3", "pic", "simclr")
DATASETS = ("cifar10", "cifar100", "fashion-mnist", "imagefolder", "imagenet-zip", "stl10", "synthetic")
STREAMABLE = ("imagefolder", "imagenet-zip")     # file-backed sets that data.stream can read step by step
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet_small")
DEFAULT_INDEX_CACHE = "~/.cache/selfsup/index"


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
    index_cache: Optional[str] = DEFAULT_INDEX_CACHE   # imagefolder file-index cache (null: none)
    labels: str = "auto"                # imagefolder: auto (sub-folders are classes) | none (unlabelled images)
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
    rotate: float = 0.0                 # random rotation: angle uniform in [-rotate, rotate] degrees ...
    rotate_p: float = 0.0               # ... with this probability (after the crop; corners black)
    erase_p: float = 0.0                # random erasing (cutout): one black rectangle of 2-20% of the area


@dataclass
class ModelConfig:
    backbone: str = "resnet18"          # resnet18 | resnet34 | resnet50 | resnet_small | timm/<any timm model name>
    backbone_args: Dict[str, Any] = field(default_factory=dict)  # timm/<name> only: timm.create_model kwargs
                                        # (img_size, patch_size, drop_path_rate (default 0), ...)
    cifar_stem: bool = True             # 3x3 stride-1 conv1, no max-pool (32x32 inputs); not for timm models
    width: int = 32                     # base width of resnet_small only
    head_layers: int = 2                # 2: SimCLR v1 head, 3: SimCLR v2 head
    head_hidden: Optional[int] = None   # None: the backbone's feature dim
    head_out_bn: Optional[bool] = None  # BatchNorm (no affine) on the head's output; None: with head_layers=3 only
    proj_dim: int = 128
    init_from: Optional[str] = None     # an export (`selfsup export`, encoder.safetensors): the encoder's start
    checkpointing: bool = False         # activation checkpointing: recompute each backbone stage in the backward
                                        # (less memory, about one more forward of compute)


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
class MoCoV3Config:                     # MoCo v3 (Chen, Xie and He 2021); ViT-S/B ImageNet values in the presets
    temperature: float = 0.2
    momentum: float = 0.99              # key encoder EMA m0, rising to 1 by a cosine schedule over the run
    proj_layers: int = 3                # projection head MLP layers (MoCo v3: 3 for ViT, 2 for ResNet)
    proj_hidden: Optional[int] = None   # hidden width of both heads (MoCo v3: 4096); None: the backbone's feature dim
    proj_dim: int = 256                 # output of the projection and prediction heads
    pred_hidden: Optional[int] = None   # predictor hidden width; None: proj_hidden
    freeze_patch_embed: bool = True     # fixed random patch projection (backbones with a patch_embed: ViTs)


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
    fused: bool = False                 # fused head step: the row update runs inside the backward's chunk loop
                                        # (no (N, D) gradient; needs train.nonfinite=stop)


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: Optional[int] = None     # stop early after this many steps
    batch_size: int = 512               # global batch (split over ranks)
    micro_batch: Optional[int] = None   # gradient caching: encode each rank's batch in chunks of this many images
                                        # (exact for the loss; BN statistics per chunk: ghost BN); None: whole batch
    optimizer: str = "lars"             # lars | sgd | adamw
    lr: Optional[float] = None          # absolute lr; None: base_lr * batch_size / 256
    base_lr: float = 0.3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    schedule: str = "cosine"            # cosine | constant
    checkpoint_every: Optional[int] = None  # steps; None: each epoch's end
    log_every: int = 50                 # steps
    progress_s: float = 30.0            # seconds between plain progress lines when stdout is not a terminal
    precision: str = "auto"             # auto (bf16 on cuda) | fast (bf16 on cuda and on CPUs with AMX) | bf16 | fp32
    channels_last: bool = True          # NHWC activations (faster with cuDNN and with oneDNN on CPU)
    compile: bool = False
    threads: Optional[int] = None       # torch CPU threads; None: torch default
    deterministic: bool = False
    sync_bn: bool = True                # synchronised (global) BN when distributed on GPUs (per-rank BN on CPU)
    nonfinite: str = "stop"             # a NaN/Inf loss or gradient: stop | skip (the step) | rollback
                                        # (to the last checkpoint); skip/rollback also scale the lr
    nonfinite_lr_factor: float = 0.5    # lr multiplier applied at each skip / rollback
    nonfinite_max: int = 5              # stop after this many skips / rollbacks in a run
    resume: str = "never"               # never (only `--resume RUN_DIR`) | auto (resume run_dir when it holds
                                        # a checkpoint, else start fresh: job arrays, requeues, torchrun restarts)


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
    layer_decay: float = 1.0            # layer-wise lr decay of fine-tuning (MAE/BEiT: lr x d^(L - layer)); 1: off


@dataclass
class DetConfig:                        # transfer to detection (`selfsup eval detection`): torchvision
                                        # Faster R-CNN, ResNet-FPN body from the encoder; defaults: MoCo's VOC
                                        # schedule (24k iterations at batch 16, lr 0.02, x0.1 at 18k and 22k),
                                        # scaled by the batch. Older runs' eval.det_<key> is read as det.<key>.
    data: str = "voc"                   # voc (VOCdevkit folders) | coco (a COCO-format json over an image folder)
    root: Optional[str] = None          # voc: the folder holding VOCdevkit/; coco: the image folder
    ann: Optional[str] = None           # coco: the training json
    test_ann: Optional[str] = None      # coco: the test json
    years: List[int] = field(default_factory=lambda: [2007, 2012])  # voc: trainval of these; test: VOC2007 test
    classes: Optional[List[str]] = None  # None: VOC's 20 (voc) / the json's categories (coco)
    norm: str = "frozen"                # frozen (FrozenBatchNorm2d, torchvision's default) | sync (BN trained;
                                        # SyncBatchNorm under several GPU processes, MoCo's choice)
    trainable_layers: int = 3           # 0-5: layer4, layer3, layer2, layer1, conv1 trained (torchvision's count)
    batch_size: int = 16                # images per iteration (global)
    iters: Optional[int] = None         # None: 24000 x 16 / batch_size
    lr: Optional[float] = None          # None: 0.02 x batch_size / 16
    steps: List[float] = field(default_factory=lambda: [0.75, 0.9166667])  # lr x0.1 at these fractions of iters
    warmup_iters: Optional[int] = None  # linear warm-up from lr/1000; None: 100 x 16 / batch_size
    weight_decay: float = 1e-4
    min_sizes: List[int] = field(default_factory=lambda: list(range(480, 801, 32)))  # train shorter sides
    max_size: int = 1333                # longer side cap (train and test)
    test_size: int = 800                # test shorter side
    fpn_channels: int = 256             # FPN / RPN width (torchvision: 256)
    head_dim: int = 1024                # box head MLP width (torchvision: 1024)
    rois: int = 512                     # RoIs sampled per image for the box head in training (torchvision: 512)
    proposals: int = 2000               # RPN proposals kept per image in training; half of it at test (torchvision)
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # per FPN level P2-P6
    num_workers: int = 4                # image decoding workers
    checkpoint_every: int = 1000        # iterations between checkpoints (and at a stop and the end)
    log_every: int = 20                 # iterations between log lines (and the stop check under torchrun)


@dataclass
class LogConfig:                        # what a run reports besides metrics.jsonl and TensorBoard
    collapse_std: float = 0.1           # collapse alarm: embed_std below this fraction of 1/sqrt(D) (0: off)
    collapse_rank: float = 2.0          # collapse alarm: embed_rank (effective rank) below this (0: off)
    wandb: bool = False                 # also send scalars, config and final metrics to Weights & Biases
    wandb_project: str = "selfsup"
    wandb_mode: str = "offline"         # offline (files under RUN_DIR/wandb; `wandb sync` later) | online
    mlflow: bool = False                # also send them to MLflow
    mlflow_uri: Optional[str] = None    # tracking URI; None: a file store in RUN_DIR/mlruns (no server)
    mlflow_experiment: str = "selfsup"


@dataclass
class DistConfig:                       # torch.distributed (torchrun)
    timeout_s: float = 600.0            # a collective waiting longer than this for a stuck or dead rank ends the job


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
    mocov3: MoCoV3Config = field(default_factory=MoCoV3Config)
    instdisc: InstDiscConfig = field(default_factory=InstDiscConfig)
    pic: PICConfig = field(default_factory=PICConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    det: DetConfig = field(default_factory=DetConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)


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
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read config file '{path}': {e}") from None
            cfg = _merge(cfg, parse_yaml(text, f"config file '{path}'"), str(path))
        else:
            if preset_or_yaml not in list_presets():
                close = difflib.get_close_matches(preset_or_yaml, list_presets(), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown preset '{preset_or_yaml}'.{hint}\n"
                                  f"Valid presets: {', '.join(list_presets())} (or a path to a YAML file)")
            text = (_preset_dir() / f"{preset_or_yaml}.yaml").read_text()
            cfg = _merge(cfg, parse_yaml(text, f"preset {preset_or_yaml}"), f"preset {preset_or_yaml}")
            cfg.preset = preset_or_yaml
    return _apply_overrides(cfg, overrides)


def config_from_text(text: str, overrides: list[str] | None = None, source: str = "config") -> DictConfig:
    """A config from YAML text (e.g. the copy stored inside a checkpoint) plus overrides."""
    return _apply_overrides(_merge(OmegaConf.structured(Config), parse_yaml(text, source), source), overrides)


def parse_yaml(text: str, source: str) -> DictConfig:
    """YAML text -> a DictConfig of config keys. ConfigError naming `source` for a syntax error, a tag
    (`!!python/...`: never constructed), or a top level that is not a mapping of keys."""
    try:
        node = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{at}: {problem}; fix that line (key: value lines, "
                          "no !!python tags)") from None
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise ConfigError(f"{source} cannot be read as a config: {e}") from None
    except AssertionError:   # OmegaConf asserts on a document that is one number or boolean
        node = None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{source} must be a mapping of config keys (lines like 'train: {{epochs: 10}}'), "
                          f"not a {'list' if node is not None else 'single value'}")
    return migrate(node)


# The keys that older selfsup kept in the eval section as eval.det_<key>: now det.<key>.
DET_RENAMED = {f"det_{f.name}": f.name for f in fields(DetConfig)}


def migrate(node: DictConfig) -> DictConfig:
    """`node` (parsed config YAML) with older selfsup's eval.det_<key> moved to det.<key>, in place and
    silently: the config.yaml and checkpoints of older runs load as they did (a det.<key> also present wins)."""
    ev = node.get("eval") if isinstance(node, DictConfig) and "eval" in node else None
    if isinstance(ev, DictConfig) and any(k in DET_RENAMED for k in ev.keys()):
        moved = OmegaConf.create({DET_RENAMED[k]: ev.pop(k) for k in list(ev.keys()) if k in DET_RENAMED})
        det = node.get("det") if "det" in node else None
        node.det = OmegaConf.merge(moved, det) if isinstance(det, DictConfig) else moved
    return node


def migrate_override(item: str) -> str:
    """An override of an old eval.det_<key> as det.<key>, with a one-line note on stderr."""
    key, _, value = item.partition("=")
    parts = key.split(".")
    if len(parts) < 2 or parts[0] != "eval" or parts[1] not in DET_RENAMED:
        return item
    new = ".".join(["det", DET_RENAMED[parts[1]], *parts[2:]])
    print(f"[selfsup] note: {key} is now {new} (the eval.det_* keys moved to the det: section); "
          f"write {new}={value}", file=sys.stderr)
    return f"{new}={value}"


def _apply_overrides(cfg: DictConfig, overrides: list[str] | None) -> DictConfig:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.epochs=10)")
        item = migrate_override(item)
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    validate(cfg)
    return cfg


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "data.name": DATASETS,
    "data.on_error": ("raise", "skip"),
    "data.labels": ("auto", "none"),
    "data.sampler": ("epoch", "sliding_window"),
    "data.cache_mode": ("none", "full", "part"),
    "data.decode": ("cpu", "device"),
    "aug.preset": ("simclr", "mocov2", "mocov1"),
    "model.backbone": BACKBONES,
    "model.head_layers": (1, 2, 3),
    "instdisc.loss": ("nce", "softmax"),
    "instdisc.bank_init": ("random", "features"),
    "train.optimizer": ("lars", "sgd", "adamw"),
    "train.schedule": ("cosine", "constant"),
    "train.precision": ("auto", "fast", "bf16", "fp32"),
    "train.nonfinite": ("stop", "skip", "rollback"),
    "train.resume": ("never", "auto"),
    "log.wandb_mode": ("offline", "online"),
    "eval.linear_mode": ("features", "augment"),
    "eval.linear_schedule": (None, "cosine", "step"),
    "det.data": ("voc", "coco"),
    "det.norm": ("frozen", "sync"),
}

# key -> (test, what it must be); None values are allowed where the key is Optional
RANGES = {
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.prefetch": (lambda v: v >= 1, ">= 1"),
    "data.image_size": (lambda v: v >= 1, ">= 1 (pixels)"),
    "data.window": (lambda v: v >= 1, ">= 1"),
    "data.stride": (lambda v: v >= 1, ">= 1"),
    "aug.strength": (lambda v: v >= 0, ">= 0"),
    "aug.jitter_p": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "aug.gray_p": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "aug.solarize_p": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "aug.rotate": (lambda v: 0 <= v <= 180, "in [0, 180] (degrees)"),
    "aug.rotate_p": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "aug.erase_p": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "aug.crop_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "a pair [lo, hi] with 0 < lo <= hi <= 1"),
    "model.width": (lambda v: v >= 1, ">= 1"),
    "train.micro_batch": (lambda v: v >= 1, ">= 1 (images per chunk; null: the whole batch at once)"),
    "model.head_hidden": (lambda v: v >= 1, ">= 1"),
    "model.proj_dim": (lambda v: v >= 1, ">= 1"),
    "simclr.temperature": (lambda v: v > 0, "> 0"),
    "moco.queue_size": (lambda v: v >= 1, ">= 1"),
    "moco.momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "moco.temperature": (lambda v: v > 0, "> 0"),
    "moco.bn_splits": (lambda v: v >= 1, ">= 1"),
    "mocov3.temperature": (lambda v: v > 0, "> 0"),
    "mocov3.momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "mocov3.proj_layers": (lambda v: v >= 1, ">= 1"),
    "mocov3.proj_hidden": (lambda v: v >= 1, ">= 1"),
    "mocov3.proj_dim": (lambda v: v >= 1, ">= 1"),
    "mocov3.pred_hidden": (lambda v: v >= 1, ">= 1"),
    "instdisc.nce_k": (lambda v: v >= 1, ">= 1"),
    "instdisc.temperature": (lambda v: v > 0, "> 0"),
    "instdisc.bank_momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "pic.temperature": (lambda v: v > 0, "> 0"),
    "pic.chunk_size": (lambda v: v >= 1, ">= 1"),
    "pic.negatives": (lambda v: v >= 0, ">= 0 (0: full softmax)"),
    "pic.small_crops": (lambda v: v >= 0, ">= 0"),
    "pic.small_size": (lambda v: v >= 1, ">= 1 (pixels)"),
    "pic.small_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "a pair [lo, hi] with 0 < lo <= hi <= 1"),
    "pic.large_size": (lambda v: v >= 1, ">= 1 (pixels)"),
    "pic.row_lr_scale": (lambda v: v >= 0, ">= 0"),
    "pic.smooth_alpha": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "pic.smooth_k": (lambda v: v >= 0, ">= 0"),
    "train.max_steps": (lambda v: v >= 0, ">= 0 (0: evaluate the untrained network)"),
    "train.batch_size": (lambda v: v >= 2, ">= 2 (contrastive losses need negatives)"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.base_lr": (lambda v: v > 0, "> 0"),
    "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "train.checkpoint_every": (lambda v: v >= 1, ">= 1 (steps)"),
    "train.log_every": (lambda v: v >= 1, ">= 1 (steps)"),
    "train.progress_s": (lambda v: v > 0, "> 0 (seconds between progress lines in a log)"),
    "log.collapse_std": (lambda v: 0 <= v < 1, "in [0, 1) (a fraction of 1/sqrt(D); 0 turns it off)"),
    "log.collapse_rank": (lambda v: v >= 0, ">= 0 (an effective rank; 0 turns it off)"),
    "train.threads": (lambda v: v >= 1, ">= 1"),
    "train.nonfinite_lr_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.nonfinite_max": (lambda v: v >= 0, ">= 0"),
    "eval.every": (lambda v: v >= 0, ">= 0 (epochs; 0 turns the kNN monitor off)"),
    "eval.knn_k": (lambda v: v >= 1, ">= 1"),
    "eval.knn_temperature": (lambda v: v > 0, "> 0"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "eval.aug_crop_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "a pair [lo, hi] with 0 < lo <= hi <= 1"),
    "eval.linear_epochs": (lambda v: v >= 1, ">= 1"),
    "eval.linear_lr": (lambda v: v > 0, "> 0"),
    "eval.linear_batch_size": (lambda v: v >= 1, ">= 1"),
    "eval.linear_weight_decay": (lambda v: v >= 0, ">= 0"),
    "eval.logreg_l2_range": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "a pair [lo, hi] with 0 < lo <= hi"),
    "eval.logreg_l2_count": (lambda v: v >= 1, ">= 1"),
    "eval.logreg_val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "eval.logreg_max_iter": (lambda v: v >= 1, ">= 1"),
    "eval.finetune_fractions": (lambda v: len(v) >= 1 and all(0 < f <= 1 for f in v), "fractions in (0, 1]"),
    "eval.finetune_epochs": (lambda v: v >= 1, ">= 1"),
    "eval.finetune_lr": (lambda v: v > 0, "> 0"),
    "eval.finetune_batch_size": (lambda v: v >= 2, ">= 2 (BN in training mode)"),
    "eval.finetune_from_head_layer": (lambda v: v >= 0, ">= 0"),
    "eval.layer_decay": (lambda v: 0 < v <= 1, "in (0, 1] (1: no layer-wise lr decay)"),
    "det.years": (lambda v: len(v) >= 1 and set(v) <= {2007, 2012}, "a list of 2007 and/or 2012"),
    "det.trainable_layers": (lambda v: 0 <= v <= 5, "in 0..5"),
    "det.batch_size": (lambda v: v >= 1, ">= 1"),
    "det.iters": (lambda v: v >= 1, ">= 1"),
    "det.lr": (lambda v: v > 0, "> 0"),
    "det.steps": (lambda v: all(0 < f <= 1 for f in v), "fractions of det.iters in (0, 1]"),
    "det.warmup_iters": (lambda v: v >= 0, ">= 0"),
    "det.weight_decay": (lambda v: v >= 0, ">= 0"),
    "det.min_sizes": (lambda v: len(v) >= 1 and min(v) >= 1, "a non-empty list of sizes >= 1 (pixels)"),
    "det.max_size": (lambda v: v >= 1, ">= 1 (pixels)"),
    "det.test_size": (lambda v: v >= 1, ">= 1 (pixels)"),
    "det.fpn_channels": (lambda v: v >= 1, ">= 1"),
    "det.head_dim": (lambda v: v >= 1, ">= 1"),
    "det.rois": (lambda v: v >= 1, ">= 1"),
    "det.proposals": (lambda v: v >= 2, ">= 2"),
    "det.anchor_sizes": (lambda v: len(v) == 5 and min(v) >= 1, "5 sizes (pixels), one per level P2-P6"),
    "det.num_workers": (lambda v: v >= 0, ">= 0"),
    "det.checkpoint_every": (lambda v: v >= 1, ">= 1 (iterations)"),
    "det.log_every": (lambda v: v >= 1, ">= 1 (iterations)"),
    "dist.timeout_s": (lambda v: 0 < v <= 1e6, "in (0, 1e6] (seconds)"),
}


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def validate(cfg: DictConfig, world: int | None = None) -> None:
    """Check every value and combination that needs no data; raise ConfigError naming the key, the
    valid choices and the fix. `world`: the number of processes (default: torchrun's WORLD_SIZE)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method '{cfg.method}'. Valid methods: {', '.join(METHODS)}")
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if key == "data.name":   # the dataset registry also takes Fashion_MNIST for fashion-mnist
            value = str(value).lower().replace("_", "-")
        if key == "model.backbone" and str(value).startswith("timm/"):
            _validate_timm(cfg.model)
            continue
        if key == "model.backbone" and value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid. Choose one of: {', '.join(valid)}, "
                              "or timm/<name> for any timm model (e.g. timm/vit_small_patch16_224)")
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid. Choose one of: {', '.join(map(str, valid))}")
    for key, (ok, what) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} is not valid: it must be {what}")
    t, d, p = cfg.train, cfg.data, cfg.pic
    if t.epochs < 1 and t.max_steps is None:
        raise ConfigError("train.epochs must be >= 1 (or set train.max_steps)")
    world = _world_size() if world is None else world
    if t.batch_size % world:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the number of processes {world}: "
                          "choose a multiple of it (train.batch_size is the global batch)")
    if t.micro_batch == 1:
        check_micro_batch_bn(1, _batchnorm_in(cfg))
    _validate_data(d)
    if d.sampler == "sliding_window" and d.window < d.stride:
        raise ConfigError(f"data.window={d.window} is smaller than data.stride={d.stride}: some images would never "
                          "be served")
    if cfg.model.backbone_args and not cfg.model.backbone.startswith("timm/"):
        raise ConfigError(f"model.backbone_args are for timm/<name> backbones, not model.backbone="
                          f"{cfg.model.backbone}: remove them or choose a timm backbone")
    if p.smooth_alpha > 0 and p.smooth_k == 0:
        raise ConfigError("pic.smooth_alpha > 0 needs pic.smooth_k > 0 (the number of hard classes)")
    if cfg.method == "pic" and p.fused and t.nonfinite != "stop":
        raise ConfigError(f"pic.fused=true moves the classifier rows inside the backward, so a step cannot be "
                          f"dropped: it needs train.nonfinite=stop (got {t.nonfinite})")
    if cfg.eval.train_split == cfg.eval.test_split:
        raise ConfigError(f"eval.train_split and eval.test_split are both '{cfg.eval.test_split}': the kNN memory "
                          "and the labelled subsets must come from a split disjoint from the test split")


def _validate_timm(m) -> None:
    """model.backbone=timm/<name>: the name is one of timm's models (close matches otherwise). timm is
    imported here, lazily, only for such a backbone, so that a wrong name fails before any data loads."""
    name = m.backbone[len("timm/"):]
    for key in m.backbone_args:
        if not str(key).isidentifier():
            raise ConfigError(f"model.backbone_args key {key!r} is not a keyword argument name: write "
                              "model.backbone_args.img_size=32 (or model.backbone_args='{img_size: 32}', with a "
                              "space after each colon)")
    if not name:
        raise ConfigError("model.backbone='timm/' names no model: write timm/<name> (e.g. timm/vit_small_patch16_224)")
    check_timm_name(name)
    check_timm_args(name, OmegaConf.to_container(m.backbone_args))


def _batchnorm_in(cfg) -> str | None:
    """Where the config's model has BatchNorm, as far as the config tells (a timm backbone's own layers
    are seen when it is built), or None."""
    m = cfg.model
    if not m.backbone.startswith("timm/"):
        return f"the {m.backbone} backbone"
    if cfg.method == "mocov3":
        return "MoCo v3's projection and prediction heads"
    if m.head_layers >= 2 or m.head_out_bn:
        return f"the projection head (model.head_layers={m.head_layers})"
    return None


def check_micro_batch_bn(micro_batch, where: str | None) -> None:
    """BatchNorm in training mode needs two samples or more per chunk: refuse train.micro_batch=1 when
    the model has it (`where`: in which part; None: nowhere)."""
    if micro_batch == 1 and where:
        raise ConfigError(f"train.micro_batch=1 cannot train {where}: BatchNorm needs 2 or more images per chunk. "
                          "Set train.micro_batch=2 or more (or null: the whole batch at once)")


def check_timm_name(name: str) -> None:
    """ConfigError unless `name` is one of timm's models (with close matches). Imports timm."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model.backbone=timm/{name} needs timm: pip install timm==1.0.31") from None
    names = timm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        hint = f" Close matches: {', '.join('timm/' + c for c in close)}." if close else ""
        raise ConfigError(f"model.backbone=timm/{name}: timm {timm.__version__} has no model '{name}'.{hint} "
                          "All names: python -c 'import timm; print(timm.list_models())'")


def _whole(v) -> bool:
    """A whole number >= 1, or a non-empty list of them (one per stage, or [H, W])."""
    values = v if isinstance(v, list) else [v]
    return bool(values) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in values)


def _rate(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


# common timm.create_model keyword arguments, checked here because timm's own checks are asserts and
# divisions deep inside (or none: a negative drop-path rate fails in the first step)
TIMM_ARGS = {
    "img_size": (_whole, "a size in pixels >= 1 (or [H, W])"),
    "patch_size": (_whole, "a size in pixels >= 1"),
    "embed_dim": (_whole, "a whole number >= 1"),
    "depth": (lambda v: _whole(v) and sum(v if isinstance(v, list) else [v]) <= 1000,
              "a whole number of blocks in 1..1000"),
    "num_heads": (_whole, "a whole number >= 1"),
    "mlp_ratio": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
    "in_chans": (lambda v: v == 3 and not isinstance(v, bool),
                 "3: the images reach the model as RGB (grayscale ones repeated to 3 channels); leave it out"),
    **{k: (_rate, "a rate in [0, 1)") for k in ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate",
                                                 "pos_drop_rate", "patch_drop_rate", "drop_block_rate")},
}


def check_timm_args(name: str, args: dict) -> None:
    """ConfigError naming the key when model.backbone_args cannot build timm/<name>: the common keys
    against their ranges, then a build on the meta device (no memory) for what timm itself rejects
    and for a model larger than this machine's memory. Imports torch and timm."""
    for key, (ok, what) in TIMM_ARGS.items():
        if key in args and not ok(args[key]):
            raise ConfigError(f"model.backbone_args.{key}={args[key]!r} is not valid: it must be {what}")
    heads, dim = args.get("num_heads"), args.get("embed_dim")
    if isinstance(heads, int) and isinstance(dim, int) and dim % heads:
        raise ConfigError(f"model.backbone_args.embed_dim={dim} is not divisible by num_heads={heads}: choose an "
                          f"embed_dim that is a multiple of num_heads (e.g. {heads * max(1, dim // heads)})")
    size, patch = args.get("img_size"), args.get("patch_size")
    if size is not None and patch is not None and min(size if isinstance(size, list) else [size]) < \
            max(patch if isinstance(patch, list) else [patch]):
        raise ConfigError(f"model.backbone_args.patch_size={patch} is larger than img_size={size}: the image holds "
                          "no patch. Choose a patch_size that divides img_size (e.g. 7 for 28, 8 for 32)")
    built = _timm_meta_build(name, args)
    if isinstance(built, str):   # name the keys without which it builds
        without = {k: {a: v for a, v in args.items() if a != k} for k in args}
        keys = [k for k in args if not isinstance(_timm_meta_build(name, without[k]), str)]
        which = ", ".join(f"model.backbone_args.{k}={args[k]!r}" for k in keys) or f"model.backbone_args {args}"
        raise ConfigError(f"timm cannot build timm/{name} with {which} ({built}): change or remove "
                          f"{'that value' if len(keys) == 1 else 'those values'}")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # no sysconf: no bound
        return
    if built * 4 > memory:
        raise ConfigError(f"model.backbone_args {args} make timm/{name} too large: {built:.3g} parameters, "
                          f"{built * 4 / 2**30:,.0f} GiB in float32, more than this machine's {memory / 2**30:.0f} GiB "
                          "of memory. Lower embed_dim, depth or img_size")


def _timm_meta_build(name: str, args: dict) -> int | str:
    """The parameter count of timm's `name` built with `args` on the meta device (no memory; 0 when a
    model cannot be built there: its real build checks it), or timm's error as text."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False, num_classes=0, **args)
    except Exception as e:  # noqa: BLE001 - timm checks with asserts, divisions and tensor shapes
        return 0 if "meta" in str(e) else f"{type(e).__name__}: {e}"
    return sum(p.numel() for p in net.parameters())


def uses_stream(d) -> bool:
    """Whether training reads `d` (the data section) from its files step by step: data.stream, whose
    default (null) means yes for imagenet-zip only."""
    return bool(d.stream if d.stream is not None else d.name == "imagenet-zip")


def _validate_data(d) -> None:
    if d.labels == "none" and d.name != "imagefolder":
        raise ConfigError(f"data.labels=none is for a folder of your own images (data.name=imagefolder), not "
                          f"data.name={d.name}")
    stream = uses_stream(d)
    if stream and d.name not in STREAMABLE:
        raise ConfigError(f"data.stream=true works for {', '.join(STREAMABLE)}, not data.name={d.name} "
                          "(it is held in memory; leave data.stream unset)")
    if stream and not d.image_size:
        raise ConfigError(f"streamed data ({d.name}) needs data.image_size (e.g. 224): its images differ in size")
    if d.cache_mode != "none" and not stream:
        raise ConfigError(f"data.cache_mode={d.cache_mode} is for streamed data (data.stream=true); "
                          f"{d.name} is already held in memory")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
