"""W&B and MLflow, offline: a run sends them the scalars TensorBoard gets, the config and the final
metrics; both read back here from what they wrote (no network: the suite's audit hook refuses it)."""
import json
import struct

import pytest

from selfsup.cli import main
from selfsup.config import load_config
from selfsup.engine import trackers
from selfsup.errors import ConfigError

from conftest import TINY

RUN = TINY + ["train.epochs=1", "train.max_steps=40", "train.log_every=20", "eval.every=1"]


def _events(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _wandb_records(path):
    """The records of a W&B offline run file: a 7-byte header, then 32 KiB blocks of records, each a
    (crc32c, length, kind) header and a piece of one protobuf `Record` (kind 1: whole, 2-4: first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:   # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _items(update):
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}


def test_wandb_offline_gets_scalars_config_and_final(tmp_path, capsys):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    assert main(["train", *RUN, "log.wandb=true", f"run_dir={run}"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    recs = _wandb_records(files[0])
    config = [_items(r.run.config.update) for r in recs if r.WhichOneof("record_type") == "run"]
    assert config and config[0]["train"]["batch_size"] == 32 and config[0]["method"] == "simclr"
    history = [_items(r.history.item) for r in recs if r.WhichOneof("record_type") == "history"]
    train = [e for e in _events(run) if e["event"] == "train"]
    logged = {h["_step"]: h for h in history if "loss" in h}
    assert sorted(logged) == [e["step"] for e in train]
    for e in train:   # the same scalars as metrics.jsonl / TensorBoard
        assert logged[e["step"]]["loss"] == pytest.approx(e["loss"])
        assert logged[e["step"]]["embed_rank"] == pytest.approx(e["embed_rank"])
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["knn_top1"] == pytest.approx(final["knn_top1"])
    assert json.loads((run / "trackers.json").read_text())["wandb"] in files[0].name


def test_mlflow_file_store_gets_scalars_config_and_final(tmp_path, capsys):
    mlflow = pytest.importorskip("mlflow")
    run = tmp_path / "run"
    assert main(["train", *RUN, "log.mlflow=true", f"run_dir={run}"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    got = client.get_run(run_id)
    assert got.data.params["train.batch_size"] == "32" and got.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    train = [e for e in _events(run) if e["event"] == "train"]
    assert history == pytest.approx({e["step"]: e["loss"] for e in train})
    assert got.data.metrics["knn_top1"] == pytest.approx(final["knn_top1"])
    local = client.download_artifacts(run_id, "final-metrics.json", str(tmp_path))
    assert json.loads(open(local).read())["knn_top1"] == pytest.approx(final["knn_top1"])


def test_a_missing_tracker_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    cfg = load_config(None, TINY + ["log.mlflow=true"])
    with pytest.raises(ConfigError, match=r"log.mlflow=true needs the mlflow package: pip install 'selfsup\[trackers\]'"):
        trackers.check_trackers(cfg)
