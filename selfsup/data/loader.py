"""Streaming batches from file-backed image sets: decode in DataLoader workers (pinned memory,
prefetch) or on the device with torchvision.io, with the random-resized crop chosen before the
full-size image is materialised.

Each training step the trainer's index schedule names the batch; a copy of the schedule drives the
loader's batch sampler, so the workers run ahead while the trainer keeps the exact position for its
checkpoints. Every item's crop boxes come from a seed derived from (seed, step, position in the
global batch), so the crops of a run do not depend on the number of workers or processes and a
resumed run draws the same crops.

A view *spec* is (size, crop_scale, crop_ratio) of one view (one per view of the method). A worker
returns, per item, one uint8 (3, size, size) crop per spec (decode="cpu": PIL, with JPEG DCT
scaling via ``draft`` so a small crop of a large image is decoded at a reduced size); with
decode="device" it returns the encoded bytes and the crop boxes, and the main process decodes the
batch with ``torchvision.io.decode_jpeg(device=...)`` and crops on the device. The rest of the
augmentation (flip, colour, blur...) runs batched on the device (``BatchAugment(..., crop=False)``).
"""
from __future__ import annotations

import math
import random
import signal
from functools import partial
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DatasetFormatError
from .augment import central_crop_size
from .files import FileImageSet, decode_bytes, load_rgb
from .samplers import derive_seed

__all__ = ["crop_box", "ViewReader", "StepBatches", "StreamLoader", "clean_batches", "decode_on_device", "DECODE_MODES"]

DECODE_MODES = ("cpu", "device")
_CROP_STREAM = 7
_MAX_SUBSTITUTES = 16


def crop_box(rng: random.Random, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): 10 tries of area fraction in `scale` and log-uniform
    aspect ratio in `ratio`, else the central crop clamped to `ratio`."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    h, w = central_crop_size(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


