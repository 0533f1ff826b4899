"""Export a trained encoder, and read an export back.

    RUN_DIR/encoder.safetensors       written at the end of every run (the encoder's own key names:
                                      torchvision's for the torchvision ResNets, no fc)
    selfsup export --format F:
      torchvision             DIR/encoder.safetensors: torchvision.models.resnetXX().load_state_dict(sd,
                              strict=False) misses only fc.* (a CIFAR stem: conv1 is 3x3 stride 1, no max-pool)
      timm                    DIR/model.safetensors + DIR/config.json: timm.create_model("local-dir:DIR",
                              pretrained=True, num_classes=0)
      hf                      the timm folder plus a model card DIR/README.md (evaluation table, how to load)
      torchvision-detection   DIR/backbone_body.safetensors: model.backbone.body.load_state_dict(sd) of
                              torchvision's fasterrcnn_resnet50_fpn (FrozenBatchNorm2d: no num_batches_tracked)
    and, in every format, DIR/selfsup.yaml (the run's config) and DIR/export.json (format, run, weights
    file), written last: DIR is a new or empty folder, or an export of the same run and format; one
    folder holds one export, and the loader reads the weights export.json names.

Which formats fit which backbone: `export_formats(cfg)`. timm's ResNets use torchvision's key names,
so a torchvision ResNet (without the CIFAR stem) is timm's architecture of the same name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ..atomic import replacing, write_json, write_text
from ..data.augment import IMAGE_MEAN, IMAGE_STD
from ..errors import CheckpointError, ConfigError

__all__ = ["check_export_fits", "export_config", "export_encoder", "export_formats", "export_run", "read_export",
           "FORMATS"]

FORMATS = ("torchvision", "timm", "hf", "torchvision-detection")
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")
NATIVE_SIZE = {"fashion-mnist": 28, "cifar10": 32, "cifar100": 32, "stl10": 96, "synthetic": 32}
WHAT_FITS = ("torchvision, timm, hf and torchvision-detection fit a torchvision ResNet (model.backbone=resnet18|34|50) "
             "with model.cifar_stem=false; torchvision alone fits one with the CIFAR stem; timm and hf fit a timm "
             "backbone (model.backbone=timm/<name>); none fits resnet_small (its RUN_DIR/encoder.safetensors loads "
             "back into selfsup: `selfsup train --init-from`, `selfsup eval ... --checkpoint FILE --config YAML`)")


def export_encoder(encoder: torch.nn.Module, path: Path, drop_num_batches: bool = False) -> None:
    """Save the encoder's state dict as safetensors, atomically (temp file, then rename)."""
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()
             if not (drop_num_batches and k.endswith("num_batches_tracked"))}
    with replacing(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "producer": "selfsup"})


def export_formats(cfg) -> list[str]:
    """The export formats that fit the run's backbone."""
    name = cfg.model.backbone
    if name in TORCHVISION_RESNETS:
        return ["torchvision"] if cfg.model.cifar_stem else list(FORMATS)
    if name.startswith("timm/"):
        return ["timm", "hf"]
    return []


