"""No host sync in a steady-state training step of any method (issue 25).

A step that reads a tensor back to the host (``.item()``, ``bool(t)``, ``int(t)``, ``.cpu()``,
``.tolist()``, a boolean mask, ``torch.unique``, ``torch.nonzero``) makes a GPU wait for the
host. On the CPU the step of every method runs under a probe that records every aten operation
that would read back on a GPU (and the Python-level reads), after two warm-up steps (a first step
may read once: MoCo v3's step count, InstDisc's Z) and with the classifier's CPU-only input checks
off (``no_host_checks``: the CPU then runs the GPU's code path).  PIC with sampled negatives or
smoothed labels builds data-dependent candidate sets (``torch.unique``, boolean masks): those and
only those reads are known and listed.  With a GPU, the same steps run under
``torch.cuda.set_sync_debug_mode("error")``.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from selfsup.config import load_config
from selfsup.engine.step import TrainStep, make_optimizer
from selfsup.instance import no_host_checks
from selfsup.methods import build_method

COMMON = ["device=cpu", "model.backbone=resnet_small", "model.width=4", "model.cifar_stem=false",
          "model.head_hidden=16", "model.proj_dim=8", "train.optimizer=sgd", "train.lr=0.1",
          "train.warmup_epochs=0", "train.weight_decay=1e-4", "seed=3", "train.batch_size=8"]
METHODS = {
    "simclr": ["method=simclr"],
    "simclr-lars": ["method=simclr", "train.optimizer=lars"],
    "mocov2": ["method=moco", "moco.queue_size=24", "moco.bn_splits=2"],
    "mocov3": ["method=mocov3", "mocov3.proj_hidden=16", "mocov3.proj_dim=8"],
    "instdisc-nce": ["method=instdisc", "instdisc.nce_k=10"],
    "instdisc-softmax": ["method=instdisc", "instdisc.loss=softmax"],
    "pic": ["method=pic", "pic.chunk_size=7"],
    "pic-fused": ["method=pic", "pic.fused=true"],
    "pic-multicrop": ["method=pic", "pic.small_crops=2", "pic.small_size=8", "pic.fused=true"],
    "pic-sampled": ["method=pic", "pic.negatives=8"],
    "millionway": ["method=pic", "pic.negatives=8", "pic.smooth_alpha=0.2", "pic.smooth_k=3", "pic.fused=true"],
}
# the reads of the data-dependent candidate sets of sampled negatives and smoothed labels (known, not fixed):
# torch.unique of the candidates, the boolean mask of this shard's ids, the boolean mask of the hard-class queries
KNOWN = {"pic-sampled": {"unique", "index[bool]"}, "millionway": {"unique", "index[bool]", "index_put[bool]"}}
N, B = 40, 8
READ_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "equal", "is_nonzero", "allclose",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
            "repeat_interleave", "_assert_async"}


class HostReads(TorchDispatchMode):
    """Records the aten operations that read a tensor back to the host on a GPU."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READ_OPS:
            self.seen.append("unique" if "unique" in name else name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool
                for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())):
            self.seen.append(f"{name.rstrip('_')}[bool]")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def python_reads(monkeypatch, seen: list):
    """Tensor.cpu / .tolist / .numpy record themselves (on a CPU tensor ``.cpu()`` reaches no aten op)."""
    for name in ("cpu", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            seen.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    yield


def build(method, device="cpu"):
    cfg = load_config(None, COMMON + METHODS[method])
    torch.manual_seed(0)
    model = build_method(cfg)
    model.setup(N)
    model = model.to(device).train()
    opt, sched = make_optimizer(model, cfg, 10)
    return model, TrainStep(model, model, opt, sched, None, None)


def batches(model, steps, device="cpu", size=16):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        views = [torch.randn(B, 3, size, size, generator=g) for _ in range(model.n_views)]
        if getattr(model, "small_aug", None) is not None:   # PIC's small crops come from its own augmentation
            views = views[:1] + [torch.randn(B, 3, 8, 8, generator=g) for _ in range(model.n_views - 1)]
        out.append(([v.to(device) for v in views], torch.randperm(N, generator=g)[:B].to(device)))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_a_steady_state_step_reads_nothing_back_to_the_host(method, monkeypatch):
    model, step = build(method)
    data = batches(model, 3)
    with no_host_checks():
        for views, index in data[:2]:   # warm-up: a first step may read once (MoCo v3's count, InstDisc's Z)
            step.step(views, index)
        seen = []
        with python_reads(monkeypatch, seen), HostReads() as probe:
            step.step(*data[2])
    assert set(probe.seen + seen) == KNOWN.get(method, set()), (probe.seen, seen)


def test_mocov3_reads_its_step_count_once_and_again_after_a_load():
    model, step = build("mocov3")
    data = batches(model, 4)
    with no_host_checks():
        step.step(*data[0])
        with HostReads() as probe:
            step.step(*data[1])
            step.step(*data[2])
        assert probe.seen == []
        assert model.steps_done() == 3 == int(model.ema_step)
        model.load_state_dict(model.state_dict())   # written elsewhere: read again, once
        with HostReads() as probe:
            step.step(*data[3])
        assert probe.seen == ["_local_scalar_dense"] and model.steps_done() == 4 == int(model.ema_step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", [m for m in METHODS if m not in KNOWN])
def test_steady_state_steps_on_a_gpu_under_sync_debug_mode_error(method):
    model, step = build(method, "cuda")
    data = batches(model, 5, "cuda")
    for views, index in data[:2]:
        step.step(views, index)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for views, index in data[2:]:
            step.step(views, index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
