"""`selfsup bench methods --quick`: every *-fmnist-cpu preset trained a few steps on synthetic data."""
import json

import pytest
import torch

from selfsup.bench.methods import QUICK, _preset_config, default_presets
from selfsup.cli import main
from selfsup.data.splits import load_eval_data
from selfsup.eval.baselines import pixel_baseline


def test_quick_writes_json_plot_and_table_with_a_row_per_preset(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "methods", "--quick", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(out / "methods.json")
    res = json.loads((out / "methods.json").read_text())
    presets = default_presets()
    assert len(presets) == 8 and "simclr-vit-fmnist-cpu" in presets
    assert [r["preset"] for r in res["rows"]] == presets
    assert [json.loads(x)["preset"] for x in (out / "rows.jsonl").read_text().splitlines()] == presets
    for r in res["rows"]:
        assert r["steps"] == 4 and not r["stopped_at_budget"]
        assert [p["step"] for p in r["curve"]] == [2, 4]   # --points 2 over 4 steps; the last is the final kNN
        assert r["knn_top1"] == r["curve"][-1]["knn_top1"]
        assert 0 <= r["linear_top1"] <= 1 and r["views_per_s"] > 0 and r["peak_mem_mib"] > 0
        assert r["train_s"] >= r["curve"][-1]["train_s"] > r["curve"][0]["train_s"] > 0
        assert (out / "runs" / r["preset"] / "encoder.safetensors").is_file()
    # the pixel baseline is the run's data scored with the run's kNN protocol (InstDisc's t=0.07 is its own)
    for r in res["rows"][:2]:
        cfg = _preset_config(r["preset"], list(QUICK["overrides"]), tmp_path / "x", 4)
        train, test = load_eval_data(cfg)
        assert r["baseline_pixels_top1"] == pytest.approx(
            pixel_baseline(cfg, train, test, torch.device("cpu"))["baseline_pixels_top1"])
    # one random-init baseline per backbone: the ResNets share theirs, the ViTs theirs
    rand = {r["random_init_of"]: r["baseline_random_init_top1"] for r in res["rows"]}
    assert len(rand) == 2
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "methods.md").read_text().splitlines()
    assert md[0].startswith("| preset | method | kNN top-1 | linear top-1 | minutes |") and len(md) == 2 + len(presets)


def test_unknown_preset_and_existing_run_are_refused(tmp_path, capsys):
    assert main(["bench", "methods", "--quick", "--presets", "nope-fmnist-cpu", "--out", str(tmp_path)]) == 2
    assert "unknown preset(s) nope-fmnist-cpu" in capsys.readouterr().err
    (tmp_path / "runs" / "simclr-fmnist-cpu").mkdir(parents=True)
    assert main(["bench", "methods", "--quick", "--presets", "simclr-fmnist-cpu", "--out", str(tmp_path)]) == 2
    assert "give another --out" in capsys.readouterr().err
