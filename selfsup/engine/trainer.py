"""The training loop shared by every method: data on the device, batched augmentation, precision,
DDP, logging, the kNN monitor, atomic checkpoints and exact resume.
"""
from __future__ import annotations

import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..config import ConfigError
from ..data.augment import augment_from_config
from ..data.datasets import build_dataset
from ..data.loader import StreamLoader
from ..data.samplers import build_index_schedule
from ..eval.knn import extract_features, knn_accuracy
from ..methods import METHODS
from ..models.backbones import build_backbone
from ..optim import build_optimizer, build_scheduler, param_groups
from ..parallel import distributed as D
from .checkpoint import load_checkpoint, load_state_checked, save_checkpoint
from .logging import MetricLogger


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing a checkpoint."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda when available, else cpu. 'cuda' without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(cfg: DictConfig, device: torch.device):
    """bf16 autocast on cuda by default (train.precision=auto), none on cpu."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_model(cfg: DictConfig):
    """The method module (encoder, head and the method's own state) for `cfg`."""
    backbone, feat_dim = build_backbone(cfg.model.backbone, cfg.model.cifar_stem, cfg.model.width)
    return METHODS[cfg.method](cfg, backbone, feat_dim)


def load_eval_data(cfg: DictConfig, train_ds=None, stream: bool = False):
    """(train, test) labelled datasets for the kNN monitor; reuses `train_ds` when the splits agree."""
    train = train_ds if (train_ds is not None and cfg.eval.train_split == cfg.data.train_split) else \
        load_split(cfg, cfg.eval.train_split, stream)
    return train, load_split(cfg, cfg.eval.test_split, stream)


STREAMABLE = ("imagefolder", "imagenet-zip")


def streams(cfg: DictConfig) -> bool:
    """Whether training reads the images from their files step by step (data.stream; None: only
    imagenet-zip) instead of holding the decoded set in memory."""
    d = cfg.data
    on = d.stream if d.stream is not None else d.name == "imagenet-zip"
    if on and d.name not in STREAMABLE:
        raise ConfigError(f"data.stream=true works for {', '.join(STREAMABLE)}, not data.name={d.name} "
                          "(it is held in memory; leave data.stream unset)")
    if on and not d.image_size:
        raise ConfigError(f"streamed data ({d.name}) needs data.image_size (e.g. 224): its images differ in size")
    return bool(on)


def load_split(cfg: DictConfig, split: str, stream: bool = False):
    """The dataset `cfg.data.name`, split `split`, with the data.* options: an in-memory ImageDataset,
    or with `stream` a file-backed FileImageSet (selfsup.data.files) read by the loader's workers."""
    d = cfg.data
    if stream:
        from ..data.files import open_imagefolder, open_imagenet_zip

        dset = open_imagenet_zip(d.root, split) if d.name == "imagenet-zip" else \
            open_imagefolder(d.root, split, d.file_list, d.index_cache)
        dset.workers = d.num_workers
        return dset
    extra = {"num_workers": d.num_workers} if d.name in STREAMABLE and d.num_workers else {}
    if d.name == "imagefolder":
        extra.update(file_list=d.file_list, index_cache=d.index_cache)
    return build_dataset(d.name, split, root=d.root, download=d.download, image_size=d.image_size,
                         on_error=d.on_error, **extra)


def pixels(ds):
    """What feature extraction reads: the uint8 image tensor of an in-memory set, or the file-backed set."""
    return getattr(ds, "images", ds)


def knn_eval(encoder, cfg, train_ds, test_ds, device, amp) -> dict:
    """Weighted kNN top-1/top-5 of `encoder` on clean (test-transform) features of train and test."""
    size = cfg.data.image_size
    ftr = extract_features(encoder, pixels(train_ds), cfg.eval.batch_size, device, size, amp)
    fte = extract_features(encoder, pixels(test_ds), cfg.eval.batch_size, device, size, amp)
    return knn_accuracy(ftr, train_ds.labels.to(device), fte, test_ds.labels.to(device),
                        cfg.eval.knn_k, cfg.eval.knn_temperature, train_ds.num_classes)


def monitor_eval(model, cfg, train_ds, test_ds, device, amp, bank_valid: bool) -> dict:
    """The kNN monitor: `knn_eval` of the encoder, its protocol, and, for a method that keeps a
    memory bank of the training set (`bank_valid`: the monitor's train split is the training set),
    a second kNN with the bank rows as training features and head-space test features."""
    res = {**knn_eval(model.encoder, cfg, train_ds, test_ds, device, amp), "protocol": knn_protocol(cfg)}
    bank = model.monitor_bank()
    if bank is not None and bank_valid:
        fte = extract_features(nn.Sequential(model.backbone, model.head), pixels(test_ds), cfg.eval.batch_size,
                               device, cfg.data.image_size, amp)
        r = knn_accuracy(F.normalize(bank.float(), dim=1), train_ds.labels.to(device), fte,
                         test_ds.labels.to(device), cfg.eval.knn_k, cfg.eval.knn_temperature, train_ds.num_classes)
        res.update({k.replace("knn_", "knn_bank_"): v for k, v in r.items()})
        res["protocol_bank"] = (f"weighted kNN k={cfg.eval.knn_k} t={cfg.eval.knn_temperature}: training "
                                f"features = the method's memory bank ({cfg.model.proj_dim}-d head space, "
                                f"momentum average of augmented views), test = clean head-space features, "
                                f"{cfg.data.train_split} -> {cfg.eval.test_split}")
    return res


def knn_protocol(cfg) -> str:
    """How a kNN number was measured, stored beside it."""
    return (f"weighted kNN k={cfg.eval.knn_k} t={cfg.eval.knn_temperature} on clean (test-transform) "
            f"features, {cfg.eval.train_split} -> {cfg.eval.test_split}")


def use_channels_last(cfg, model: nn.Module, device: torch.device) -> bool:
    """train.channels_last, except on CPU for a model with a strided 1x1 conv of fewer than 16 input
    channels (resnet_small with model.width < 16): oneDNN (torch 2.14) corrupts the heap in that
    conv's channels-last backward on large inputs."""
    if cfg.train.channels_last and device.type == "cpu" and any(
            isinstance(m, nn.Conv2d) and m.in_channels < 16 and m.kernel_size == (1, 1) and m.stride != (1, 1)
            for m in model.modules()):
        print("[selfsup] train.channels_last off: a strided 1x1 conv with < 16 input channels crashes "
              "oneDNN's channels-last backward on CPU")
        return False
    return bool(cfg.train.channels_last)


def keep_freed_memory() -> None:
    """glibc: keep freed blocks in the process instead of returning them to the OS, so the large
    per-step activations are not page-faulted back in every step (about 13% of a CPU step measured by
    `selfsup bench throughput`). No-op elsewhere."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: do not give the heap's top back
        libc.mallopt(-3, 1 << 25)   # M_MMAP_THRESHOLD: blocks up to 32 MiB (glibc's maximum) from the heap
    except (OSError, AttributeError):   # not glibc
        pass


def _default_run_dir(cfg) -> str:
    name = cfg.preset or cfg.method
    run_dir = f"runs/{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if D.is_dist():   # every rank must write to the same folder
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    return run_dir


def _rng_state(aug_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "aug": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if D.is_dist():   # each rank's augmentation stream, so a resume on the same world size is exact
        states = [None] * D.world_size()
        dist.all_gather_object(states, state["aug"].cpu())
        state["aug_all"] = states
    return state


def train(cfg: DictConfig, resume: str | None = None) -> dict:
    """Train `cfg` (or resume the run in directory `resume`); return the final metrics.

    Rank 0 writes RUN_DIR/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/last.pt,
    encoder.safetensors}. Under torchrun, the encoder and head are wrapped in DDP.
    """
    owns_group = not D.is_dist()   # a process group made by the caller is left to the caller
    rank, local_rank, world = D.setup_distributed()
    try:
        return _train(cfg, resume, rank, local_rank, world)
    finally:
        if owns_group:
            D.cleanup_distributed()


def _train(cfg, resume, rank, local_rank, world):
    main = rank == 0
    device = resolve_device(cfg.device, local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # every step has the same shapes: pick the fastest kernels once
    if device.type == "cpu":
        keep_freed_memory()
    ckpt = None
    if resume:
        ckpt = load_checkpoint(Path(resume) / "checkpoints" / "last.pt")
        cfg.run_dir = str(resume)
    if cfg.run_dir is None:
        cfg.run_dir = _default_run_dir(cfg)
    run_dir = Path(cfg.run_dir)
    if not resume and (run_dir / "checkpoints" / "last.pt").exists():
        raise ConfigError(f"run directory '{run_dir}' already holds a checkpoint: continue it with "
                          f"`selfsup train --resume {run_dir}` or choose another run_dir=...")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    torch.manual_seed(cfg.seed)

    # data: one uint8 tensor, resident on the accelerator when there is one; or (data.stream) files
    # decoded step by step in DataLoader workers
    d = cfg.data
    stream = streams(cfg)
    ds = load_split(cfg, d.train_split, stream)
    if not stream and d.on_device and device.type == "cuda":
        ds = ds.to(device)
    eval_data = load_eval_data(cfg, ds, stream) if cfg.eval.every > 0 else None
    if eval_data is not None and (eval_data[0].labels < 0).any():
        print(f"[selfsup] split '{cfg.eval.train_split}' has no labels: kNN monitor off")
        eval_data = None
    size = d.image_size or ds.images.shape[-1]
    aug = augment_from_config(cfg.aug, size)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)

    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the world size {world}")
    if len(ds) < cfg.train.batch_size:
        raise ConfigError(f"dataset has {len(ds)} images, fewer than train.batch_size={cfg.train.batch_size}")
    if d.cache_mode != "none" and not stream:
        raise ConfigError(f"data.cache_mode={d.cache_mode} is for streamed data (data.stream=true); "
                          f"{d.name} is already held in memory")
    part = stream and d.cache_mode == "part"

    def make_schedule():
        return build_index_schedule(d.sampler, len(ds), cfg.train.batch_size, cfg.seed, window=d.window,
                                    stride=d.stride, partition_world=world if part else None)

    try:
        sampler = make_schedule()
    except ValueError as e:
        raise ConfigError(f"data.sampler={d.sampler}: {e}") from None
    if stream and d.cache_mode != "none":   # part: each rank keeps only the items its partition reads
        t0 = time.perf_counter()
        nbytes = ds.cache(torch.arange(rank, len(ds), world) if part else torch.arange(len(ds)))
        print(f"[selfsup] rank {rank}: cached {nbytes / 2**20:.1f} MiB of {ds.name} ({d.cache_mode}) "
              f"in {time.perf_counter() - t0:.1f} s")
    steps_per_epoch = sampler.epoch_length
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    # model, optimiser, schedule
    model = build_model(cfg)
    model.setup(len(ds))   # per-instance state (InstDisc memory bank) sized from the dataset
    model = model.to(device)
    amp = autocast_dtype(cfg, device)
    channels_last = use_channels_last(cfg, model, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and cfg.train.sync_bn and device.type == "cuda":   # torch's SyncBatchNorm is GPU-only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr = cfg.train.lr if cfg.train.lr is not None else cfg.train.base_lr * cfg.train.batch_size / 256
    own = {id(p) for p in model.own_parameters()}   # updated by the method itself (PIC's classifier rows)
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in own]}
              for g in param_groups(model, cfg.train.weight_decay)]
    opt = build_optimizer([g for g in groups if g["params"]], cfg.train.optimizer, lr, cfg.train.weight_decay,
                          cfg.train.momentum)
    sched_steps = cfg.train.epochs * steps_per_epoch
    sched = build_scheduler(opt, sched_steps, int(cfg.train.warmup_epochs * steps_per_epoch), cfg.train.schedule)
    step, elapsed_before, n_nonfinite, n_skipped = 0, 0.0, 0, 0
    logger = MetricLogger(run_dir, enabled=main)
    batches = None   # streamed data: the loader's iterator, (re)started at the current step

    def restore(ck) -> None:
        """Model, optimiser, schedule, sampler and RNG state of checkpoint `ck` (resume, rollback)."""
        nonlocal step, n_nonfinite, batches
        batches = None
        load_state_checked(model, ck["model"], "model")
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck.get("sampler") or {"epoch": ck["epoch"], "batch_in_epoch": ck["batch_in_epoch"]})
        step, n_nonfinite = ck["step"], ck.get("nonfinite_events", 0)
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        aug_states = rng.get("aug_all") or [rng["aug"]]
        if len(aug_states) == world:
            aug_gen.set_state(aug_states[rank].to(aug_gen.get_state().device))
        elif main:
            print(f"[selfsup] resuming on {world} processes from a run on {len(aug_states)}: "
                  "augmentation streams are re-seeded, so the resume is not bit-exact")

    if ckpt is not None:
        restore(ckpt)
        elapsed_before = ckpt["elapsed"]
        logger.truncate_lines(ckpt["log_lines"])
        if main:
            print(f"[selfsup] resumed {run_dir} at step {step} (epoch {step // steps_per_epoch}, "
                  f"batch {step % steps_per_epoch})")
    else:
        model.init_from_data(pixels(ds), cfg, device, amp)   # a fresh start: data-dependent state

    net = model
    if world > 1:
        ignored = model.ddp_ignored()   # per-rank state (classifier shards): no broadcast, no gradient sync
        if ignored:
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)

    saved_step = -1

    def checkpoint():
        nonlocal saved_step
        if saved_step == step:
            return
        saved_step = step
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:   # never write a checkpoint from a NaN state
            raise NonFiniteLossError(f"non-finite parameters ({', '.join(bad[:3])}...) at step {step}; "
                                     f"the last good checkpoint in {run_dir / 'checkpoints'} is kept. "
                                     "Try a lower train.lr / train.base_lr or train.precision=fp32.")
        rng = _rng_state(aug_gen)   # collective under DDP: every rank calls it
        state = model.state_dict()
        if model.ddp_ignored():   # sharded state: rank 0 writes every rank's shard
            state = model.gather_sharded_state(state)
        if main:
            save_checkpoint({"format": 1, "config": OmegaConf.to_yaml(cfg), "model": state,
                             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                             "sampler": sampler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                             "batch_in_epoch": step % steps_per_epoch, "elapsed": wall(), "rng": rng,
                             "world_size": world, "nonfinite_events": n_nonfinite,
                             "log_lines": logger.lines()}, run_dir / "checkpoints" / "last.pt")

    t_start = time.perf_counter()

    def wall():
        return elapsed_before + time.perf_counter() - t_start

    def nonfinite_error(what):
        return NonFiniteLossError(
            f"non-finite {what} at step {step}, epoch {step // steps_per_epoch}. Training stopped; the last "
            f"good checkpoint (if any) is untouched in {run_dir / 'checkpoints'}. Try a lower train.lr "
            "or train.base_lr, a longer train.warmup_epochs, train.precision=fp32, or "
            "train.nonfinite=skip|rollback.")

    def check_finite(loss):
        if not torch.isfinite(loss).all():
            raise nonfinite_error(f"loss ({loss.item()})")

    def step_is_finite(loss) -> bool:
        """Loss and every gradient finite on every rank (one host sync; train.nonfinite=skip|rollback)."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []   # one fused kernel: inf/NaN anywhere -> inf/NaN
        ok = torch.isfinite(torch.stack([loss.detach().float().reshape(())] + [n.float() for n in norms])).all().float()
        if D.is_dist():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def handle_nonfinite(loss) -> None:
        """train.nonfinite=skip: drop this step (no update; BN statistics, queue and bank as before it;
        the data and schedule move on); rollback: return to the last checkpoint. Both scale the learning rate by train.nonfinite_lr_factor and log a `nonfinite` event."""
        nonlocal n_nonfinite
        policy, f = cfg.train.nonfinite, cfg.train.nonfinite_lr_factor
        n_nonfinite += 1
        if n_nonfinite > cfg.train.nonfinite_max:
            raise nonfinite_error(f"loss or gradient (event {n_nonfinite}, over train.nonfinite_max="
                                  f"{cfg.train.nonfinite_max})")
        opt.zero_grad(set_to_none=True)
        model.discard_step()
        event = {"event": "nonfinite", "step": step, "loss": str(float(loss.detach())), "action": policy}
        if policy == "rollback":
            path = run_dir / "checkpoints" / "last.pt"
            if not path.exists():
                raise nonfinite_error("loss or gradient, and no checkpoint to roll back to yet")
            count = n_nonfinite
            restore(load_checkpoint(path))
            n_nonfinite = count
            event["rolled_back_to"] = step
        sched.base_lrs = [b * f for b in sched.base_lrs]
        for g, b, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = b * fn(sched.last_epoch)
        event["lr"] = opt.param_groups[0]["lr"]
        logger.log(event)
        if main:
            print(f"[selfsup] non-finite loss or gradient at step {event['step']}: {policy}, lr now "
                  f"{event['lr']:.3g} ({n_nonfinite}/{cfg.train.nonfinite_max})")

    last = {"step": step}
    knn_res, knn_step = {}, -1
    bar = tqdm(total=total_steps, initial=step, disable=None if main else True, desc="train", dynamic_ncols=True)
    t_log, step_log = time.perf_counter(), step
    guarded = cfg.train.nonfinite != "stop"
    # BN running statistics change in the forward; a skipped step puts them back
    bn_stats = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None] if guarded else []
    net.train()
    while step < total_steps:
        bn_saved = [b.clone() for b in bn_stats]
        if stream:
            if batches is None:
                schedule = make_schedule()
                schedule.load_state_dict(sampler.state_dict())
                batches = iter(StreamLoader(
                    ds, [(a.size, a.crop_scale, a.crop_ratio) for a in model.view_augs(aug)], schedule,
                    rank=rank, world=world, start=step, total=total_steps, seed=cfg.seed, workers=d.num_workers,
                    device=device, decode=d.decode, on_error=d.on_error, prefetch=d.prefetch))
            index = sampler.next_batch(rank, world)
            got, crops, bad = next(batches)
            if not torch.equal(got, index):
                raise RuntimeError(f"the data loader is out of step with the index schedule at step {step}")
            if bad:
                n_skipped += len(bad)
                logger.log({"event": "skipped_images", "step": step, "count": len(bad), "total": n_skipped,
                            "examples": bad[:3]})
            views = model.make_views(crops, aug, aug_gen, precropped=True)
        else:
            index = sampler.next_batch(rank, world)
            if device.type == "cuda":   # an asynchronous copy: no host sync inside the step
                index = index.pin_memory().to(device, non_blocking=True)
            images = ds.images[index.to(ds.images.device)].to(device, non_blocking=True)
            views = model.make_views(images, aug, aug_gen)
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = net(views, index.to(device, non_blocking=True))
        loss = out["loss"]
        if not guarded and (device.type == "cpu" or (step + 1) % cfg.train.log_every == 0):
            check_finite(loss)   # on GPU only when logging: no host sync inside the step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guarded and not step_is_finite(loss):
            handle_nonfinite(loss)
            if cfg.train.nonfinite == "skip":
                for b, saved in zip(bn_stats, bn_saved):
                    b.copy_(saved)
                with warnings.catch_warnings():   # "scheduler stepped before optimizer": intended here
                    warnings.simplefilter("ignore", UserWarning)
                    sched.step()
                step += 1
                bar.update(1)
            else:
                bar.reset(total=total_steps)
                bar.update(step)
            continue
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        model.optimizer_step(lr_now)
        sched.step()
        model.after_step()
        step += 1
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == total_steps:
            check_finite(loss)
            now = time.perf_counter()
            views_s = (step - step_log) * cfg.train.batch_size * model.n_views / max(now - t_log, 1e-9)
            t_log, step_log = now, step
            last = {"event": "train", "step": step, "epoch": step // steps_per_epoch,
                    "loss": D.all_reduce_mean(loss.detach()).item(),
                    "lr": opt.param_groups[0]["lr"], "views_per_s": views_s, "wall_time": wall()}
            last.update({k: float(v) for k, v in out.items() if k != "loss"})
            if n_skipped:
                last["skipped_images"] = n_skipped
            logger.log(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            checkpoint()
        if step % steps_per_epoch == 0:   # an epoch's end
            epoch = step // steps_per_epoch
            if eval_data is not None and epoch % cfg.eval.every == 0:
                knn_res, knn_step = monitor_eval(model, cfg, *eval_data, device, amp, eval_data[0] is ds), step
                logger.log({"event": "knn", "step": step, "epoch": epoch, **knn_res, "wall_time": wall()})
                if main:
                    bar.write(f"epoch {epoch}: knn_top1 {knn_res['knn_top1']:.4f}")
            checkpoint()
    bar.close()

    epoch = step // steps_per_epoch
    if eval_data is not None and knn_step != step:
        knn_res = monitor_eval(model, cfg, *eval_data, device, amp, eval_data[0] is ds)
        logger.log({"event": "knn", "step": step, "epoch": epoch, **knn_res, "wall_time": wall()})
    checkpoint()
    final = {"event": "final", "run_dir": str(run_dir), "step": step, "epoch": epoch,
             "loss": last.get("loss"), "wall_time": wall(), **knn_res}
    if main:
        export_encoder(model.encoder, run_dir / "encoder.safetensors")
        logger.log(final)
    logger.close()
    return final


def export_encoder(encoder: torch.nn.Module, path: Path) -> None:
    """Save the encoder's state dict as safetensors (torchvision ResNet key names, no fc)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "selfsup"})
    tmp.replace(path)

