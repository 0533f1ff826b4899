"""Index schedules (selfsup.data.samplers): the trainer's epoch order and PIC's sliding window."""

import io
import math

import pytest
import torch

from selfsup.data.samplers import (EpochSampler, SlidingWindowSampler, build_index_schedule,
                                   rank_slice)


def serve(sampler, steps):
    return [sampler.next_global_batch() for _ in range(steps)]


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- EpochSampler ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_epoch_sampler_reproduces_trainer_order(seed, world):
    n, bs = 103, 12
    local_bs, steps_per_epoch = bs // world, n // bs
    ranks = [EpochSampler(n, bs, seed) for _ in range(world)]
    assert ranks[0].epoch_length == steps_per_epoch
    for epoch in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for b in range(steps_per_epoch):
            for rank, s in enumerate(ranks):
                start = b * bs + rank * local_bs
                got = s.next_batch(rank, world)
                assert got.dtype == torch.int64
                assert torch.equal(got, perm[start:start + local_bs])
    assert ranks[0].state_dict()["epoch"] == 3 and ranks[0].steps_done == 3 * steps_per_epoch


def test_epoch_sampler_resume_and_legacy_position():
    ref = serve(EpochSampler(50, 8, 1), 30)
    for k in [0, 3, 6, 7, 13]:
        s = EpochSampler(50, 8, 1)
        serve(s, k)
        t = EpochSampler(50, 8, 1)
        t.load_state_dict(roundtrip(s.state_dict()))
        assert all(torch.equal(a, b) for a, b in zip(serve(t, 10), ref[k:k + 10]))
    # the trainer's older checkpoints hold only (epoch, batch_in_epoch); end-of-epoch positions too
    t = EpochSampler(50, 8, 1)
    t.load_state_dict({"epoch": 1, "batch_in_epoch": 2})
    assert torch.equal(t.next_global_batch(), ref[6 + 2])
    t.load_state_dict({"epoch": 0, "batch_in_epoch": 6})
    assert torch.equal(t.next_global_batch(), ref[6])
    with pytest.raises(ValueError):
        t.load_state_dict(EpochSampler(50, 8, 2).state_dict())   # other seed


# --- SlidingWindowSampler: schedule ------------------------------------------------------------

def window_log(s, n_windows):
    """Serve n_windows windows (B must divide W) and return [(pass, start, served indices)]."""
    per = s.window // s.batch_size
    out = []
    for _ in range(n_windows):
        served = torch.cat(serve(s, per))
        st = s.state_dict()
        assert st["pos"] == s.window
        out.append((st["pass_index"], st["start"], served))
    return out


@pytest.mark.parametrize("n,w,stride,bs", [(960, 240, 60, 40), (1000, 250, 60, 25), (97, 40, 15, 8)])
def test_windows_follow_the_schedule(n, w, stride, bs):
    s = SlidingWindowSampler(n, w, stride, bs, seed=5)
    log = window_log(s, 3 * math.ceil(n / stride) + 2)
    pass_, start = 0, 0
    for j, (p, st, served) in enumerate(log):
        if j:
            start += stride
            if start >= n:               # wrap: new pass, new permutation
                start, pass_ = start - n, pass_ + 1
        assert (p, st) == (pass_, start)
        assert len(set(served.tolist())) == w
        assert torch.equal(served.sort().values, s.window_indices(p, st).sort().values)
        assert torch.equal(s.window_indices(p, st), s.permutation(p)[(st + torch.arange(w)) % n])
    assert pass_ >= 2
    # windows are served shuffled, not in permutation order
    assert not torch.equal(log[0][2], s.window_indices(0, 0))


