"""Smoke tests of `selfsup bench throughput` (selfsup.bench.throughput): CI-sized, a few seconds each."""
import json

import pytest

from selfsup.bench.throughput import count_backbone_flops, run


def _check_rows(rows):
    assert [r["mode"] for r in rows] == ["synthetic", "pipeline"]
    for r in rows:
        assert r["method"] == "simclr" and r["backbone"] == "resnet_small"
        assert r["image_size"] == 32 and r["batch"] == 16 and r["n_views"] == 2
        assert r["views_per_s"] > 0 and r["ms_per_step"] > 0
        assert r["gflop_per_view"] > 0 and r["gflop_per_step"] > 0 and r["tflops"] > 0
        assert 0.0 <= r["data_share"] < 1.0
        assert r["peak_mem_mib"] > 0   # CUDA: max allocated; CPU: the step's peak RSS growth
        assert r["micro_batch"] is None and r["checkpointing"] is False
        # views/s and the mean ms/step come from the same wall clock: batch x views per step
        assert r["views_per_s"] == pytest.approx(16 * 2 * 1e3 / r["ms_per_step_mean"], rel=1e-6)
    assert rows[0]["data_share"] == 0.0 and rows[1]["data_ms"] > 0
    # the same backbone in both modes: the same counted FLOPs
    assert rows[0]["gflop_per_step"] == rows[1]["gflop_per_step"]
    assert rows[0]["gflop_per_step"] == pytest.approx(3 * 2 * 16 * rows[0]["gflop_per_view"])


def test_run_quick_writes_json(tmp_path):
    out = tmp_path / "tp.json"
    res = run({"quick": True, "out": str(out)})
    _check_rows(res["rows"])
    saved = json.loads(out.read_text())
    _check_rows(saved["rows"])
    assert saved["notes"] and "views/s" in res["table"]
    c = saved["config"]
    for key in ("device", "device_name", "torch", "precision", "compile", "channels_last"):
        assert key in c
    assert c["quick"] is True and c["dataset"] == "synthetic"


def test_cli_quick(tmp_path, capsys):
    from selfsup.cli import main

    out = tmp_path / "cli.json"
    main(["bench", "throughput", "--quick", "--out", str(out)])
    _check_rows(json.loads(out.read_text())["rows"])
    assert "TFLOP/s" in capsys.readouterr().out


def test_resnet18_cifar_flops():
    """ResNet-18 with the CIFAR stem at 32x32, one image: 555.4 M multiply-adds (the usual '0.56 G'):
    conv1 3*9*64*32^2 = 1.77 M; layer1 4 * 64*9*64*32^2 = 151.0 M; layers 2-4 each
    18.9 M (strided 3x3) + 3 * 37.7 M (3x3) + 2.1 M (1x1 downsample) = 134.2 M. x2 FLOPs = 1.111 GFLOP."""
    from selfsup.models.backbones import build_backbone

    backbone, _ = build_backbone("resnet18", cifar_stem=True)
    macs = 3 * 9 * 64 * 32**2 + 4 * 64 * 9 * 64 * 32**2 + 3 * (2**27)
    assert macs == 555_417_600
    flops = count_backbone_flops(backbone, 32)
    assert flops == pytest.approx(1.11e9, rel=0.05)
    assert flops == pytest.approx(2 * macs, rel=0.01)
    assert backbone.training   # counted on a copy: the model is untouched


def test_unknown_settings_raise():
    with pytest.raises(ValueError, match="unknown benchmark settings"):
        run({"bogus": 1})
    with pytest.raises(ValueError, match="unknown mode"):
        run({"quick": True, "modes": ["nope"]})
    with pytest.raises(ValueError, match="unknown data"):
        run({"quick": True, "data": "imagenet"})
    with pytest.raises(ValueError):   # ConfigError: an unknown config key in the overrides
        run({"quick": True, "overrides": ["model.nope=1"]})


