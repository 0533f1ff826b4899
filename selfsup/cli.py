"""The `selfsup` command.

    selfsup train PRESET_OR_YAML [key=value ...]      train (presets: `selfsup train --list`)
    selfsup train --resume RUN_DIR [key=value ...]    continue a run exactly where it stopped
    selfsup eval knn --run RUN_DIR [key=value ...]    weighted kNN of a run's encoder

Every command prints its metrics as one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_train(args) -> dict:
    from .config import ConfigError, list_presets, load_config
    from .engine.trainer import train

    if args.list:
        for name in list_presets():
            print(name)
        return None
    if args.resume:
        cfg_path = Path(args.resume) / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"'{args.resume}' is not a run directory: {cfg_path} is missing")
        overrides = ([args.preset] if args.preset else []) + args.overrides
        cfg = load_config(str(cfg_path), overrides)
        return train(cfg, resume=args.resume)
    if not args.preset and not args.overrides:
        raise ConfigError("name a preset or YAML file: `selfsup train simclr-fmnist-cpu` "
                          f"(presets: {', '.join(list_presets())})")
    return train(load_config(args.preset, args.overrides))


def load_run_encoder(run: str | None, checkpoint: str | None, config: str | None, overrides: list[str]):
    """(cfg, encoder) of a run directory, or of a checkpoint file plus its config."""
    import torch

    from .config import ConfigError, config_from_text, load_config
    from .engine.checkpoint import load_checkpoint, load_state_checked
    from .engine.trainer import build_model

    if run:
        cfg = load_config(str(Path(run) / "config.yaml"), overrides)
        cfg.run_dir = run
        enc_file = Path(run) / "encoder.safetensors"
        checkpoint = checkpoint or (None if enc_file.is_file() else str(Path(run) / "checkpoints" / "last.pt"))
    elif checkpoint:   # a selfsup checkpoint carries its own config
        cfg = load_config(config, overrides) if config else \
            config_from_text(load_checkpoint(checkpoint)["config"], overrides, f"checkpoint {checkpoint}")
        cfg.run_dir = None
    else:
        raise ConfigError("give --run RUN_DIR, or --checkpoint FILE (with --config if it is not a selfsup checkpoint)")
    model = build_model(cfg)
    if checkpoint:
        load_state_checked(model, load_checkpoint(checkpoint)["model"], "model")
    else:
        from safetensors.torch import load_file

        load_state_checked(model.encoder, load_file(str(enc_file)), "encoder")
    return cfg, model.encoder.to(torch.device("cpu"))


def _cmd_eval_knn(args) -> dict:
    from .engine.trainer import autocast_dtype, knn_eval, knn_protocol, load_eval_data, resolve_device

    cfg, encoder = load_run_encoder(args.run, args.checkpoint, args.config, args.overrides)
    device = resolve_device(cfg.device)
    encoder = encoder.to(device)
    res = knn_eval(encoder, cfg, *load_eval_data(cfg), device, autocast_dtype(cfg, device))
    res["protocol"] = knn_protocol(cfg)
    if cfg.run_dir:
        out = Path(cfg.run_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "knn.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description="Self-supervised representation learning.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a preset or YAML config")
    t.add_argument("preset", nargs="?", help="preset name (see --list) or path to a YAML config")
    t.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.epochs=5")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    t.add_argument("--list", action="store_true", help="list the shipped presets")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a trained encoder")
    esub = e.add_subparsers(dest="protocol", required=True)
    k = esub.add_parser("knn", help="weighted kNN on clean features (eval.knn_k, eval.knn_temperature)")
    k.add_argument("--run", metavar="RUN_DIR")
    k.add_argument("--checkpoint", metavar="FILE")
    k.add_argument("--config", metavar="YAML")
    k.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. eval.knn_k=20")
    k.set_defaults(fn=_cmd_eval_knn)
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .engine.checkpoint import CheckpointError
    from .engine.trainer import NonFiniteLossError

    args = build_parser().parse_args(argv)
    # the positional preset may have swallowed the first key=value when only overrides were given
    if getattr(args, "preset", None) and "=" in args.preset and not Path(args.preset).exists():
        args.overrides.insert(0, args.preset)
        args.preset = None
    try:
        result = args.fn(args)
    except (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError) as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    if result is not None and os.environ.get("RANK", "0") == "0":   # one line per job, not per rank
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