def test_reshuffle_on_wrap():
    n, w, stride, bs = 960, 240, 60, 40
    s = SlidingWindowSampler(n, w, stride, bs, seed=0)
    windows_per_pass = n // stride
    log = window_log(s, windows_per_pass + 1)
    assert [p for p, _, _ in log] == [0] * windows_per_pass + [1]
    assert not torch.equal(s.permutation(0), s.permutation(1))
    assert torch.equal(s.permutation(1).sort().values, torch.arange(n))
    # the first window of pass 1 comes from the new permutation
    first_new = set(log[-1][2].tolist())
    assert first_new == set(s.permutation(1)[:w].tolist()) != set(s.permutation(0)[:w].tolist())
    # the last windows of pass 0 wrap around the end of the *same* permutation
    assert set(log[windows_per_pass - 1][2].tolist()) == set(
        torch.cat([s.permutation(0)[n - stride:], s.permutation(0)[:w - stride]]).tolist())


def visit_counts(batches, n):
    return torch.bincount(torch.cat(batches), minlength=n)


def test_exact_visits_over_rescaled_epochs():
    # S divides W and N: a pass = W/S = 4 epochs, each image exactly W/S times per pass,
    # also with B not dividing W (batches straddle windows; 3840 images = 120 batches of 32)
    n, w, stride, bs = 960, 240, 60, 32
    s = SlidingWindowSampler(n, w, stride, bs, seed=2)
    assert s.visits_per_pass == 4 and s.passes_for_epochs(8) == 2
    batches = serve(s, s.steps_for_epochs(4))
    assert sum(len(b) for b in batches) == 4 * n
    assert (visit_counts(batches, n) == 4).all()
    batches += serve(s, s.steps_for_epochs(4))
    assert (visit_counts(batches, n) == 8).all()


def expected_counts(s, images):
    """Per-index visit counts of the first `images` served entries, from the window schedule:
    full windows exactly, the partly served last window bounded by [0, 1]."""
    n, w, stride = s.n, s.window, s.stride
    lo = torch.zeros(n, dtype=torch.int64)
    pass_, start, done = 0, 0, 0
    while done + w <= images:
        lo += torch.bincount(s.window_indices(pass_, start), minlength=n)
        done += w
        start += stride
        if start >= n:
            start, pass_ = start - n, pass_ + 1
    hi = lo.clone()
    if done < images:
        hi += torch.bincount(s.window_indices(pass_, start), minlength=n)
    return lo, hi


@pytest.mark.parametrize("n,w,stride,bs", [(1000, 250, 60, 48), (1000, 250, 60, 25), (997, 200, 64, 30),
                                           (960, 240, 60, 32)])
