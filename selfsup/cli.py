"""The `selfsup` command.

    selfsup train PRESET_OR_YAML [key=value ...]      train (presets: `selfsup train --list`)
    selfsup train --resume RUN_DIR [key=value ...]    continue a run exactly where it stopped
    selfsup eval knn --run RUN_DIR [key=value ...]    weighted kNN of a run's encoder
        [--k 10,20,200 --t 0.07,0.1]                  ... plus a sweep of k x t in one pass
        [--baselines]                                 ... beside raw pixels and the encoder at random init
    selfsup eval linear --run RUN_DIR [key=value ...] linear classifier on the frozen encoder
                                                      (eval.linear_mode=features | augment)
    selfsup eval logreg --run RUN_DIR [key=value ...] L2 logistic regression (L-BFGS), l2 picked
                                                      on a held-out part of the train split
    selfsup eval finetune --run RUN_DIR [key=value ...]  fine-tune on 1% / 10% class-balanced labels
    selfsup embed --run RUN_DIR [--split test]        export features (npy/safetensors) and
                                                      TensorBoard projector files
    selfsup visualize --run RUN_DIR [--method tsne]   2-D map of the features and a
                                                      nearest-neighbour grid (PNG under RUN_DIR/eval)
    selfsup report --run RUN_DIR                      RUN_DIR/report.html and report.md
    selfsup export --run RUN_DIR --format F --out DIR the encoder for torchvision, timm, hf (model card) or
                                                      torchvision-detection; `train --init-from DIR` reads it back
    selfsup bench NAME [--quick] ...                  benchmarks (table + JSON); NAME: `selfsup bench --list`
    selfsup fake-imagenet OUT [--classes 4 ...]       a small ImageNet-like set (folders + zips + maps)
    selfsup eval detection --run RUN_DIR --root DIR   transfer to VOC detection (Faster R-CNN, ResNet-FPN;
        [--preset det-voc-r50] [--init ssl|random|both]   RUN_DIR/eval/detection.json)
    selfsup fake-detection OUT                        a small VOC-format detection set (shapes on noise)

Every command prints its metrics as one JSON object on its last line. `python -m selfsup` is the
same command. Each command imports the layers it needs when it runs, so that a bad config or option
is reported before torch loads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_train(args) -> dict:
    from .config import list_presets, load_config
    from .errors import ConfigError

    if args.list:
        for name in list_presets():
            print(name)
        return None
    if args.resume:
        cfg_path = Path(args.resume) / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"'{args.resume}' is not a run directory: {cfg_path} is missing")
        cfg = load_config(str(cfg_path), ([args.preset] if args.preset else []) + args.overrides)
    elif not args.preset and not args.overrides:
        raise ConfigError("name a preset or YAML file: `selfsup train simclr-fmnist-cpu` "
                          f"(presets: {', '.join(list_presets())})")
    else:
        cfg = load_config(args.preset, args.overrides)
    if args.resume_if_exists:
        cfg.train.resume = "auto"
    if args.init_from:
        if args.resume:
            raise ConfigError("--init-from starts a new run from an exported encoder; --resume continues a run "
                              "from its checkpoint: give one of them")
        cfg.model.init_from = args.init_from
    # the config is good: now load torch and the engine
    from .engine.trainer import train

    return train(cfg, resume=args.resume)


def load_run_encoder(run: str | None, checkpoint: str | None, config: str | None, overrides: list[str],
                     head: bool = False):
    """(cfg, encoder) of a run directory, or of a checkpoint file plus its config.

    head=True: the encoder followed by the projection head (from a full checkpoint; a run's
    encoder.safetensors holds the encoder only)."""
    import torch

    from .config import config_from_text, load_config
    from .engine.checkpoint import load_state_checked
    from .errors import CheckpointError, ConfigError
    from .methods import build_method, load_encoder_state

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
        ck = _read_checkpoint(checkpoint)
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
        ck = ck if ck is not None else _read_checkpoint(checkpoint)
        if "model" in ck:
            load_state_checked(model, ck["model"], "model")
        elif head:
            raise CheckpointError(f"--head needs a selfsup checkpoint with the projection head; '{checkpoint}' "
                                  "holds an encoder state dict only")
        else:   # an export (torchvision or timm names); its classifier (fc.*) is not part of the encoder
            from .engine.export import check_export_fits

            check_export_fits(checkpoint, cfg)   # a ViT's heads do not show in its weights: its config.json
            load_encoder_state(model.encoder, ck, checkpoint, cfg.model.backbone)
    else:
        load_state_checked(model.encoder, _read_checkpoint(str(enc_file)), "encoder")
    net = torch.nn.Sequential(model.backbone, model.head) if head else model.encoder
    return cfg, net.to(torch.device("cpu"))


def _read_checkpoint(path: str) -> dict:
    """A checkpoint file as a dict: selfsup's (`torch.load`), a state dict (.pt, or .safetensors), or an
    export folder (`selfsup export`: timm/hf, torchvision-detection)."""
    from .engine.checkpoint import load_checkpoint
    from .engine.export import read_export
    from .errors import CheckpointError

    if Path(path).is_dir() or str(path).endswith(".safetensors"):
        return read_export(path)
    ck = load_checkpoint(path)
    if not isinstance(ck, dict):
        raise CheckpointError(f"'{path}' holds a {type(ck).__name__}, not a checkpoint or a state dict")
    return ck


def _number_list(text: str, cast, option: str) -> list:
    from .errors import ConfigError

    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise ConfigError(f"{option} takes comma-separated positive numbers, e.g. {option} 10,20,200; got '{text}'")
    return values


def _split_features(encoder, cfg, images, device, normalize: bool = True):
    from .engine.setup import autocast_dtype
    from .eval.features import extract_features

    return extract_features(encoder, images, cfg.eval.batch_size, device, cfg.data.image_size,
                            autocast_dtype(cfg, device), normalize=normalize)


def _cmd_eval_knn(args) -> dict:
    from .data.images import require_labels
    from .config import uses_stream
    from .data.splits import load_eval_data, pixels
    from .engine.setup import resolve_device
    from .eval.knn import knn_sweep
    from .eval.monitor import knn_protocol

    ks = _number_list(args.k, int, "--k") if args.k else None
    ts = _number_list(args.t, float, "--t") if args.t else None
    out = _eval_out(args)
    cfg, encoder = load_run_encoder(args.run, args.checkpoint, args.config, args.overrides)
    ks, ts = ks or [cfg.eval.knn_k], ts or [cfg.eval.knn_temperature]
    device = resolve_device(cfg.device)
    encoder = encoder.to(device)
    train_ds, test_ds = load_eval_data(cfg, stream=uses_stream(cfg.data))
    require_labels(train_ds, cfg.eval.train_split, "kNN")
    require_labels(test_ds, cfg.eval.test_split, "kNN")
    ftr = _split_features(encoder, cfg, pixels(train_ds), device)
    fte = _split_features(encoder, cfg, pixels(test_ds), device)
    k0, t0 = cfg.eval.knn_k, cfg.eval.knn_temperature   # the main result; the sweep rides on the same search
    table = knn_sweep(ftr, train_ds.labels.to(device), fte, test_ds.labels.to(device), list(dict.fromkeys([k0, *ks])),
                      list(dict.fromkeys([t0, *ts])), train_ds.num_classes)
    main = next(r for r in table if r["k"] == k0 and r["t"] == t0)
    res = {"knn_top1": main["top1"], **({"knn_top5": main["top5"]} if main["top5"] is not None else {})}
    res["protocol"] = knn_protocol(cfg, len(train_ds))
    if args.k or args.t:
        res["sweep"] = [r for k in ks for t in ts for r in table if r["k"] == k and r["t"] == t]
    if args.baselines:
        from .engine.setup import autocast_dtype
        from .eval.baselines import baselines, gains_line

        res.update(baselines(cfg, train_ds, test_ds, device, autocast_dtype(cfg, device)))
        print(gains_line(res))
    return _save_eval(out, "knn", res, args.checkpoint)


def _eval_inputs(args, finetune: bool = False, features_only=False):
    """(cfg, encoder, head, train_ds, test_ds, device, amp) for `eval linear|logreg|finetune`; head is
    the projection head when finetune and eval.finetune_from_head_layer > 0 (from the full
    checkpoint), else None. The datasets go to the GPU when data.on_device. A protocol that only
    needs clean features (`features_only`: a bool, or a function of the config) streams a run's
    streamed data (data.stream) from its files; the others decode the splits into memory."""
    from .config import uses_stream
    from .data.splits import load_eval_data
    from .engine.setup import autocast_dtype, data_on_device, resolve_device

    cfg, encoder = load_run_encoder(args.run, args.checkpoint, args.config, args.overrides)
    head = None
    if finetune and cfg.eval.finetune_from_head_layer:
        cfg, net = load_run_encoder(args.run, args.checkpoint, args.config, args.overrides, head=True)
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


def _eval_out(args) -> Path | None:
    """The folder of `eval knn|linear|logreg|finetune`'s json: --out, else RUN_DIR/eval; None (no file)
    for a --checkpoint alone. A --checkpoint outside --run is another encoder: its numbers never go under
    the run's name (its eval/, then its model card and report), so it needs --out."""
    from .errors import ConfigError

    if args.out:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ConfigError(f"--out {args.out} is a file; --out takes a folder (new or existing) to write into")
        return Path(args.out)
    if not args.run:
        return None
    if args.checkpoint and not Path(args.checkpoint).resolve().is_relative_to(Path(args.run).resolve()):
        raise ConfigError(f"--checkpoint {args.checkpoint} is not a file of run {args.run}: its results would be "
                          f"filed as that run's ({Path(args.run) / 'eval'}). Give --out DIR for them, or leave out "
                          "--checkpoint to evaluate the run's own encoder")
    return Path(args.run) / "eval"


