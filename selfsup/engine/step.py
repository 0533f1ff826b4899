"""The training step, and the model and optimiser it runs on.

`TrainStep` is the one training step of the project: the trainer runs it, and `selfsup bench throughput`
times this same object (a test checks that), so a benchmark figure is a figure of the real step.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..config import check_micro_batch_bn
from ..errors import ConfigError
from ..methods import Method, build_method
from ..methods.base import chunks
from ..optim import build_optimizer, build_scheduler, param_groups
from .guard import BNSnapshot
from .setup import Env, ddp_wrap, sync_batchnorm, use_channels_last

__all__ = ["TrainStep", "build_model", "make_optimizer", "micro_batch_line", "wrap_model"]


def build_model(cfg, num_samples: int, env: Env, encoder_state: dict | None = None) -> tuple[Method, bool]:
    """(the method module of `cfg` set up for `num_samples` instances on the device, whether its
    activations are channels-last). Synchronised BN replaces BN under several GPU processes
    (train.sync_bn; torch's SyncBatchNorm has no CPU kernel). `encoder_state`: the encoder starts from
    these weights (model.init_from)."""
    model = build_method(cfg, encoder_state, cfg.model.get("init_from") or "")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):   # a timm backbone's own
        check_micro_batch_bn(cfg.train.micro_batch, f"{cfg.model.backbone} (it has BatchNorm layers)")
    model.setup(num_samples)   # per-instance state (InstDisc memory bank, PIC rows) sized from the dataset
    model = model.to(env.device)
    channels_last = use_channels_last(cfg, model, env.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return sync_batchnorm(model, env, cfg.train.sync_bn), channels_last


def check_input_size(backbone: nn.Module, size: int) -> None:
    """A ViT reads one image size (its patch grid): a ConfigError when the training images differ."""
    pe = getattr(backbone, "patch_embed", None)
    want = getattr(pe, "img_size", None)
    if want is not None and getattr(pe, "strict_img_size", True) and tuple(want) != (size, size):
        raise ConfigError(f"the ViT reads {want[0]}x{want[1]} images but the training images are {size}x{size}: "
                          f"set model.backbone_args.img_size={size}, or data.image_size={want[0]}")


def make_optimizer(model: Method, cfg, steps_per_epoch: int):
    """(optimiser, per-step lr schedule) of train.*: lr = train.lr, or train.base_lr x batch / 256;
    no weight decay or LARS adaptation for biases and norm parameters; the method's own parameters
    (PIC's rows, updated by the method) left out."""
    t = cfg.train
    lr = t.lr if t.lr is not None else t.base_lr * t.batch_size / 256
    own = {id(p) for p in model.own_parameters()}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in own]}
              for g in param_groups(model, t.weight_decay)]
    opt = build_optimizer([g for g in groups if g["params"]], t.optimizer, lr, t.weight_decay, t.momentum)
    sched = build_scheduler(opt, t.epochs * steps_per_epoch, int(t.warmup_epochs * steps_per_epoch), t.schedule)
    return opt, sched


def wrap_model(model: Method, cfg, env: Env) -> nn.Module:
    """What the step calls: `model` in DDP under several processes, then torch.compile'd with
    train.compile. Kept out of DDP: the method's per-rank state (classifier shards), and the buffers
    every rank updates identically (bank, queue), broadcast once here rather than at every forward."""
    net = model
    if env.world > 1:
        same = model.rank_identical_buffers()
        for name in same:
            dist.broadcast(model.get_buffer(name), src=0)
        net = ddp_wrap(model, env, model.ddp_ignored() + same)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


def micro_batch_line(cfg, world: int, model: nn.Module) -> str:
    """The run's line on train.micro_batch (empty when it has no effect): how the batch is cut, and
    what that means for BatchNorm."""
    m, b = cfg.train.micro_batch, cfg.train.batch_size // world
    if m is None or m >= b:
        return ""
    how = "each chunk's loss backpropagated as it is encoded" if model.per_sample_loss else \
        "encoded without a graph, the loss on the whole batch, each chunk re-encoded with its cached gradient"
    parts = chunks(b, m)
    sizes = "-".join(sorted({str(p.stop - p.start) for p in parts}, reverse=True))
    line = (f"[selfsup] train.micro_batch={m}: each step's {b} images per process in {len(parts)} chunks of {sizes} "
            f"({how})")
    if any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in model.modules()):
        line += (f"; BatchNorm normalises each chunk with its own statistics (ghost BN of {sizes} images), not the "
                 f"whole batch of {b}")
    return line


