"""Gradient caching (train.micro_batch): a micro-batched step equals the full-batch step in float64.

* a BN-free model (a tiny ViT, LayerNorm only): every method's parameter gradients, and the state after
  two whole steps (queues, banks, classifier rows, key encoders), equal the full batch's, for chunks that
  divide the batch and chunks that do not;
* a BN model: equal to a "ghost BN" reference written plainly here (the batch encoded chunk by chunk
  with a graph), BN running statistics moved once per chunk, as that reference moves them;
* random ops inside the network (drop-path, dropout): equal to the chunked reference only because the
  RNG state is replayed in the second encoding; without the replay they differ;
* 2 gloo processes with micro-batches equal one process on the concatenated batch;
* a run with train.micro_batch resumes exactly.
"""
import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from selfsup.config import load_config
from selfsup.engine import step as step_module
from selfsup.engine.runs import check_run_resume
from selfsup.engine.step import TrainStep, make_optimizer, micro_batch_line
from selfsup.methods.base import chunks
from selfsup.engine.trainer import train
from selfsup.errors import ConfigError
from selfsup.losses import info_nce, nt_xent
from selfsup.methods import build_method

from conftest import TINY, assert_same_model
from dist_utils import assert_same_as_one_process, run_distributed

VIT = ["model.backbone=timm/vit_tiny_patch16_224", "model.backbone_args.img_size=16",
       "model.backbone_args.patch_size=8", "model.backbone_args.embed_dim=16", "model.backbone_args.depth=2",
       "model.backbone_args.num_heads=2"]
SMALL = ["model.backbone=resnet_small", "model.width=4", "model.cifar_stem=false"]
COMMON = ["device=cpu", "model.head_hidden=16", "model.proj_dim=8", "train.optimizer=sgd", "train.lr=0.5",
          "train.warmup_epochs=0", "train.weight_decay=1e-4", "seed=3"]
METHODS = {
    "simclr": ["method=simclr"],
    "mocov3": ["method=mocov3", "mocov3.proj_hidden=16", "mocov3.proj_dim=8"],
    "moco": ["method=moco", "moco.queue_size=24", "model.head_layers=2"],
    "moco-symmetric": ["method=moco", "moco.queue_size=24", "moco.symmetric=true"],
    "pic": ["method=pic", "pic.chunk_size=7"],
    "millionway": ["method=pic", "pic.negatives=8", "pic.smooth_alpha=0.2", "pic.smooth_k=3", "pic.chunk_size=5"],
    "instdisc-nce": ["method=instdisc", "instdisc.nce_k=10", "model.head_layers=1"],
    "instdisc-softmax": ["method=instdisc", "instdisc.loss=softmax", "model.head_layers=1"],
}
N, B = 40, 8


def no_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm replaced by Identity (the heads of SimCLR and MoCo v3 have BN): a BN-free model."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            no_bn(child)
    return module


def make(method: str, backbone: list, extra=(), bn: bool = True):
    cfg = load_config(None, COMMON + backbone + METHODS[method] + list(extra))
    torch.manual_seed(0)
    model = build_method(cfg)
    if not bn:
        no_bn(model)
    model.setup(N)
    return cfg, model.double().train()


def batches(steps: int, size: int = 16, n_views: int = 2):
    g = torch.Generator().manual_seed(1)
    return [([torch.randn(B, 3, size, size, generator=g, dtype=torch.float64) for _ in range(n_views)],
             torch.randperm(N, generator=g)[:B]) for _ in range(steps)]


def run_steps(cfg, model, micro, data):
    """Whole steps with TrainStep(micro_batch=micro): each step's gradients, the last outputs, the final state."""
    opt, sched = make_optimizer(model, cfg, 10)
    step, grads, out = TrainStep(model, model, opt, sched, None, micro), [], None
    for i, (views, index) in enumerate(data):
        torch.manual_seed(100 + i)
        out = step.forward_backward(views, index)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        step.update()
    return out, grads, model.state_dict()


def assert_close_dicts(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for k, v in a.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, b[k], rtol=1e-6, atol=1e-10, msg=lambda m, k=k: f"{what} {k}: {m}")
        else:
            assert torch.equal(v, b[k]), f"{what} {k}"


@pytest.mark.parametrize("micro", [3, 4])
@pytest.mark.parametrize("method", list(METHODS))
def test_micro_batched_steps_equal_the_full_batch_on_a_bn_free_model(method, micro):
    cfg, model = make(method, VIT, bn=False)
    data = batches(2, n_views=model.n_views)
    full = run_steps(cfg, copy.deepcopy(model), None, data)
    chunked = run_steps(cfg, model, micro, data)
    torch.testing.assert_close(chunked[0]["loss"], full[0]["loss"], rtol=1e-9, atol=0)
    for s in range(2):
        assert_close_dicts(chunked[1][s], full[1][s], f"step {s} grad")
    assert_close_dicts(chunked[2], full[2], "state")


