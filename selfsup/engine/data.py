"""The training data of a run: the dataset, its index schedule, the augmentation and each step's views.

Small sets are one uint8 tensor, resident on the accelerator when there is one (``data.on_device``);
each step gathers the batch's images and augments them batched on the device. Streamed sets
(``data.stream``) are decoded step by step in DataLoader workers, each view's crop cut while
decoding, and the rest of the augmentation runs on the device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import uses_stream
from ..data.augment import augment_from_config
from ..data.loader import StreamLoader
from ..data.samplers import build_index_schedule
from ..data.splits import load_split
from ..errors import ConfigError
from .setup import Env, data_on_device

__all__ = ["TrainData", "Batch", "crop_specs", "make_views"]


@dataclass
class Batch:
    """One step's data: its images (uint8 on the device; for streamed data, a list holding each view's
    random-resized crops, cut while decoding: `precropped`), this rank's instance indices (on the device)
    and the locations of unreadable images replaced by others (streamed data, on_error=skip).
    :func:`make_views` turns it into the method's views."""

    images: object
    index: torch.Tensor
    skipped: list
    precropped: bool = False


def crop_specs(model, aug) -> list:
    """(size, crop scale, crop ratio) of each of the method's views: what the stream loader cuts while decoding."""
    return [(a.size, a.crop_scale, a.crop_ratio) for a in model.view_augs(aug)]


def make_views(model, data: "TrainData", batch: Batch, channels_last: bool) -> list:
    """The method's views of `batch` (its `make_views`, with the run's augmentation and random stream)."""
    views = model.make_views(batch.images, data.aug, data.aug_gen, precropped=batch.precropped)
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


class TrainData:
    """The training set of `cfg` for this process, and the step-by-step path from indices to views.

    Attributes: ``ds`` (in-memory ImageDataset or file-backed FileImageSet), ``stream``, ``sampler``
    (the index schedule whose position checkpoints store), ``aug`` (the batched augmentation at the
    data size), ``aug_gen`` (this rank's augmentation RNG), ``steps_per_epoch``, ``total_steps``.
    `ds` may be given (the benchmarks' procedural set) instead of loaded from the config.
    """

    def __init__(self, cfg, env: Env, ds=None):
        d, t = cfg.data, cfg.train
        self.cfg, self.env, self.stream = cfg, env, uses_stream(cfg.data)
        self.ds = ds if ds is not None else load_split(cfg, d.train_split, self.stream)
        if not self.stream and data_on_device(cfg, env.device):
            self.ds = self.ds.to(env.device)
        self.size = d.image_size or self.ds.images.shape[-1]
        self.aug = augment_from_config(cfg.aug, self.size)
        self.aug_gen = torch.Generator(device=env.device).manual_seed(cfg.seed * 1000 + env.rank)
        if len(self.ds) < t.batch_size:
            raise ConfigError(f"dataset has {len(self.ds)} images, fewer than train.batch_size={t.batch_size}")
        self.sampler = self.make_schedule()
        if self.stream and d.cache_mode != "none":
            self._cache()
        self.steps_per_epoch = self.sampler.epoch_length
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self._batches = None   # streamed data: the loader's iterator, (re)started at the current step

    def make_schedule(self):
        """A fresh index schedule of the run (position 0)."""
        d, part = self.cfg.data, self.stream and self.cfg.data.cache_mode == "part"
        try:
            return build_index_schedule(d.sampler, len(self.ds), self.cfg.train.batch_size, self.cfg.seed,
                                        window=d.window, stride=d.stride,
                                        partition_world=self.env.world if part else None)
        except ValueError as e:
            raise ConfigError(f"data.sampler={d.sampler}: {e}") from None

    def _cache(self) -> None:
        """data.cache_mode: every encoded image in RAM (full), or only this rank's partition (part)."""
        rank, world, ds = self.env.rank, self.env.world, self.ds
        t0 = time.perf_counter()
        part = self.cfg.data.cache_mode == "part"
        nbytes = ds.cache(torch.arange(rank, len(ds), world) if part else torch.arange(len(ds)))
        print(f"[selfsup] rank {rank}: cached {nbytes / 2**20:.1f} MiB of {ds.name} ({self.cfg.data.cache_mode}) "
              f"in {time.perf_counter() - t0:.1f} s")

    def restart(self) -> None:
        """Forget the stream loader (after a resume or rollback moved the schedule)."""
        self._batches = None

    def next(self, step: int, specs: list) -> Batch:
        """Advance the schedule by one step and return its images. `specs`: each view's crop
        (:func:`crop_specs`), which the stream loader cuts while decoding."""
        env = self.env
        batches = self._stream(step, specs) if self.stream else None   # started before the schedule moves
        index = self.sampler.next_batch(env.rank, env.world)
        if batches is not None:
            got, crops, skipped = next(batches)
            if not torch.equal(got, index):
                raise RuntimeError(f"the data loader is out of step with the index schedule at step {step}")
            return Batch(crops, index.to(env.device, non_blocking=True), skipped, precropped=True)
        if env.device.type == "cuda":   # an asynchronous copy: no host sync inside the step
            index = index.pin_memory().to(env.device, non_blocking=True)
        images = self.ds.images[index.to(self.ds.images.device)].to(env.device, non_blocking=True)
        return Batch(images, index.to(env.device, non_blocking=True), [])

    def _stream(self, step: int, specs: list):
        """The stream loader's iterator, started at `step` on a copy of the schedule's position."""
        if self._batches is None:
            d, env = self.cfg.data, self.env
            schedule = self.make_schedule()
            schedule.load_state_dict(self.sampler.state_dict())
            self._batches = iter(StreamLoader(
                self.ds, specs, schedule, rank=env.rank, world=env.world, start=step, total=self.total_steps,
                seed=self.cfg.seed, workers=d.num_workers, device=env.device, decode=d.decode, on_error=d.on_error,
                prefetch=d.prefetch))
        return self._batches