def check_format(cfg, fmt: str) -> None:
    """ConfigError unless `fmt` fits the run's backbone; the message says what fits."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'. Valid: {', '.join(FORMATS)}")
    fits = export_formats(cfg)
    if fmt not in fits:
        stem = " with the CIFAR stem (3x3 stride-1 conv1, no max-pool)" if cfg.model.cifar_stem and \
            cfg.model.backbone in TORCHVISION_RESNETS else ""
        raise ConfigError(f"--format {fmt} does not fit this run's backbone, "
                          f"model.backbone={cfg.model.backbone}{stem}: "
                          f"{'for it use --format ' + ' or '.join(fits) if fits else 'no export format fits it'}. "
                          f"{WHAT_FITS}")


def input_size(cfg) -> int:
    return int(cfg.data.image_size or NATIVE_SIZE.get(cfg.data.name, 224))


def timm_config(cfg, encoder: torch.nn.Module) -> dict:
    """timm's config.json for the encoder (num_classes 0: pooled features)."""
    name = cfg.model.backbone
    own = dict(getattr(encoder, "pretrained_cfg", None) or {})   # a timm backbone carries its own
    arch = name.removeprefix("timm/")
    size = input_size(cfg)
    pool = getattr(encoder, "global_pool", None)   # a timm ViT: "token" or "avg"
    pretrained = {k: v for k, v in own.items() if k in ("first_conv", "classifier", "interpolation", "pool_size",
                                                         "fixed_input_size")}
    pretrained.update({"tag": "selfsup", "custom_load": False, "input_size": [3, size, size],
                       "crop_pct": 1.0, "crop_mode": "center", "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                       "num_classes": 0})
    pretrained.setdefault("interpolation", "bilinear")
    pretrained.setdefault("first_conv", "conv1")
    pretrained.setdefault("classifier", "fc")
    out = {"architecture": arch, "num_classes": 0, "num_features": int(getattr(encoder, "num_features", 0) or
                                                                      (2048 if arch == "resnet50" else 512)),
           "global_pool": pool if isinstance(pool, str) and pool else "avg", "pretrained_cfg": pretrained}
    args = OmegaConf.to_container(cfg.model.backbone_args) if name.startswith("timm/") and \
        cfg.model.get("backbone_args") else {}
    if args:
        out["model_args"] = args
    return out


def _eval_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    """(what, metrics, protocol) of the run's evaluations: RUN_DIR/eval/*.json and the final line of metrics.jsonl."""
    rows = []
    for f in sorted((run_dir / "eval").glob("*.json")):
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(res, dict):
            nums = ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float))
            rows.append((f"eval {f.stem}", nums, str(res.get("protocol", ""))))
    final = None
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "final":
                final = ev
    if final:
        nums = ", ".join(f"{k} {final[k]:.4f}" for k in final if k.startswith("knn_") and isinstance(final[k], float))
        if nums:
            rows.append(("kNN monitor at the end of training", nums, str(final.get("protocol", ""))))
    return rows


def _model_card(cfg, run_dir: Path, timm_cfg: dict) -> str:
    rows = _eval_rows(run_dir)
    table = "\n".join(f"| {w} | {m} | {p.replace('|', '/')} |" for w, m, p in rows) or "| (none yet) | | |"
    preset = cfg.get("preset", None) or "(see selfsup.yaml)"
    return f"""---
library_name: timm
tags: [image-feature-extraction, self-supervised, selfsup, {cfg.method}]
---
# {cfg.method} {timm_cfg['architecture']} encoder (selfsup)

Self-supervised encoder trained with `selfsup` ({cfg.method}); its classifier is removed
(`num_classes=0`: {timm_cfg['num_features']}-d pooled features).

- method: {cfg.method}; preset: {preset}; the whole config: `selfsup.yaml`
- backbone: {cfg.model.backbone}
- data: {cfg.data.name} (split {cfg.data.train_split}), {input_size(cfg)} px, mean {list(IMAGE_MEAN)}, std {list(IMAGE_STD)}
- epochs: {cfg.train.epochs}, batch size {cfg.train.batch_size}

## Evaluation

| evaluation | result | protocol |
|---|---|---|
{table}

## How to load

```python
import timm
model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True, num_classes=0)   # or "hf-hub:USER/REPO"
```
Back into selfsup: `selfsup train PRESET --init-from THIS_FOLDER`, `selfsup eval knn --checkpoint THIS_FOLDER`.
"""


DETECTION_README = """# torchvision detection backbone (selfsup export)

`backbone_body.safetensors` holds the ResNet body (conv1, bn1, layer1..4) of a selfsup encoder,
without `num_batches_tracked` (detection models use FrozenBatchNorm2d):

```python
import torchvision
from safetensors.torch import load_file
model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=N)
model.backbone.body.load_state_dict(load_file("backbone_body.safetensors"))
```
For resnet18/34: `torchvision.models.detection.backbone_utils.resnet_fpn_backbone(backbone_name="{name}",
weights=None)` and the same `.body.load_state_dict`. Images: mean {mean}, std {std} at training time
(set `image_mean`/`image_std` of the detector to match).
"""


MANIFEST = "export.json"   # written last: the folder is a complete export of `format`, its weights in `weights`
WEIGHTS = {"torchvision": "encoder.safetensors", "timm": "model.safetensors", "hf": "model.safetensors",
           "torchvision-detection": "backbone_body.safetensors"}
# timm arguments that only regularise training: an encoder loads whatever values they had when it was exported
TRAINING_ONLY_ARGS = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
                      "patch_drop_rate", "drop_block_rate")


