"""Run directories (issue 13): a refused resume writes nothing, default folders never mix, a fresh run
refuses a used folder, a failed start leaves nothing behind, stale *.tmp are removed, train.resume=auto."""
import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.engine import runs
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train
from selfsup.errors import ConfigError, DatasetNotFoundError

from conftest import TINY

FAST = TINY + ["train.max_steps=2", "eval.every=0"]


def hashes(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_refused_resume_leaves_the_run_untouched_and_a_plain_resume_still_works(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(None, FAST + [f"run_dir={run}"]))
    before = hashes(run)
    assert main(["train", "--resume", str(run), "model.backbone=resnet18", "train.batch_size=64"]) == 2
    err = capsys.readouterr().err
    assert "model.backbone: resnet_small -> resnet18" in err and "train.batch_size: 32 -> 64" in err
    assert err.count("selfsup: error:") == 1 and "run_dir=" in err
    assert hashes(run) == before   # byte for byte: config.yaml, checkpoint, metrics, tensorboard
    assert main(["train", "--resume", str(run), "train.max_steps=3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3
    assert main(["eval", "knn", "--run", str(run)]) == 0


def test_resume_applies_allowed_changes_and_removes_a_stale_tmp(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, FAST + [f"run_dir={run}"]))
    stale = run / "checkpoints" / "last.pt.abc123.tmp"   # the name save_checkpoint's mkstemp gives
    stale.write_bytes(b"half a checkpoint")
    cfg = load_config(str(run / "config.yaml"), ["train.max_steps=4", "eval.knn_k=5", "data.num_workers=1"])
    assert train(cfg, resume=str(run))["step"] == 4
    assert not stale.exists()
    saved = load_config(str(run / "config.yaml"))
    assert saved.train.max_steps == 4 and saved.eval.knn_k == 5
    assert load_checkpoint(run / "checkpoints/last.pt")["step"] == 4


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 24, 10, 15, 0)

    monkeypatch.setattr(runs, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    a = train(load_config(None, FAST))["run_dir"]
    b = train(load_config(None, FAST + ["seed=1"]))["run_dir"]
    assert a == "runs/simclr-20261124-101500" and b == "runs/simclr-20261124-101500-2"
    assert load_config(f"{a}/config.yaml").seed == 0 and load_config(f"{b}/config.yaml").seed == 1
    ck_a, ck_b = (load_checkpoint(f"{r}/checkpoints/last.pt") for r in (a, b))
    assert "seed: 0" in ck_a["config"] and "seed: 1" in ck_b["config"]


def test_a_fresh_run_refuses_a_non_empty_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 7}\n')   # an old run, no checkpoint
    before = hashes(run)
    with pytest.raises(ConfigError, match="not empty") as e:
        train(load_config(None, FAST + [f"run_dir={run}"]))
    # no checkpoint: nothing to --resume (issue 23: the suggested --resume failed)
    assert "--resume" not in str(e.value) and "run_dir=" in str(e.value) and "remove" in str(e.value)
    assert hashes(run) == before and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_a_run_that_never_checkpointed_is_refused_with_a_fix_that_works(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(None, FAST + [f"run_dir={run}"]))
    (run / "checkpoints/last.pt").unlink()   # as a run that failed in its first step leaves it
    assert main(["train", *FAST, f"run_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "--resume " not in err and "before its first checkpoint" in err and "--resume-if-exists" in err, err
    assert main(["train", *FAST, f"run_dir={run}", "--resume-if-exists"]) == 0   # the fix it names


def test_resume_auto_needs_a_fixed_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *FAST, "--resume-if-exists"]) == 2
    assert "needs a fixed run_dir" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="run_dir=DIR"):
        train(load_config(None, FAST + ["train.resume=auto"]))
    assert not Path("runs").exists()   # no timestamped folder was made


