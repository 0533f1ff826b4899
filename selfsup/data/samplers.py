"""Index schedules: which dataset indices each training step uses.

An *index schedule* is a small stateful object that serves, step after step, the **global
batch** of dataset indices (an int64 tensor of shape (B,), B = ``batch_size`` = the global
batch over all ranks). Under data parallelism every rank holds its own copy of the schedule,
built with the same arguments, so all copies serve identical global batches; rank ``r`` of
``w`` uses the disjoint slice ``batch[r * B/w:(r + 1) * B/w]`` (the slices of all ranks
concatenate, in rank order, to the global batch). ``next_batch(rank, world_size)`` returns
that slice directly (the whole batch for the defaults ``rank=0, world_size=1``).

All randomness comes from private ``torch.Generator`` objects seeded from ``seed``; the global
RNG is never touched, so a schedule is a pure function of its constructor arguments and the
number of batches served. ``state_dict()`` holds only ints, strings and one int64 tensor (it
loads with ``torch.load(weights_only=True)``); ``load_state_dict`` on a freshly built schedule
with the same arguments restores the exact position, so the batches after a resume equal
those of an uninterrupted run.

Two schedules:

* :class:`EpochSampler` -- shuffled epochs, the trainer's historical order, bit for bit.
* :class:`SlidingWindowSampler` -- PIC's sliding-window data scheduler: every image is
  revisited about every W images instead of every N.

Both define ``epoch_length = N // B`` steps. A trainer that runs
``epochs * schedule.epoch_length`` steps shows the network ``epochs * (N // B) * B`` (about
``epochs * N``) images with either schedule, so "epochs" keep meaning "N images' worth of
compute"; for the sliding window this *is* the epoch rescaling of PIC (see
:class:`SlidingWindowSampler` for how epochs relate to passes over the permutation).

Trainer use (every rank)::

    sampler = build_index_schedule(kind, len(ds), cfg.train.batch_size, cfg.seed, ...)
    if resuming:
        sampler.load_state_dict(ckpt["sampler"])       # same position as at save time
    for step in range(start_step, epochs * sampler.epoch_length):
        index = sampler.next_batch(rank, world)          # (B // world,) int64, CPU
        ...
        checkpoint: {"sampler": sampler.state_dict(), ...}
"""

from __future__ import annotations

import torch

__all__ = [
    "IndexSchedule",
    "EpochSampler",
    "SlidingWindowSampler",
    "PartitionedSchedule",
    "rank_slice",
    "build_index_schedule",
    "derive_seed",
]

_MASK64 = (1 << 64) - 1


def derive_seed(seed: int, stream: int, i: int) -> int:
    """A 63-bit seed from (seed, stream, i) (splitmix64-style mixing), so that independent
    random draws (one per pass, one per window) never share a generator state."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(stream) * 0xBF58476D1CE4E5B9 + int(i)) & _MASK64
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of a global batch: ``batch[rank*b:(rank+1)*b]``, ``b = len(batch) // world_size``.

    The parts of ranks 0..world_size-1 are disjoint and concatenate to ``batch``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    if len(batch) % world_size:
        raise ValueError(f"global batch size {len(batch)} is not divisible by the world size {world_size}")
    b = len(batch) // world_size
    return batch[rank * b:(rank + 1) * b]


def _check_positive(**kw: int) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


class IndexSchedule:
    """Common interface of the index schedules (see the module docstring).

    Attributes: ``n`` (dataset size), ``batch_size`` (global batch B), ``seed``,
    ``epoch_length`` (= N // B steps), ``steps_done`` (global batches served so far)."""

    kind = "base"

    n: int
    batch_size: int
    seed: int
    steps_done: int

    @property
    def epoch_length(self) -> int:
        """Steps per epoch, N // B: ``epochs * epoch_length`` steps show about ``epochs * N`` images."""
        return self.n // self.batch_size

    def steps_for_epochs(self, epochs: float) -> int:
        """Number of steps that make ``epochs`` epochs (``int(epochs * epoch_length)``)."""
        return int(epochs * self.epoch_length)

    def next_global_batch(self) -> torch.Tensor:
        """The next global batch, int64 (B,), and advance the position by one step."""
        raise NotImplementedError

    def next_batch(self, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Advance by one step and return this rank's slice of the global batch (int64, CPU).

        Every rank calls it once per step on its own copy of the schedule."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by the world size {world_size}")
        return rank_slice(self.next_global_batch(), rank, world_size)

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _check_state(self, state: dict, keys: tuple[str, ...]) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"sampler state is for a '{state['kind']}' schedule, not '{self.kind}'")
        for k in keys:
            if k in state and int(state[k]) != int(getattr(self, k)):
                raise ValueError(f"sampler state has {k}={int(state[k])}, but this schedule has "
                                 f"{k}={getattr(self, k)}: it was saved with other settings")