def test_visits_as_designed(n, w, stride, bs):
    s = SlidingWindowSampler(n, w, stride, bs, seed=9)
    epochs = 6
    batches = serve(s, s.steps_for_epochs(epochs))
    for b in batches:
        assert len(b) == bs and len(set(b.tolist())) == bs       # never a repeat inside a batch
    counts = visit_counts(batches, n)
    lo, hi = expected_counts(SlidingWindowSampler(n, w, stride, bs, seed=9), sum(map(len, batches)))
    assert ((counts >= lo) & (counts <= hi)).all()
    assert (counts > 0).all()                                     # every index served
    assert counts.sum() == epochs * (n // bs) * bs                # ~ epochs * N images
    # per pass each index is in floor/ceil(W/S) windows, +-1 near a wrap when S does not divide N
    per_pass, _ = expected_counts(SlidingWindowSampler(n, w, stride, bs, seed=9), w * math.ceil(n / stride))
    assert per_pass.min() >= w // stride - (n % stride > 0)
    assert per_pass.max() <= -(-w // stride) + (n % stride > 0)
    if n % stride == 0 and w % stride == 0:
        assert (per_pass == w // stride).all()
    # over many epochs each index is seen about `epochs` times
    assert abs(counts.float().mean().item() - epochs * (n // bs) * bs / n) < 1e-6
    assert counts.max() - counts.min() <= 2 * math.ceil(w / stride)


def test_revisit_distance():
    n, w, stride, bs = 4096, 512, 64, 64
    s = SlidingWindowSampler(n, w, stride, bs, seed=4)
    windows_per_pass = n // stride
    stream = torch.cat(serve(s, 2 * windows_per_pass * w // bs))      # two passes
    pos = torch.arange(len(stream))
    order = torch.argsort(stream * len(stream) + pos)                 # by index, then by time
    idx, t = stream[order], pos[order]
    same = idx[1:] == idx[:-1]
    gap = (t[1:] - t[:-1])[same]
    win_a, win_b = (t[:-1] // w)[same], (t[1:] // w)[same]
    within = (win_a // windows_per_pass) == (win_b // windows_per_pass)   # not across a reshuffle
    consecutive = within & (win_b == win_a + 1)
    assert consecutive.float().mean() > 0.9
    assert (gap[consecutive] < 2 * w).all()                           # < 2W between consecutive windows
    assert abs(gap[consecutive].float().mean().item() / w - 1) < 0.05  # W on average
    assert gap.float().median() < 1.1 * w                              # typical revisit ~W, not ~N
    assert gap.float().median() < n / 4
    # epoch order for comparison: one visit per index per N images
    e = torch.cat(serve(EpochSampler(n, bs, 4), 2 * n // bs))
    eo = torch.argsort(e * len(e) + torch.arange(len(e)))
    assert ((eo[1::2] - eo[0::2]).float().median() > n / 2)


def test_window_at_least_n_is_shuffled_full_passes():
    n, bs = 100, 20
    s = SlidingWindowSampler(n, 500, 30, bs, seed=1)
    assert (s.window, s.stride) == (n, n)
    passes = [torch.cat(serve(s, n // bs)) for _ in range(4)]
    for p in passes:
        assert torch.equal(p.sort().values, torch.arange(n))
    assert len({tuple(p.tolist()) for p in passes}) == 4
    # B not dividing N: batches straddle passes without repeats, each pass still complete
    s = SlidingWindowSampler(n, n, 7, 32, seed=1)
    batches = serve(s, 25)                                            # 800 images = 8 passes
    assert all(len(set(b.tolist())) == 32 for b in batches)
    assert (visit_counts(batches, n) == 8).all()


# --- data parallelism, determinism, checkpoints ------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("make", [lambda: SlidingWindowSampler(1000, 250, 60, 48, seed=3),
                                  lambda: EpochSampler(1000, 48, seed=3)])
def test_rank_slices_disjoint_and_cover(world, make):
    ref, ranks = make(), [make() for _ in range(world)]
    for _ in range(40):
        g = ref.next_global_batch()
        parts = [s.next_batch(r, world) for r, s in enumerate(ranks)]
        assert all(len(p) == 48 // world for p in parts)
        assert torch.equal(torch.cat(parts), g)
        assert len(set(torch.cat(parts).tolist())) == 48
        assert all(torch.equal(rank_slice(g, r, world), parts[r]) for r in range(world))
    with pytest.raises(ValueError):
        make().next_batch(0, 5)


def test_deterministic_from_seed_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = serve(SlidingWindowSampler(1000, 250, 60, 48, seed=7), 60)
    b = serve(SlidingWindowSampler(1000, 250, 60, 48, seed=7), 60)
    c = serve(SlidingWindowSampler(1000, 250, 60, 48, seed=8), 60)
    serve(EpochSampler(1000, 48, seed=7), 30)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("n,w,stride,bs", [(960, 240, 60, 32), (1000, 250, 60, 48), (100, 500, 30, 16),
                                           (97, 40, 15, 8)])
def test_exact_resume(n, w, stride, bs):
    seed, after = 11, 6
    s = SlidingWindowSampler(n, w, stride, bs, seed)
    total = 2 * math.ceil(n / s.stride) * s.window // bs + 7     # two passes and a bit
    ref, states = [], [s.state_dict()]          # states[k]: the position after k steps
    for _ in range(total + after):
        ref.append(s.next_global_batch())
        states.append(s.state_dict())
    # just before a wrap: the next step starts a new pass; mid-window; at a window's end
    before_wrap = [k for k in range(total) if states[k + 1]["pass_index"] > states[k]["pass_index"]]
    mid = [k for k in range(total) if 0 < states[k]["pos"] < s.window]
    at_end = [k for k in range(1, total) if states[k]["pos"] == s.window]
    assert before_wrap and mid
    ks = {0, 1, total - 1, before_wrap[0], before_wrap[0] + 1, before_wrap[-1], *mid[:3], *mid[-2:], *at_end[:2]}
    for k in sorted(ks):
        s = SlidingWindowSampler(n, w, stride, bs, seed)
        serve(s, k)
        state = roundtrip(s.state_dict())
        assert state["steps_done"] == k
        t = SlidingWindowSampler(n, w, stride, bs, seed)
        t.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(serve(t, after), ref[k:k + after])), k
        # the original continues identically too (state_dict does not disturb it)
        assert all(torch.equal(x, y) for x, y in zip(serve(s, after), ref[k:k + after])), k


def test_state_mismatch_rejected():
    s = SlidingWindowSampler(1000, 250, 60, 48, seed=3)
    serve(s, 5)
    for other in [SlidingWindowSampler(1000, 250, 50, 48, seed=3), SlidingWindowSampler(1000, 250, 60, 24, seed=3),
                  SlidingWindowSampler(999, 250, 60, 48, seed=3), SlidingWindowSampler(1000, 250, 60, 48, seed=4)]:
        with pytest.raises(ValueError):
            other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        EpochSampler(1000, 48, 3).load_state_dict(s.state_dict())


def test_invalid_arguments():
    for args in [(0, 10, 5, 4), (100, 0, 5, 4), (100, 10, 0, 4), (100, 10, 5, 0), (100, 10, -5, 4),
                 (100, 4, 5, 2),          # W < S
                 (100, 200, 50, 101),     # B > N
                 (100, 20, 5, 32),        # B > W: a batch would repeat images
                 (100, 10.0, 5, 4)]:
        with pytest.raises(ValueError):
            SlidingWindowSampler(*args)
    for args in [(0, 4), (10, 0), (10, 11)]:
        with pytest.raises(ValueError):
            EpochSampler(*args)
    with pytest.raises(ValueError):
        build_index_schedule("sliding_window", 100, 10)
    with pytest.raises(ValueError):
        build_index_schedule("nope", 100, 10)
    assert isinstance(build_index_schedule("epoch", 100, 10), EpochSampler)
    assert isinstance(build_index_schedule("sliding_window", 100, 10, window=40, stride=10), SlidingWindowSampler)


# ---------------------------------------------------------------- partitioned (cache_mode=part)
@pytest.mark.parametrize("kind", ["epoch", "sliding_window"])
def test_partitioned_schedule_keeps_each_rank_in_its_part_and_resumes(kind):
    from selfsup.data.samplers import build_index_schedule

    kw = {"window": 40, "stride": 10} if kind == "sliding_window" else {}
    s = build_index_schedule(kind, 103, 12, 7, partition_world=3, **kw)
    seen = [set() for _ in range(3)]
    for _ in range(2 * s.epoch_length):
        g = s.next_global_batch()
        for r in range(3):
            part = g[4 * r:4 * (r + 1)].tolist()
            assert all(i % 3 == r for i in part) and len(set(part)) == 4
            seen[r].update(part)
    assert all(len(x) >= (30 if kind == "epoch" else 12) for x in seen)
    state = s.state_dict()
    t = build_index_schedule(kind, 103, 12, 7, partition_world=3, **kw)
    t.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(s.next_batch(1, 3), t.next_batch(1, 3))
    # saved on 3 ranks, resumed on 2: same number of steps done, each rank in its new part
    u = build_index_schedule(kind, 103, 12, 7, partition_world=2, **kw)
    u.load_state_dict(state)
    assert u.steps_done == state["steps_done"]
    assert all(i % 2 == 1 for i in u.next_batch(1, 2).tolist())
    with pytest.raises(ValueError, match="for 2 processes"):
        u.next_batch(0, 4)
