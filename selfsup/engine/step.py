"""The training step, and the model and optimiser it runs on.

`Step` is the one training step of the project: the trainer runs it, and `selfsup bench throughput`
times this same object (a test checks that), so a benchmark figure is a figure of the real step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..methods import Method, build_method
from ..optim import build_optimizer, build_scheduler, param_groups
from .setup import Env, use_channels_last

__all__ = ["Step", "build_model", "wrap_model", "make_optimizer"]


def build_model(cfg, num_samples: int, env: Env, encoder_state: dict | None = None) -> tuple[Method, bool]:
    """(the method module of `cfg` set up for `num_samples` instances on the device, whether its
    activations are channels-last). Synchronised BN replaces BN under several GPU processes
    (train.sync_bn; torch's SyncBatchNorm has no CPU kernel). `encoder_state`: the encoder starts from
    these weights (model.init_from)."""
    model = build_method(cfg, encoder_state, cfg.model.get("init_from") or "")
    model.setup(num_samples)   # per-instance state (InstDisc memory bank, PIC rows) sized from the dataset
    model = model.to(env.device)
    channels_last = use_channels_last(cfg, model, env.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.world > 1 and cfg.train.sync_bn and env.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, channels_last


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
        ignored = model.ddp_ignored() + same   # no broadcast, no gradient sync
        if ignored:
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    return net


class Step:
    """One training step: forward under autocast, backward, the optimiser step, the method's own row
    update, the lr schedule and the method's after-step hook (EMA, queue, bank).

    ``forward_backward`` and ``update`` are its two halves, so that the non-finite guard can look at
    the loss and gradients before anything changes; ``step(views, index)`` runs both.
    """

    def __init__(self, model: Method, net: nn.Module, opt, sched, amp):
        self.model, self.net, self.opt, self.sched, self.amp = model, net, opt, sched, amp

    def forward_backward(self, views: list, index: torch.Tensor) -> dict:
        """The method's outputs ("loss" and logged extras) for one batch; gradients accumulated."""
        dev = views[0].device.type
        with torch.autocast(dev, dtype=self.amp, enabled=self.amp is not None):
            out = self.net(views, index)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        return out

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
