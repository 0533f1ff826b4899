import os
from pathlib import Path

import pytest
import torch

from selfsup.engine.checkpoint import load_checkpoint

torch.set_num_threads(1)   # deterministic and fair on a 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "1")


# A tiny SimCLR config on synthetic data that trains in seconds on one CPU core.
TINY = [
    "method=simclr", "device=cpu", "data.name=synthetic", "model.backbone=resnet_small", "model.width=8",
    "model.cifar_stem=false", "model.head_hidden=32", "model.proj_dim=16", "train.batch_size=32",
    "train.epochs=2", "train.warmup_epochs=0.5", "train.log_every=5", "train.threads=1", "eval.knn_k=20",
    "aug.blur=false",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return TINY + [f"run_dir={tmp_path / 'run'}"]


def assert_same_model(run_a, run_b) -> dict:
    """Assert the last checkpoints of two run directories hold bit-identical model states
    (parameters and buffers: queues, banks, pointers). Returns run_a's state."""
    sa = load_checkpoint(Path(run_a) / "checkpoints/last.pt")["model"]
    sb = load_checkpoint(Path(run_b) / "checkpoints/last.pt")["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"
    return sa
