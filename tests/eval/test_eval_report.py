import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from selfsup.cli import main
from selfsup.eval.report import NONE_YET, SECTIONS, eval_results, write_report

from conftest import TINY


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", *TINY, "train.max_steps=3", "train.log_every=1", f"run_dir={run}"]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A fresh copy of the trained run, so each test writes its own eval/ files."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    return dst


def embedded_images(page):
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    for b in imgs:
        Image.open(io.BytesIO(base64.b64decode(b))).verify()
    return imgs


def assert_self_contained(page):
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page


def test_report_on_a_run_without_evals(run, capsys):
    assert main(["report", "--run", str(run)]) == 0
    res = last_json(capsys)
    assert res["html"] == str(run / "report.html") and res["markdown"] == str(run / "report.md")
    page, md = (run / "report.html").read_text(), (run / "report.md").read_text()
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in page and f"## {name}" in md
    assert_self_contained(page)
    assert len(embedded_images(page)) == 1                 # the training curves
    assert page.count(NONE_YET) >= 2                       # evaluations and plots
    assert "![training curves](report_files/curves.png)" in md and (run / "report_files/curves.png").is_file()
    assert "simclr" in page and "resnet_small" in page
    assert "method: simclr" in page and "```yaml\nrun_dir:" in md           # config verbatim
    for key in ("python", "torch", "torchvision", "selfsup", "device", "cpu_count", "git_commit"):
        assert f"| {key} |" in md
    px = np.asarray(Image.open(run / "report_files/curves.png").convert("RGB"))
    assert px.std() > 10 and len(np.unique(px.reshape(-1, 3), axis=0)) > 5


def test_report_lists_every_eval_file_and_plot(run, capsys):
    assert main(["eval", "knn", "--run", str(run), "--k", "5,20", "--t", "0.1"]) == 0
    capsys.readouterr()
    ev = run / "eval"
    (ev / "linear.json").write_text(json.dumps({
        "linear_top1": 0.5, "linear_top5": 0.9, "bank_top1": 0.25, "epochs": 3, "ok": True, "note": "x",
        "protocol": "linear probe, frozen features", "protocol_bank": "memory bank protocol"}))
    (ev / "notes.json").write_text(json.dumps({"top1": 0.1}))           # no protocol: not an evaluation
    (ev / "broken.json").write_text("{")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)).save(ev / "extra.png")
    res = write_report(run)
    assert res["evals"] == ["knn.json", "linear.json"] and res["plots"] == [str(ev / "extra.png")]
    page, md = (run / "report.html").read_text(), (run / "report.md").read_text()
    assert_self_contained(page)
    assert len(embedded_images(page)) == 2                 # curves + extra.png
    assert "![extra](eval/extra.png)" in md
    assert "| linear.json | linear_top1 | 0.5000 | linear probe, frozen features |" in md
    assert "| linear.json | bank_top1 | 0.2500 | memory bank protocol |" in md
    assert "| linear.json | epochs | 3 |" in md and "| ok |" not in md and "| note |" not in md
    assert "| knn.json | knn_top1 |" in md and "weighted kNN k=20" in md
    assert "**knn.json: sweep**" in md and "| k | t | top1 | top5 |" in md
    assert "notes.json" not in md
    assert "Plots</h2>\n<p class=none>" not in page


def test_report_on_a_bare_run_dir(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.yaml").write_text("method: simclr\n")
    res = write_report(run)
    assert res["curves"] is None and res["evals"] == [] and res["plots"] == []
    page = (run / "report.html").read_text()
    for name in SECTIONS:
        assert f"<h2>{name}</h2>" in page
    assert page.count(NONE_YET) >= 4                       # curves, final kNN, evaluations, plots
    assert embedded_images(page) == []


def test_eval_results_picks_the_matching_protocol(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/knn.json").write_text(json.dumps(
        {"knn_top1": 0.8, "knn_bank_top1": 0.7, "protocol": "A", "protocol_bank": "B"}))
    rows = eval_results(tmp_path)[0]["rows"]
    assert rows == [("knn_top1", 0.8, "A"), ("knn_bank_top1", 0.7, "B")]


def test_report_bad_input_exits_2(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", "--run", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report"])                                   # --run is required


def test_time_to_knn_is_the_first_event_reaching_the_threshold():
    from selfsup.eval.report import time_to_knn

    events = [{"event": "train", "step": 1, "wall_time": 1.0},
              {"event": "knn", "step": 10, "epoch": 1, "knn_top1": 0.84, "wall_time": 30.0},
              {"event": "knn", "step": 20, "epoch": 2, "knn_top1": 0.91, "wall_time": 61.0},
              {"event": "knn", "step": 30, "epoch": 3, "knn_top1": 0.89, "wall_time": 90.0},
              {"event": "knn", "step": 40, "epoch": 4, "knn_top1": 0.93, "wall_time": 120.0}]
    assert time_to_knn(events, 0.90)["wall_time"] == 61.0
    assert time_to_knn(events, 0.84)["step"] == 10
    assert time_to_knn(events, 0.95) is None
