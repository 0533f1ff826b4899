"""The process group follows the device a run trains on (issue 17, defect 1): a CPU run on a machine
with GPUs joins on gloo and never touches CUDA; a CUDA run joins on NCCL with its LOCAL_RANK's GPU,
and asking for more GPUs than are visible is a clear error. The GPU is faked: torch.cuda's queries and
the process-group call are patched, so this runs on any machine."""
import pytest
import torch
import torch.distributed as dist

from conftest import TINY
from selfsup.config import load_config
from selfsup.engine.setup import setup_env
from selfsup.errors import ConfigError
from selfsup.parallel import distributed as D


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with `n` GPUs, under torchrun as rank 1 of 2; returns what CUDA and the group saw."""
    seen = {"set_device": [], "backend": None}

    def make(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen["set_device"].append(int(i)))
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)   # restored after
        monkeypatch.setattr(D, "is_dist", lambda: False)
        monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend))
        for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
            monkeypatch.setenv(k, v)
        return seen
    return make


def _cfg(device):
    return load_config(None, TINY + ["train.batch_size=32", f"device={device}"])


def test_cpu_run_on_a_gpu_machine_joins_on_gloo(fake_gpus):
    seen = fake_gpus(1)
    env = setup_env(_cfg("cpu"))
    assert seen == {"set_device": [], "backend": "gloo"}
    assert env.device == torch.device("cpu") and (env.rank, env.local_rank, env.world) == (1, 1, 2)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cuda_run_joins_on_nccl_with_its_local_gpu(fake_gpus, device):
    seen = fake_gpus(2)
    env = setup_env(_cfg(device))
    assert seen["backend"] == "nccl" and set(seen["set_device"]) == {1}
    assert env.device == torch.device("cuda", 1) and env.amp == torch.bfloat16


def test_more_processes_than_gpus_is_a_clear_error(fake_gpus):
    seen = fake_gpus(1)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 needs GPU 1, but 1 GPU\(s\) are visible.*device=cpu"):
        setup_env(_cfg("cuda"))
    assert seen["backend"] is None   # nothing joined