def _is_run_dir(d: Path) -> bool:
    return (d / "config.yaml").is_file() or (d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file()


def check_out_folder(out: Path, fmt: str, run_dir: Path) -> None:
    """ConfigError unless `out` is a new or empty folder, or a complete export of the same run in the same
    format (which may be rewritten): never a run directory, never another export or anything else."""
    fix = f"give a new or empty folder (e.g. --out {out.parent / (out.name + '-' + fmt)}), or remove it"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; --out takes a folder (new or empty) to write into")
    if not out.is_dir():
        return
    if _is_run_dir(out):
        raise ConfigError(f"--out {out} is a run directory (config.yaml, checkpoints/, metrics.jsonl): an export "
                          f"there would replace the run's own files: {fix}")
    held = sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp"))
    if not held:
        return
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        m = None
    if not isinstance(m, dict):
        raise ConfigError(f"--out {out} is not empty ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}) "
                          f"and is not a selfsup export (no readable {MANIFEST}): {fix}")
    if m.get("format") != fmt or m.get("run") != str(run_dir.resolve()):
        raise ConfigError(f"--out {out} holds another export ({m.get('format')} of run {m.get('run')}); one folder "
                          f"holds one export, and only an export of the same run and format is rewritten: {fix}")


def export_run(cfg, encoder: torch.nn.Module, fmt: str, out: Path, run_dir: Path) -> dict:
    """Write `encoder` (of the run in `run_dir`, config `cfg`) to folder `out` in format `fmt`; return what
    was written. Every file goes through a temporary file; OUT/export.json, naming the format and the
    weights file, is removed first and written last."""
    check_format(cfg, fmt)
    check_out_folder(out, fmt, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)   # a rewrite stopped half-way is no complete export
    encoder = encoder.cpu()
    if (run_dir / "config.yaml").is_file():   # the run's config: `selfsup eval --checkpoint DIR` needs no --config
        write_text(out / "selfsup.yaml", (run_dir / "config.yaml").read_text())
    res = {"format": fmt, "out": str(out), "backbone": cfg.model.backbone, "config": "selfsup.yaml"}
    if fmt == "torchvision":
        export_encoder(encoder, out / "encoder.safetensors")
        res["files"] = ["encoder.safetensors"]
        res["load"] = (f"torchvision.models.{cfg.model.backbone}().load_state_dict(load_file(...), strict=False) "
                       "(missing: fc.*)")
        if cfg.model.cifar_stem:
            res["note"] = ("CIFAR stem: conv1 is 3x3 stride 1 and there is no max-pool; set model.conv1 = "
                           "nn.Conv2d(3, 64, 3, 1, 1, bias=False) and model.maxpool = nn.Identity() before loading")
    elif fmt == "torchvision-detection":
        export_encoder(encoder, out / "backbone_body.safetensors", drop_num_batches=True)
        write_text(out / "README.md", DETECTION_README.format(name=cfg.model.backbone, mean=list(IMAGE_MEAN),
                                                              std=list(IMAGE_STD)))
        res["files"] = ["backbone_body.safetensors", "README.md"]
        res["load"] = "fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone.body.load_state_dict(sd)"
    else:
        tcfg = timm_config(cfg, encoder)
        export_encoder(encoder, out / "model.safetensors")
        write_json(out / "config.json", tcfg)
        res["files"] = ["model.safetensors", "config.json"]
        if fmt == "hf":
            write_text(out / "README.md", _model_card(cfg, run_dir, tcfg))
            res["files"].append("README.md")
        res["load"] = f'timm.create_model("local-dir:{out}", pretrained=True, num_classes=0)'
    write_json(out / MANIFEST, {"format": fmt, "run": str(run_dir.resolve()), "backbone": cfg.model.backbone,
                                "weights": WEIGHTS[fmt], "files": res["files"]})
    return res


FITS = ("an export is a .safetensors file (torchvision names: RUN_DIR/encoder.safetensors, `selfsup export "
        "--format torchvision`), a timm/hf folder (model.safetensors + config.json), a torchvision-detection "
        "folder (backbone_body.safetensors) or any folder `selfsup export` wrote (export.json names its weights)")


def _read_json(f: Path, what: str) -> dict:
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read {what} '{f}': {e} (export the run again into a new folder)") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} '{f}' holds a JSON {type(d).__name__}, not an object (export the run again "
                              "into a new folder)")
    return d


