"""The collapse alarm: embed_std and embed_rank against a hand computation, logged at every log step,
one warning when the encoder is forced constant, none on a healthy run."""
import json
import math

import pytest
import torch

from selfsup.config import load_config
from selfsup.engine.collapse import CollapseAlarm, embedding_stats
from selfsup.engine.trainer import Trainer
from selfsup.eval.report import write_report

from conftest import TINY


def test_stats_against_a_float64_reference():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 16)
    u = torch.nn.functional.normalize(z.double(), dim=1)
    s = torch.linalg.svdvals(u)
    p = s / s.sum()
    got = embedding_stats(z)
    assert got["embed_std"] == pytest.approx(u.std(dim=0).mean().item(), rel=1e-5)
    assert got["embed_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-4)


def test_stats_at_the_extremes():
    same = embedding_stats(torch.ones(32, 8) * torch.arange(1.0, 9.0))   # every row the same point
    assert same["embed_std"] == pytest.approx(0, abs=1e-6) and same["embed_rank"] == pytest.approx(1, abs=1e-3)
    spread = embedding_stats(torch.eye(8).repeat(4, 1))   # each of the 8 directions equally
    assert spread["embed_rank"] == pytest.approx(8, rel=1e-4)
    d = 128   # isotropic in D dimensions: about 1/sqrt(D)
    iso = embedding_stats(torch.randn(4096, d, generator=torch.Generator().manual_seed(1)))
    assert iso["embed_std"] == pytest.approx(1 / math.sqrt(d), rel=0.02)


def test_alarm_fires_once_after_the_first_epoch_and_can_be_turned_off():
    alarm = CollapseAlarm(std_frac=0.1, min_rank=2.0)
    low = {"embed_std": 0.0, "embed_rank": 1.0}
    assert alarm.check(low, epoch=0, dim=16) is None   # a random init may look collapsed
    line = alarm.check(low, epoch=1, dim=16)
    assert line.startswith("collapse alarm") and "1/sqrt(16)" in line and "learning rate" in line
    assert alarm.check(low, epoch=2, dim=16) is None   # once
    assert CollapseAlarm(0, 0).check(low, epoch=5, dim=16) is None


def _run(tmp_path, constant: bool, capsys):
    over = ["train.epochs=2", "train.max_steps=70", "eval.every=0", f"run_dir={tmp_path / 'run'}"]
    cfg = load_config(None, TINY + over)
    trainer = Trainer(cfg)
    if constant:   # every image to one point: the head then maps them all to one embedding
        trainer.model.backbone.register_forward_hook(lambda mod, inp, out: out * 0 + 1)
    trainer.fit()
    events = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "train"], capsys.readouterr().out


def test_constant_encoder_sets_off_the_alarm(tmp_path, capsys):
    train, out = _run(tmp_path, True, capsys)
    assert out.count("collapse alarm") == 1
    assert all(e["embed_std"] < 1e-5 and e["embed_rank"] < 1.01 for e in train)
    report = write_report(tmp_path / "run")
    assert report["curves"]   # the curves carry both


def test_healthy_run_stays_quiet(tmp_path, capsys):
    train, out = _run(tmp_path, False, capsys)
    assert "collapse alarm" not in out
    assert all(e["embed_std"] > 0.1 / math.sqrt(16) and e["embed_rank"] > 2 for e in train)
