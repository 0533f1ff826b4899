"""`selfsup eval linear|logreg|finetune` end to end on a tiny synthetic run."""
import json

import pytest

from selfsup.cli import main

from conftest import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("evalrun") / "run"
    assert main(["train", *TINY, "train.max_steps=2", "eval.every=0", f"run_dir={run}"]) == 0
    return run


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_linear(run, capsys):
    assert main(["eval", "linear", "--run", str(run), "eval.linear_epochs=3"]) == 0
    res = last_json(capsys)
    assert {"linear_top1", "linear_top5", "linear_train_top1", "protocol"} <= set(res)
    assert "linear (features)" in res["protocol"] and "3 epochs" in res["protocol"]
    assert json.loads((run / "eval/linear.json").read_text()) == res
    argv = ["eval", "linear", "--checkpoint", str(run / "checkpoints/last.pt"), "eval.linear_mode=augment",
            "eval.linear_epochs=1", "eval.linear_lr=1.0", "eval.linear_batch_size=500"]
    assert main(argv) == 0
    res = last_json(capsys)
    assert "linear (augment)" in res["protocol"] and "step schedule" in res["protocol"] and 0 <= res["linear_top1"] <= 1


def test_eval_logreg(run, capsys):
    assert main(["eval", "logreg", "--run", str(run), "eval.logreg_l2_count=3", "eval.logreg_max_iter=30"]) == 0
    res = last_json(capsys)
    assert {"logreg_top1", "logreg_top5", "logreg_l2", "logreg_C", "logreg_val", "protocol"} <= set(res)
    assert res["logreg_l2"] in [r["l2"] for r in res["logreg_val"]] and len(res["logreg_val"]) == 3
    assert json.loads((run / "eval/logreg.json").read_text()) == res


def test_eval_finetune(run, capsys):
    argv = ["eval", "finetune", "--run", str(run), "eval.finetune_epochs=1", "eval.finetune_batch_size=16",
            "eval.finetune_from_head_layer=1"]
    assert main(argv) == 0
    res = last_json(capsys)
    for tag, n in (("1pct", 20), ("10pct", 200)):   # synthetic: 2000 training images, 10 classes
        assert {f"finetune_{tag}_top1", f"finetune_{tag}_top5", f"finetune_{tag}_train_top1"} <= set(res)
        assert res[f"finetune_{tag}_labels"] == n
        assert len(json.loads((run / f"eval/finetune_subset_{tag}.json").read_text())["indices"]) == n
    assert "first 1 projection-head layer" in res["protocol"]
    assert json.loads((run / "eval/finetune.json").read_text()) == res


@pytest.mark.parametrize("argv,needle", [
    (["finetune", "eval.finetune_fractions=[0.0]"], "(0, 1]"),
    (["finetune", "eval.test_split=train"], "disjoint"),
    (["finetune", "eval.finetune_from_head_layer=2"], "hidden layer"),
    (["linear", "eval.linear_mode=nope"], "features, augment"),
    (["logreg", "eval.logreg_val_fraction=1.0"], "logreg_val_fraction"),
])
def test_bad_settings_exit_2(run, argv, needle, capsys):
    assert main(["eval", argv[0], "--run", str(run), *argv[1:]]) == 2
    assert needle in capsys.readouterr().err


def test_another_runs_checkpoint_is_never_filed_under_the_run(run, tmp_path_factory, capsys):
    other = tmp_path_factory.mktemp("evalrun") / "other"
    assert main(["train", *TINY, "train.max_steps=2", "eval.every=0", "seed=7", f"run_dir={other}"]) == 0
    ck = other / "checkpoints/last.pt"
    before = sorted((run / "eval").glob("*")) if (run / "eval").exists() else []
    for argv in (["eval", "knn"], ["eval", "linear"], ["eval", "logreg"], ["eval", "finetune"], ["embed"],
                 ["visualize", "--method", "pca"], ["eval", "detection"]):
        assert main([*argv, "--run", str(run), "--checkpoint", str(ck)]) == 2
        err = capsys.readouterr().err
        assert "is not a file of run" in err and "--out DIR" in err, err
    assert (sorted((run / "eval").glob("*")) if (run / "eval").exists() else []) == before
    out = tmp_path_factory.mktemp("other-eval")
    for protocol, extra in (("knn", "eval.knn_k=5"), ("linear", "eval.linear_epochs=1")):
        assert main(["eval", protocol, "--run", str(run), "--checkpoint", str(ck), "--out", str(out), extra]) == 0
        res = last_json(capsys)
        assert res["protocol"].endswith(f"; encoder: {ck.resolve()}")
        assert json.loads((out / f"{protocol}.json").read_text()) == res
    # key=value after an option's value; the run's own checkpoint goes under the run, named
    assert main(["eval", "knn", "--run", str(run), "--checkpoint", str(run / "checkpoints/last.pt"), "--k", "1",
                 "eval.knn_k=5"]) == 0
    assert "k=5" in last_json(capsys)["protocol"]
    assert "; encoder: " in json.loads((run / "eval/knn.json").read_text())["protocol"]