def _save_eval(out: Path | None, name: str, res: dict, checkpoint: str | None = None) -> dict:
    """Write `res` to OUT/<name>.json (`_eval_out`; None: no file); return it. The protocol names the
    encoder when it came from --checkpoint."""
    if checkpoint:
        res["protocol"] = f"{res['protocol']}; encoder: {Path(checkpoint).resolve()}"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from .atomic import write_json

        write_json(out / f"{name}.json", res)   # a temporary file, then a rename: never half a json
    return res


def _cmd_eval_linear(args) -> dict:
    from .eval.linear import linear_eval

    out = _eval_out(args)
    cfg, encoder, _, train_ds, test_ds, device, amp = _eval_inputs(
        args, features_only=lambda cfg: cfg.eval.linear_mode == "features")
    return _save_eval(out, "linear", linear_eval(encoder, cfg, train_ds, test_ds, device, amp), args.checkpoint)


def _cmd_eval_logreg(args) -> dict:
    from .eval.logreg import logreg_eval

    out = _eval_out(args)
    cfg, encoder, _, train_ds, test_ds, device, amp = _eval_inputs(args, features_only=True)
    return _save_eval(out, "logreg", logreg_eval(encoder, cfg, train_ds, test_ds, device, amp), args.checkpoint)


def _cmd_eval_finetune(args) -> dict:
    from .eval.finetune import finetune_eval

    out = _eval_out(args)   # the subsets' indices go beside the result
    cfg, encoder, head, train_ds, test_ds, device, amp = _eval_inputs(args, finetune=True)
    return _save_eval(out, "finetune", finetune_eval(encoder, cfg, train_ds, test_ds, device, amp, head, out),
                      args.checkpoint)


