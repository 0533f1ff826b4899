import os
import sys
from pathlib import Path

import pytest
import torch

from selfsup.engine.checkpoint import load_checkpoint

torch.set_num_threads(1)   # deterministic and fair on a 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["SELFSUP_HEARTBEAT_S"] = "0"   # no "working" lines in the outputs tests read (test_progress covers it)

# Hermetic: the suite never reads the machine's datasets or the network, so a green run here is a
# green run on a machine where Fashion-MNIST was never installed. The loader searches no system folder
# (inherited by the suite's subprocesses), and this process refuses to open anything under the system
# data folder or to reach a non-local address (an audit hook: it sees every `open` and `connect`).
SYSTEM_DATA = "/usr/share/datasets"
os.environ["SELFSUP_SYSTEM_DATA"] = ""
os.environ.pop("SELFSUP_DATA", None)
LOCAL_HOSTS = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _hermetic(event: str, args: tuple) -> None:
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if os.path.abspath(path).startswith(SYSTEM_DATA):
            raise PermissionError(f"the test suite must not read the machine's datasets ({path})")
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL_HOSTS:
        raise PermissionError(f"the test suite must not use the network ({args[1]})")
    elif event == "socket.getaddrinfo" and args[0] not in LOCAL_HOSTS:
        raise PermissionError(f"the test suite must not use the network (lookup of {args[0]})")


sys.addaudithook(_hermetic)


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


def cli_error(capsys, argv) -> str:
    """The one `selfsup: error: ...` line of a command that must fail with exit code 2 (no traceback)."""
    from selfsup.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err
