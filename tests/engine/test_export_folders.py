"""Where `selfsup export` may write (never over a run or another export), which file an export folder
is read from (the one its export.json names), and an export's config.json checked against the backbone
it is loaded into (issue 23). Runs here are made without training: a config.yaml and an encoder."""
import json
import shutil

import pytest
import torch
from conftest import TINY, cli_error
from omegaconf import OmegaConf
from safetensors.torch import load_file

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.engine.export import export_encoder, export_run, read_export
from selfsup.errors import CheckpointError
from selfsup.methods import build_method

R18 = ["model.backbone=resnet18", "model.cifar_stem=false", "data.image_size=32"]
VIT = ["model.backbone=timm/vit_tiny_patch16_224", "model.backbone_args.img_size=32",
       "model.backbone_args.patch_size=8"]


def make_run(path, seed, extra=R18):
    """A run directory as training leaves it (config.yaml, metrics.jsonl, encoder.safetensors), untrained."""
    cfg = load_config(None, TINY + extra + [f"seed={seed}", f"run_dir={path}"])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (path / "metrics.jsonl").write_text("")
    torch.manual_seed(seed)
    encoder = build_method(cfg).encoder
    export_encoder(encoder, path / "encoder.safetensors")
    return cfg, encoder


def _tree(d):
    """Every file under `d`: its bytes, or for safetensors its tensors (the header's order may vary)."""
    return {p.relative_to(d).as_posix(): {k: v.numpy().tobytes() for k, v in load_file(str(p)).items()}
            if p.suffix == ".safetensors" else p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_never_writes_over_a_run_or_another_export(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    make_run(a, 0)
    make_run(b, 7)
    before = _tree(a)
    for fmt in ("torchvision", "timm"):   # another run's folder, and the run's own
        for run in (b, a):
            err = cli_error(capsys, ["export", "--run", str(run), "--format", fmt, "--out", str(a)])
            assert "is a run directory" in err and f"--out {a}-{fmt}" in err
    assert _tree(a) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    err = cli_error(capsys, ["export", "--run", str(a), "--format", "torchvision", "--out", str(other)])
    assert "is not empty (todo.txt)" in err and "no readable export.json" in err
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]

    d = tmp_path / "det"
    assert main(["export", "--run", str(a), "--format", "torchvision-detection", "--out", str(d)]) == 0
    det = _tree(d)
    assert json.loads(det["export.json"])["weights"] == "backbone_body.safetensors"
    for run, fmt in ((a, "hf"), (b, "torchvision-detection")):   # another kind, another run's
        err = cli_error(capsys, ["export", "--run", str(run), "--format", fmt, "--out", str(d)])
        assert f"holds another export (torchvision-detection of run {a.resolve()})" in err
    assert _tree(d) == det
    # the same run and format is rewritten; an empty folder is fine
    assert main(["export", "--run", str(a), "--format", "torchvision-detection", "--out", str(d)]) == 0
    assert _tree(d) == det
    (tmp_path / "empty").mkdir()
    assert main(["export", "--run", str(b), "--format", "timm", "--out", str(tmp_path / "empty")]) == 0
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_an_export_folder_is_read_from_the_file_its_export_json_names(tmp_path):
    cfg_a, enc_a = make_run(tmp_path / "A", 0)
    cfg_b, enc_b = make_run(tmp_path / "B", 7)
    export_run(cfg_b, enc_b, "torchvision-detection", tmp_path / "det", tmp_path / "B")
    h = tmp_path / "hf"
    export_run(cfg_a, enc_a, "hf", h, tmp_path / "A")
    shutil.copy(tmp_path / "det/backbone_body.safetensors", h)   # a stale weights file of another export
    want = load_file(str(tmp_path / "A/encoder.safetensors"))
    got = read_export(str(h))
    assert all(torch.equal(got[k], want[k]) for k in want)
    (h / "export.json").unlink()   # no manifest: two weight files, no telling which
    with pytest.raises(CheckpointError, match="holds model.safetensors and backbone_body.safetensors"):
        read_export(str(h))
    # a torchvision export folder reads back too (its export.json names encoder.safetensors)
    export_run(cfg_a, enc_a, "torchvision", tmp_path / "tv", tmp_path / "A")
    got = read_export(str(tmp_path / "tv"), cfg_a)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_vit_export_loads_only_into_the_same_vit(tmp_path, capsys):
    pytest.importorskip("timm")
    cfg, enc = make_run(tmp_path / "vit", 0, VIT)   # vit_tiny: 3 heads
    out = tmp_path / "hf"
    export_run(cfg, enc, "hf", out, tmp_path / "vit")
    new = ["train", *TINY, *VIT, "train.max_steps=0", "eval.every=0"]
    for heads in (6, 12):   # the same weight shapes: only config.json tells
        err = cli_error(capsys, [*new, f"model.backbone_args.num_heads={heads}", f"run_dir={tmp_path / 'r'}",
                              "--init-from", str(out)])
        assert f"num_heads: export unset (timm's default), this config {heads}" in err
        assert not (tmp_path / "r").exists()
        err = cli_error(capsys, ["eval", "knn", "--checkpoint", str(out), f"model.backbone_args.num_heads={heads}"])
        assert "num_heads" in err and "model.backbone_args=" in err
    err = cli_error(capsys, [*new, "model.backbone_args.patch_size=4", "model.backbone_args.img_size=16",
                          f"run_dir={tmp_path / 'r'}", "--init-from", str(out)])
    assert "img_size: export 32, this config 16; patch_size: export 8, this config 4" in err
    err = cli_error(capsys, ["train", *TINY, "train.max_steps=0", "eval.every=0", *VIT[1:], f"run_dir={tmp_path / 'r'}",
                          "model.backbone=timm/vit_small_patch16_224", "--init-from", str(out)])
    assert "architecture: export vit_tiny_patch16_224, this config vit_small_patch16_224" in err
    # the same model, a training-only argument changed: loads
    assert main([*new, "model.backbone_args.drop_path_rate=0.1", f"run_dir={tmp_path / 'ok'}",
                 "--init-from", str(out)]) == 0
