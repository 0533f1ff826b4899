import math

import pytest
import torch

from selfsup.losses import nt_xent, nt_xent_local


def ref_nt_xent(z1, z2, t):
    """Plain reference: explicit loops over the 2B anchors and their candidates (float64)."""
    z = torch.cat([z1, z2]).double()
    n, b = z.shape[0], z1.shape[0]
    zn = [z[i] / torch.sqrt((z[i] * z[i]).sum()) for i in range(n)]
    total = 0.0
    for i in range(n):
        j = i + b if i < b else i - b
        denom = 0.0
        for k in range(n):
            if k != i:
                denom = denom + torch.exp(torch.dot(zn[i], zn[k]) / t)
        total = total - torch.log(torch.exp(torch.dot(zn[i], zn[j]) / t) / denom)
    return total / n


def _pair(b, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("t", [0.07, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("d", [3, 8, 64])
@pytest.mark.parametrize("b", [1, 2, 5, 16])
def test_matches_reference(b, d, t):
    z1, z2 = _pair(b, d, seed=b * 100 + d)
    got = nt_xent(z1, z2, temperature=t)
    assert got.dtype == torch.float64 and got.shape == ()
    torch.testing.assert_close(got, ref_nt_xent(z1, z2, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.07, 0.5])
@pytest.mark.parametrize("b", [1, 2, 5, 16])
def test_gradients_match_reference(b, t):
    z1, z2 = _pair(b, 8, seed=b)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    nt_xent(a1, a2, t).backward()
    ref_nt_xent(r1, r2, t).backward()
    torch.testing.assert_close(a1.grad, r1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a2.grad, r2.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    z1, z2 = _pair(4, 5, seed=3)
    z1.requires_grad_(), z2.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.2), (z1, z2))


@pytest.mark.parametrize("block", [1, 7, 40])   # elements of the largest similarity block: 1 anchor ... a few
@pytest.mark.parametrize("b", [1, 5, 16])
def test_blockwise_nt_xent_equals_the_reference(b, block, monkeypatch):
    """Above losses.BLOCK_ELEMENTS the (2B, 2N) logits go block by block of anchors (large batches under
    train.micro_batch): the loss and the gradients equal the plain loop reference."""
    import selfsup.losses as L

    monkeypatch.setattr(L, "BLOCK_ELEMENTS", block)
    z1, z2 = _pair(b, 8, seed=b + 7)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    r1, r2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    got = nt_xent(a1, a2, 0.2)
    assert got.grad_fn.name().startswith("_BlockwiseCE") or (2 * b) ** 2 <= block
    got.backward()
    ref = ref_nt_xent(r1, r2, 0.2)
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a1.grad, r1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a2.grad, r2.grad, rtol=1e-10, atol=1e-12)


def test_blockwise_nt_xent_local_gradcheck_and_value(monkeypatch):
    import selfsup.losses as L

    z1, z2 = _pair(3, 5, seed=4)
    c1, c2 = _pair(9, 5, seed=5)
    c1[3:6], c2[3:6] = z1, z2   # this rank's rows at offset 3 of N = 9
    args = [x.clone().requires_grad_() for x in (z1, z2, c1, c2)]
    plain = nt_xent_local(*args, 3, 0.3)
    monkeypatch.setattr(L, "BLOCK_ELEMENTS", 20)
    torch.testing.assert_close(nt_xent_local(*args, 3, 0.3), plain, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda *a: nt_xent_local(*a, 3, 0.3), tuple(args))


def test_scale_invariance():
    z1, z2 = _pair(6, 10, seed=1)
    s1 = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1
    s2 = torch.rand(6, 1, dtype=torch.float64) * 0.01 + 1e-3
    torch.testing.assert_close(nt_xent(z1 * s1, z2 * s2, 0.1), nt_xent(z1, z2, 0.1), rtol=1e-12, atol=1e-12)


def test_aligned_lower_than_random_and_closed_form():
    b, t = 8, 0.1
    e = torch.eye(b, dtype=torch.float64)  # distinct, orthogonal, views perfectly aligned
    aligned = nt_xent(e, 2 * e, t)
    # positive sim 1, the 2B-2 negatives have sim 0
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * b - 2)))
    assert aligned.item() == pytest.approx(expected, rel=1e-12)
    rnd = nt_xent(*_pair(b, b, seed=7), temperature=t)
    assert aligned < rnd


def test_single_pair_is_zero():
    # B = 1: the positive is the only candidate left after masking the anchor itself
    z1, z2 = _pair(1, 4)
    assert nt_xent(z1, z2).item() == pytest.approx(0.0, abs=1e-15)


def test_float32_agrees_with_float64():
    z1, z2 = _pair(32, 16, seed=5)
    for t in (0.07, 0.5):
        l32 = nt_xent(z1.float(), z2.float(), t)
        assert l32.dtype == torch.float32
        assert l32.item() == pytest.approx(nt_xent(z1, z2, t).item(), rel=1e-5)