def test_a_micro_batch_of_the_whole_batch_or_more_is_the_plain_step():
    cfg, model = make("simclr", SMALL)
    data = batches(1)
    full = run_steps(cfg, copy.deepcopy(model), None, data)
    same = run_steps(cfg, model, B, data)
    for k, v in full[2].items():
        assert torch.equal(v, same[2][k]), k


def test_simclr_with_batchnorm_equals_a_ghost_bn_reference():
    """Chunks of 3 of a batch of 8 (3, 3, 2): the reference encodes each chunk with a graph, BN over the
    chunk's two views, and takes NT-Xent over all of them."""
    cfg, model = make("simclr", SMALL)
    ref = copy.deepcopy(model)
    (views, index), = batches(1)
    parts = [slice(0, 3), slice(3, 6), slice(6, 8)]
    z1, z2 = [], []
    for p in parts:
        z = ref.head(ref.backbone(torch.cat([views[0][p], views[1][p]])))
        z1.append(z[:p.stop - p.start])
        z2.append(z[p.stop - p.start:])
    loss = nt_xent(torch.cat(z1), torch.cat(z2), ref.temperature)
    loss.backward()
    opt, sched = make_optimizer(model, cfg, 10)
    out = TrainStep(model, model, opt, sched, None, 3).forward_backward(views, index)
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-12, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert_close_dicts(grads, {n: p.grad for n, p in ref.named_parameters()}, "grad")
    # running statistics: one update per chunk, as the reference's single pass (pass 1 moved nothing)
    buffers = {n: b for n, b in model.named_buffers() if "running" in n or "num_batches" in n}
    assert buffers and all(int(b) == 3 for n, b in buffers.items() if "num_batches" in n)
    assert_close_dicts(buffers, {n: b for n, b in ref.named_buffers() if n in buffers}, "BN buffer")


def test_moco_with_batchnorm_and_split_bn_equals_a_ghost_bn_reference():
    """The per-sample path: keys once for the whole batch (split BN over moco.bn_splits shuffled parts),
    queries chunk by chunk."""
    cfg, model = make("moco", SMALL, ["moco.bn_splits=2"])
    assert model.shuffle_bn
    ref = copy.deepcopy(model)
    (views, index), = batches(1)
    torch.manual_seed(5)
    k = ref.keys(views[1])
    q = torch.cat([ref.query(views[0][p]) for p in (slice(0, 3), slice(3, 6), slice(6, 8))])
    loss = info_nce(q, k, ref.queue, ref.temperature)
    loss.backward()
    opt, sched = make_optimizer(model, cfg, 10)
    torch.manual_seed(5)
    out = TrainStep(model, model, opt, sched, None, 3).forward_backward(views, index)
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=1e-12, atol=0)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert_close_dicts(grads, {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}, "grad")
    assert_close_dicts(dict(model.named_buffers()), dict(ref.named_buffers()), "buffer")


def _drop_path_grads(replay: bool, monkeypatch):
    """(micro-batched grads, chunked reference grads) of SimCLR on a ViT with drop-path and dropout."""
    cfg, model = make("simclr", VIT, ["model.backbone_args.drop_path_rate=0.5",
                                      "model.backbone_args.proj_drop_rate=0.3"], bn=False)
    ref = copy.deepcopy(model)
    (views, index), = batches(1)
    torch.manual_seed(9)
    zs = [ref.head(ref.backbone(torch.cat([views[0][p], views[1][p]]))).chunk(2) for p in (slice(0, 4), slice(4, 8))]
    nt_xent(torch.cat([z[0] for z in zs]), torch.cat([z[1] for z in zs]), ref.temperature).backward()
    if not replay:
        monkeypatch.setattr(step_module, "_set_rng_state", lambda *a: None)
    opt, sched = make_optimizer(model, cfg, 10)
    torch.manual_seed(9)
    TrainStep(model, model, opt, sched, None, 5).forward_backward(views, index)
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    return torch.cat([model.get_parameter(n).grad.flatten() for n in names]), \
        torch.cat([ref.get_parameter(n).grad.flatten() for n in names])


def test_drop_path_and_dropout_replay_their_masks(monkeypatch):
    got, want = _drop_path_grads(True, monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)


def test_without_the_rng_replay_drop_path_gives_other_gradients(monkeypatch):
    got, want = _drop_path_grads(False, monkeypatch)
    assert (got - want).abs().max() > 1e-3 * want.abs().max()


def _count_gathers(fn):
    """(fn(), the number of gathers it made)."""
    from selfsup.parallel import distributed as D

    calls = []
    saved = {name: getattr(D, name) for name in ("all_gather_no_grad", "all_gather_with_grad")}
    for name, f in saved.items():
        setattr(D, name, lambda *a, _f=f, _n=name, **k: calls.append(_n) or _f(*a, **k))
    try:
        return fn(), len(calls)
    finally:
        for name, f in saved.items():
            setattr(D, name, f)


