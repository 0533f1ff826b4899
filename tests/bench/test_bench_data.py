"""Smoke tests of `selfsup bench data` (selfsup.bench.data): CI-sized (2 x 16 small images, batch 8)."""
import json

import pytest

from selfsup.bench.data import READERS, default_workers, run


def _check_rows(rows, readers, decodes):
    assert sorted({(r["reader"], r["decode"]) for r in rows}) == sorted((a, b) for a in readers for b in decodes)
    for r in rows:
        assert r["device"] == "cpu" and r["workers"] == 0 and r["batch"] == 8
        assert r["images_per_s"] > 0 and r["loader_only_images_per_s"] > 0 and r["ms_per_batch"] > 0
        assert r["views_per_s"] == pytest.approx(2 * r["images_per_s"])


def test_run_quick_writes_json(tmp_path):
    out = tmp_path / "bench" / "data.json"
    res = run({"quick": True, "out": str(out), "data": str(tmp_path / "set"), "decodes": ["cpu"], "device": "cpu"})
    _check_rows(res["rows"], READERS, ["cpu"])
    saved = json.loads(out.read_text())
    _check_rows(saved["rows"], READERS, ["cpu"])
    assert saved["config"]["generated"] and saved["config"]["quick"] is True
    assert "others_cpu_share" in saved["config"]
    assert (tmp_path / "set" / "train.zip").is_file() and (tmp_path / "set" / "train").is_dir()
    notes = " ".join(saved["notes"])
    assert "CPUs" in notes and "torch" in notes and "source images" in notes and "zip-cached" in notes
    assert "e2e img/s" in res["table"]
    # a second run reuses the generated set
    again = run({"quick": True, "data": str(tmp_path / "set"), "readers": ["zip"], "decodes": ["cpu"],
                 "device": "cpu"})
    assert any("reused" in n for n in again["notes"]) and len(again["rows"]) == 1


def test_cli_quick(tmp_path, capsys):
    from selfsup.cli import main

    out = tmp_path / "cli.json"
    assert main(["bench", "data", "--quick", "--data", str(tmp_path / "set"), "--readers", "zip-cached",
                 "--decodes", "device", "--repeats", "2", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    _check_rows(rows, ["zip-cached"], ["device"])
    printed = capsys.readouterr().out
    assert "loader img/s" in printed and "note: machine" in printed


def test_unknown_setting():
    with pytest.raises(ValueError, match="unknown benchmark settings"):
        run({"quick": True, "nonsense": 1})


def test_default_workers():
    assert default_workers(2) == [0, 1, 2]
    assert default_workers(1) == [0, 1]
    assert default_workers(12) == [0, 2, 4, 8, 12]
    assert default_workers(64) == [0, 2, 4, 8, 16]
