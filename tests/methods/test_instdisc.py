"""InstDisc: memory bank set-up and update, NCE with a once-estimated Z, full softmax, ranks, resume."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, assert_same_model
from dist_utils import run_distributed
from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train
from selfsup.eval.features import extract_features
from selfsup.methods import build_method
from selfsup.losses import instance_softmax, nce_loss, nce_normalizer

INSTDISC = TINY + ["method=instdisc", "instdisc.nce_k=64", "eval.every=0"]


def tiny_instdisc(n=100, *overrides):
    torch.manual_seed(0)
    model = build_method(load_config(None, INSTDISC + list(overrides)))
    model.setup(n)
    return model.train()


def images(b, seed):
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_setup_allocates_a_unit_norm_bank_and_z_unset():
    model = tiny_instdisc(100)
    assert model.bank.shape == (100, 16) and float(model.Z) == 0.0
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(100))
    assert model.bank.min() < 0 < model.bank.max()
    assert model.n_views == 1 and {"bank", "Z"} <= model.state_dict().keys()


def test_nce_forward_estimates_z_once_then_keeps_it():
    model = tiny_instdisc(100)
    x, index = images(8, 1), torch.arange(8) * 3
    torch.manual_seed(3)
    loss = model([x], index)["loss"]
    torch.manual_seed(3)
    noise = model.bank[torch.randint(100, (64,))]
    f = model.head(model.backbone(x))
    z = nce_normalizer(f, model.bank[index], noise, 0.07, 100)
    torch.testing.assert_close(model.Z, z.float())
    torch.testing.assert_close(loss, nce_loss(f, model.bank[index], noise, model.Z, 0.07, 100))
    model([images(8, 2)], index)
    assert torch.equal(model.Z, z.float())   # fixed after the first batch


def test_softmax_forward_is_instance_softmax_over_the_bank():
    model = tiny_instdisc(50, "instdisc.loss=softmax", "instdisc.temperature=0.1")
    x, index = images(8, 1), torch.tensor([0, 5, 9, 13, 20, 33, 41, 49])
    loss = model([x], index)["loss"]
    f = model.head(model.backbone(x))
    torch.testing.assert_close(loss, instance_softmax(f, model.bank, index, 0.1))
    assert float(model.Z) == 0.0


def test_after_step_updates_exactly_the_batch_rows():
    model = tiny_instdisc(40, "instdisc.bank_momentum=0.25")
    x, index = images(8, 1), torch.tensor([1, 4, 7, 10, 13, 22, 30, 39])
    before = model.bank.clone()
    model([x], index)
    f = F.normalize(model.head(model.backbone(x)).detach(), dim=1)
    model.after_step()
    expected = before.clone()
    for i, row in enumerate(index.tolist()):
        v = 0.25 * before[row] + 0.75 * f[i]
        expected[row] = v / v.norm()
    torch.testing.assert_close(model.bank, expected, rtol=0, atol=1e-6)
    others = torch.ones(40, dtype=torch.bool)
    others[index] = False
    assert torch.equal(model.bank[others], before[others])


def test_a_model_built_without_setup_loads_a_checkpoint_bank():
    state = tiny_instdisc(30).state_dict()
    fresh = build_method(load_config(None, INSTDISC))   # e.g. `selfsup eval` reading a checkpoint
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bank, state["bank"])
    with pytest.raises(RuntimeError):   # a bank sized by setup() must match
        tiny_instdisc(31).load_state_dict(state)


# ---------------------------------------------------------------- distributed (2 gloo processes)


def _bank_worker(rank, world, b, n):
    model = tiny_instdisc(n)
    index = torch.arange(world * b)[rank * b:(rank + 1) * b] * 2 + 1   # disjoint rows per rank
    torch.manual_seed(10 + rank)   # different noise per rank is fine; Z must still agree
    model([images(world * b, 1)[rank * b:(rank + 1) * b]], index)
    f = model._pending[0][0].clone()
    model.after_step()
    return model.bank.clone(), model.Z.clone(), f


def test_distributed_bank_update_uses_every_ranks_features():
    world, b, n = 2, 4, 30
    outs = run_distributed(_bank_worker, world, b, n)
    before = tiny_instdisc(n).bank
    f_all = torch.cat([o[2] for o in outs])
    index = torch.arange(world * b) * 2 + 1
    expected = before.clone()
    expected[index] = F.normalize(0.5 * before[index] + 0.5 * f_all, dim=1)
    for bank, z, _ in outs:
        torch.testing.assert_close(bank, expected, rtol=0, atol=1e-6)
        assert torch.equal(z, outs[0][1]) and float(z) > 0
    assert torch.equal(outs[0][0], outs[1][0])


# ---------------------------------------------------------------- exact resume


def test_stop_and_resume_is_exact_with_bank_and_z(tmp_path):
    args = INSTDISC + ["train.epochs=1"]
    train(load_config(None, args + [f"run_dir={tmp_path / 'a'}", "train.max_steps=12"]))
    train(load_config(None, args + [f"run_dir={tmp_path / 'b'}", "train.max_steps=7"]))
    mid = load_checkpoint(tmp_path / "b/checkpoints/last.pt")["model"]
    assert float(mid["Z"]) > 0 and mid["bank"].shape == (2000, 16)
    train(load_config(str(tmp_path / "b/config.yaml"), ["train.max_steps=12"]), resume=str(tmp_path / "b"))
    sa = assert_same_model(tmp_path / "a", tmp_path / "b")
    assert torch.equal(sa["Z"], mid["Z"])   # estimated once, kept after resume


# ---------------------------------------------------------------- bank from data, bank kNN monitor


def test_bank_init_features_are_the_untrained_networks_features_and_leave_its_bn_alone():
    from selfsup.data.augment import eval_transform

    model = tiny_instdisc(40, "instdisc.bank_init=features")
    imgs = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.eval()   # the init must use batch statistics whatever mode the model is in
    model.init_from_data(   # what the engine passes (at the trainer's batch size, 32)
        lambda net, train_bn=False: extract_features(net, imgs, 32, torch.device("cpu"), None, train_bn=train_bn))
    for k, v in bn_before.items():
        assert torch.equal(model.state_dict()[k], v), k
    net = torch.nn.Sequential(model.backbone, model.head).train()
    with torch.no_grad():   # the trainer's batch size (32): two batches, 32 and 8 images
        ref = torch.cat([F.normalize(net(eval_transform(c, 16)), dim=1) for c in imgs.split(32)])
    torch.testing.assert_close(model.bank, ref)


def test_bank_knn_monitor_is_reported_with_its_own_protocol(tmp_path):
    cfg = load_config(None, INSTDISC + [f"run_dir={tmp_path}", "train.epochs=1", "eval.every=1",
                                        "instdisc.loss=softmax", "instdisc.bank_init=features"])
    out = train(cfg)
    assert 0.0 <= out["knn_bank_top1"] <= 1.0 and "memory bank" in out["protocol_bank"]
    assert "knn_top1" in out and "protocol" in out