def _preset_det_overrides(preset: str | None) -> list[str]:
    """The det.* keys (and train.threads, when set) of a preset (e.g. det-shapes-cpu) as key=value
    overrides; its other keys are ignored (the model and the rest are the run's)."""
    import json as _json

    from omegaconf import OmegaConf

    from .config import load_config

    if not preset:
        return []
    cfg = load_config(preset)
    threads = [f"train.threads={cfg.train.threads}"] if cfg.train.threads else []
    return [f"det.{k}={_json.dumps(OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)}"
            for k, v in cfg.det.items()] + threads


def _cmd_eval_detection(args) -> dict:
    import torch

    from .config import load_config, migrate_override
    from .errors import ConfigError

    flags = [f"det.{k}={v}" for k, v in (("data", args.data), ("root", args.root), ("ann", args.ann),
                                         ("test_ann", args.test_ann)) if v]
    overrides = _preset_det_overrides(args.preset) + flags + [migrate_override(o) for o in args.overrides]
    load_config(None, [o for o in overrides if o.startswith(("det.", "train.threads"))])   # fail before any file
    if not args.run and not args.out:
        raise ConfigError("give --out DIR with --checkpoint: there is no run directory to write into")
    out = _eval_out(args)   # another run's --checkpoint is never filed under --run
    cfg, encoder = load_run_encoder(args.run, args.checkpoint, args.config, overrides)
    import contextlib

    from .engine.detection import folder_lock, run_detection
    from .methods import build_method
    from .parallel import distributed as D

    source = f"run {args.run}" if args.run else f"checkpoint {args.checkpoint}"
    inits = ("ssl", "random") if args.init == "both" else (args.init,)
    results, owns_group, main_rank = {}, not D.is_dist(), os.environ.get("RANK", "0") == "0"
    with folder_lock(out) if main_rank else contextlib.nullcontext():   # one eval detection per folder
        _read_detection(out / "detection.json")   # a damaged one is refused before any training
        try:
            for init in inits:
                if init == "random":
                    torch.manual_seed(cfg.eval.seed)
                    enc, text = build_method(cfg).encoder, f"a random {cfg.model.backbone} (seed {cfg.eval.seed})"
                else:
                    enc, text = encoder, f"the encoder of {source}"
                res = run_detection(cfg, enc, out / "detection" / init, init, text, restart=args.restart)
                if res is not None:
                    results[init] = res
        finally:
            if owns_group:
                D.cleanup_distributed()
        return _save_detection(out / "detection.json", results) if main_rank else None


