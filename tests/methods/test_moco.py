"""MoCo: EMA arithmetic, FIFO queue, split / shuffle BN, distributed queue and gradients, exact resume."""
import pytest
import torch
from torch import nn

from conftest import TINY, assert_same_model
from dist_utils import assert_same_as_one_process, run_distributed
from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train
from selfsup.methods import build_method
from selfsup.losses import info_nce
from selfsup.methods.moco import MoCo
from selfsup.parallel.shuffle_bn import shuffle_bn_forward, split_bn_forward

MOCO = TINY + ["method=moco", "moco.queue_size=80", "eval.every=0"]


def tiny_moco(*overrides):
    torch.manual_seed(0)
    return build_method(load_config(None, MOCO + list(overrides)))


def linear_moco(*overrides):
    """MoCo with a BN-free encoder (flatten -> linear) and a linear head, float64."""
    cfg = load_config(None, MOCO + ["model.head_layers=1", "model.proj_dim=8", "moco.queue_size=20",
                                    *overrides])
    torch.manual_seed(0)
    return MoCo(cfg, nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16)), 16).double()


def images(b, seed, size=16):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_key_encoder_is_a_frozen_copy_outside_the_optimiser():
    model = tiny_moco()
    assert all(not p.requires_grad for p in model.key_encoder.parameters())
    for a, b in zip(model.backbone.state_dict().values(), model.key_encoder.backbone.state_dict().values()):
        assert torch.equal(a, b)
    keys = model.state_dict().keys()
    assert {"queue", "queue_ptr"} <= keys and any(k.startswith("key_encoder.backbone.") for k in keys)
    from selfsup.optim import param_groups
    opt_params = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert not opt_params & {id(p) for p in model.key_encoder.parameters()}


def test_ema_update_is_exact_for_parameters_and_buffers():
    model = tiny_moco("moco.momentum=0.9")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            t.copy_(torch.randn(t.shape, generator=g))
    q = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    k_before = {k: v.clone() for k, v in model.key_encoder.backbone.state_dict().items()}
    for name, mod in model.backbone.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.num_batches_tracked.fill_(7)
            q[name + ".num_batches_tracked"] = mod.num_batches_tracked.clone()
    model.after_step()
    m = 0.9
    for key, kv in model.key_encoder.backbone.state_dict().items():
        if kv.is_floating_point():
            assert torch.equal(kv, m * k_before[key] + (1 - m) * q[key]), key
        else:
            assert torch.equal(kv, q[key]), key
    # and the query encoder is untouched
    for key, v in model.backbone.state_dict().items():
        assert torch.equal(v, q[key])


def test_key_forward_leaves_key_bn_running_stats_alone():
    model = tiny_moco()
    before = {k: v.clone() for k, v in model.key_encoder.backbone.state_dict().items() if "running" in k}
    model.train()
    model.keys(images(32, 0))
    for k, v in before.items():
        assert torch.equal(model.key_encoder.backbone.state_dict()[k], v), k


def test_queue_is_fifo_across_a_wrap_with_uneven_batches():
    model = tiny_moco("moco.queue_size=10", "model.proj_dim=3")
    ref = model.queue.clone()
    ref_src = torch.full((10,), -1)
    ptr, counter = 0, 0
    for n in (4, 3, 5, 7, 23, 1):
        keys = torch.arange(counter, counter + n, dtype=torch.float32)[:, None].repeat(1, 3)
        src = torch.arange(counter, counter + n)
        counter += n
        model.enqueue(keys, src)
        for row, s in zip(keys, src):   # reference: write row by row, pointer wraps
            ref[ptr], ref_src[ptr] = row, s
            ptr = (ptr + 1) % 10
        assert torch.equal(model.queue, ref) and int(model.queue_ptr) == ptr, n
        assert torch.equal(model.queue_src, ref_src), n


def test_split_bn_returns_rows_in_input_order_with_per_split_statistics():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).train()
    for b, splits in ((16, 4), (18, 4)):   # 18: uneven splits
        x = torch.randn(b, 6)
        torch.manual_seed(11)
        out = split_bn_forward(enc, x, splits)
        torch.manual_seed(11)
        perm = torch.randperm(b)
        ref = torch.empty(b, 5)
        for chunk in perm.tensor_split(splits):   # encoder run on each shuffled chunk separately
            ref[chunk] = enc(x[chunk])
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        assert not torch.allclose(out, enc(x), atol=1e-3)   # not whole-batch statistics


def test_method_keys_use_split_bn_and_original_order():
    model = tiny_moco("moco.bn_splits=4").train()
    x = images(32, 1)
    torch.manual_seed(5)
    k = model.keys(x)
    torch.manual_seed(5)
    perm = torch.randperm(32)
    ref = torch.empty_like(k)
    with torch.no_grad():
        for chunk in perm.tensor_split(4):
            ref[chunk] = torch.nn.functional.normalize(model.key_encoder.head(model.key_encoder.backbone(x[chunk])), dim=1)
    torch.testing.assert_close(k, ref, rtol=0, atol=1e-5)
    assert torch.allclose(k.norm(dim=1), torch.ones(32))


@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_is_info_nce_against_the_queue_and_after_step_enqueues_keys(symmetric):
    model = linear_moco(f"moco.symmetric={str(symmetric).lower()}").train()
    x1, x2 = images(6, 1, 4).double(), images(6, 2, 4).double()
    queue = model.queue.clone()
    loss = model([x1, x2], torch.arange(6))["loss"]
    q1, q2 = model.query(x1), model.query(x2)
    k1, k2 = model.keys(x1), model.keys(x2)   # no BN: shuffling does not change the keys
    t = model.temperature
    ref = info_nce(q1, k2, queue, t) + (info_nce(q2, k1, queue, t) if symmetric else 0)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    model.after_step()
    new = torch.cat([k1, k2]) if symmetric else k2
    torch.testing.assert_close(model.queue[:len(new)], new, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.queue[len(new):], queue[len(new):]) and int(model.queue_ptr) == len(new)