def _export_files(p: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) of export folder `p`: the files its export.json names; in a
    folder without one (a timm folder from elsewhere, an older export) the one weights file it holds."""
    redo = "re-export it into a new folder: `selfsup export --run RUN_DIR --format F --out NEW_DIR`"
    if (p / MANIFEST).exists():
        m = _read_json(p / MANIFEST, "export manifest")
        fmt = m.get("format")
        if fmt not in WEIGHTS or m.get("weights") != WEIGHTS[fmt]:
            raise CheckpointError(f"export manifest '{p / MANIFEST}' names format {fmt!r} and weights "
                                  f"{m.get('weights')!r}, not one of selfsup's ({WEIGHTS}): {redo}")
        f, config = p / WEIGHTS[fmt], (p / "config.json" if fmt in ("timm", "hf") else None)
        missing = [x.name for x in (f, config) if x is not None and not x.is_file()]
        if missing:
            raise CheckpointError(f"{fmt} export folder '{p}' has no {' and no '.join(missing)} (it holds "
                                  f"{f.name}{' and config.json' if config else ''}): {redo}")
        return f, config
    found = [n for n in ("model.safetensors", "backbone_body.safetensors") if (p / n).is_file()]
    if len(found) > 1:
        raise CheckpointError(f"export folder '{p}' holds {' and '.join(found)} and no {MANIFEST} naming which is "
                              f"its export: one folder holds one export; {redo}")
    if found == ["backbone_body.safetensors"]:
        return p / found[0], None
    missing = [n for n in ("model.safetensors", "config.json") if not (p / n).is_file()]
    if missing:
        raise CheckpointError(f"export folder '{p}' has no {' and no '.join(missing)}: {FITS} ({redo})")
    return p / "model.safetensors", p / "config.json"


def export_config(path: str) -> dict | None:
    """The timm config.json of export `path` (a folder), checked to be an object with an architecture
    and model_args; None for a .safetensors file or a folder with no config.json."""
    p = Path(path)
    if not p.is_dir():
        return None
    config = _export_files(p)[1]
    if config is None:
        return None
    c = _read_json(config, "export config")
    if not isinstance(c.get("architecture"), str) or not isinstance(c.get("model_args", {}), dict):
        raise CheckpointError(f"export config '{config}' has no architecture name or its model_args is not an "
                              "object: export the run again into a new folder")
    return c


def _arg(args: dict, k) -> str:
    return json.dumps(args[k]) if k in args else "unset (timm's default)"


def check_export_fits(path: str, cfg) -> None:
    """CheckpointError unless the config.json of export `path` (when it has one) describes this config's
    backbone: the same architecture and the same model_args (model.backbone_args of a timm backbone),
    but for the training-only ones (TRAINING_ONLY_ARGS). Weights alone do not tell: a ViT with 3 heads
    has the shapes of one with 6 or 12."""
    c = export_config(path)
    if c is None:
        return
    name = cfg.model.backbone
    arch, want = c["architecture"], name.removeprefix("timm/")
    diff = [] if arch.split(".")[0] == want.split(".")[0] else \
        [f"architecture: export {arch}, this config {want} (model.backbone={name})"]
    theirs = c.get("model_args") or {}
    own = cfg.model.get("backbone_args") if name.startswith("timm/") else None
    own = OmegaConf.to_container(own) if OmegaConf.is_config(own) else dict(own or {})
    for k in sorted(set(theirs) | set(own), key=str):
        if k not in TRAINING_ONLY_ARGS and (k in theirs, theirs.get(k)) != (k in own, own.get(k)):
            diff.append(f"{k}: export {_arg(theirs, k)}, this config {_arg(own, k)}")
    if diff:
        raise CheckpointError(f"the export '{path}' was made for another model than this config's: "
                              f"{'; '.join(diff)}. Load it with the export's settings (model.backbone=timm/{arch}, "
                              f"model.backbone_args={json.dumps(theirs)}) or load an export of this model")


def read_export(path: str, cfg=None) -> dict:
    """The encoder state dict of an export: a .safetensors file (torchvision names, or any selfsup encoder),
    a folder `selfsup export` wrote (the weights its export.json names), a timm/hf folder (model.safetensors
    + config.json) or a torchvision-detection folder (backbone_body.safetensors). With `cfg`, the export's
    config.json must describe cfg's backbone (`check_export_fits`). CheckpointError naming what is wrong
    and what fits."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"'{path}' does not exist: {FITS}")
    if p.is_dir():
        f = _export_files(p)[0]
        if cfg is not None:
            check_export_fits(path, cfg)
    elif p.suffix == ".safetensors":
        f = p
    else:
        raise CheckpointError(f"'{path}' is not an export: {FITS}")
    try:
        return load_file(str(f))
    except Exception as e:   # noqa: BLE001 -- truncated or not safetensors
        raise CheckpointError(f"could not read '{f}' as safetensors: {e} (truncated or not safetensors: "
                              "export it again; a run's checkpoints/last.pt holds the same encoder: --checkpoint "
                              "it)") from None
