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


def _encoder(args) -> tuple:
    """(run, checkpoint, config, overrides): the encoder a command loads (options ENCODER)."""
    return args.run, args.checkpoint, args.config, args.overrides


def _cmd_train(args) -> dict:
    from .config import list_presets

    if args.list:
        for name in list_presets():
            print(name)
        return None
    from .engine.commands import train_run

    return train_run(args.preset, args.overrides, args.resume, args.resume_if_exists, args.init_from)


def _number_list(text: str, cast, option: str) -> list:
    from .errors import ConfigError

    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise ConfigError(f"{option} takes comma-separated positive numbers, e.g. {option} 10,20,200; got '{text}'")
    return values


def _cmd_eval_knn(args) -> dict:
    ks = _number_list(args.k, int, "--k") if args.k else None
    ts = _number_list(args.t, float, "--t") if args.t else None
    from .engine.commands import eval_knn

    return eval_knn(*_encoder(args), ks, ts, args.baselines, args.out)


def _cmd_eval_classifier(args) -> dict:   # eval linear | logreg | finetune
    from .engine.commands import eval_classifier

    return eval_classifier(args.protocol, *_encoder(args), args.out)


def _cmd_eval_detection(args) -> dict:
    from .engine.commands import eval_detection

    det = {"data": args.data, "root": args.root, "ann": args.ann, "test_ann": args.test_ann}
    return eval_detection(*_encoder(args), args.out, args.preset, det, args.init, args.restart)


def _cmd_embed(args) -> dict:
    from .engine.commands import embed

    return embed(*_encoder(args), args.split, args.format, args.out, args.head, args.max_points)


def _cmd_visualize(args) -> dict:
    from .engine.commands import visualize

    return visualize(*_encoder(args), args.split, args.method, args.max_points, args.queries, args.neighbours,
                     args.out)


def _cmd_export(args) -> dict:
    from .engine.commands import export

    return export(args.run, args.format, args.out)


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
    from .bench import BENCHES, run_bench

    if args.list or not args.what:
        for name, b in BENCHES.items():
            print(f"{name:12} {b.about}")
        return None
    return run_bench(args.what, args.args)


OUT_HELP = ("folder for {}.json (default: RUN_DIR/eval; none with --checkpoint alone); needed for a --checkpoint "
            "that is not a file of --run")


# the encoder a command loads (`_encoder`): a run directory, or a checkpoint (with --config for a plain state dict)
ENCODER = (("--run", dict(metavar="RUN_DIR")), ("--checkpoint", dict(metavar="FILE")),
           ("--config", dict(metavar="YAML")))


def _add_options(p: argparse.ArgumentParser, fn, *options: tuple) -> None:
    """Each option as (name, keyword arguments of add_argument), e.g. *ENCODER; then the command's function."""
    for name, kw in options:
        p.add_argument(name, **kw)
    p.set_defaults(fn=fn)


