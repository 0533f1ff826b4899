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