# ---------------------------------------------------------------- distributed (2 gloo processes)


def _shuffle_bn_worker(rank, world, b):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).train()
    x = torch.randn(world * b, 6, generator=torch.Generator().manual_seed(1))[rank * b:(rank + 1) * b]
    torch.manual_seed(100 + rank)   # different RNG streams: rank 0's permutation must win
    return shuffle_bn_forward(enc, x)


def test_shuffle_bn_across_ranks_returns_own_rows_with_bn_over_the_shuffled_slice():
    world, b = 2, 8
    outs = run_distributed(_shuffle_bn_worker, world, b)
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).train()
    x = torch.randn(world * b, 6, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(100)
    perm = torch.randperm(world * b)
    ref = torch.empty(world * b, 5)
    for r in range(world):
        rows = perm[r * b:(r + 1) * b]
        ref[rows] = enc(x[rows])
    torch.testing.assert_close(torch.cat(outs), ref, rtol=0, atol=1e-6)


def _ddp_moco_worker(rank, world, b):
    """DDP-wrapped symmetric MoCo on this rank's slice: loss, parameter gradients, queue after the step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = linear_moco("moco.symmetric=true").train()
    net = DDP(model)
    x1, x2 = images(world * b, 1, 4).double(), images(world * b, 2, 4).double()
    sl = slice(rank * b, (rank + 1) * b)
    torch.manual_seed(7)
    loss = net([x1[sl], x2[sl]], torch.arange(world * b)[sl])["loss"]
    loss.backward()
    keys = [k.clone() for k in model._pending_keys]
    model.after_step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, keys, model.queue.clone(), int(model.queue_ptr), model.state_dict(), \
        model.queue_src.clone()


def test_distributed_symmetric_moco_matches_one_process_on_the_whole_batch():
    """Gradients (DDP-averaged) equal those of one process on the concatenated batch, and every
    rank's keys land in the queue in rank order.

    The encoder has no BN: with BN, per-rank batch statistics (and the shuffle) legitimately change
    the function, so the comparison would not be exact. Shuffle BN stays on, exercising the
    cross-rank shuffle (it must not change BN-free keys)."""
    world, b = 2, 4
    outs = run_distributed(_ddp_moco_worker, world, b)
    model = linear_moco("moco.symmetric=true").train()
    x1, x2 = images(world * b, 1, 4).double(), images(world * b, 2, 4).double()
    loss = model([x1, x2], torch.arange(world * b))["loss"]
    loss.backward()
    k1, k2 = model._pending_keys
    model.after_step()
    assert_same_as_one_process(outs, model, loss, world)
    for r, o in enumerate(outs):
        # rank order: k1 of rank 0, k1 of rank 1, then k2 of rank 0, k2 of rank 1
        assert torch.equal(o[3][r * b:(r + 1) * b], o[2][0])
        assert torch.equal(o[3][(world + r) * b:(world + r + 1) * b], o[2][1])
        torch.testing.assert_close(o[3], model.queue, rtol=1e-12, atol=1e-12)
        assert o[4] == int(model.queue_ptr) == 2 * world * b
        # provenance: rows written this step name their rank; untouched rows stay -1
        src = torch.arange(world).repeat_interleave(b).repeat(2)
        assert torch.equal(o[6][:2 * world * b], src) and (o[6][2 * world * b:] == -1).all()
    for key in outs[0][5]:   # identical state (queue, key encoder) on both ranks
        assert torch.equal(outs[0][5][key], outs[1][5][key]), key
    torch.testing.assert_close(torch.cat([o[2][0] for o in outs]), k1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([o[2][1] for o in outs]), k2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- exact resume


def test_stop_and_resume_is_exact_with_a_filled_queue(tmp_path):
    args = MOCO + ["train.epochs=1", "moco.symmetric=true"]
    train(load_config(None, args + [f"run_dir={tmp_path / 'a'}", "train.max_steps=14"]))
    train(load_config(None, args + [f"run_dir={tmp_path / 'b'}", "train.max_steps=9"]))
    mid = load_checkpoint(tmp_path / "b/checkpoints/last.pt")["model"]
    assert int(mid["queue_ptr"]) == (9 * 2 * 32) % 80   # wrapped several times, pointer mid-queue
    train(load_config(str(tmp_path / "b/config.yaml"), ["train.max_steps=14"]), resume=str(tmp_path / "b"))
    sa = assert_same_model(tmp_path / "a", tmp_path / "b")
    assert int(sa["queue_ptr"]) == (14 * 2 * 32) % 80


def test_checkpoints_with_the_old_key_encoder_names_still_load():
    """Before KeyEncoder, MoCo's state dict named the key encoder key_backbone.* / key_head.*."""
    cfg = load_config(None, TINY + ["method=moco", "model.head_layers=2"])
    torch.manual_seed(0)
    src = build_method(cfg)
    def renamed(k):
        return k.replace("key_encoder.backbone.", "key_backbone.").replace("key_encoder.head.", "key_head.")

    old = {renamed(k): v + 1 if v.is_floating_point() else v for k, v in src.state_dict().items()}
    assert any(k.startswith("key_backbone.") for k in old) and any(k.startswith("key_head.") for k in old)
    dst = build_method(cfg)
    dst.load_state_dict(old)   # strict: every old name is mapped
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v + 1 if v.is_floating_point() else v), k