DET_METRICS = ("ap50", "ap", "ap75", "voc07_ap50", "voc07_ap75", "voc07_ap")


def _read_detection(path: Path) -> dict:
    """The detection json at `path`, {} when there is none; anything but a JSON object with a list
    "runs" (as `_save_detection` writes it) is refused, naming the file."""
    from .errors import ConfigError

    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        old = None
    if not isinstance(old, dict) or not isinstance(old.get("runs", []), list):
        raise ConfigError(f"{path} is not a detection results file (a JSON object with a list \"runs\", as "
                          "`selfsup eval detection` writes it): move or remove it, or give another --out")
    return old


def _save_detection(path: Path, results: dict) -> dict:
    """Merge `results` ({init: scores}) into the detection json at `path` (one file for SSL and random
    init, flat det_<init>_<metric> numbers with protocol_<init>, as `selfsup report` reads them)."""
    old = _read_detection(path)
    runs = {r["init"]: r for r in old.get("runs", []) if isinstance(r, dict) and "init" in r}
    runs.update({k: {kk: vv for kk, vv in v.items() if kk != "protocol"} for k, v in results.items()})
    protocols = {k[len("protocol_"):]: v for k, v in old.items() if k.startswith("protocol_")}
    protocols.update({k: v["protocol"] for k, v in results.items()})
    res = {}
    for init in ("ssl", "random"):
        if init in runs:
            res.update({f"det_{init}_{m}": runs[init][m] for m in DET_METRICS if m in runs[init]})
            res[f"det_{init}_s_per_iter"] = runs[init].get("s_per_iter")
    res["protocol"] = "transfer to detection (eval/detection/<init>/: checkpoints, metrics.jsonl)"
    res.update({f"protocol_{k}": v for k, v in protocols.items()})
    res["runs"] = [runs[k] for k in ("ssl", "random") if k in runs]
    path.parent.mkdir(parents=True, exist_ok=True)
    from .atomic import write_json

    write_json(path, res)
    return res


