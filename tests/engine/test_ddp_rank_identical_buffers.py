"""DDP does not re-broadcast state that every rank updates identically (issue 17): InstDisc's memory
bank and MoCo's queue are kept out of DDP's per-forward buffer broadcast; BN running statistics
still go. Each method names those buffers itself (`Method.rank_identical_buffers`)."""
from types import SimpleNamespace

import pytest
import torch

import selfsup.engine.step as step_module
from selfsup.config import load_config
from selfsup.engine.setup import Env
from selfsup.engine.step import build_model, wrap_model

from dist_utils import run_distributed

SMALL = ["device=cpu", "seed=0", "data.name=synthetic", "model.width=8", "model.head_hidden=32", "model.proj_dim=16",
         "train.batch_size=32", "train.log_every=1", "train.threads=1", "eval.every=0", "moco.queue_size=256",
         "instdisc.nce_k=256"]
SAME = {"instdisc-fmnist-cpu": ["Z", "bank"], "mocov2-fmnist-cpu": ["queue", "queue_ptr", "queue_src"],
        "simclr-fmnist-cpu": []}


@pytest.mark.parametrize("preset", sorted(SAME))
def test_ddp_is_told_to_ignore_exactly_the_bank_and_queue(preset, monkeypatch):
    cfg = load_config(preset, SMALL)
    env = Env(rank=0, local_rank=0, world=2, device=torch.device("cpu"), amp=None)
    model, _ = build_model(cfg, 100, env)
    told, sent = [], []

    class FakeDDP:   # records what wrap_model hands to DDP
        @staticmethod
        def _set_params_and_buffers_to_ignore_for_model(module, names):
            assert module is model
            told.extend(names)

        def __init__(self, module, device_ids=None):
            self.module = module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(step_module, "dist", SimpleNamespace(broadcast=lambda t, src: sent.append(t)))
    wrap_model(model, cfg, env)
    assert sorted(told) == SAME[preset]
    # made equal once, from rank 0, when wrapped
    assert sorted(id(t) for t in sent) == sorted(id(model.get_buffer(n)) for n in SAME[preset])


def _train(rank, world, preset, overrides):
    from selfsup.engine.trainer import Trainer

    t = Trainer(load_config(preset, overrides))
    t.fit()
    m, net = t.model, t.train_step.net
    same = {n: m.get_buffer(n).clone() for n in m.rank_identical_buffers()}
    return same, sorted(net.named_module_buffers), sorted(n for n, _ in m.named_buffers())


@pytest.mark.parametrize("preset", ["instdisc-fmnist-cpu", "mocov2-fmnist-cpu"])
def test_bank_and_queue_stay_bit_identical_on_two_ranks_without_broadcast(preset, tmp_path):
    over = SMALL + ["train.max_steps=4", f"run_dir={tmp_path / 'run'}"]
    (a, sent_a, all_a), (b, sent_b, _) = run_distributed(_train, 2, preset, over, timeout=300)
    names = SAME[preset]
    assert sorted(a) == names
    # DDP's per-forward broadcast: every buffer but these, BN running statistics included
    assert sent_a == sent_b == [n for n in all_a if n not in names]
    assert any(n.endswith("running_mean") for n in sent_a)
    for n in names:
        assert torch.equal(a[n], b[n]), f"{n} differs between the ranks"
    if preset.startswith("instdisc"):
        assert float(a["Z"]) > 0                                 # estimated on the first step
    else:
        assert int(a["queue_ptr"]) == 4 * 2 * 16 % 256           # 4 steps of 2 ranks x 16 keys
        assert (a["queue_src"][:128] >= 0).all() and set(a["queue_src"][:128].tolist()) == {0, 1}
