"""Activation checkpointing (`model.checkpointing`, selfsup.models.backbones.set_checkpointing): the
same gradients and BatchNorm statistics as without it, RNG (dropout, drop-path) preserved, no change
in eval / no_grad or in the state_dict, and less memory held for the backward."""
import copy
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from selfsup.config import load_config
from selfsup.errors import ConfigError
from selfsup.methods import build_method
from selfsup.models.backbones import build_backbone, run_stage, set_checkpointing

VIT = "timm/vit_tiny_patch16_224"
VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# (backbone, build_backbone kwargs, input size): our two ResNet families, a tiny ViT (LayerNorm, timm's own
# checkpointing) and a small timm ResNet (BatchNorm under timm's checkpointing: the backward hooks)
CASES = {
    "resnet_small": ("resnet_small", {"width": 8, "cifar_stem": True}, 32),
    "resnet18": ("resnet18", {"cifar_stem": True}, 16),
    "vit": (VIT, {"backbone_args": VIT_ARGS}, 32),
    "timm-resnet10t": ("timm/resnet10t", {}, 32),
}


def _pair(case, **extra):
    """(plain, checkpointed) float64 copies of one backbone with the same weights."""
    name, kw, size = CASES[case]
    kw = {**kw, **({"backbone_args": {**kw.get("backbone_args", {}), **extra}} if extra else {})}
    torch.manual_seed(0)
    net = build_backbone(name, **kw)[0].double()
    return net, set_checkpointing(copy.deepcopy(net), True, name), size


def _count_calls(net):
    """Forward calls of every submodule of `net` (hooks), in a one-element list."""
    calls = [0]
    for m in net.modules():
        m.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def _train_step(net, x, seed=1, calls=None):
    """Forward + backward; returns the number of submodule forwards run in the backward (`calls`: see
    :func:`_count_calls`), i.e. the recomputation."""
    torch.manual_seed(seed)
    loss = net(x).pow(2).sum()
    before = calls[0] if calls else 0
    loss.backward()
    return (calls[0] if calls else 0) - before


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_gives_the_same_gradients_and_bn_statistics(case):
    net, ck, size = _pair(case)
    assert list(ck.state_dict()) == list(net.state_dict())   # exports and checkpoints unchanged
    x = torch.randn(4, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert _train_step(net, x, calls=_count_calls(net)) == 0
    assert _train_step(ck, x, calls=_count_calls(ck)) > 0   # the stages really ran again in the backward
    for (n, p), q in zip(net.named_parameters(), ck.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-10, msg=n)
    for (n, b), c in zip(net.named_buffers(), ck.buffers()):   # running mean/var and num_batches_tracked: once
        torch.testing.assert_close(c, b, rtol=0, atol=1e-12, msg=n)


def test_plain_torch_checkpoint_would_update_batchnorm_twice_run_stage_does_not():
    """The property the BN guard is for: torch's recomputation runs BN in train mode again."""
    torch.manual_seed(0)
    stage = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    ref, plain, guarded = (copy.deepcopy(stage) for _ in range(3))
    ref(x).sum().backward()
    checkpoint(plain, x, use_reentrant=False).sum().backward()
    run_stage(guarded, x).sum().backward()
    assert int(plain[1].num_batches_tracked) == 2 and not torch.allclose(plain[1].running_mean, ref[1].running_mean)
    assert int(guarded[1].num_batches_tracked) == 1
    torch.testing.assert_close(guarded[1].running_mean, ref[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(guarded[1].running_var, ref[1].running_var, rtol=0, atol=0)
    assert guarded[1].momentum == ref[1].momentum


def test_dropout_and_drop_path_are_recomputed_with_the_same_random_draws():
    net, ck, size = _pair("vit", drop_path_rate=0.5, proj_drop_rate=0.3)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    torch.manual_seed(1)
    a = net(x)
    torch.manual_seed(2)
    assert not torch.allclose(net(x), a)   # the draws matter
    _train_step(net, x, seed=3)
    _train_step(ck, x, seed=3)
    for (n, p), q in zip(net.named_parameters(), ck.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-10, msg=n)


@pytest.mark.parametrize("case", ["resnet_small", "resnet18"])
def test_eval_and_no_grad_run_no_checkpoint_and_give_the_same_output(case):
    net, ck, size = _pair(case)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    calls = _count_calls(ck)
    net.eval(), ck.eval()
    a, b = net(x), ck(x)   # eval, gradients on: no recomputation in the backward
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    before = calls[0]
    b.sum().backward()
    assert calls[0] == before
    net.train(), ck.train()
    with torch.no_grad():
        torch.testing.assert_close(ck(x), net(x), rtol=0, atol=0)
    assert ck.training and all(m.training for m in ck.modules())


def _held_after_forward(net, x) -> int:
    """Bytes a training forward leaves allocated (what autograd keeps for the backward, plus the
    small output), from the profiler's allocator records: deterministic, unlike the RSS."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = net(x)
    held = sum(e.self_cpu_memory_usage for e in prof.events())
    del y
    return held


@pytest.mark.parametrize("case", ["resnet_small", "resnet18"])
def test_checkpointing_holds_less_memory_for_the_backward(case):
    net, ck, size = _pair(case)
    net, ck = net.float(), ck.float()
    x = torch.randn(8, 3, size, size)
    plain, checked = _held_after_forward(net, x), _held_after_forward(ck, x)
    assert 0 < checked < 0.6 * plain, (checked, plain)
    with torch.no_grad():
        assert _held_after_forward(ck, x) < 0.1 * checked   # the measure sees activations, not weights


def test_a_timm_model_without_checkpointing_is_refused_naming_the_key():
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="model.checkpointing"):
        build_backbone("timm/convit_tiny", backbone_args={"img_size": 32}, checkpointing=True)


def test_the_config_key_reaches_the_backbone_and_moco_copies_it():
    from conftest import TINY

    model = build_method(load_config("mocov2-fmnist-cpu", [*TINY, "method=moco", "model.checkpointing=true"]))
    assert model.backbone.checkpointing and model.key_encoder.backbone.checkpointing
    plain = build_method(load_config("mocov2-fmnist-cpu", [*TINY, "method=moco"]))
    assert not plain.backbone.checkpointing
    assert list(model.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("preset,method,micro", [("simclr-fmnist-cpu", "simclr", "8"),
                                                 ("mocov2-fmnist-cpu", "moco", "null")])
def test_training_with_checkpointing_gives_bit_identical_models(preset, method, micro, tmp_path, capsys):
    """Two steps of the trainer (SimCLR with gradient caching: chunks encoded without a graph, then again
    with one; MoCo: shuffle BN, key encoder): the same parameters and BN buffers, bit for bit."""
    from conftest import TINY, assert_same_model

    from selfsup.cli import main

    runs = []
    for ck in ("false", "true"):
        runs.append(tmp_path / ck)
        assert main(["train", preset, *TINY, f"method={method}", f"train.micro_batch={micro}", "train.max_steps=2",
                     "eval.every=0", f"model.checkpointing={ck}", f"run_dir={runs[-1]}"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    assert_same_model(*runs)
