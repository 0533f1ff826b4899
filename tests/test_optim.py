import io
import math

import pytest
import torch
from torch import nn

from selfsup.optim import LARS, build_optimizer, build_scheduler, param_groups, warmup_cosine


def _norm(x):
    return math.sqrt(sum(v * v for v in x))


def _lars_reference(p, grads, lr, m, wd, tc, eps, exclude):
    """Hand-written LARS (plain python floats) over several steps; p, grads: flat lists."""
    p, v = list(p), [0.0] * len(p)
    for g in grads:
        g = list(g)
        if not exclude:
            g = [gi + wd * pi for gi, pi in zip(g, p)]
            pn, gn = _norm(p), _norm(g)
            trust = tc * pn / (gn + eps) if pn > 0 and gn > 0 else 1.0
            g = [gi * trust for gi in g]
        v = [m * vi + gi for vi, gi in zip(v, g)]
        p = [pi - lr * vi for pi, vi in zip(p, v)]
    return p


def test_lars_matches_hand_computed_reference():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    z = torch.zeros(5, dtype=torch.float64)  # zero norm: trust ratio falls back to 1
    grads = {k: [torch.randn(t.shape, generator=gen, dtype=torch.float64) for _ in range(3)] for k, t in
             (("w", w), ("b", b), ("z", z))}
    lr, m, wd, tc, eps = 0.3, 0.9, 1e-2, 1e-3, 1e-8
    pw, pb, pz = (nn.Parameter(t.clone()) for t in (w, b, z))
    opt = LARS(
        [{"params": [pw, pz], "weight_decay": wd}, {"params": [pb], "weight_decay": 0.0, "lars_exclude": True}],
        lr=lr, momentum=m, trust_coefficient=tc, eps=eps,
    )
    for step in range(3):
        pw.grad, pb.grad, pz.grad = grads["w"][step], grads["b"][step], grads["z"][step]
        opt.step()
    ref = lambda t, k, ex: torch.tensor(  # noqa: E731
        _lars_reference(t.flatten().tolist(), [g.flatten().tolist() for g in grads[k]], lr, m, wd, tc, eps, ex),
        dtype=torch.float64,
    ).view(t.shape)
    torch.testing.assert_close(pw.data, ref(w, "w", False), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(pb.data, ref(b, "b", True), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(pz.data, ref(z, "z", False), rtol=1e-13, atol=1e-15)
    # one explicit step for the decayed param, written out
    pw2 = nn.Parameter(w.clone())
    opt2 = LARS([pw2], lr=lr, momentum=m, weight_decay=wd, trust_coefficient=tc, eps=eps)
    pw2.grad = grads["w"][0]
    opt2.step()
    g = grads["w"][0] + wd * w
    expected = w - lr * (tc * w.norm() / (g.norm() + eps)) * g
    torch.testing.assert_close(pw2.data, expected, rtol=1e-13, atol=1e-15)


def test_lars_skips_params_without_grad_and_supports_closure():
    p, q = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    opt = LARS([p, q], lr=0.1)
    p.grad = torch.ones(2, 2)
    assert opt.step(lambda: torch.tensor(1.5)).item() == 1.5
    assert torch.equal(q.data, torch.ones(2)) and not torch.equal(p.data, torch.ones(2, 2))


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
        nn.BatchNorm1d(5, affine=True), nn.Linear(5, 2, bias=False),
    )


def test_param_groups_exclude_bn_and_bias():
    net = _net()
    groups = param_groups(net, weight_decay=1e-4)
    assert len(groups) == 2
    decay, excluded = groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([net[0].weight, net[4].weight, net[6].weight])
    assert ids(excluded["params"]) == ids([net[0].bias, net[1].weight, net[1].bias, net[4].bias,
                                          net[5].weight, net[5].bias])
    assert decay["weight_decay"] == 1e-4 and not decay.get("lars_exclude", False)
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    # frozen params are left out; exclude_bn_bias=False gives one group
    net[0].weight.requires_grad_(False)
    assert id(net[0].weight) not in ids(param_groups(net, 1e-4)[0]["params"])
    (single,) = param_groups(net, 1e-4, exclude_bn_bias=False)
    assert len(single["params"]) == 8 and single["weight_decay"] == 1e-4


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW),
                                      ("LARS", LARS)])
def test_build_optimizer(name, cls):
    net = _net()
    opt = build_optimizer(net, name, lr=0.5, weight_decay=1e-4, nesterov=(name == "sgd"))
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    if cls is LARS:
        assert [g["lars_exclude"] for g in opt.param_groups] == [False, True]
    # plain parameter iterables are accepted too
    assert isinstance(build_optimizer(net.parameters(), name, lr=0.1, weight_decay=0.0), cls)


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError, match="lars, sgd, adamw"):
        build_optimizer(_net(), "adam_w", lr=0.1, weight_decay=0.0)


def test_warmup_cosine_values():
    f = warmup_cosine(total_steps=110, warmup_steps=10, final_lr_ratio=0.0)
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)  # end of warm-up
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # middle of the cosine
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(1000) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    g = warmup_cosine(100, 0, final_lr_ratio=0.1)
    assert g(0) == pytest.approx(1.0) and g(50) == pytest.approx(0.55) and g(100) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_build_scheduler_steps_per_iteration():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4, kind="cosine")
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[3] == pytest.approx(2.0) and lrs[12] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(0.0, abs=1e-12)

    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=2, kind="constant")
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="cosine"):
        build_scheduler(opt, 10, 1, kind="poly")


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_lars_state_dict_roundtrip_continues_identically():
    torch.manual_seed(0)
    model = _net()
    opt = build_optimizer(model, "lars", lr=0.1, weight_decay=1e-4)
    _train(model, opt, 3, seed=1)

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _net()
    model2.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(model2, "lars", lr=0.1, weight_decay=1e-4)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[1]["lars_exclude"] is True

    _train(model, opt, 3, seed=2)
    _train(model2, opt2, 3, seed=2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
