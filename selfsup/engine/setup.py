"""Run set-up: the process group, the device, the precision and torch's settings for a config.

Every command that runs a network (training, the evaluations, the benchmarks) starts here, so a
config means the same device, precision and threads everywhere.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..parallel import distributed as D

__all__ = ["Env", "setup_env", "resolve_device", "data_on_device", "autocast_dtype", "configure_torch",
           "use_channels_last", "keep_freed_memory", "sync_batchnorm", "ddp_wrap", "hash_seed"]

# Device types that data.on_device moves in-memory datasets to. On a CPU the data is already there; the
# tests add "cpu" to run the accelerator's placement branch (datasets, labels and indices moved) on CI.
DATA_DEVICE_TYPES = ("cuda",)


@dataclass
class Env:
    """Where this process runs: its rank among `world` processes, its device and autocast dtype."""

    rank: int
    local_rank: int
    world: int
    device: torch.device
    amp: torch.dtype | None

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run directory and prints."""
        return self.rank == 0


def setup_env(cfg) -> Env:
    """Pick the device, join the process group torchrun describes (if any; a group made by the caller is
    reused) on the backend of that device (NCCL for cuda, gloo for cpu), and set precision, torch's
    threads, determinism and allocator for `cfg`. Collectives wait at most dist.timeout_s for a rank."""
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    rank, local_rank, world = D.setup_distributed("nccl" if device.type == "cuda" else "gloo", cfg.dist.timeout_s)
    configure_torch(cfg, device)
    return Env(rank, local_rank, world, device, autocast_dtype(cfg, device))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda when available, else cpu. 'cuda' without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process LOCAL_RANK={local_rank} needs GPU {local_rank}, but "
                              f"{torch.cuda.device_count()} GPU(s) are visible; start at most that many processes "
                              "per node (torchrun --nproc_per_node) or use device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def data_on_device(cfg, device: torch.device) -> bool:
    """Whether an in-memory (not streamed) dataset is moved to `device` (data.on_device, on a GPU)."""
    return bool(cfg.data.on_device) and device.type in DATA_DEVICE_TYPES


def autocast_dtype(cfg, device: torch.device):
    """The autocast dtype of train.precision on `device`: bf16 or None (fp32). auto: bf16 on cuda; fast:
    also on a CPU with AMX tiles (Sapphire Rapids and newer: oneDNN's bf16 convolutions run ~1.7x an fp32
    step; without AMX, bf16 on a CPU is emulated and slower than fp32)."""
    p = cfg.train.precision
    if p == "bf16" or (p in ("auto", "fast") and device.type == "cuda") or \
            (p == "fast" and device.type == "cpu" and cpu_has_amx()):
        return torch.bfloat16
    return None


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (fast bf16 matrix products in oneDNN)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def configure_torch(cfg, device: torch.device) -> None:
    """train.threads, train.deterministic; cuDNN's autotuner on CUDA (every step has the same shapes:
    pick the fastest kernels once); on CPU the allocator keeps freed memory (`keep_freed_memory`)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu":
        keep_freed_memory()


def use_channels_last(cfg, model: nn.Module, device: torch.device) -> bool:
    """train.channels_last, except on CPU for a model with a strided 1x1 conv of fewer than 16 input
    channels (resnet_small with model.width < 16): oneDNN (torch 2.14) corrupts the heap in that
    conv's channels-last backward on large inputs."""
    if cfg.train.channels_last and device.type == "cpu" and any(
            isinstance(m, nn.Conv2d) and m.in_channels < 16 and m.kernel_size == (1, 1) and m.stride != (1, 1)
            for m in model.modules()):
        D.say("train.channels_last off: a strided 1x1 conv with < 16 input channels crashes "
              "oneDNN's channels-last backward on CPU")
        return False
    return bool(cfg.train.channels_last)


def keep_freed_memory() -> None:
    """glibc: keep freed blocks in the process instead of returning them to the OS, so the large
    per-step activations are not page-faulted back in every step (about 13% of a CPU step measured by
    `selfsup bench throughput`). No-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: do not give the heap's top back
        libc.mallopt(-3, 1 << 25)   # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's maximum) from the heap
    except (OSError, AttributeError):   # not glibc
        pass


def sync_batchnorm(model: nn.Module, env: Env, wanted: bool) -> nn.Module:
    """`model` with synchronised BatchNorm when `wanted` under several GPU processes (torch's
    SyncBatchNorm has no CPU kernel), else `model` as it is. The parameters stay the same objects."""
    if wanted and env.world > 1 and env.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def ddp_wrap(model: nn.Module, env: Env, ignored: list | tuple = ()) -> nn.Module:
    """What a loop calls: `model` in DistributedDataParallel under several processes (on this
    process's GPU, if any), `model` itself in one. `ignored`: parameter and buffer names DDP leaves
    alone (no broadcast, no gradient sync)."""
    if env.world == 1:
        return model
    if ignored:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignored))
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def hash_seed(*parts) -> int:
    """A 63-bit seed that depends only on `parts` (ints and strings by their text, bytes as they are,
    joined by ":"): the first 8 bytes of their sha256, little-endian, shifted right by one. For seeds
    that must not depend on what was drawn before: each detection iteration's, a stream re-seeded
    on resume."""
    text = b":".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