class EpochSampler(IndexSchedule):
    """Shuffled epochs, dropping the last partial batch (the trainer's historical order).

    Epoch ``e`` uses ``perm_e = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + e))``;
    its step ``b`` (0 <= b < n // B) serves the global batch ``perm_e[b*B:(b+1)*B]``; the last
    ``n % B`` entries of ``perm_e`` are never served. After step ``n // B - 1`` the next epoch starts.

    The position is (``epoch``, ``batch_in_epoch``); ``load_state_dict`` also accepts a dict holding
    just those two keys (the trainer's older checkpoints store them at the top level).
    """

    kind = "epoch"

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        _check_positive(n=n, batch_size=batch_size)
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} images)")
        self.n, self.batch_size, self.seed = n, batch_size, int(seed)
        self.epoch, self.batch_in_epoch = 0, 0
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    @property
    def steps_done(self) -> int:
        return self.epoch * self.epoch_length + self.batch_in_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch``."""
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def next_global_batch(self) -> torch.Tensor:
        perm = self.permutation(self.epoch)
        b = self.batch_in_epoch
        out = perm[b * self.batch_size:(b + 1) * self.batch_size].clone()
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.epoch_length:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("n", "batch_size", "seed"))
        epoch, b = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= b <= self.epoch_length:
            raise ValueError(f"invalid sampler position epoch={epoch}, batch_in_epoch={b}")
        if b == self.epoch_length:   # a position saved at the very end of an epoch
            epoch, b = epoch + 1, 0
        self.epoch, self.batch_in_epoch = epoch, b


class SlidingWindowSampler(IndexSchedule):
    """PIC's sliding-window data scheduler.

    Arguments: ``n`` images, ``window`` W, ``stride`` S, global ``batch_size`` B, ``seed``.
    Requires positive sizes, S <= W and B <= min(W, N) (else ``ValueError``).

    **Schedule.** Pass ``t`` (t = 0, 1, ...) has its own permutation ``perm_t`` of the N indices
    (``permutation(t)``). Window positions follow each other with starts
    ``start_0 = 0``, ``start_{j+1} = start_j + S``; when ``start_j + S >= N`` the start wraps to
    ``start_j + S - N`` and the next window belongs to pass ``t + 1`` (a fresh permutation: the
    reshuffle on wrap). A window at start ``s`` in pass ``t`` holds the W consecutive entries
    ``perm_t[(s + arange(W)) % N]`` (wrapping around the end of the *same* permutation), and
    **all W of them are served**, in a fresh random order, before the window advances. The
    served stream is the concatenation of the windows; global batches are consecutive chunks of
    B entries of that stream. Nothing is dropped: when B does not divide W a batch straddles
    two consecutive window positions (the last r entries of one window and the first B - r of
    the next). Such a batch never repeats an index: the next window's random order is then
    re-drawn so that its first B - r entries avoid the r already in the batch (possible since
    B <= W; the window's content is unchanged, only its order).

    **Visits.** Within a pass, image ``i`` at position p of ``perm_t`` belongs to the windows
    whose (cyclic) range covers p: W/S consecutive windows when S divides both W and N
    (floor or ceil of W/S when S does not divide W, and within +-1 of W/S near the pass's
    wrap point when S does not divide N). It is served once in each of them, at a uniform random
    place, so between two consecutive visits fewer than 2W images are served (W on average)
    instead of ~N: the classifier row of an instance is refreshed every ~W images. Across a
    reshuffle the image moves to a random place of the new permutation, so that one gap is of
    order N.

    **Epochs.** A pass has ceil((N - start_0 of the pass) / S) ~= N/S window positions of W
    images each, i.e. about N*W/S images = W/S epochs' worth (exactly that when S divides N).
    The trainer keeps counting epochs as ``epoch_length = N // B`` steps, so E epochs show about
    E*N images (the same compute as E shuffled epochs), each image about E times, and make
    E*S/W passes over the permutation (``passes_for_epochs``). E.g. ImageNet with W = 2^17,
    S = 2^14: a pass is 8 epochs; 200 epochs = 25 passes.

    **W >= N** degenerates to shuffled full passes: W and S are both taken as N, so every
    window is the whole dataset in a fresh random order (``window``/``stride`` then report N).

    The state (``state_dict``) is the pass index, the window start, the number of windows made,
    the served offset inside the current window and the current window's order (int64 (W,)).
    """

    kind = "sliding_window"
    _PERM_STREAM, _WINDOW_STREAM = 1, 2

    def __init__(self, n: int, window: int, stride: int, batch_size: int, seed: int = 0):
        _check_positive(n=n, window=window, stride=stride, batch_size=batch_size)
        if window < stride:
            raise ValueError(f"window={window} is smaller than stride={stride}: some images would never be served")
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} images)")
        if window >= n:
            window = stride = n
        if batch_size > window:
            raise ValueError(f"batch_size={batch_size} is larger than window={window}: a batch would span "
                             "several window positions and repeat images")
        self.n, self.window, self.stride, self.batch_size, self.seed = n, window, stride, batch_size, int(seed)
        self.steps_done = 0
        self.pass_index = 0       # pass of the current window
        self.start = 0            # start of the current window in permutation(pass_index)
        self.windows_made = 0     # windows drawn so far (the current one included)
        self.pos = 0              # entries of the current window already served
        self._order = torch.empty(0, dtype=torch.int64)   # current window, in serving order
        self._perm: torch.Tensor | None = None
        self._perm_pass = -1

    # --- schedule -------------------------------------------------------------------------
    @property
    def visits_per_pass(self) -> float:
        """W / S: how many times each image is served per pass (exact when S divides W and N)."""
        return self.window / self.stride

    def passes_for_epochs(self, epochs: float) -> float:
        """Passes over the permutation made by ``epochs`` epochs: epochs * S / W (for S dividing N)."""
        return epochs * self.stride / self.window

    def permutation(self, pass_index: int) -> torch.Tensor:
        """The permutation of the N indices used by pass ``pass_index``."""
        if self._perm_pass != pass_index:
            g = _generator(derive_seed(self.seed, self._PERM_STREAM, pass_index))
            self._perm, self._perm_pass = torch.randperm(self.n, generator=g), pass_index
        return self._perm

    def window_indices(self, pass_index: int, start: int) -> torch.Tensor:
        """The (unshuffled) content of the window at ``start`` in pass ``pass_index``."""
        return self.permutation(pass_index)[(start + torch.arange(self.window)) % self.n]

    def _next_window(self, taken: torch.Tensor) -> None:
        """Advance to the next window position and draw its serving order; ``taken`` holds the
        entries of the batch being assembled (they must not appear in its first B - r places)."""
        if self.windows_made > 0:
            self.start += self.stride
            while self.start >= self.n:
                self.start -= self.n
                self.pass_index += 1
        content = self.window_indices(self.pass_index, self.start)
        g = _generator(derive_seed(self.seed, self._WINDOW_STREAM, self.windows_made))
        order = content[torch.randperm(self.window, generator=g)]
        head = self.batch_size - len(taken)
        if len(taken) and head > 0:
            clash = torch.isin(order, taken)
            if clash[:head].any():
                free = order[~clash]
                rest = torch.cat([free[head:], order[clash]])
                order = torch.cat([free[:head], rest[torch.randperm(len(rest), generator=g)]])
        self._order, self.pos = order, 0
        self.windows_made += 1

    def next_global_batch(self) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        need = self.batch_size
        while need:
            if self.pos == len(self._order):
                self._next_window(torch.cat(parts) if parts else self._order[:0])
            take = min(need, len(self._order) - self.pos)
            parts.append(self._order[self.pos:self.pos + take])
            self.pos += take
            need -= take
        self.steps_done += 1
        return parts[0].clone() if len(parts) == 1 else torch.cat(parts)

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "window": self.window, "stride": self.stride,
                "batch_size": self.batch_size, "seed": self.seed, "steps_done": self.steps_done,
                "pass_index": self.pass_index, "start": self.start, "windows_made": self.windows_made,
                "pos": self.pos, "order": self._order.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("n", "window", "stride", "batch_size", "seed"))
        order = torch.as_tensor(state["order"], dtype=torch.int64).clone()
        pos, made = int(state["pos"]), int(state["windows_made"])
        if len(order) != (self.window if made else 0) or not 0 <= pos <= len(order):
            raise ValueError("invalid sliding-window sampler state (window order/position)")
        self.steps_done = int(state["steps_done"])
        self.pass_index, self.start = int(state["pass_index"]), int(state["start"])
        self.windows_made, self.pos, self._order = made, pos, order


class PartitionedSchedule(IndexSchedule):
    """Each rank reads only its own part of the data: rank ``r`` of ``w`` the indices
    ``r, r + w, r + 2w, ...`` (PIC's ``--cache-mode part``, where each rank caches just those).

    Rank ``r``'s slice of every global batch comes from its own inner schedule (``kind``, over
    its part, batch ``B / w``, seed ``seed + r``; a sliding window of ``W / w``, ``S / w``), so the
    global batch is the rank slices concatenated in rank order. ``epoch_length`` is the shortest
    inner one. A state saved with another world size is replayed step by step on the new
    partition (same number of steps; the order differs, as the parts differ).
    """

    kind = "partitioned"

    def __init__(self, kind: str, n: int, batch_size: int, world_size: int, seed: int = 0, **kw):
        _check_positive(n=n, batch_size=batch_size, world_size=world_size)
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by the world size {world_size}")
        if kind == "sliding_window":
            kw = {k: max(1, v // world_size) for k, v in kw.items()}
        self.n, self.batch_size, self.world, self.seed, self.inner_kind = n, batch_size, world_size, int(seed), kind
        self.parts = [torch.arange(r, n, world_size) for r in range(world_size)]
        self.inner = [build_index_schedule(kind, len(p), batch_size // world_size, seed + r, **kw)
                      for r, p in enumerate(self.parts)]
        self.steps_done = 0

    @property
    def epoch_length(self) -> int:
        return min(s.epoch_length for s in self.inner)

    def next_global_batch(self) -> torch.Tensor:
        self.steps_done += 1
        return torch.cat([p[s.next_global_batch()] for p, s in zip(self.parts, self.inner)])

    def next_batch(self, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        if world_size != self.world:
            raise ValueError(f"this partitioned schedule is for {self.world} processes, not {world_size}")
        return super().next_batch(rank, world_size)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "world": self.world, "steps_done": self.steps_done, "inner": [s.state_dict() for s in self.inner]}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state, ("n", "batch_size", "seed"))
        if int(state["world"]) == self.world:
            for s, st in zip(self.inner, state["inner"]):
                s.load_state_dict(st)
            self.steps_done = int(state["steps_done"])
        else:
            for _ in range(int(state["steps_done"]) - self.steps_done):
                self.next_global_batch()


def build_index_schedule(kind: str, n: int, batch_size: int, seed: int = 0, *,
                         window: int | None = None, stride: int | None = None,
                         partition_world: int | None = None) -> IndexSchedule:
    """``"epoch"`` -> :class:`EpochSampler`; ``"sliding_window"`` -> :class:`SlidingWindowSampler`
    (needs ``window`` and ``stride``); with ``partition_world`` a :class:`PartitionedSchedule` of
    that kind over that many ranks."""
    if partition_world:
        kw = {"window": window, "stride": stride} if kind == "sliding_window" else {}
        return PartitionedSchedule(kind, n, batch_size, partition_world, seed, **kw)
    if kind == "epoch":
        return EpochSampler(n, batch_size, seed)
    if kind == "sliding_window":
        if window is None or stride is None:
            raise ValueError("the sliding_window schedule needs window and stride")
        return SlidingWindowSampler(n, window, stride, batch_size, seed)
    raise ValueError(f"unknown index schedule '{kind}' (expected 'epoch' or 'sliding_window')")
