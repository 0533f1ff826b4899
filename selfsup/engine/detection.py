"""Training and testing a detector for `selfsup eval detection`, with the engine's run machinery.

One detector run lives in its own folder (RUN_DIR/eval/detection/<init>/): checkpoints/last.pt
(atomic, `save_checkpoint`), metrics.jsonl (`MetricLogger`). The process group, device, threads and
autocast dtype come from `setup_env` (train.precision, train.threads; bf16 on a GPU, applied to the
backbone and FPN only); SIGTERM / SIGINT finish the iteration, checkpoint and exit 75 / 130
(`StopSignals`, `TrainingStopped`, as training does; under
torchrun the ranks agree at every eval.det_log_every iteration). A folder holding a checkpoint is
resumed; the resume is exact because every random draw of an iteration (the images it reads, their
flips, the training scale, the RPN / RoI sampling) comes from a seed of (eval.seed, iteration, rank),
so model, optimiser and schedule are the whole state.

Schedule (:func:`det_schedule`): MoCo's VOC schedule, 24k iterations at batch 16, lr 0.02, x0.1 at
18k and 22k, 100 warm-up iterations (linear from lr / 1000), scaled linearly to eval.det_batch_size.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ..data.detection import detection_sets
from ..errors import CheckpointError, ConfigError, NonFiniteLossError
from ..eval.detection import build_detector, detection_scores, set_test_size
from ..parallel import distributed as D
from ..progress import Progress
from .checkpoint import load_checkpoint, save_checkpoint
from .logging import MetricLogger
from .setup import setup_env
from .signals import StopSignals, stopped

__all__ = ["det_protocol", "det_schedule", "run_detection"]

# eval.det_* keys that may change when a detector run resumes (paths, workers, logging)
RESUME_MAY_CHANGE = ("det_root", "det_ann", "det_test_ann", "det_num_workers", "det_log_every",
                     "det_checkpoint_every")


def det_schedule(e) -> dict:
    """{iters, lr, steps (iterations where the lr drops x0.1), warmup, batch} of the eval section `e`."""
    b = e.det_batch_size
    iters = e.det_iters if e.det_iters is not None else max(1, round(24000 * 16 / b))
    lr = e.det_lr if e.det_lr is not None else 0.02 * b / 16
    warmup = e.det_warmup_iters if e.det_warmup_iters is not None else round(100 * 16 / b)
    return {"iters": iters, "lr": lr, "steps": [round(f * iters) for f in e.det_steps], "warmup": warmup, "batch": b}


def _lr_factor(s: dict):
    def f(it: int) -> float:
        warm = 0.001 + (1 - 0.001) * it / s["warmup"] if it < s["warmup"] else 1.0
        return warm * 0.1 ** sum(it >= m for m in s["steps"])
    return f


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class _StepBatches(torch.utils.data.Sampler):
    """This rank's indices for iterations start..iters-1: iteration i reads global positions
    i*B .. (i+1)*B - 1 of an endless sequence of seeded permutations (one per pass over the set)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int, iters: int):
        self.n, self.batch, self.rank, self.world, self.seed, self.start, self.iters = \
            n, batch, rank, world, seed, start, iters
        self._perms: dict = {}

    def _at(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                _seed("det-perm", self.seed, epoch)))}
        return int(self._perms[epoch][pos % self.n])

    def __iter__(self):
        per = self.batch // self.world
        for it in range(self.start, self.iters):
            first = it * self.batch + self.rank * per
            yield [self._at(p) for p in range(first, first + per)]

    def __len__(self) -> int:
        return max(0, self.iters - self.start)


def _collate(batch):
    return tuple(zip(*batch))


def _det_config(e) -> dict:
    return {k: (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in e.items()
            if str(k).startswith("det_")}


def _check_resume(saved: dict, now: dict, init: str, ck_init: str, path: Path) -> None:
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)]
    if ck_init != init:
        diff.insert(0, f"init: {ck_init} -> {init}")
    if diff:
        raise CheckpointError(f"{path} was written with other detection settings; to resume, keep them "
                              f"({'; '.join(diff)}), or remove {path.parent.parent} to start over")


def _flip(images: list, targets: list) -> None:
    """Each image (and its boxes) flipped left-right with probability 1/2 (torch's RNG), in place."""
    for i, (im, t) in enumerate(zip(images, targets)):
        if torch.rand(()) < 0.5:
            images[i] = im.flip(-1)
            b = t["boxes"].clone()
            b[:, [0, 2]] = im.shape[-1] - t["boxes"][:, [2, 0]]
            t["boxes"] = b