class TrainStep:
    """One training step: forward under autocast, backward, the optimiser step, the method's own row
    update, the lr schedule and the method's after-step hook (EMA, queue, bank).

    ``forward_backward`` and ``update`` are its two halves, so that the non-finite guard can look at
    the loss and gradients before anything changes; ``step(views, index)`` runs both.

    ``micro_batch=M`` (train.micro_batch) below the rank's batch B: gradient caching (Gao et al. 2021),
    the gradient of the whole batch's loss with the activation memory of M images:

    1. ``prepare`` once (keys, noise, targets; the step's gathers);
    2. encode the batch in chunks of at most M (:func:`~selfsup.methods.base.chunks`) without a graph,
       BN running statistics put back afterwards (they move once, in pass 4), the RNG state saved
       before each chunk;
    3. the loss on all the representations, backward to them (and to the method's own rows);
    4. each chunk encoded again with a graph, its RNG state replayed (dropout, drop-path draw the same
       masks), and its cached representation gradient backpropagated; DDP syncs at the last chunk.

    A ``per_sample_loss`` method (MoCo v1-v3, InstDisc once Z is known) skips 2 and 3: each chunk's
    loss, weighted by its share of B, is backpropagated as it is encoded. Exact for any loss; BatchNorm
    sees per-chunk batch statistics, i.e. equals "ghost BN" over groups of M images.
    """

    def __init__(self, model: Method, net: nn.Module, opt, sched, amp, micro_batch: int | None = None):
        self.model, self.net, self.opt, self.sched, self.amp = model, net, opt, sched, amp
        self.micro_batch = micro_batch
        self._bn = BNSnapshot(model, micro_batch is not None)   # put back after the no-graph pass

    def _autocast(self, views):
        return torch.autocast(views[0].device.type, dtype=self.amp, enabled=self.amp is not None)

    def forward_backward(self, views: list, index: torch.Tensor) -> dict:
        """The method's outputs ("loss" and logged extras) for one batch; gradients accumulated."""
        self.model.before_step(self.opt.param_groups[0]["lr"])   # the lr `update` will use (PIC's fused head)
        m, b = self.micro_batch, index.shape[0]
        if m is not None and m < b:
            return self._cached(views, index, chunks(b, m))
        with self._autocast(views):
            out = self.net(views, index)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        return out

    def _encode(self, views, index, part: slice, last: bool) -> list:
        """The representations of the samples `part`, with a graph, through DDP (synced at the `last` part)."""
        ddp = getattr(self.net, "_orig_mod", self.net)   # under torch.compile
        sync = last or not isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else ddp.no_sync(), self._autocast(views):
            return self.net([v[part] for v in views], index[part], encode_only=True)

    def _cached(self, views: list, index: torch.Tensor, parts: list) -> dict:
        model, b = self.model, index.shape[0]
        self.opt.zero_grad(set_to_none=True)
        with self._autocast(views):
            ctx = model.prepare(views, index, chunk=self.micro_batch)
        if model.per_sample_loss:
            loss, out, emb = 0.0, {}, []
            for i, p in enumerate(parts):
                reps = self._encode(views, index, p, i == len(parts) - 1)
                emb.append(reps[0].detach())
                with self._autocast(views):
                    out = model.loss(reps, ctx, index, p)
                part_loss = out["loss"] * ((p.stop - p.start) / b)
                part_loss.backward()
                loss = loss + part_loss.detach()
            return {**out, "loss": loss, "embedding": torch.cat(emb)}
        dev = views[0].device
        rng = []
        self._bn.save()
        with torch.no_grad(), self._autocast(views):
            encoded = []
            for p in parts:
                rng.append(_get_rng_state(dev))
                encoded.append(model.encode([v[p] for v in views]))
        self._bn.restore()
        reps = [torch.cat(r).requires_grad_() for r in zip(*encoded)]
        del encoded
        with self._autocast(views):
            out = model.loss(reps, ctx, index)
        out["loss"].backward()   # the representations' gradients (and the method's own rows')
        grads = [r.grad for r in reps]
        end = _get_rng_state(dev)
        for i, (p, state) in enumerate(zip(parts, rng)):
            _set_rng_state(dev, state)
            torch.autograd.backward(self._encode(views, index, p, i == len(parts) - 1), [g[p] for g in grads])
        _set_rng_state(dev, end)
        return {**out, "loss": out["loss"].detach(), "embedding": reps[0].detach()}

    def update(self) -> None:
        """Apply the step: optimiser, the method's own parameters at the lr the optimiser used, the
        schedule, the method's after-step state updates."""
        lr_now = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.model.optimizer_step(lr_now)
        self.sched.step()
        self.model.after_step()

    def step(self, views: list, index: torch.Tensor) -> dict:
        """forward_backward, then update; returns the method's outputs."""
        out = self.forward_backward(views, index)
        self.update()
        return out


def _get_rng_state(device: torch.device) -> tuple:
    """The global CPU RNG state, and the device's when it has its own generator."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
