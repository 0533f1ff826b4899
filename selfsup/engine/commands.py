"""What each `selfsup` command does, as library functions: the CLI parses its options and calls
one of these. Each loads torch and the layers it needs only after its options and config were
checked, so that a bad one is reported first."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import list_presets, load_config, migrate_override, uses_stream
from ..errors import ConfigError
from ..eval.results import eval_out, out_dir, read_detection, save_detection, save_eval
from .load import default_split, eval_inputs, load_run_encoder, split_features


def train_run(preset: str | None, overrides: list[str], resume: str | None = None, resume_if_exists: bool = False,
              init_from: str | None = None) -> dict:
    """`selfsup train`: a preset or YAML plus overrides, or --resume RUN_DIR (its config.yaml)."""
    if resume:
        cfg_path = Path(resume) / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"'{resume}' is not a run directory: {cfg_path} is missing")
        cfg = load_config(str(cfg_path), ([preset] if preset else []) + overrides)
    elif not preset and not overrides:
        raise ConfigError("name a preset or YAML file: `selfsup train simclr-fmnist-cpu` "
                          f"(presets: {', '.join(list_presets())})")
    else:
        cfg = load_config(preset, overrides)
    if resume_if_exists:
        cfg.train.resume = "auto"
    if init_from:
        if resume:
            raise ConfigError("--init-from starts a new run from an exported encoder; --resume continues a run "
                              "from its checkpoint: give one of them")
        cfg.model.init_from = init_from
    # the config is good: now load torch and the engine
    from .trainer import train

    return train(cfg, resume=resume)


def eval_knn(run, checkpoint, config, overrides, ks=None, ts=None, baselines=False, out=None) -> dict:
    """`selfsup eval knn`: eval.knn_k and eval.knn_temperature, plus a sweep over `ks` x `ts` when given
    (one search), plus the raw-pixel and random-init baselines when `baselines`."""
    from ..data.images import require_labels
    from ..data.splits import load_eval_data, pixels
    from ..eval.knn import knn_sweep
    from ..eval.monitor import knn_protocol
    from .setup import resolve_device

    folder = eval_out(out, run, checkpoint)
    cfg, encoder = load_run_encoder(run, checkpoint, config, overrides)
    sweep = bool(ks or ts)
    ks, ts = ks or [cfg.eval.knn_k], ts or [cfg.eval.knn_temperature]
    device = resolve_device(cfg.device)
    encoder = encoder.to(device)
    train_ds, test_ds = load_eval_data(cfg, stream=uses_stream(cfg.data))
    require_labels(train_ds, cfg.eval.train_split, "kNN")
    require_labels(test_ds, cfg.eval.test_split, "kNN")
    ftr = split_features(encoder, cfg, pixels(train_ds), device)
    fte = split_features(encoder, cfg, pixels(test_ds), device)
    k0, t0 = cfg.eval.knn_k, cfg.eval.knn_temperature   # the main result; the sweep rides on the same search
    table = knn_sweep(ftr, train_ds.labels.to(device), fte, test_ds.labels.to(device), list(dict.fromkeys([k0, *ks])),
                      list(dict.fromkeys([t0, *ts])), train_ds.num_classes)
    main = next(r for r in table if r["k"] == k0 and r["t"] == t0)
    res = {"knn_top1": main["top1"], **({"knn_top5": main["top5"]} if main["top5"] is not None else {})}
    res["protocol"] = knn_protocol(cfg, len(train_ds))
    if sweep:
        res["sweep"] = [r for k in ks for t in ts for r in table if r["k"] == k and r["t"] == t]
    if baselines:
        from ..eval.baselines import baselines as score_baselines, gains_line
        from .setup import autocast_dtype

        res.update(score_baselines(cfg, train_ds, test_ds, device, autocast_dtype(cfg, device)))
        print(gains_line(res))
    return save_eval(folder, "knn", res, checkpoint)


def eval_classifier(protocol: str, run, checkpoint, config, overrides, out=None) -> dict:
    """`selfsup eval linear|logreg|finetune`: train the protocol's classifier, file its json."""
    folder = eval_out(out, run, checkpoint)   # finetune: the subsets' indices go beside the result
    if protocol == "linear":
        from ..eval.linear import linear_eval

        cfg, encoder, _, train_ds, test_ds, device, amp = eval_inputs(
            run, checkpoint, config, overrides, features_only=lambda cfg: cfg.eval.linear_mode == "features")
        res = linear_eval(encoder, cfg, train_ds, test_ds, device, amp)
    elif protocol == "logreg":
        from ..eval.logreg import logreg_eval

        cfg, encoder, _, train_ds, test_ds, device, amp = eval_inputs(run, checkpoint, config, overrides,
                                                                      features_only=True)
        res = logreg_eval(encoder, cfg, train_ds, test_ds, device, amp)
    else:
        from ..eval.finetune import finetune_eval

        cfg, encoder, head, train_ds, test_ds, device, amp = eval_inputs(run, checkpoint, config, overrides,
                                                                         finetune=True)
        res = finetune_eval(encoder, cfg, train_ds, test_ds, device, amp, head, folder)
    return save_eval(folder, protocol, res, checkpoint)


