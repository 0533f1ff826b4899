"""MoCo v3: loss and gradient against a float64 reference, cosine momentum, frozen patch
projection, key encoder without gradient, 2 processes = 1 process on the whole batch, 3 steps."""
import importlib.util
import math

import pytest
import torch
from torch import nn

from conftest import TINY
from dist_utils import assert_same_as_one_process, run_distributed
from selfsup.config import load_config
from selfsup.engine.trainer import train
from selfsup.losses import mocov3_contrastive
from selfsup.methods import build_method
from selfsup.methods.base import KeyEncoder
from selfsup.methods.mocov3 import MoCoV3, cosine_momentum

MOCOV3 = TINY + ["method=mocov3", "mocov3.proj_hidden=32", "mocov3.proj_dim=16", "eval.every=0"]


def reference_ctr(q, k_all, offset, t):
    """MoCo v3's ctr written out, float64, one query at a time."""
    q, k_all = q.double(), k_all.double()
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        logits = torch.stack([qi @ (k / k.norm()) / t for k in k_all])
        total = total - (logits[offset + i] - torch.logsumexp(logits, 0))
    return total / q.shape[0] * 2 * t


@pytest.mark.parametrize("offset", [0, 3, 6])
def test_loss_matches_float64_reference(offset):
    g = torch.Generator().manual_seed(offset)
    q, k_all = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    for t in (0.2, 1.0):
        torch.testing.assert_close(mocov3_contrastive(q, k_all, offset, t), reference_ctr(q, k_all, offset, t),
                                   rtol=1e-12, atol=1e-12)
    # float32 inputs: computed in float32, close to the reference
    torch.testing.assert_close(mocov3_contrastive(q.float(), k_all.float(), offset, 0.2).double(),
                               reference_ctr(q, k_all, offset, 0.2), rtol=1e-5, atol=1e-6)


def test_loss_gradient_matches_reference_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k_all = torch.randn(8, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: mocov3_contrastive(x, k_all, 4, 0.2), (q,))
    (gq,) = torch.autograd.grad(mocov3_contrastive(q, k_all, 4, 0.2), q)
    (gr,) = torch.autograd.grad(reference_ctr(q, k_all, 4, 0.2), q)
    torch.testing.assert_close(gq, gr, rtol=1e-10, atol=1e-12)


def test_loss_rejects_bad_offset():
    with pytest.raises(ValueError, match="offset"):
        mocov3_contrastive(torch.randn(3, 4), torch.randn(6, 4), 4, 0.2)


def test_cosine_momentum_schedule():
    m0, T = 0.99, 100
    assert cosine_momentum(m0, 0, T) == pytest.approx(0.99, abs=1e-15)
    assert cosine_momentum(m0, T // 2, T) == pytest.approx(1 - 0.01 / 2, abs=1e-15)
    assert cosine_momentum(m0, T, T) == pytest.approx(1.0, abs=1e-15)
    assert cosine_momentum(m0, 25, T) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-15)
    model = build_method(load_config(None, MOCOV3 + ["train.epochs=4", "train.batch_size=32"]))
    model.setup(100)   # 4 epochs x (100 // 32) steps
    assert model.total_steps == 12
    assert model.momentum_at(6) == pytest.approx(0.995) and model.momentum_at(12) == pytest.approx(1.0)


