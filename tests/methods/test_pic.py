"""PIC / one-million-way as a method: row updates, sampled negatives, multi-crop, prior, sharding, resume."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, assert_same_model
from dist_utils import run_distributed
from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train
from selfsup.eval.features import extract_features
from selfsup.instance import Targets
from selfsup.methods import build_method
from selfsup.methods.pic import PIC

PIC_ARGS = TINY + ["method=pic", "eval.every=0"]


def linear_pic(n, *overrides, dtype=torch.float64):
    """PIC on a BN-free linear encoder (exact comparisons across ranks), N = n instances."""
    cfg = load_config(None, PIC_ARGS + ["model.head_layers=1", "model.proj_dim=4", *overrides])
    torch.manual_seed(0)
    model = PIC(cfg, nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), 6)
    model.setup(n)
    return model.to(dtype).train()


def batch(b, seed, dtype=torch.float64):
    return torch.randn(b, 3, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_full_softmax_row_update_is_torch_sgd():
    model = linear_pic(10, "train.weight_decay=0.01", "train.momentum=0.9")
    ref = nn.Parameter(model.clf.weight.detach().clone())
    opt = torch.optim.SGD([ref], lr=0.5, momentum=0.9, weight_decay=0.01)
    for step in range(3):
        index = torch.tensor([1, 4, 7]) + step
        loss = model([batch(3, step)], index)["loss"]
        loss.backward()
        ref.grad = model.clf.weight.grad.clone()
        opt.step()
        model.optimizer_step(0.5)
        torch.testing.assert_close(model.clf.weight, ref, rtol=0, atol=1e-14)
        assert model.clf.weight.grad is None
        model.zero_grad()


def test_sampled_negatives_leave_other_rows_and_momentum_untouched():
    model = linear_pic(40, "pic.negatives=6", "train.weight_decay=0.01")
    model.clf_momentum.normal_()   # a non-zero momentum must not move rows outside the sample
    for step in range(4):
        index = torch.arange(3) * 7 + step
        w0, m0 = model.clf.weight.detach().clone(), model.clf_momentum.clone()
        sel_ids = model.recent.candidates(index)
        model([batch(3, step)], index)["loss"].backward()
        model.optimizer_step(0.1)
        outside = torch.ones(40, dtype=torch.bool)
        outside[sel_ids] = False
        assert torch.equal(model.clf.weight[outside], w0[outside])
        assert torch.equal(model.clf_momentum[outside], m0[outside])
        assert not torch.equal(model.clf.weight[index], w0[index])
        assert (model.recent.recent()[-3:] == index).all()   # this step's visits are the newest negatives


def test_small_crops_train_the_encoder_only():
    model = linear_pic(10, "pic.small_crops=2", "pic.small_size=2", "pic.small_scale=[0.5,1.0]")
    index = torch.tensor([0, 3, 5])
    x, s1, s2 = batch(3, 0), batch(3, 1), batch(3, 2)
    model([x, s1, s2], index)["loss"].backward()
    g_rows = model.clf.weight.grad.clone()
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ref.clf.weight.grad = None
    (ref.clf(ref.embed(x), Targets(index)) / 3).backward()
    torch.testing.assert_close(g_rows, ref.clf.weight.grad, rtol=0, atol=1e-14)
    views = model.make_views(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), lambda im, g: im.float(), None)
    assert len(views) == 3 and model.n_views == 3 and views[1].shape[-1] == 2


def test_prior_rows_are_the_untrained_networks_features_with_collected_bn_statistics():
    cfg = load_config(None, PIC_ARGS + ["pic.prior=true", "train.batch_size=16"])
    torch.manual_seed(0)
    model = build_method(cfg)
    model.setup(40)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(model.state_dict())
    ref = copy.deepcopy(nn.Sequential(model.backbone, model.head))
    model.init_from_data(   # what the engine passes: the training images' clean features under a network
        lambda net, train_bn=False: extract_features(net, images, 16, torch.device("cpu"), None, train_bn=train_bn))
    from selfsup.data.augment import eval_transform

    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        ref.train()
        for c in images.split(16):
            ref(eval_transform(c, 16))
        ref.eval()
        feats = F.normalize(ref(eval_transform(images, 16)), dim=1)
    torch.testing.assert_close(model.clf.weight, feats, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():   # nothing but the rows changed
        if k != "clf.weight":
            assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- hybrid parallelism, end to end


def _pic_step_worker(rank, world, overrides, b, n):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = linear_pic(n, *overrides)
    DDP._set_params_and_buffers_to_ignore_for_model(model, model.ddp_ignored())
    net = DDP(model)
    own = {id(p) for p in model.own_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if id(p) not in own], lr=0.3, momentum=0.9)
    for step in range(3):
        x, index = batch(world * b, step), (torch.arange(world * b) * 5 + step) % n
        sl = slice(rank * b, (rank + 1) * b)
        loss = net([x[sl]], index[sl])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.optimizer_step(0.3)
    state = model.gather_sharded_state(model.state_dict())
    return loss.item(), state, model.ddp_ignored()


@pytest.mark.parametrize("overrides", [[], ["pic.negatives=7", "pic.smooth_k=2", "pic.smooth_alpha=0.2"]],
                         ids=["full", "sampled+smoothed"])
def test_sharded_pic_steps_match_one_process_on_the_whole_batch(overrides):
    """2 ranks (13 rows: uneven shards), DDP encoder + sharded rows, three steps: loss, encoder and
    every row (and its momentum) equal one process with all rows and the concatenated batch."""
    world, b, n = 2, 3, 13
    outs = run_distributed(_pic_step_worker, world, overrides, b, n)
    model = linear_pic(n, *overrides)
    own = {id(p) for p in model.own_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if id(p) not in own], lr=0.3, momentum=0.9)
    for step in range(3):
        x, index = batch(world * b, step), (torch.arange(world * b) * 5 + step) % n
        loss = model([x], index)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.optimizer_step(0.3)
    ref = model.state_dict()
    assert "clf.weight" in outs[0][2] and "clf_momentum" in outs[0][2]
    for got_loss, state, _ in outs:
        assert abs(got_loss - loss.item()) < 1e-10
        assert state.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=1e-9, atol=1e-10, msg=k)


def _count_gathers(rank, world, settings):
    """all_gather calls of one PIC forward with a large and two small crops on this rank, for each
    list of overrides in `settings`."""
    import torch.distributed as dist

    real, out = dist.all_gather, []
    for overrides in settings:
        model = linear_pic(13, "pic.small_crops=2", "pic.small_size=2", "pic.small_scale=[0.5,1.0]", *overrides)
        calls = []

        def counting(o, x, *a, **k):
            calls.append(tuple(x.shape))
            return real(o, x, *a, **k)

        dist.all_gather = counting   # this spawned process only
        try:
            model([batch(3, 0), batch(3, 1), batch(3, 2)], torch.arange(3) + 3 * rank)
        finally:
            dist.all_gather = real
        out.append(calls)
    return out


def test_the_global_batchs_targets_are_gathered_once_per_step():
    """One step, three crops: the instance ids are gathered once (with the shape check: 2 all_gathers),
    then one all_gather of the features per crop; with smoothed labels the hard-class refresh adds
    its merge (values and ids, 2 x 2). Before the redesign targets and smoothing ids were gathered
    again for every crop (14 and 24 all_gathers)."""
    plain, smoothed = run_distributed(_count_gathers, 2, [[], ["pic.smooth_k=2", "pic.smooth_alpha=0.2"]])[0]
    assert len(plain) == 5 and plain[-3:] == [(3, 4)] * 3   # the features of each crop: (B, D)
    assert len(smoothed) == 9


def _train_two_ranks(rank, world, overrides):
    return train(load_config(None, overrides))


def test_run_on_two_ranks_resumes_on_one_with_all_rows(tmp_path):
    args = PIC_ARGS + ["train.epochs=1", "pic.negatives=64", "data.sampler=sliding_window", "data.window=512",
                       "data.stride=128", f"run_dir={tmp_path}"]
    run_distributed(_train_two_ranks, 2, args + ["train.max_steps=4"])
    state = load_checkpoint(tmp_path / "checkpoints/last.pt")["model"]
    assert state["clf.weight"].shape == (2000, 16) and state["clf_momentum"].shape == (2000, 16)
    out = train(load_config(str(tmp_path / "config.yaml"), ["train.max_steps=6"]), resume=str(tmp_path))
    assert out["step"] == 6


def test_stop_and_resume_is_exact_with_sampled_negatives_and_sliding_window(tmp_path):
    args = PIC_ARGS + ["train.epochs=1", "pic.negatives=100", "pic.smooth_k=3", "pic.smooth_alpha=0.2",
                       "pic.small_crops=1", "pic.small_size=8", "data.sampler=sliding_window", "data.window=256",
                       "data.stride=64"]
    train(load_config(None, args + [f"run_dir={tmp_path / 'a'}", "train.max_steps=10"]))
    train(load_config(None, args + [f"run_dir={tmp_path / 'b'}", "train.max_steps=6"]))
    train(load_config(str(tmp_path / "b/config.yaml"), ["train.max_steps=10"]), resume=str(tmp_path / "b"))
    sa = assert_same_model(tmp_path / "a", tmp_path / "b")
    assert int(sa["recent.count"]) == 100 and (sa["clf.hard_classes"] >= 0).any()
