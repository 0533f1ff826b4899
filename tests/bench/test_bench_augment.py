"""Smoke tests of `selfsup bench augment` (selfsup.bench.augment): quick run only (size 32, batch 64), not timed."""
import json

import pytest

from selfsup.bench.augment import format_table, run, source_size


def _check_rows(rows):
    assert {r["pipeline"] for r in rows} == {"batched", "torchvision"}
    for r in rows:
        assert r["size"] == 32 and r["source_size"] == 32 and r["batch"] == 64
        assert r["images_per_s"] > 0 and r["ms_per_batch"] > 0 and r["threads"] >= 1
    for r in rows:
        if r["pipeline"] == "batched":
            assert r["workers"] is None and r["speedup"] > 0
        else:
            assert r["workers"] == 0


def test_run_quick_writes_json(tmp_path):
    out = tmp_path / "a.json"
    res = run({"quick": True, "out": str(out)})
    assert out.is_file()
    saved = json.loads(out.read_text())
    _check_rows(saved["rows"])
    assert saved["config"]["quick"] is True and saved["config"]["sizes"] == [32]
    notes = " ".join(saved["notes"])
    assert "CPUs" in notes and "torch" in notes and "GPU" in notes
    assert "images/s" in res["table"] and "speedup" in res["table"]


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown benchmark settings.*nonsense"):
        run({"quick": True, "nonsense": 1})
    with pytest.raises(ValueError, match="unknown device"):
        run({"quick": True, "device": "tpu"})


def test_cli_quick(tmp_path, capsys):
    from selfsup.cli import main

    out = tmp_path / "cli.json"
    assert main(["bench", "augment", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    _check_rows(json.loads(out.read_text())["rows"])
    printed = capsys.readouterr().out
    assert "images/s" in printed and "note: machine" in printed


def test_source_size_and_table():
    assert [source_size(s) for s in (32, 96, 224)] == [32, 96, 256]
    row = dict(pipeline="batched", device="cpu", size=224, source_size=256, batch=8, workers=None, threads=2,
               images_per_s=100.0, ms_per_batch=80.0, speedup=3.0)
    assert "3.0x" in format_table([row])