def _out_dir(args, name: str) -> Path:
    """Where embed and visualize write: --out, else RUN_DIR/eval/<name>; as `_eval_out`, another run's
    --checkpoint needs --out."""
    from .errors import ConfigError

    base = _eval_out(args)
    if base is None:
        raise ConfigError("give --out DIR: with --checkpoint there is no run directory to write into")
    return base if args.out else base / name


def _cmd_embed(args) -> dict:
    from .data.splits import load_split
    from .engine.setup import resolve_device
    from .eval.embed import export_embeddings

    cfg, net = load_run_encoder(args.run, args.checkpoint, args.config, args.overrides, head=args.head)
    args.split = args.split or _default_split(cfg)
    space = "head" if args.head else "backbone"
    out = _out_dir(args, f"embed-{args.split}" + ("-head" if args.head else ""))
    device = resolve_device(cfg.device)
    ds = load_split(cfg, args.split)
    feats = _split_features(net.to(device), cfg, ds.images, device, normalize=False).cpu()
    res = export_embeddings(out, feats, ds, args.format, args.max_points or None, f"{space} features, {args.split}")
    res.pop("classes")
    return {**res, "space": space, "split": args.split}


def _cmd_visualize(args) -> dict:
    from .data.images import require_labels
    from .data.splits import load_split
    from .engine.setup import autocast_dtype, resolve_device
    from .errors import ConfigError
    from .eval.visualize import visualize_run

    if args.queries < 1 or args.neighbours < 1:
        raise ConfigError("--queries and --neighbours must be at least 1")
    cfg, encoder = load_run_encoder(args.run, args.checkpoint, args.config, args.overrides)
    split = args.split or _default_split(cfg)
    device = resolve_device(cfg.device)
    ds = load_split(cfg, split)
    bank_ds = ds if split == cfg.eval.train_split else load_split(cfg, cfg.eval.train_split)
    if cfg.data.labels != "none" and (ds.labels >= 0).any():   # labelled data: the classes must make sense
        require_labels(ds, split, "visualize")
        require_labels(bank_ds, cfg.eval.train_split, "the nearest-neighbour grid")
    return visualize_run(encoder.to(device), cfg, ds, bank_ds, args.method, args.max_points or None, args.queries,
                         args.neighbours, _out_dir(args, ""), device, autocast_dtype(cfg, device), split)


def _default_split(cfg) -> str:
    """The split embed and visualize read when --split is not given: test, or the training split for
    unlabelled images (data.labels=none, or a flat folder with no test/ or val/ folder)."""
    if cfg.data.labels == "none":
        return cfg.data.train_split
    if cfg.data.name == "imagefolder" and cfg.data.root and not cfg.data.file_list and not any(
            (Path(cfg.data.root).expanduser() / n).is_dir() for n in ("test", "val")):
        return cfg.data.train_split
    return "test"


def _cmd_export(args) -> dict:
    from .config import load_config
    from .engine.export import FORMATS, check_format, check_out_folder, export_run
    from .errors import ConfigError

    cfg_path = Path(args.run) / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"'{args.run}' is not a run directory: {cfg_path} is missing")
    if args.format not in FORMATS:
        raise ConfigError(f"unknown export format '{args.format}'. Valid: {', '.join(FORMATS)}")
    check_format(load_config(str(cfg_path), []), args.format)   # before the weights are read
    check_out_folder(Path(args.out), args.format, Path(args.run))
    cfg, encoder = load_run_encoder(args.run, None, None, [])
    return export_run(cfg, encoder, args.format, Path(args.out), Path(args.run))


def _cmd_fake_imagenet(args) -> dict:
    from .data.fake import make_fake_imagenet

    return make_fake_imagenet(args.out, args.classes, args.train_per_class, args.val_per_class,
                              args.min_size, args.max_size, args.seed)


def _cmd_fake_detection(args) -> dict:
    from .data.detection import make_fake_detection

    return make_fake_detection(args.out, args.trainval, args.test, args.size, args.max_objects,
                               args.difficult_size, args.seed)


