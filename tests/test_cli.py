import argparse
import json

import pytest

from selfsup.cli import build_parser, main

from conftest import TINY


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_list_presets(capsys):
    assert main(["train", "--list"]) == 0
    assert "simclr-fmnist-cpu" in capsys.readouterr().out.split()


@pytest.mark.parametrize("argv,needle", [
    (["train", "no-such-preset"], "Valid presets"),
    (["train", "simclr-fmnist-cpu", "train.nope=1"], "Valid keys"),
    (["train", "simclr-fmnist-cpu", "method=byol"], "Valid methods"),
    (["train", "--resume", "/nonexistent/run"], "not a run directory"),
    (["eval", "knn", "--run", "/nonexistent/run"], "does not exist"),
    (["bench", "nope"], "Valid: classifier, throughput, augment, data, methods"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_missing_dataset_names_the_paths_tried(tmp_path, capsys):
    argv = ["train", "simclr-fmnist-cpu", "data.name=cifar10", f"data.root={tmp_path}", f"run_dir={tmp_path / 'r'}"]
    assert main(argv) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_train_then_eval_knn(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "train.epochs=1", f"run_dir={run}"]) == 0
    trained = last_json(capsys)
    assert trained["run_dir"] == str(run) and "knn_top1" in trained
    assert main(["eval", "knn", "--run", str(run)]) == 0
    res = last_json(capsys)
    assert res["knn_top1"] == pytest.approx(trained["knn_top1"])
    assert json.loads((run / "eval/knn.json").read_text())["knn_top1"] == res["knn_top1"]
    assert "k=20" in res["protocol"]
    assert main(["eval", "knn", "--checkpoint", str(run / "checkpoints/last.pt"), "eval.knn_k=5"]) == 0
    assert "k=5" in last_json(capsys)["protocol"]


def test_bench_list_reads_the_registry(capsys):
    from selfsup.bench import BENCHES

    assert main(["bench", "--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(BENCHES)


def _command_paths(parser, path=()):
    """Every command line that names a (sub)command: [], [train], [eval], [eval, knn], ..."""
    yield list(path)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*path, name))


def test_help_of_every_command_and_subcommand(capsys):
    from selfsup.bench import BENCHES

    paths = list(_command_paths(build_parser()))
    assert ["eval", "finetune"] in paths and ["fake-detection"] in paths
    for path in paths + [["bench", name] for name in BENCHES]:
        for flag in ("--help", "-h"):
            with pytest.raises(SystemExit) as e:
                main([*path, flag])
            assert e.value.code == 0, path
            assert "usage:" in capsys.readouterr().out, path


def test_overrides_may_come_after_an_option(capsys):
    # the override reaches the config (an unknown key: refused there), not argparse's "unrecognized arguments"
    assert main(["train", "simclr-fmnist-cpu", "--resume-if-exists", "train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:   # an unknown option stays an error
        main(["train", "simclr-fmnist-cpu", "--resume-if-exits", "train.epochs=1"])
    assert e.value.code == 2 and "unrecognized arguments: --resume-if-exits" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # as does a key=value for a command that takes none
        main(["report", "--run", "r", "train.epochs=1"])