def _ddp_worker(rank, world, method, micro):
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg, model = make(method, VIT, bn=False)
    (views, index), = batches(1)
    sl = slice(rank * B // world, (rank + 1) * B // world)
    views, index = [v[sl] for v in views], index[sl]
    _, full_gathers = _count_gathers(lambda: copy.deepcopy(model)(views, index))
    opt, sched = make_optimizer(model, cfg, 10)
    torch.manual_seed(11)
    step = TrainStep(model, DDP(model), opt, sched, None, micro)
    out, gathers = _count_gathers(lambda: step.forward_backward(views, index))
    assert gathers == full_gathers, (gathers, full_gathers)   # once per step, not once per chunk
    return out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["simclr", "mocov3"])
def test_two_processes_with_micro_batches_equal_one_process_on_the_whole_batch(method):
    world = 2
    outs = run_distributed(_ddp_worker, world, method, 3)   # 4 images per rank in chunks of 2
    _, model = make(method, VIT, bn=False)
    (views, index), = batches(1)
    torch.manual_seed(11)
    out = model(views, index)
    out["loss"].backward()
    assert_same_as_one_process(outs, model, out["loss"], world)


def _shuffle_bn_worker(rank, world):
    """MoCo with BN and cross-rank shuffle BN, micro-batched under DDP, against a plain reference: keys
    of the shuffled global batch, queries chunk by chunk with a graph, gradients averaged over ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg, model = make("moco", SMALL)
    assert model.shuffle_bn
    ref = copy.deepcopy(model)
    (views, index), = batches(1)
    sl = slice(rank * B // world, (rank + 1) * B // world)
    views, index = [v[sl] for v in views], index[sl]
    torch.manual_seed(13)
    k = ref.keys(views[1])
    q = torch.cat([ref.query(views[0][p]) for p in (slice(0, 2), slice(2, 4))])
    info_nce(q, k, ref.queue, ref.temperature).backward()
    opt, sched = make_optimizer(model, cfg, 10)
    torch.manual_seed(13)
    TrainStep(model, DDP(model, broadcast_buffers=False), opt, sched, None, 3).forward_backward(views, index)
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            dist.all_reduce(r.grad)
            torch.testing.assert_close(p.grad, r.grad / world, rtol=1e-6, atol=1e-10, msg=n)
    return True


def test_cross_rank_shuffle_bn_works_with_micro_batches():
    assert run_distributed(_shuffle_bn_worker, 2) == [True, True]


def test_resume_with_micro_batches_is_exact(tmp_path):
    args = TINY + ["train.micro_batch=12", "train.epochs=1", "eval.every=0", "train.checkpoint_every=10"]
    train(load_config(None, args + [f"run_dir={tmp_path / 'a'}"]))
    train(load_config(None, args + [f"run_dir={tmp_path / 'b'}", "train.max_steps=25"]))
    train(load_config(str(tmp_path / "b/config.yaml"), ["train.max_steps=null"]), resume=str(tmp_path / "b"))
    assert_same_model(tmp_path / "a", tmp_path / "b")


def test_the_memory_knobs_may_change_on_resume_and_the_batch_may_not(tmp_path):
    cfg = load_config(None, TINY + ["train.micro_batch=12"])
    saved = OmegaConf.to_yaml(cfg)
    check_run_resume(load_config(None, TINY + ["train.micro_batch=4", "model.checkpointing=true"]), saved, tmp_path)
    with pytest.raises(ConfigError, match="train.batch_size: 32 -> 64"):
        check_run_resume(load_config(None, TINY + ["train.micro_batch=12", "train.batch_size=64"]), saved, tmp_path)


def test_chunks_are_the_fewest_of_at_most_m_and_alike():
    assert chunks(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert chunks(4, 3) == [slice(0, 2), slice(2, 4)]
    for b in range(1, 40):
        for m in range(1, b + 2):
            sizes = [p.stop - p.start for p in chunks(b, m)]
            assert sum(sizes) == b and max(sizes) <= m and max(sizes) - min(sizes) <= 1 and len(sizes) == -(-b // m)


def test_the_run_says_how_the_batch_is_cut_and_what_bn_does():
    cfg, model = make("simclr", SMALL, ["train.batch_size=512", "train.micro_batch=100"])
    line = micro_batch_line(cfg, 2, model)
    assert "256 images per process in 3 chunks of 86-85" in line and "ghost BN of 86-85 images" in line
    cfg, model = make("moco", VIT, ["train.batch_size=512", "train.micro_batch=100"], bn=False)
    line = micro_batch_line(cfg, 1, model)
    assert "6 chunks" in line and "as it is encoded" in line and "ghost BN" not in line
    assert micro_batch_line(load_config(None, ["train.batch_size=64", "train.micro_batch=64"]), 1, model) == ""
    with pytest.raises(ConfigError, match="train.micro_batch"):
        load_config(None, ["train.micro_batch=0"])