class ToyViT(nn.Module):
    """A backbone with a `patch_embed` module, like timm's ViTs."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
        self.block = nn.Linear(8, 8)

    def forward(self, x):
        return self.block(self.patch_embed(x).flatten(2).mean(2))


def test_freeze_patch_embed_freezes_only_the_patch_projection():
    cfg = load_config(None, MOCOV3)
    model = MoCoV3(cfg, ToyViT(), 8)
    assert not any(p.requires_grad for p in model.backbone.patch_embed.parameters())
    assert all(p.requires_grad for p in model.backbone.block.parameters())
    from selfsup.optim import param_groups
    opt = {id(p) for grp in param_groups(model, 0.1) for p in grp["params"]}
    assert not opt & {id(p) for p in model.backbone.patch_embed.parameters()}
    off = MoCoV3(load_config(None, MOCOV3 + ["mocov3.freeze_patch_embed=false"]), ToyViT(), 8)
    assert all(p.requires_grad for p in off.backbone.patch_embed.parameters())


def test_freeze_patch_embed_is_a_no_op_without_one(capsys):
    model = build_method(load_config(None, MOCOV3))
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("key_"))
    assert "no patch_embed" in capsys.readouterr().out


def test_key_encoder_gets_no_gradient_and_ema_follows_the_schedule():
    torch.manual_seed(0)
    model = build_method(load_config(None, MOCOV3 + ["train.epochs=1"])).train()
    model.setup(64)   # T = 2 steps
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    model([x1, x2], torch.arange(8))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.key_encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    q = {k: v.clone() for k, v in model.head.state_dict().items()}
    k = {k: v.clone() for k, v in model.key_encoder.head.state_dict().items()}
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    model.after_step()   # the EMA with m_1 = 0.995
    m = model.momentum_at(1)
    assert m == pytest.approx(0.995) and int(model.ema_step) == 1
    for name, p in model.head.named_parameters():
        torch.testing.assert_close(model.key_encoder.head.state_dict()[name], m * k[name] + (1 - m) * (q[name] + 1.0))


# ---------------------------------------------------------------- distributed (2 gloo processes)


def linear_mocov3():
    """MoCo v3 with a BN-free encoder and linear heads (per-rank BN would change the function), float64."""
    cfg = load_config(None, MOCOV3 + ["mocov3.proj_dim=6"])
    torch.manual_seed(0)
    model = MoCoV3(cfg, nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)), 10)
    model.head, model.predictor = nn.Linear(10, 6), nn.Linear(6, 6)
    model.key_encoder = KeyEncoder(model.backbone, model.head)
    return model.double().train()


def images(b, seed, size=4):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ddp_worker(rank, world, b):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = linear_mocov3()
    net = DDP(model)
    x1, x2 = images(world * b, 1), images(world * b, 2)
    sl = slice(rank * b, (rank + 1) * b)
    loss = net([x1[sl], x2[sl]], torch.arange(world * b)[sl])["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.after_step()
    return loss.item(), grads, model.state_dict()


def test_two_processes_equal_one_process_on_the_whole_batch():
    world, b = 2, 4
    outs = run_distributed(_ddp_worker, world, b)
    model = linear_mocov3()
    x1, x2 = images(world * b, 1), images(world * b, 2)
    loss = model([x1, x2], torch.arange(world * b))["loss"]
    loss.backward()
    model.after_step()
    assert_same_as_one_process(outs, model, loss, world)
    for key, v in model.state_dict().items():   # identical key encoders after the EMA
        for o in outs:
            torch.testing.assert_close(o[2][key], v, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- training


def test_three_training_steps_are_finite(tmp_path):
    out = train(load_config(None, MOCOV3 + [f"run_dir={tmp_path / 'run'}", "train.max_steps=3"]))
    assert out["step"] == 3 and math.isfinite(out["loss"])


def test_stop_and_resume_is_exact_and_continues_the_momentum_schedule(tmp_path):
    from conftest import assert_same_model
    train(load_config(None, MOCOV3 + [f"run_dir={tmp_path / 'a'}", "train.max_steps=6"]))
    train(load_config(None, MOCOV3 + [f"run_dir={tmp_path / 'b'}", "train.max_steps=3"]))
    train(load_config(str(tmp_path / "b/config.yaml"), ["train.max_steps=6"]), resume=str(tmp_path / "b"))
    state = assert_same_model(tmp_path / "a", tmp_path / "b")
    assert int(state["ema_step"]) == 6


# ---------------------------------------------------------------- presets

NEW_PRESETS = ["mocov3-vit-fmnist-cpu", "mocov3-vit-small-imagenet", "mocov3-resnet50-imagenet",
               "simclr-vit-fmnist-cpu"]
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                reason="the ViT presets use timm/<name> backbones: timm is not installed")


@needs_timm
@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_presets_load(name):
    cfg = load_config(name)
    assert cfg.method == name.split("-")[0]


@needs_timm
def test_tiny_vit_preset_freezes_the_patch_projection():
    model = build_method(load_config("mocov3-vit-fmnist-cpu"))
    assert not any(p.requires_grad for p in model.backbone.patch_embed.parameters())
    assert all(p.requires_grad for p in model.backbone.blocks.parameters())


def test_mocov3_builds_only_its_own_heads():
    """model.head_* do not apply to MoCo v3: changing them changes nothing, and no unused head is built
    (none of its parameters, none of its draws from the RNG)."""
    states = []
    for extra in ([], ["model.head_layers=3", "model.proj_dim=7", "model.head_hidden=5"]):
        cfg = load_config(None, MOCOV3 + extra)
        torch.manual_seed(0)
        states.append(build_method(cfg).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    cfg = load_config(None, MOCOV3)
    torch.manual_seed(0)
    model = build_method(cfg)
    own = {id(p) for m in (model.backbone, model.head, model.predictor, model.key_encoder) for p in m.parameters()}
    assert {id(p) for p in model.parameters()} == own