class ViewReader(torch.utils.data.Dataset):
    """Map-style dataset of (index, seed) items for a DataLoader with a batch sampler.

    Returns (requested index, views or (bytes, boxes, seed), substituted item's location or "").
    With on_error="skip" an unreadable item is replaced by the next readable one (index + 1, ...)
    and its location returned, so the trainer can count and log it.
    """

    def __init__(self, dset: FileImageSet, specs, decode: str = "cpu", on_error: str = "raise"):
        if decode not in DECODE_MODES:
            raise ValueError(f"data.decode must be one of {DECODE_MODES}, got {decode!r}")
        self.dset, self.specs, self.decode, self.on_error = dset, [tuple(s) for s in specs], decode, on_error

    def __len__(self) -> int:
        return len(self.dset)

    def _boxes(self, seed: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
        rng = random.Random(seed)
        return [crop_box(rng, h, w, scale, ratio) for _, scale, ratio in self.specs]

    def _read(self, i: int, seed: int):
        data = self.dset.read_bytes(i)
        im = decode_bytes(data, self.dset.where(i))   # the header: the size, for the crop boxes
        w0, h0 = im.size
        boxes = self._boxes(seed, h0, w0)
        if self.decode == "device":
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor(boxes, dtype=torch.int64), seed
        need = min(1.0, max(s / min(bh, bw) for (s, _, _), (_, _, bh, bw) in zip(self.specs, boxes)))
        im.draft("RGB", (max(1, math.ceil(w0 * need)), max(1, math.ceil(h0 * need))))
        im = load_rgb(im, self.dset.where(i))
        fx, fy = im.size[0] / w0, im.size[1] / h0
        from PIL import Image

        views = []
        for (s, _, _), (t, l, bh, bw) in zip(self.specs, boxes):
            v = im.resize((s, s), Image.BILINEAR, box=(l * fx, t * fy, (l + bw) * fx, (t + bh) * fy))
            views.append(torch.from_numpy(np.asarray(v, dtype=np.uint8).copy()).permute(2, 0, 1))
        return views

    def __getitem__(self, item):
        i, seed = item
        return (i, *self.read(i, seed))

    def read(self, i: int, seed: int, start: int = 0, check=None):
        """(item i, or with on_error="skip" the first readable of i + start, i + start + 1, ...; and
        where(i) if that is not i, else ""). `check(item)` (the main process's decode) may reject an item
        with DatasetFormatError too, and returns what replaces it."""
        n = len(self.dset)
        for j in range(start, _MAX_SUBSTITUTES):
            try:
                out = self._read((i + j) % n, seed)
                return (check(out) if check else out), ("" if j == 0 else self.dset.where(i))
            except DatasetFormatError:
                if self.on_error != "skip":
                    raise
        raise DatasetFormatError(f"{_MAX_SUBSTITUTES} unreadable images in a row from {self.dset.where(i)} "
                                 f"on in {self.dset.source}: is the data set intact?")


def _collate(items):
    """(index, views or [(bytes, boxes, seed)] with decode="device", [substituted location or ""])."""
    index = torch.tensor([it[0] for it in items], dtype=torch.int64)
    where = [it[2] for it in items]
    if isinstance(items[0][1], tuple):   # device decode: the main process decodes
        return index, [it[1] for it in items], where
    return index, [torch.stack([it[1][v] for it in items]) for v in range(len(items[0][1]))], where


def decode_on_device(data: list[torch.Tensor], boxes: torch.Tensor, specs, device,
                     where: list[str] | None = None) -> list[torch.Tensor]:
    """Decode encoded images (1-D uint8 tensors) on `device` (torchvision.io; JPEG batches on CUDA
    use nvJPEG, anything else decodes on the CPU) and cut each item's crop boxes (B, V, 4: top, left,
    h, w) resized to each spec's size (bilinear, antialiased). Returns V uint8 tensors (B, 3, size,
    size) on `device`. DatasetFormatError naming the item's `where` for an image that does not decode."""
    import warnings

    with warnings.catch_warnings():   # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_on_device(data, boxes, specs, device, where)


def _decode_on_device(data, boxes, specs, device, where):
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    def one(d, w):
        try:
            img = decode_image(d, mode=ImageReadMode.RGB)
            if img.dtype == torch.uint16:   # a 16-bit PNG: scale to 8 bits (value / 257), not clip
                img = ((img.to(torch.int32) + 128) // 257).to(torch.uint8)
            return img.to(device, non_blocking=True)
        except RuntimeError as e:
            raise DatasetFormatError(f"cannot decode image {w}: {type(e).__name__}: {e}") from e

    device, imgs = torch.device(device), None
    if device.type == "cuda":
        try:
            imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:   # a PNG, CMYK or corrupt JPEG in the batch: decode one by one on the CPU
            pass
    if imgs is None:
        imgs = [one(d, w) for d, w in zip(data, where or [f"#{k} of the batch" for k in range(len(data))])]
    out = []
    for v, (s, _, _) in enumerate(specs):
        crops = []
        for img, b in zip(imgs, boxes[:, v].tolist()):
            t, l, h, w = b
            x = img[None, :, t:t + h, l:l + w].to(device).float()
            crops.append(F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False))
        out.append(torch.cat(crops).round_().clamp_(0, 255).to(torch.uint8))
    return out


class StepBatches(torch.utils.data.Sampler):
    """The batch sampler of a loop that runs by steps: `batch(step)` (called in step order) gives the
    batch of each step start..total-1. Used by the stream loader and by the detection loop."""

    def __init__(self, batch, start: int, total: int):
        self.batch, self.start, self.total = batch, start, total

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.batch(step)


def _seeded_batch(schedule, rank: int, world: int, seed: int, step: int) -> list:
    """This rank's (index, crop seed) pairs of `step`: the schedule's next batch (it advances)."""
    pos0 = rank * (schedule.batch_size // world)
    idx = schedule.next_batch(rank, world).tolist()
    return [(i, derive_seed(seed, _CROP_STREAM, step * schedule.batch_size + pos0 + j)) for j, i in enumerate(idx)]


class StreamLoader:
    """Iterate (index (b,), [uint8 views on device], [substituted locations]) for steps
    start..total-1 of `schedule` (a copy: the caller's schedule is not advanced)."""

    def __init__(self, dset: FileImageSet, specs, schedule, *, rank: int = 0, world: int = 1, start: int = 0,
                 total: int, seed: int = 0, workers: int = 0, device="cpu", decode: str = "cpu",
                 on_error: str = "raise", prefetch: int = 4):
        self.specs, self.device, self.decode = specs, torch.device(device), decode
        self.reader = reader = ViewReader(dset, specs, decode, on_error)
        cuda = self.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            reader, batch_sampler=StepBatches(partial(_seeded_batch, schedule, rank, world, seed), start, total),
            num_workers=workers, collate_fn=_collate, pin_memory=cuda and decode == "cpu",
            prefetch_factor=prefetch if workers else None, worker_init_fn=_worker_init if workers else None)

    def __iter__(self) -> Iterator:
        for index, views, where in self.loader:
            if self.decode == "device":
                views = self._decode(index.tolist(), views, where)
            else:
                views = [v.to(self.device, non_blocking=True) for v in views]
            yield index, views, [w for w in where if w]

    def _decode(self, index: list[int], items, where: list[str]) -> list[torch.Tensor]:
        """Decode the batch on the device; with on_error="skip" an image that does not decode is
        replaced as the workers replace an unreadable one, and `where` notes it."""
        def decode(item):
            return decode_on_device([item[0]], item[1][None], self.specs, self.device)

        try:
            return decode_on_device([it[0] for it in items], torch.stack([it[1] for it in items]), self.specs,
                                    self.device, [self.reader.dset.where(i) for i in index])
        except DatasetFormatError:
            if self.reader.on_error != "skip":
                raise
        views = []
        for k, (i, item) in enumerate(zip(index, items)):
            try:
                views.append(decode(item))
            except DatasetFormatError:
                v, where[k] = self.reader.read(i, item[2], start=1, check=decode)
                views.append(v)
        return [torch.cat(v) for v in zip(*views)]


def _worker_init(_):
    """A worker: one thread; SIGINT/SIGTERM (a Ctrl-C or a scheduler signals the whole process group) are
    left to the main process, which finishes its step, checkpoints and then shuts the workers down."""
    torch.set_num_threads(1)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


class _CleanReader(torch.utils.data.Dataset):
    def __init__(self, dset: FileImageSet, size: int):
        self.dset, self.size = dset, size

    def __len__(self):
        return len(self.dset)

    def __getitem__(self, i):
        return torch.from_numpy(self.dset.load(int(i), self.size)).permute(2, 0, 1)


def clean_batches(dset: FileImageSet, indices: torch.Tensor, batch_size: int, size: int | None,
                  workers: int = 0) -> Iterator[torch.Tensor]:
    """uint8 (b, 3, size, size) batches of items `indices` in order, shorter side resized to `size`
    and centre-cropped (the in-memory loaders' transform), decoded in `workers` workers."""
    if size is None:
        raise ValueError(f"{dset.name}: streamed images need data.image_size (their sizes differ)")
    batches = [c.tolist() for c in indices.split(batch_size)]
    loader = torch.utils.data.DataLoader(_CleanReader(dset, size), batch_sampler=batches, num_workers=workers,
                                         worker_init_fn=_worker_init if workers else None,
                                         prefetch_factor=4 if workers else None)
    yield from loader