def _add_eval_parsers(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a trained encoder")
    esub = e.add_subparsers(dest="protocol", required=True)
    k = esub.add_parser("knn", help="weighted kNN on clean features (eval.knn_k, eval.knn_temperature)")
    _add_options(k, _cmd_eval_knn, *ENCODER,
                 ("--k", dict(metavar="K1,K2,...", help="also report a sweep over these k (one search, top-max(k))")),
                 ("--t", dict(metavar="T1,T2,...", help="also report a sweep over these temperatures")),
                 ("--baselines", dict(action="store_true", help="also score raw pixels (centred) and the same "
                  "encoder at random init (the run's seed) with the same protocol (baseline_*_top1 in knn.json)")),
                 ("--out", dict(metavar="DIR", help=OUT_HELP.format("knn"))),
                 ("overrides", dict(nargs="*", help="config overrides as key=value, e.g. eval.knn_k=20")))
    for name, text in (
            ("linear", "linear classifier on the frozen encoder (eval.linear_*)"),
            ("logreg", "L2 logistic regression by L-BFGS on clean features (eval.logreg_*)"),
            ("finetune", "fine-tune the whole network on 1%%/10%% labels (eval.finetune_*)")):
        example = "max_iter=500" if name == "logreg" else "epochs=10"
        _add_options(esub.add_parser(name, help=text), _cmd_eval_classifier, *ENCODER,
                     ("--out", dict(metavar="DIR", help=OUT_HELP.format(name))),
                     ("overrides", dict(nargs="*", help=f"config overrides as key=value, e.g. eval.{name}_{example}")))
    d = esub.add_parser("detection", help="transfer to detection: Faster R-CNN (ResNet-FPN) from the encoder, "
                        "VOC or COCO-format data (det.*)")
    _add_options(d, _cmd_eval_detection, *ENCODER,
                 ("--preset", dict(metavar="NAME", help="take the det.* keys of a preset: det-voc-r50, "
                                   "det-shapes-cpu")),
                 ("--data", dict(choices=("voc", "coco"), help="det.data")),
                 ("--root", dict(metavar="DIR", help="det.root: the folder holding VOCdevkit/ (voc), the images "
                                 "(coco)")),
                 ("--ann", dict(metavar="FILE", help="det.ann: COCO-format training json")),
                 ("--test-ann", dict(metavar="FILE", help="det.test_ann: COCO-format test json")),
                 ("--init", dict(choices=("ssl", "random", "both"), default="ssl", help="backbone start: the run's "
                                 "encoder (ssl), a random one (baseline), or both in turn")),
                 ("--out", dict(metavar="DIR", help="where eval/detection.json and detection/<init>/ go (default: "
                                "RUN_DIR/eval)")),
                 ("--restart", dict(action="store_true", help="discard the detectors already in --out (trained "
                                    "from another encoder or with other settings) and train from the start")),
                 ("overrides", dict(nargs="*", help="config overrides as key=value, e.g. det.batch_size=8")))


def _add_feature_parsers(sub) -> None:   # embed, visualize
    split = ("--split", dict(default=None, help="split whose images are used (default: test; the training split "
                             "for unlabelled images, data.labels=none or a folder without test/)"))
    overrides = ("overrides", dict(nargs="*", help="config overrides as key=value"))
    em = sub.add_parser("embed", help="export clean features of a split and TensorBoard projector files")
    _add_options(em, _cmd_embed, *ENCODER, split, overrides,
                 ("--format", dict(choices=("npy", "safetensors"), default="npy")),
                 ("--out", dict(metavar="DIR", help="output folder (default: RUN_DIR/eval/embed-SPLIT)")),
                 ("--head", dict(action="store_true", help="projection-head features instead of backbone features")),
                 ("--max-points", dict(type=int, default=5000, help="projector points, a fixed random subset "
                                       "(0: all)")))
    vi = sub.add_parser("visualize", help="2-D map of the features and a nearest-neighbour grid (PNG)")
    _add_options(vi, _cmd_visualize, *ENCODER, split, overrides,
                 ("--method", dict(choices=("tsne", "umap", "pca"), default="tsne")),
                 ("--max-points", dict(type=int, default=2000, help="points on the map, a fixed random subset "
                                       "(0: all)")),
                 ("--queries", dict(type=int, default=8, help="query rows of the neighbour grid")),
                 ("--neighbours", dict(type=int, default=8, help="neighbours per query")),
                 ("--out", dict(metavar="DIR", help="output folder (default: RUN_DIR/eval)")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfsup", description="Self-supervised representation learning.")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error (also SELFSUP_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    _add_options(sub.add_parser("train", help="train a model from a preset or YAML config"), _cmd_train,
                 ("preset", dict(nargs="?", help="preset name (see --list) or path to a YAML config")),
                 ("overrides", dict(nargs="*", help="config overrides as key=value, e.g. train.epochs=5")),
                 ("--resume", dict(metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")),
                 ("--resume-if-exists", dict(action="store_true", help="train.resume=auto: resume run_dir when "
                                             "it holds a checkpoint, else start fresh (requeued jobs, torchrun "
                                             "restarts)")),
                 ("--list", dict(action="store_true", help="list the shipped presets")),
                 ("--init-from", dict(metavar="EXPORT", help="start the encoder from an export (model.init_from): a "
                                      ".safetensors file, a timm/hf or torchvision-detection export folder; "
                                      "everything else fresh")))
    _add_eval_parsers(sub)
    _add_feature_parsers(sub)
    _add_options(sub.add_parser("bench", help="benchmarks: print a table, write JSON (`selfsup bench --list`)"),
                 _cmd_bench, ("--list", dict(action="store_true", help="list the benchmarks")),
                 ("what", dict(nargs="?", metavar="NAME", help="the benchmark (see --list)")),
                 ("args", dict(nargs=argparse.REMAINDER, help="options of the benchmark (--quick, --out ...; "
                               "see `selfsup bench NAME --help`)")))
    _add_options(sub.add_parser("export", help="write a run's encoder for other libraries: torchvision, timm, hf, "
                                "torchvision-detection"), _cmd_export,
                 ("--run", dict(metavar="RUN_DIR", required=True)),
                 ("--format", dict(required=True, metavar="F", help="torchvision | timm | hf | torchvision-detection")),
                 ("--out", dict(metavar="DIR", required=True, help="output folder: new or empty, or an export of the "
                                "same run and format (rewritten); never a run directory")))
    _add_options(sub.add_parser("fake-imagenet", help="write a small ImageNet-like set (folders, zips, map files) "
                                "to OUT"), _cmd_fake_imagenet,
                 ("out", dict(metavar="OUT")), ("--classes", dict(type=int, default=4)),
                 ("--train-per-class", dict(type=int, default=50)), ("--val-per-class", dict(type=int, default=10)),
                 ("--min-size", dict(type=int, default=64, help="smallest image side (px)")),
                 ("--max-size", dict(type=int, default=160, help="largest image side (px)")),
                 ("--seed", dict(type=int, default=0)))
    _add_options(sub.add_parser("fake-detection", help="write a small VOC-format detection set (shapes on noise) "
                                "to OUT"), _cmd_fake_detection,
                 ("out", dict(metavar="OUT", help="a new or empty folder")),
                 ("--trainval", dict(type=int, default=200, help="training images")),
                 ("--test", dict(type=int, default=100, help="test images")),
                 ("--size", dict(type=int, default=64, help="image side (px)")),
                 ("--max-objects", dict(type=int, default=4, help="shapes per image: 1 to this")),
                 ("--difficult-size", dict(type=int, default=10, help="shapes smaller than this (px) are difficult")),
                 ("--seed", dict(type=int, default=0)))
    _add_options(sub.add_parser("report", help="RUN_DIR/report.html (self-contained) and RUN_DIR/report.md"),
                 _cmd_report, ("--run", dict(metavar="RUN_DIR", required=True)))
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import SelfsupError, TrainingStopped, os_error_text
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
