"""The suite is hermetic: no system datasets, no network (see conftest.py), and a config error needs
no data at all."""
import os
import socket
import subprocess
import sys
import time

import pytest

from selfsup.config import load_config
from selfsup.data.datasets import build_dataset
from selfsup.errors import ConfigError, DatasetNotFoundError


def test_the_system_data_folder_is_hidden_from_the_loader_and_unreadable():
    assert os.environ["SELFSUP_SYSTEM_DATA"] == "" and "SELFSUP_DATA" not in os.environ
    with pytest.raises(DatasetNotFoundError) as e:   # no data.root: nothing to search at all
        build_dataset("fashion-mnist", "train")
    assert "/usr/share/datasets" not in e.value.args[0].split("To get it:")[0]
    with pytest.raises(PermissionError, match="datasets"):
        open("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz", "rb")
    with pytest.raises(PermissionError, match="datasets"):
        os.listdir("/usr/share/datasets")


def test_the_network_is_refused():
    with pytest.raises(PermissionError, match="network"):
        socket.getaddrinfo("example.com", 443)
    with socket.socket() as s, pytest.raises(PermissionError, match="network"):
        s.connect(("93.184.215.14", 443))


@pytest.mark.parametrize("override,match", [
    ("data.cache_mode=full", "cache_mode"),       # a combination
    ("data.stream=true", "data.stream=true works for"),
    ("train.log_every=0", "train.log_every"),     # a range
    ("train.batch_size=255", "divisible"),        # the batch against the processes
])
def test_a_bad_config_fails_in_under_two_seconds_without_any_data(override, match, tmp_path, monkeypatch):
    """With WORLD_SIZE=2 as torchrun sets it: the error comes from the config check, before torch or
    a dataset (none is installed here) is loaded; in-process, and as the real command in a fresh
    process, which writes nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=match):
        load_config("simclr-fmnist-cpu", [override])
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "selfsup", "train", "simclr-fmnist-cpu", override,
                          f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 2 and out.stderr.startswith("selfsup: error:") and match in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
    assert elapsed < 2.0, f"{elapsed:.2f} s"