def test_the_bench_times_the_trainers_own_step(monkeypatch, tmp_path):
    """`selfsup bench throughput` runs the trainer's TrainStep, not a copy of it: the class's two halves,
    patched with counters, see every bench step (CPU priming 1 + two modes x (1 warm-up + 2 timed +
    2 memory steps: RSS, tensors)), and every step of a training run."""
    from conftest import TINY
    from selfsup.config import load_config
    from selfsup.engine.step import TrainStep
    from selfsup.engine.trainer import train

    calls = {"forward_backward": 0, "update": 0}
    for name in calls:
        real = getattr(TrainStep, name)

        def counted(self, *a, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, *a)

        monkeypatch.setattr(TrainStep, name, counted)
    run({"quick": True, "warmup": 1, "steps": 2, "device": "cpu"})   # the CPU priming run is counted too
    assert calls == {"forward_backward": 11, "update": 11}
    calls.update(forward_backward=0, update=0)
    train(load_config(None, TINY + ["train.max_steps=3", "eval.every=0", f"run_dir={tmp_path / 'run'}"]))
    assert calls == {"forward_backward": 3, "update": 3}


def test_the_classifier_bench_runs_pics_row_update():
    import selfsup.bench.classifier as bench
    import selfsup.methods.pic as pic
    from selfsup.instance import Targets, row_sgd_

    assert bench.row_sgd_ is pic.row_sgd_ is row_sgd_ and bench.Targets is pic.Targets is Targets


def test_one_row_per_micro_batch_and_checkpointing_pair(tmp_path, monkeypatch):
    """--micro-batch / --checkpointing lists: every pair measured, in order, with its own memory figures;
    the trainer's TrainStep gets the micro-batch (train.micro_batch), the backbone the checkpointing."""
    from selfsup.engine.step import TrainStep

    seen = []
    real_init = TrainStep.__init__

    def init(self, model, *a):
        seen.append((a[-1] if len(a) == 5 else None, model.backbone.checkpointing))
        real_init(self, model, *a)

    monkeypatch.setattr(TrainStep, "__init__", init)
    out = tmp_path / "mem.json"
    res = run({"quick": True, "modes": ["synthetic"], "micro_batch": "none,8", "checkpointing": "off,on",
               "device": "cpu", "out": str(out)})
    pairs = [(None, False), (None, True), (8, False), (8, True)]
    for rows in (res["rows"], json.loads(out.read_text())["rows"]):
        assert [(r["micro_batch"], r["checkpointing"]) for r in rows] == pairs
        assert all(r["mode"] == "synthetic" and r["views_per_s"] > 0 for r in rows)
        assert all(r["peak_mem_mib"] > 0 and r["tensor_peak_mib"] > 0 for r in rows)
    assert seen[1:] == pairs   # after the CPU priming run (the first pair)
    c = json.loads(out.read_text())["config"]
    assert c["micro_batch"] == [None, 8] and c["checkpointing"] == [False, True]
    assert "micro" in res["table"] and "ckpt" in res["table"] and "tensor MiB" in res["table"]
    # the tensor peak is deterministic: checkpointing keeps fewer activations at once
    by = {(r["micro_batch"], r["checkpointing"]): r["tensor_peak_mib"] for r in res["rows"]}
    assert by[(None, True)] < by[(None, False)]


def test_cli_micro_batch_and_checkpointing_lists(tmp_path):
    from selfsup.cli import main

    out = tmp_path / "cli.json"
    main(["bench", "throughput", "--quick", "--modes", "synthetic", "--steps", "1", "--micro-batch", "8",
          "--checkpointing", "on", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["micro_batch"], r["checkpointing"]) for r in rows] == [(8, True)]


@pytest.mark.parametrize("key,value,match", [
    ("micro_batch", "abc", "bad micro-batch value 'abc'"), ("micro_batch", "-4", "bad micro-batch value '-4'"),
    ("micro_batch", "1.5", "bad micro-batch"), ("checkpointing", "maybe", "bad checkpointing value 'maybe'"),
])
def test_bad_micro_batch_or_checkpointing_values_raise(key, value, match):
    with pytest.raises(ValueError, match=match):
        run({"quick": True, key: value})


def test_list_settings_parse():
    from selfsup.bench.throughput import checkpointings, micro_batches

    assert micro_batches(None) == [None] and checkpointings(None) == [None]   # not given: the preset's
    assert micro_batches("none, 1024,256,0") == ["null", "1024", "256", "null"]
    assert micro_batches([None, 4096, 0]) == ["null", "4096", "null"]
    assert checkpointings("off,on") == ["false", "true"] and checkpointings([True, False]) == ["true", "false"]