def _cmd_report(args) -> dict:
    from .eval.report import write_report

    return write_report(args.run)


def _cmd_bench(args) -> dict:
    from .bench import BENCHES
    from .errors import ConfigError

    if args.list or not args.what:
        for name, b in BENCHES.items():
            print(f"{name:12} {b.about}")
        return None
    if args.what not in BENCHES:
        raise ConfigError(f"unknown benchmark '{args.what}'. Valid: {', '.join(BENCHES)} (see `selfsup bench --list`)")
    argv, bench = list(args.args), BENCHES[args.what]
    if "--out" not in argv and not bench.out_file:
        argv += ["--out", f"runs/bench/{args.what}.json"]
    res = bench.main(argv)
    out = os.path.join(res["config"]["out"], bench.out_file) if bench.out_file else argv[argv.index("--out") + 1]
    return {"rows": res["rows"], "notes": res["notes"], "out": out}


OUT_HELP = ("folder for {}.json (default: RUN_DIR/eval; none with --checkpoint alone); needed for a --checkpoint "
            "that is not a file of --run")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description="Self-supervised representation learning.")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error (also SELFSUP_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model from a preset or YAML config")
    t.add_argument("preset", nargs="?", help="preset name (see --list) or path to a YAML config")
    t.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. train.epochs=5")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    t.add_argument("--resume-if-exists", action="store_true", help="train.resume=auto: resume run_dir when it "
                   "holds a checkpoint, else start fresh (requeued jobs, torchrun restarts)")
    t.add_argument("--list", action="store_true", help="list the shipped presets")
    t.add_argument("--init-from", metavar="EXPORT", help="start the encoder from an export (model.init_from): a "
                   ".safetensors file, a timm/hf or torchvision-detection export folder; everything else fresh")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a trained encoder")
    esub = e.add_subparsers(dest="protocol", required=True)
    k = esub.add_parser("knn", help="weighted kNN on clean features (eval.knn_k, eval.knn_temperature)")
    k.add_argument("--run", metavar="RUN_DIR")
    k.add_argument("--checkpoint", metavar="FILE")
    k.add_argument("--config", metavar="YAML")
    k.add_argument("--k", metavar="K1,K2,...", help="also report a sweep over these k (one search, top-max(k))")
    k.add_argument("--t", metavar="T1,T2,...", help="also report a sweep over these temperatures")
    k.add_argument("--baselines", action="store_true", help="also score raw pixels (centred) and the same encoder "
                   "at random init (the run's seed) with the same protocol (baseline_*_top1 in knn.json)")
    k.add_argument("--out", metavar="DIR", help=OUT_HELP.format("knn"))
    k.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. eval.knn_k=20")
    k.set_defaults(fn=_cmd_eval_knn)
    for name, fn, text in (
            ("linear", _cmd_eval_linear, "linear classifier on the frozen encoder (eval.linear_*)"),
            ("logreg", _cmd_eval_logreg, "L2 logistic regression by L-BFGS on clean features (eval.logreg_*)"),
            ("finetune", _cmd_eval_finetune, "fine-tune the whole network on 1%%/10%% labels (eval.finetune_*)")):
        ev = esub.add_parser(name, help=text)
        ev.add_argument("--run", metavar="RUN_DIR")
        ev.add_argument("--checkpoint", metavar="FILE")
        ev.add_argument("--config", metavar="YAML")
        ev.add_argument("--out", metavar="DIR", help=OUT_HELP.format(name))
        ev.add_argument("overrides", nargs="*", help=f"config overrides as key=value, e.g. eval.{name}_"
                        f"{'max_iter=500' if name == 'logreg' else 'epochs=10'}")
        ev.set_defaults(fn=fn)
    d = esub.add_parser("detection", help="transfer to detection: Faster R-CNN (ResNet-FPN) from the encoder, "
                        "VOC or COCO-format data (det.*)")
    d.add_argument("--run", metavar="RUN_DIR")
    d.add_argument("--checkpoint", metavar="FILE")
    d.add_argument("--config", metavar="YAML")
    d.add_argument("--preset", metavar="NAME", help="take the det.* keys of a preset: det-voc-r50, det-shapes-cpu")
    d.add_argument("--data", choices=("voc", "coco"), help="det.data")
    d.add_argument("--root", metavar="DIR", help="det.root: the folder holding VOCdevkit/ (voc), the images (coco)")
    d.add_argument("--ann", metavar="FILE", help="det.ann: COCO-format training json")
    d.add_argument("--test-ann", metavar="FILE", help="det.test_ann: COCO-format test json")
    d.add_argument("--init", choices=("ssl", "random", "both"), default="ssl",
                   help="backbone start: the run's encoder (ssl), a random one (baseline), or both in turn")
    d.add_argument("--out", metavar="DIR", help="where eval/detection.json and detection/<init>/ go (default: "
                   "RUN_DIR/eval)")
    d.add_argument("--restart", action="store_true", help="discard the detectors already in --out (trained "
                   "from another encoder or with other settings) and train from the start")
    d.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. det.batch_size=8")
    d.set_defaults(fn=_cmd_eval_detection)
    em = sub.add_parser("embed", help="export clean features of a split and TensorBoard projector files")
    vi = sub.add_parser("visualize", help="2-D map of the features and a nearest-neighbour grid (PNG)")
    for a in (em, vi):
        a.add_argument("--run", metavar="RUN_DIR")
        a.add_argument("--checkpoint", metavar="FILE")
        a.add_argument("--config", metavar="YAML")
        a.add_argument("--split", default=None, help="split whose images are used (default: test; the training "
                       "split for unlabelled images, data.labels=none or a folder without test/)")
        a.add_argument("overrides", nargs="*", help="config overrides as key=value")
    em.add_argument("--format", choices=("npy", "safetensors"), default="npy")
    em.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/eval/embed-SPLIT)")
    em.add_argument("--head", action="store_true", help="projection-head features instead of backbone features")
    em.add_argument("--max-points", type=int, default=5000, help="projector points, a fixed random subset (0: all)")
    em.set_defaults(fn=_cmd_embed)
    vi.add_argument("--method", choices=("tsne", "umap", "pca"), default="tsne")
    vi.add_argument("--max-points", type=int, default=2000, help="points on the map, a fixed random subset (0: all)")
    vi.add_argument("--queries", type=int, default=8, help="query rows of the neighbour grid")
    vi.add_argument("--neighbours", type=int, default=8, help="neighbours per query")
    vi.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/eval)")
    vi.set_defaults(fn=_cmd_visualize)
    b = sub.add_parser("bench", help="benchmarks: print a table, write JSON (`selfsup bench --list`)")
    b.add_argument("--list", action="store_true", help="list the benchmarks")
    b.add_argument("what", nargs="?", metavar="NAME", help="the benchmark (see --list)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark (--quick, --out ...; "
                   "see `selfsup bench NAME --help`)")
    b.set_defaults(fn=_cmd_bench)
    ex = sub.add_parser("export", help="write a run's encoder for other libraries: torchvision, timm, hf, "
                        "torchvision-detection")
    ex.add_argument("--run", metavar="RUN_DIR", required=True)
    ex.add_argument("--format", required=True, metavar="F", help="torchvision | timm | hf | torchvision-detection")
    ex.add_argument("--out", metavar="DIR", required=True, help="output folder: new or empty, or an export of the "
                    "same run and format (rewritten); never a run directory")
    ex.set_defaults(fn=_cmd_export)
    fk = sub.add_parser("fake-imagenet", help="write a small ImageNet-like set (folders, zips, map files) to OUT")
    fk.add_argument("out", metavar="OUT")
    fk.add_argument("--classes", type=int, default=4)
    fk.add_argument("--train-per-class", type=int, default=50)
    fk.add_argument("--val-per-class", type=int, default=10)
    fk.add_argument("--min-size", type=int, default=64, help="smallest image side (px)")
    fk.add_argument("--max-size", type=int, default=160, help="largest image side (px)")
    fk.add_argument("--seed", type=int, default=0)
    fk.set_defaults(fn=_cmd_fake_imagenet)
    fd = sub.add_parser("fake-detection", help="write a small VOC-format detection set (shapes on noise) to OUT")
    fd.add_argument("out", metavar="OUT", help="a new or empty folder")
    fd.add_argument("--trainval", type=int, default=200, help="training images")
    fd.add_argument("--test", type=int, default=100, help="test images")
    fd.add_argument("--size", type=int, default=64, help="image side (px)")
    fd.add_argument("--max-objects", type=int, default=4, help="shapes per image: 1 to this")
    fd.add_argument("--difficult-size", type=int, default=10, help="shapes smaller than this (px) are difficult")
    fd.add_argument("--seed", type=int, default=0)
    fd.set_defaults(fn=_cmd_fake_detection)
    r = sub.add_parser("report", help="RUN_DIR/report.html (self-contained) and RUN_DIR/report.md")
    r.add_argument("--run", metavar="RUN_DIR", required=True)
    r.set_defaults(fn=_cmd_report)
    return p


