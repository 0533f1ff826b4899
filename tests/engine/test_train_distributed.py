"""The trainer under torch.distributed on CPU (gloo): a real torchrun launch, and sharded kNN features."""
import json
import os
import subprocess
import sys

import torch

from dist_utils import run_distributed
from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.eval.features import extract_features
from selfsup.models.backbones import build_backbone

from conftest import TINY


def _features(rank, world_size, images):
    torch.manual_seed(0)
    net, _ = build_backbone("resnet_small", cifar_stem=False, width=8)
    return extract_features(net, images, batch_size=4, device=torch.device("cpu"))


def test_sharded_feature_extraction_keeps_order():
    images = torch.randint(0, 256, (23, 1, 16, 16), dtype=torch.uint8)   # 23: not divisible by 2 or 3
    single = _features(0, 1, images)
    for world in (2, 3):
        for got in run_distributed(_features, world, images):
            torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-5)


def _train_in_group(rank, world_size, overrides):
    from selfsup.engine.trainer import train
    return train(load_config(None, overrides))


def test_ddp_ranks_stay_in_sync(tmp_path):
    """Two gloo ranks train one model: parameters identical on both ranks after training."""
    run = tmp_path / "run"
    results = run_distributed(_train_in_group, 2, TINY + ["train.epochs=1", "eval.every=0", f"run_dir={run}"])
    assert results[0]["step"] == results[1]["step"] == 2000 // 32
    ck = load_checkpoint(run / "checkpoints/last.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]["aug_all"]) == 2


def test_torchrun_two_processes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "selfsup", "train", *TINY, "train.epochs=1", f"run_dir={run}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout.strip().splitlines()[-1])
    assert final["step"] == 2000 // 32 and 0 <= final["knn_top1"] <= 1
    assert (run / "encoder.safetensors").exists()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "final" for e in events) == 1    # rank 0 alone writes the log