def run_detection(cfg, encoder: torch.nn.Module, out_dir: str | Path, init: str, encoder_text: str,
                  on_iteration=None) -> dict | None:
    """Train a Faster R-CNN on `encoder` (eval.det_*), test it, return the scores (rank 0; None elsewhere).

    out_dir: this detector's folder (resumed when it holds a checkpoint). init: "ssl" or "random" (for
    the record and the resume check). encoder_text: where the backbone came from, for the protocol.
    on_iteration(it): called after each iteration (tests send themselves a signal from it)."""
    e, env = cfg.eval, setup_env(cfg)
    if e.det_batch_size % env.world:
        raise ConfigError(f"eval.det_batch_size={e.det_batch_size} is not divisible by the number of processes "
                          f"{env.world}")
    sched_cfg = det_schedule(e)
    out = Path(out_dir)
    ckpt_path = out / "checkpoints" / "last.pt"
    train_ds, test_ds = detection_sets(e)
    if len(train_ds) == 0 or len(test_ds) == 0:
        raise ConfigError(f"the detection sets are empty (train {len(train_ds)}, test {len(test_ds)} images)")
    torch.manual_seed(_seed("det-init", e.seed))
    model = build_detector(encoder, len(train_ds.classes), norm=e.det_norm, trainable_layers=e.det_trainable_layers,
                           min_sizes=list(e.det_min_sizes), max_size=e.det_max_size, test_size=e.det_test_size,
                           fpn_channels=e.det_fpn_channels, head_dim=e.det_head_dim, rois=e.det_rois,
                           proposals=e.det_proposals, anchor_sizes=list(e.det_anchor_sizes),
                           amp=env.amp).to(env.device)
    if env.world > 1 and env.device.type == "cuda" and e.det_norm == "sync":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if env.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=sched_cfg["lr"], momentum=0.9, weight_decay=e.det_weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(sched_cfg))
    it, elapsed, now_cfg = 0, 0.0, _det_config(e)
    logger = MetricLogger(out, enabled=env.main)
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        _check_resume(ck.get("det_config", {}), now_cfg, init, ck.get("init", "?"), ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        it, elapsed = ck["iteration"], ck["elapsed"]
        logger.truncate_lines(ck["log_lines"])
        if env.main:
            print(f"[selfsup] detection ({init}): resumed {out} at iteration {it} of {sched_cfg['iters']}")
    else:
        logger.truncate_lines(0)

    def checkpoint() -> None:
        if env.main:
            save_checkpoint({"format": 1, "kind": "detection", "init": init, "det_config": now_cfg,
                             "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "iteration": it, "elapsed": elapsed,
                             "log_lines": logger.lines()}, ckpt_path)

    loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=_StepBatches(len(train_ds), e.det_batch_size, env.rank, env.world, e.seed, it,
                                             sched_cfg["iters"]),
        num_workers=e.det_num_workers, collate_fn=_collate)
    iters_here, t0 = 0, time.perf_counter()
    bar = Progress(sched_cfg["iters"], f"detection ({init})", initial=it, enabled=env.main, unit="iteration")
    net.train()
    set_test_size(model, False)
    with StopSignals() as stop:
        for images, targets in loader:
            t_it = time.perf_counter()
            torch.manual_seed(_seed("det-step", e.seed, it, env.rank))
            images = [im.to(env.device).float().div_(255) for im in images]
            targets = [{"boxes": t["boxes"].to(env.device), "labels": t["labels"].to(env.device)} for t in targets]
            _flip(images, targets)
            losses = net(images, targets)   # bf16 autocast (a GPU) inside, for the backbone and FPN only
            loss = sum(v.float() for v in losses.values())
            finite = torch.isfinite(loss.detach()).float()
            if env.world > 1:   # every rank stops together: none is left waiting in the next collective
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite:
                raise NonFiniteLossError(f"detection loss is {loss.item()} at iteration {it} (on this or another "
                                         f"rank): lower eval.det_lr (now {sched_cfg['lr']:g}) or raise "
                                         "eval.det_warmup_iters")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            it += 1
            iters_here += 1
            elapsed += time.perf_counter() - t_it
            if it % e.det_log_every == 0 or it == sched_cfg["iters"]:
                logger.log({"event": "det_train", "init": init, "step": it, "loss": loss.item(),
                            **{k: v.item() for k, v in losses.items()}, "lr": opt.param_groups[0]["lr"],
                            "s_per_iter": elapsed / max(it, 1)})
                bar.set(loss=loss.item(), lr=opt.param_groups[0]["lr"])
            bar.update()
            if it % e.det_checkpoint_every == 0:
                checkpoint()
            if on_iteration is not None:
                on_iteration(it)
            if (env.world == 1 or it % e.det_log_every == 0) and (signum := stop.agreed(env.device)):
                bar.close()
                checkpoint()
                logger.close()
                raise stopped(signum, f"detection iteration {it}", ckpt_path,
                              "run the same `selfsup eval detection` command again to resume", env.main)
    bar.close()
    checkpoint()
    s_per_iter = (time.perf_counter() - t0) / iters_here if iters_here else None
    scores = test_detector(model, test_ds, e.det_batch_size // env.world, env)
    if not env.main:
        logger.close()
        return None
    res = {"init": init, **scores, "iters": sched_cfg["iters"], "batch": sched_cfg["batch"],
           "train_images": len(train_ds), "test_images": len(test_ds), "classes": len(train_ds.classes),
           "s_per_iter": s_per_iter if s_per_iter is not None else elapsed / max(it, 1),
           "device": env.device.type, "processes": env.world}
    res["protocol"] = det_protocol(cfg, sched_cfg, encoder_text)
    logger.log({"event": "det_test", "step": it, **{k: v for k, v in res.items() if k != "protocol"}})
    logger.close()
    return res


@torch.no_grad()
def test_detector(model, test_ds, batch: int, env) -> dict:
    """Detections of `model` on this rank's share of `test_ds` (at eval.det_test_size), gathered on every
    rank; the scores of :func:`detection_scores` (computed on rank 0, {} elsewhere)."""
    model.eval()
    set_test_size(model, True)
    preds, targets = {}, {}
    idx = list(range(env.rank, len(test_ds), env.world))
    for s in range(0, len(idx), max(1, batch)):
        items = [(i, *test_ds[i]) for i in idx[s:s + max(1, batch)]]
        outs = model([im.to(env.device).float().div_(255) for _, im, _ in items])
        for (i, _, t), o in zip(items, outs):
            preds[i] = {k: v.detach().float().cpu() if k != "labels" else v.cpu() for k, v in o.items()}
            targets[i] = {k: t[k] for k in ("boxes", "labels", "difficult")}
    set_test_size(model, False)
    model.train()
    if D.is_dist():
        parts = [None] * env.world
        dist.all_gather_object(parts, (preds, targets))
        for p, t in parts:
            preds.update(p)
            targets.update(t)
    if not env.main:
        return {}
    order = sorted(preds)
    return detection_scores([preds[i] for i in order], [targets[i] for i in order], len(test_ds.classes))


def det_protocol(cfg, s: dict, encoder_text: str) -> str:
    """The protocol string stored beside every detection number."""
    e = cfg.eval
    data = (f"VOC{'+'.join(str(y)[2:] for y in e.det_years)} trainval -> VOC07 test" if e.det_data == "voc"
            else f"COCO-format {Path(str(e.det_ann)).name} -> {Path(str(e.det_test_ann)).name}")
    sizes = list(e.det_min_sizes)
    scale = f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else f"{sizes[0]}"
    return (f"detection: torchvision Faster R-CNN, {cfg.model.backbone}-FPN ({e.det_fpn_channels} ch, box head "
            f"{e.det_head_dim}, {e.det_rois} RoIs/img), backbone from {encoder_text}, norm {e.det_norm}, trainable "
            f"layers {e.det_trainable_layers}; {data}; {s['iters']} iterations at batch {s['batch']}, SGD lr "
            f"{s['lr']:g} (warm-up {s['warmup']}, x0.1 at {s['steps']}), wd {e.det_weight_decay:g}; train scale "
            f"{scale} (max {e.det_max_size}) + flip, test {e.det_test_size}; AP = COCO-style mean over IoU 0.50:0.95, "
            "AP50 / AP75 (torchmetrics, pycocotools backend; difficult as iscrowd, ignored); voc07_ap50 / voc07_ap75 = "
            "VOC07 11-point AP at IoU 0.5 / 0.75, voc07_ap its mean over IoU 0.50:0.95 (detectron2's VOC AP50 / AP75 "
            "/ AP, as MoCo reports; difficult ignored)")