def os_error_text(e: OSError) -> str:
    """An OSError as what happened, to which file, and what to do."""
    import errno

    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    fix = {errno.ENOSPC: "free some space or write elsewhere (run_dir=..., --out); the last complete "
                         "checkpoint is intact",
           errno.EDQUOT: "free some space or write elsewhere (run_dir=..., --out)",
           errno.EACCES: "choose a folder you may write (run_dir=..., --out, data.index_cache=null)",
           errno.EPERM: "choose a folder you may write (run_dir=..., --out, data.index_cache=null)",
           errno.EROFS: "the file system is read-only: choose a writable folder (run_dir=..., --out)",
           errno.EEXIST: "choose another path or remove it",
           errno.EISDIR: "give a file, not a folder",
           errno.ENOTDIR: "a part of the path is a file, not a folder"}.get(e.errno, "check the path")
    return f"{what}{where}: {fix}"


def main(argv: list[str] | None = None) -> int:
    from .errors import SelfsupError, TrainingStopped
    from .progress import Heartbeat

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere on the line, after an option too; anything else is unknown
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra
    # the positional preset may have swallowed the first key=value when only overrides were given
    if getattr(args, "preset", None) and "=" in args.preset and not Path(args.preset).exists():
        args.overrides.insert(0, args.preset)
        args.preset = None
    debug = args.debug or os.environ.get("SELFSUP_DEBUG", "0") not in ("", "0")
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    name = " ".join(words[:2] if words[:1] in (["eval"], ["bench"]) else words[:1])   # "eval knn", "visualize"
    # a log (not a terminal) hears from the command at least every 30 s, even in steps without a count
    every = float(os.environ.get("SELFSUP_HEARTBEAT_S", "30") or 0)   # 0: off
    beat = Heartbeat(name, every or 30.0, enabled=every > 0 and os.environ.get("RANK", "0") == "0")
    try:
        with beat:
            result = args.fn(args)
    except (SelfsupError, FileNotFoundError, ValueError) as e:
        if debug:
            raise
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # disk full, permissions, read-only places: the file and the fix
        if debug:
            raise
        print(f"selfsup: error: {os_error_text(e)}", file=sys.stderr)
        return 2
    except TrainingStopped as e:   # SIGTERM/SIGINT: checkpoint written, rank 0 printed how to resume
        return e.exit_code
    except KeyboardInterrupt:      # Ctrl-C outside the training loop
        print("selfsup: interrupted", file=sys.stderr)
        return 130
    except Exception as e:   # noqa: BLE001 -- a bug: one line, the traceback with --debug
        if debug:
            raise
        print(f"selfsup: internal error: {type(e).__name__}: {e} (a bug in selfsup: rerun with --debug or "
              "SELFSUP_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1
    if result is not None and os.environ.get("RANK", "0") == "0":   # one line per job, not per rank
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
