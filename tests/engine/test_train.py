import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfsup.config import ConfigError, load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train
from selfsup.errors import NonFiniteLossError

from conftest import TINY, assert_same_model


def events(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["event"] == kind]


def stable(e):   # what must match between an interrupted and an uninterrupted run
    return {k: v for k, v in e.items() if k not in ("views_per_s", "wall_time")}


def test_training_smoke_writes_the_run_directory(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    final = train(cfg)
    run = Path(cfg.run_dir)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "encoder.safetensors"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    assert final["step"] == 2 * (2000 // 32) and 0 <= final["knn_top1"] <= 1
    tr = events(run, "train")
    assert tr and all({"step", "epoch", "loss", "lr", "views_per_s"} <= e.keys() for e in tr)
    assert len(events(run, "knn")) == 2           # eval.every=1, two epochs
    assert tr[-1]["loss"] < tr[0]["loss"]          # it learns something
    assert load_config(str(run / "config.yaml")).train.batch_size == 32
    ck = load_checkpoint(run / "checkpoints/last.pt")
    assert {"model", "optimizer", "scheduler", "rng", "step", "epoch", "batch_in_epoch"} <= ck.keys()


def test_stop_and_resume_is_exact(tmp_path):
    full = train(load_config(None, TINY + [f"run_dir={tmp_path / 'a'}"]))
    train(load_config(None, TINY + [f"run_dir={tmp_path / 'b'}", "train.max_steps=71"]))   # mid epoch 2
    assert load_checkpoint(tmp_path / "b/checkpoints/last.pt")["step"] == 71
    resumed = train(load_config(str(tmp_path / "b/config.yaml"), ["train.max_steps=null"]), resume=str(tmp_path / "b"))
    assert_same_model(tmp_path / "a", tmp_path / "b")
    assert resumed["knn_top1"] == full["knn_top1"] and resumed["loss"] == full["loss"]


def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path):
    args = TINY + ["train.epochs=3", "train.checkpoint_every=5"]
    train(load_config(None, args + [f"run_dir={tmp_path / 'a'}"]))
    cmd = [sys.executable, "-m", "selfsup", "train", *args, f"run_dir={tmp_path / 'b'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ckpt = tmp_path / "b/checkpoints/last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = load_checkpoint(ckpt)["step"]
    assert 0 < killed_at < 3 * 62
    out = subprocess.run([sys.executable, "-m", "selfsup", "train", "--resume", str(tmp_path / "b")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["step"] == 3 * 62
    assert_same_model(tmp_path / "a", tmp_path / "b")
    for kind in ("train", "knn"):   # the resumed log has no gaps and no duplicates
        assert [stable(e) for e in events(tmp_path / "a", kind)] == [stable(e) for e in events(tmp_path / "b", kind)]
    fa, fb = events(tmp_path / "a", "final")[0], events(tmp_path / "b", "final")[0]
    assert fa["knn_top1"] == fb["knn_top1"] and fa["loss"] == fb["loss"] and fa["step"] == fb["step"]


def test_non_finite_loss_stops_without_checkpoint(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.lr=1e30", "train.optimizer=sgd", "train.warmup_epochs=0",
                                               "train.checkpoint_every=1"])
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        train(cfg)
    ckpt = Path(cfg.run_dir) / "checkpoints/last.pt"
    if ckpt.exists():   # any checkpoint written must hold a finite state
        for v in load_checkpoint(ckpt)["model"].values():
            assert torch.isfinite(v.float()).all()


def test_fresh_run_refuses_a_used_run_dir(tiny_overrides):
    train(load_config(None, tiny_overrides + ["train.max_steps=2", "eval.every=0"]))
    with pytest.raises(ConfigError, match="--resume"):
        train(load_config(None, tiny_overrides))