def test_low_temperature_is_finite():
    z1, z2 = _pair(16, 8, seed=2, dtype=torch.float32)
    z1.requires_grad_()
    loss = nt_xent(z1, z2, temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()


def test_autocast_bfloat16_returns_float32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 8)
    x1, x2 = torch.randn(6, 12), torch.randn(6, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h1, h2 = lin(x1), lin(x2)
        assert h1.dtype == torch.bfloat16
        loss = nt_xent(h1, h2, 0.5)
    assert loss.dtype == torch.float32
    expected = nt_xent(h1.detach().float(), h2.detach().float(), 0.5)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("world", [2, 3])
def test_local_slices_average_to_global(world):
    """The pure per-rank core: mean over rank slices == loss on the full batch."""
    b = 4
    z1, z2 = _pair(world * b, 8, seed=world)
    full = nt_xent(z1, z2, 0.2)
    parts = [
        nt_xent_local(z1[r * b : (r + 1) * b], z2[r * b : (r + 1) * b], z1, z2, r * b, 0.2)
        for r in range(world)
    ]
    torch.testing.assert_close(torch.stack(parts).mean(), full, rtol=1e-12, atol=1e-12)


def test_shape_errors():
    z1, z2 = _pair(4, 8)
    with pytest.raises(ValueError):
        nt_xent(z1, z2[:3])
    with pytest.raises(ValueError):
        nt_xent_local(z1, z2, z1, z2, offset=1, temperature=0.5)


# ---------------------------------------------------------------- MoCo InfoNCE, InstDisc NCE / softmax

from selfsup.losses import info_nce, instance_softmax, nce_loss, nce_normalizer  # noqa: E402


def _unit(x):
    return x / torch.sqrt((x * x).sum())


def ref_info_nce(q, k, queue, t):
    """Plain reference: loop over queries and queue entries (float64)."""
    total = 0.0
    for i in range(q.shape[0]):
        qi = _unit(q[i])
        pos = torch.exp(torch.dot(qi, _unit(k[i])) / t)
        neg = 0.0
        for j in range(queue.shape[0]):
            neg = neg + torch.exp(torch.dot(qi, _unit(queue[j])) / t)
        total = total - torch.log(pos / (pos + neg))
    return total / q.shape[0]


def ref_nce(f, pos, noise, z, t, n):
    """Plain reference of the InstDisc NCE loss; noise (K, D) shared or (B, K, D) per sample."""
    b = f.shape[0]
    k = noise.shape[-2]
    pn = 1.0 / n
    total = 0.0
    for i in range(b):
        fi = _unit(f[i])
        p = torch.exp(torch.dot(fi, pos[i]) / t) / z
        total = total - torch.log(p / (p + k * pn))
        rows = noise if noise.dim() == 2 else noise[i]
        for j in range(k):
            p = torch.exp(torch.dot(fi, rows[j]) / t) / z
            total = total - torch.log(1 - p / (p + k * pn))
    return total / b


def _bank(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("t", [0.07, 0.2])
def test_info_nce_matches_loop_reference_value_and_gradients(t):
    q, k = _pair(5, 8, seed=1)
    queue = torch.randn(7, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    args = [x.clone().requires_grad_() for x in (q, k, queue)]
    refs = [x.clone().requires_grad_() for x in (q, k, queue)]
    loss, ref = info_nce(*args, t), ref_info_nce(*refs, t)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    for a, r in zip(args, refs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-10, atol=1e-12)


def test_info_nce_float32_under_autocast():
    q, k = _pair(4, 8, dtype=torch.float32)
    queue = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(q.bfloat16(), k.bfloat16(), queue, 0.1)
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError):
        info_nce(q, k[:3], queue, 0.1)


@pytest.mark.parametrize("per_sample", [False, True])
def test_nce_loss_matches_loop_reference_value_and_gradient(per_sample):
    b, k, d, n, t = 4, 6, 8, 50, 0.07
    f = torch.randn(b, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    bank = _bank(n, d, seed=4)
    pos = bank[:b]
    noise = bank[10:10 + b * k].view(b, k, d) if per_sample else bank[10:10 + k]
    z = nce_normalizer(f, pos, noise, t, n)
    fa, fr = f.clone().requires_grad_(), f.clone().requires_grad_()
    loss, ref = nce_loss(fa, pos, noise, z, t, n), ref_nce(fr, pos, noise, z, t, n)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(fa.grad, fr.grad, rtol=1e-10, atol=1e-12)


def test_nce_normalizer_is_n_times_mean_exp_over_positive_and_noise_rows():
    b, k, d, n, t = 3, 5, 4, 40, 0.1
    f = torch.randn(b, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bank = _bank(n, d, seed=6)
    pos, noise = bank[:b], bank[20:20 + k]
    vals = []
    for i in range(b):
        fi = _unit(f[i])
        vals.append(torch.exp(torch.dot(fi, pos[i]) / t))
        vals += [torch.exp(torch.dot(fi, noise[j]) / t) for j in range(k)]
    expected = sum(vals) / len(vals) * n
    torch.testing.assert_close(nce_normalizer(f, pos, noise, t, n), expected, rtol=1e-12, atol=0)


def test_instance_softmax_matches_loop_reference():
    b, d, n, t = 4, 6, 9, 0.07
    f = torch.randn(b, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    bank = _bank(n, d, seed=8)
    index = torch.tensor([3, 0, 8, 3])
    fa, fr = f.clone().requires_grad_(), f.clone().requires_grad_()
    ref = 0.0
    for i in range(b):
        fi = _unit(fr[i])
        denom = sum(torch.exp(torch.dot(fi, bank[j]) / t) for j in range(n))
        ref = ref - torch.log(torch.exp(torch.dot(fi, bank[index[i]]) / t) / denom)
    ref = ref / b
    loss = instance_softmax(fa, bank, index, t)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(fa.grad, fr.grad, rtol=1e-10, atol=1e-12)