def preset_det_overrides(preset: str | None) -> list[str]:
    """The det.* keys (and train.threads, when set) of a preset (e.g. det-shapes-cpu) as key=value
    overrides; its other keys are ignored (the model and the rest are the run's)."""
    import json

    from omegaconf import OmegaConf

    if not preset:
        return []
    cfg = load_config(preset)
    threads = [f"train.threads={cfg.train.threads}"] if cfg.train.threads else []
    return [f"det.{k}={json.dumps(OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)}"
            for k, v in cfg.det.items()] + threads


def eval_detection(run, checkpoint, config, overrides, out=None, preset=None, det: dict | None = None,
                   init: str = "ssl", restart: bool = False) -> dict | None:
    """`selfsup eval detection`: a detector from the encoder (init ssl), from a random one (random) or
    both; `det` holds det.* keys given as options. Merged into OUT/detection.json (rank 0)."""
    flags = [f"det.{k}={v}" for k, v in (det or {}).items() if v]
    overrides = preset_det_overrides(preset) + flags + [migrate_override(o) for o in overrides]
    load_config(None, [o for o in overrides if o.startswith(("det.", "train.threads"))])   # fail before any file
    if not run and not out:
        raise ConfigError("give --out DIR with --checkpoint: there is no run directory to write into")
    folder = eval_out(out, run, checkpoint)   # another run's --checkpoint is never filed under --run
    cfg, encoder = load_run_encoder(run, checkpoint, config, overrides)
    import contextlib

    import torch

    from ..methods import build_method
    from ..parallel import distributed as D
    from .detection import folder_lock, run_detection

    source = f"run {run}" if run else f"checkpoint {checkpoint}"
    inits = ("ssl", "random") if init == "both" else (init,)
    results, owns_group, main_rank = {}, not D.is_dist(), os.environ.get("RANK", "0") == "0"
    with folder_lock(folder) if main_rank else contextlib.nullcontext():   # one eval detection per folder
        read_detection(folder / "detection.json")   # a damaged one is refused before any training
        try:
            for start in inits:
                if start == "random":
                    torch.manual_seed(cfg.eval.seed)
                    enc, text = build_method(cfg).encoder, f"a random {cfg.model.backbone} (seed {cfg.eval.seed})"
                else:
                    enc, text = encoder, f"the encoder of {source}"
                res = run_detection(cfg, enc, folder / "detection" / start, start, text, restart=restart)
                if res is not None:
                    results[start] = res
        finally:
            if owns_group:
                D.cleanup_distributed()
        return save_detection(folder / "detection.json", results) if main_rank else None


def embed(run, checkpoint, config, overrides, split=None, fmt="npy", out=None, head=False, max_points=5000) -> dict:
    """`selfsup embed`: clean features of a split (backbone, or projection head) and projector files."""
    from ..data.splits import load_split
    from ..eval.embed import export_embeddings
    from .setup import resolve_device

    cfg, net = load_run_encoder(run, checkpoint, config, overrides, head=head)
    split = split or default_split(cfg)
    space = "head" if head else "backbone"
    folder = out_dir(out, run, checkpoint, f"embed-{split}" + ("-head" if head else ""))
    device = resolve_device(cfg.device)
    ds = load_split(cfg, split)
    feats = split_features(net.to(device), cfg, ds.images, device, normalize=False).cpu()
    res = export_embeddings(folder, feats, ds, fmt, max_points or None, f"{space} features, {split}")
    res.pop("classes")
    return {**res, "space": space, "split": split}


def visualize(run, checkpoint, config, overrides, split=None, method="tsne", max_points=2000, queries=8,
              neighbours=8, out=None) -> dict:
    """`selfsup visualize`: a 2-D map of a split's features and a nearest-neighbour grid."""
    from ..data.images import require_labels
    from ..data.splits import load_split
    from ..eval.visualize import visualize_run
    from .setup import autocast_dtype, resolve_device

    if queries < 1 or neighbours < 1:
        raise ConfigError("--queries and --neighbours must be at least 1")
    cfg, encoder = load_run_encoder(run, checkpoint, config, overrides)
    split = split or default_split(cfg)
    device = resolve_device(cfg.device)
    ds = load_split(cfg, split)
    bank_ds = ds if split == cfg.eval.train_split else load_split(cfg, cfg.eval.train_split)
    if cfg.data.labels != "none" and (ds.labels >= 0).any():   # labelled data: the classes must make sense
        require_labels(ds, split, "visualize")
        require_labels(bank_ds, cfg.eval.train_split, "the nearest-neighbour grid")
    return visualize_run(encoder.to(device), cfg, ds, bank_ds, method, max_points or None, queries,
                         neighbours, out_dir(out, run, checkpoint, ""), device, autocast_dtype(cfg, device), split)


def export(run: str, fmt: str, out: str) -> dict:
    """`selfsup export`: a run's encoder for torchvision, timm, hf or torchvision-detection."""
    from .export import FORMATS, check_format, check_out_folder, export_run

    cfg_path = Path(run) / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{run}' is not a run directory: {cfg_path} is missing")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'. Valid: {', '.join(FORMATS)}")
    check_format(load_config(str(cfg_path), []), fmt)   # before the weights are read
    check_out_folder(Path(out), fmt, Path(run))
    cfg, encoder = load_run_encoder(run, None, None, [])
    return export_run(cfg, encoder, fmt, Path(out), Path(run))
