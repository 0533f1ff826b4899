"""A trained encoder and the data an evaluation reads: from a run directory, a checkpoint file or an
export folder (`selfsup eval|embed|visualize|export`).

torch loads inside the functions, so that a bad config or option is reported before it does."""
from __future__ import annotations

from pathlib import Path

from ..config import config_from_text, load_config, uses_stream
from ..errors import CheckpointError, ConfigError


def load_run_encoder(run: str | None, checkpoint: str | None, config: str | None, overrides: list[str],
                     head: bool = False):
    """(cfg, encoder) of a run directory, or of a checkpoint file plus its config.

    head=True: the encoder followed by the projection head (from a full checkpoint; a run's
    encoder.safetensors holds the encoder only)."""
    import torch

    from ..methods import build_method, load_encoder_state
    from .checkpoint import load_state_checked

    ck = None
    if run:
        cfg = load_config(str(Path(run) / "config.yaml"), overrides)
        cfg.run_dir = run
        enc_file = Path(run) / "encoder.safetensors"
        use_enc_file = enc_file.is_file() and not head
        checkpoint = checkpoint or (None if use_enc_file else str(Path(run) / "checkpoints" / "last.pt"))
        if head and not Path(checkpoint).is_file():
            raise ConfigError(f"--head needs the full model: {checkpoint} is missing "
                              "(encoder.safetensors holds the encoder only)")
    elif checkpoint:   # a selfsup checkpoint carries its own config; a plain state dict needs --config
        ck = read_checkpoint(checkpoint)
        if not config and (Path(checkpoint) / "selfsup.yaml").is_file():   # a timm/hf export keeps the run's config
            config = str(Path(checkpoint) / "selfsup.yaml")
        if "config" not in ck and not config:
            raise CheckpointError(f"'{checkpoint}' is not a selfsup checkpoint (it holds no config): for an encoder "
                                  "state dict (torchvision ResNet weights, encoder.safetensors) add --config YAML "
                                  "(a preset or a run's config.yaml) for the model settings")
        cfg = load_config(config, overrides) if config else \
            config_from_text(ck["config"], overrides, f"checkpoint {checkpoint}")
        cfg.run_dir = None
    else:
        raise ConfigError("give --run RUN_DIR, or --checkpoint FILE (with --config if it is not a selfsup checkpoint)")
    model = build_method(cfg)
    if checkpoint:
        ck = ck if ck is not None else read_checkpoint(checkpoint)
        if "model" in ck:
            load_state_checked(model, ck["model"], "model")
        elif head:
            raise CheckpointError(f"--head needs a selfsup checkpoint with the projection head; '{checkpoint}' "
                                  "holds an encoder state dict only")
        else:   # an export (torchvision or timm names); its classifier (fc.*) is not part of the encoder
            from .export import check_export_fits

            check_export_fits(checkpoint, cfg)   # a ViT's heads do not show in its weights: its config.json
            load_encoder_state(model.encoder, ck, checkpoint, cfg.model.backbone)
    else:
        load_state_checked(model.encoder, read_checkpoint(str(enc_file)), "encoder")
    net = torch.nn.Sequential(model.backbone, model.head) if head else model.encoder
    return cfg, net.to(torch.device("cpu"))


def read_checkpoint(path: str) -> dict:
    """A checkpoint file as a dict: selfsup's (`torch.load`), a state dict (.pt, or .safetensors), or an
    export folder (`selfsup export`: timm/hf, torchvision-detection)."""
    from .checkpoint import load_checkpoint
    from .export import read_export

    if Path(path).is_dir() or str(path).endswith(".safetensors"):
        return read_export(path)
    ck = load_checkpoint(path)
    if not isinstance(ck, dict):
        raise CheckpointError(f"'{path}' holds a {type(ck).__name__}, not a checkpoint or a state dict")
    return ck


def split_features(encoder, cfg, images, device, normalize: bool = True):
    """Features of `images` with the eval batch size and the run's precision."""
    from ..eval.features import extract_features
    from .setup import autocast_dtype

    return extract_features(encoder, images, cfg.eval.batch_size, device, cfg.data.image_size,
                            autocast_dtype(cfg, device), normalize=normalize)


def eval_inputs(run, checkpoint, config, overrides, finetune: bool = False, features_only=False):
    """(cfg, encoder, head, train_ds, test_ds, device, amp) for `eval linear|logreg|finetune`; head is
    the projection head when finetune and eval.finetune_from_head_layer > 0 (from the full
    checkpoint), else None. The datasets go to the GPU when data.on_device. A protocol that only
    needs clean features (`features_only`: a bool, or a function of the config) streams a run's
    streamed data (data.stream) from its files; the others decode the splits into memory."""
    from ..data.splits import load_eval_data
    from .setup import autocast_dtype, data_on_device, resolve_device

    cfg, encoder = load_run_encoder(run, checkpoint, config, overrides)
    head = None
    if finetune and cfg.eval.finetune_from_head_layer:
        cfg, net = load_run_encoder(run, checkpoint, config, overrides, head=True)
        encoder, head = net[0], net[1]
    device = resolve_device(cfg.device)
    if (features_only(cfg) if callable(features_only) else features_only) and uses_stream(cfg.data):
        train_ds, test_ds = load_eval_data(cfg, stream=True)
    else:
        train_ds, test_ds = load_eval_data(cfg)
        if data_on_device(cfg, device):
            train_ds, test_ds = train_ds.to(device), test_ds.to(device)
    head = head.to(device) if head is not None else None
    return cfg, encoder.to(device), head, train_ds, test_ds, device, autocast_dtype(cfg, device)


def default_split(cfg) -> str:
    """The split embed and visualize read when --split is not given: test, or the training split for
    unlabelled images (data.labels=none, or a flat folder with no test/ or val/ folder)."""
    if cfg.data.labels == "none":
        return cfg.data.train_split
    if cfg.data.name == "imagefolder" and cfg.data.root and not cfg.data.file_list and not any(
            (Path(cfg.data.root).expanduser() / n).is_dir() for n in ("test", "val")):
        return cfg.data.train_split
    return "test"