@pytest.mark.parametrize("preset", ["mocov2-fmnist-cpu", "pic-fmnist-cpu", "mocov3-vit-fmnist-cpu"])
def test_micro_batch_1_with_batchnorm_is_refused_before_any_folder(preset, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", preset, "data.name=synthetic", "train.batch_size=16", "train.max_steps=1", "eval.every=0",
            "train.threads=1", "train.micro_batch=1", f"run_dir={run}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.micro_batch=1 cannot train" in err and "train.micro_batch=2 or more" in err, err
    assert not run.exists()


def test_micro_batch_1_with_a_timm_batchnorm_backbone_leaves_no_folder(tmp_path, capsys):
    run = tmp_path / "run"   # a BN-free head (model.head_layers=1): the BN is seen when the model is built
    assert main(["train", *FAST, "model.backbone=timm/resnet18", "model.head_layers=1",
                 "train.micro_batch=1", f"run_dir={run}"]) == 2
    assert "timm/resnet18 (it has BatchNorm layers)" in capsys.readouterr().err and not run.exists()


def test_a_failed_start_leaves_no_folder(tmp_path, monkeypatch, capsys):
    bad_data = ["data.name=fashion-mnist", f"data.root={tmp_path / 'nowhere'}"]
    run = tmp_path / "new" / "run"
    with pytest.raises(DatasetNotFoundError):
        train(load_config(None, FAST + bad_data + [f"run_dir={run}"]))
    assert not run.exists()
    empty = tmp_path / "empty"   # a folder that was there (empty) stays, and stays empty
    empty.mkdir()
    assert main(["train", *FAST, *bad_data, f"run_dir={empty}"]) == 2
    assert empty.is_dir() and list(empty.iterdir()) == []
    monkeypatch.chdir(tmp_path)   # a default run directory is removed again
    assert main(["train", *FAST, *bad_data]) == 2
    assert not Path("runs").exists() or list(Path("runs").iterdir()) == []
    assert "selfsup: error:" in capsys.readouterr().err


def test_resume_auto_starts_fresh_then_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()   # empty: a fresh start
    auto = FAST + [f"run_dir={run}", "train.resume=auto"]
    assert train(load_config(None, auto))["step"] == 2
    # the relaunch of the same job continues the run (here with a longer max_steps)
    assert main(["train", *FAST, f"run_dir={run}", "train.max_steps=4", "--resume-if-exists"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and json.loads(out.strip().splitlines()[-1])["step"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    # auto on a folder that does not exist: a fresh start
    assert train(load_config(None, FAST + [f"run_dir={tmp_path / 'other'}", "train.resume=auto"]))["step"] == 2
    # auto still refuses a change the checkpoint does not allow, and writes nothing
    before = hashes(run)
    with pytest.raises(ConfigError, match="model.proj_dim: 16 -> 8"):
        train(load_config(None, auto + ["model.proj_dim=8"]))
    assert hashes(run) == before


def test_resume_auto_starts_over_a_start_killed_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, FAST + [f"run_dir={run}"]))
    (run / "checkpoints/last.pt").unlink()   # as if killed before the first save
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"event": "train", "step": 99}\n')
    assert train(load_config(None, FAST + [f"run_dir={run}", "train.resume=auto"]))["step"] == 2
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(e["step"] <= 2 for e in events) and events[-1]["event"] == "final"


def test_a_rank_timeout_says_resume_only_when_there_is_a_checkpoint(tmp_path, monkeypatch):
    from selfsup.engine import trainer as T
    from selfsup.errors import CollectiveTimeoutError

    def stuck(cfg, resume):
        raise RuntimeError("Timed out waiting 1000ms for recv operation to complete")

    for name, value in (("is_dist", lambda: True), ("rank", lambda: 1), ("world_size", lambda: 2)):
        monkeypatch.setattr(T.D, name, value)
    monkeypatch.setattr(T, "Trainer", stuck)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = load_config(None, FAST + [f"run_dir={run}"])
    with pytest.raises(CollectiveTimeoutError, match="no checkpoint yet") as e:
        T.train(cfg)
    assert "--resume " not in str(e.value)
    (run / "checkpoints/last.pt").write_bytes(b"a checkpoint")
    with pytest.raises(CollectiveTimeoutError, match=f"--resume {re.escape(str(run))}"):
        T.train(cfg)
