"""The non-finite guard: train.nonfinite = stop | skip | rollback, with an injected NaN loss."""
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_same_model
from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train
from selfsup.errors import NonFiniteLossError
from selfsup.methods.simclr import SimCLR


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({3, 5}): the 3rd and 5th forward calls of SimCLR return a NaN loss."""
    def install(calls):
        forward, count = SimCLR.forward, [0]

        def patched(self, views, index):
            out = forward(self, views, index)
            count[0] += 1
            if count[0] in calls:
                out["loss"] = out["loss"] * float("nan")
            return out

        monkeypatch.setattr(SimCLR, "forward", patched)
    return install


def events(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def run(tiny_overrides, tmp_path, name, *extra):
    args = [o for o in tiny_overrides if not o.startswith("run_dir=")]
    return train(load_config(None, args + [f"run_dir={tmp_path / name}", "eval.every=0", "train.log_every=1",
                                           *extra]))


def test_skip_drops_exactly_the_bad_step_and_lowers_the_lr(tiny_overrides, tmp_path, nan_at):
    run(tiny_overrides, tmp_path, "clean", "train.max_steps=2")
    nan_at({3})
    out = run(tiny_overrides, tmp_path, "skip", "train.max_steps=3", "train.nonfinite=skip")
    assert out["step"] == 3
    assert_same_model(tmp_path / "clean", tmp_path / "skip")   # step 3 changed nothing, BN stats included
    oa = load_checkpoint(tmp_path / "clean/checkpoints/last.pt")["optimizer"]["state"]
    ob = load_checkpoint(tmp_path / "skip/checkpoints/last.pt")["optimizer"]["state"]
    for k in oa:
        for name in oa[k]:
            assert torch.equal(oa[k][name], ob[k][name])
    (ev,) = events(tmp_path / "skip", "nonfinite")
    assert ev["action"] == "skip" and ev["step"] == 2 and ev["loss"] == "nan"
    ckpt = load_checkpoint(tmp_path / "skip/checkpoints/last.pt")
    base = load_checkpoint(tmp_path / "clean/checkpoints/last.pt")["scheduler"]["base_lrs"]
    assert ckpt["scheduler"]["base_lrs"] == [b * 0.5 for b in base] and ckpt["nonfinite_events"] == 1


def test_rollback_returns_to_the_last_checkpoint_and_finishes(tiny_overrides, tmp_path, nan_at):
    nan_at({6})
    out = run(tiny_overrides, tmp_path, "rb", "train.max_steps=8", "train.nonfinite=rollback",
              "train.checkpoint_every=4", "train.nonfinite_lr_factor=0.25")
    assert out["step"] == 8
    (ev,) = events(tmp_path / "rb", "nonfinite")
    assert ev["action"] == "rollback" and ev["step"] == 5 and ev["rolled_back_to"] == 4
    steps = [e["step"] for e in events(tmp_path / "rb", "train")]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]   # step 5 was done, rolled back, and done again
    ckpt = load_checkpoint(tmp_path / "rb/checkpoints/last.pt")
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())
    assert ckpt["nonfinite_events"] == 1


def test_rollback_without_a_checkpoint_and_too_many_events_stop(tiny_overrides, tmp_path, nan_at):
    nan_at({2})
    with pytest.raises(NonFiniteLossError, match="no checkpoint"):
        run(tiny_overrides, tmp_path, "a", "train.max_steps=8", "train.nonfinite=rollback")
    nan_at(set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match="nonfinite_max"):
        run(tiny_overrides, tmp_path, "b", "train.max_steps=20", "train.nonfinite=skip", "train.nonfinite_max=3")
    assert len(events(tmp_path / "b", "nonfinite")) == 3
    assert not (tmp_path / "b/checkpoints/last.pt").exists()
