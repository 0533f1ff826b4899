"""Training and testing a detector for `selfsup eval detection`, with the engine's run machinery.

One detector run lives in its own folder (RUN_DIR/eval/detection/<init>/): checkpoints/last.pt
(atomic, `save_checkpoint`), metrics.jsonl (`MetricLogger`). The process group, device, threads and
autocast dtype come from `setup_env` (train.precision, train.threads; bf16 on a GPU, applied to the
backbone and FPN only); SIGTERM / SIGINT finish the iteration, checkpoint and exit 75 / 130
(`StopSignals`, `TrainingStopped`, as training does; under
torchrun the ranks agree at every det.log_every iteration). A folder holding a checkpoint is
resumed; the resume is exact because every random draw of an iteration (the images it reads, their
flips, the training scale, the RPN / RoI sampling) comes from a seed of (eval.seed, iteration, rank),
so model, optimiser and schedule are the whole state. The checkpoint records the encoder it started
from (a hash of its weights, :func:`encoder_digest`): a folder holding another encoder's detector (the
run's encoder changed since, or another run's) is refused, not resumed; `restart` discards it.
Both data splits are read and checked before the first iteration (data.on_error: raise | skip), and
:func:`folder_lock` keeps a second `eval detection` out of a folder in use.

Schedule (:func:`det_schedule`): MoCo's VOC schedule, 24k iterations at batch 16, lr 0.02, x0.1 at
18k and 22k, 100 warm-up iterations (linear from lr / 1000), scaled linearly to det.batch_size.
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ..config import DET_RENAMED
from ..data.detection import detection_sets
from ..data.loader import StepBatches
from ..errors import CheckpointError, ConfigError, NonFiniteLossError
from ..eval.detection import build_detector, detection_scores, set_test_size
from ..parallel import distributed as D
from ..progress import Progress
from .checkpoint import load_checkpoint, save_checkpoint
from .guard import finite_everywhere
from .logging import MetricLogger
from .runs import check_resume
from .setup import ddp_wrap, hash_seed, setup_env, sync_batchnorm
from .signals import StopSignals, stopped

__all__ = ["det_protocol", "det_schedule", "encoder_digest", "folder_lock", "run_detection"]

# det.* keys that may change when a detector run resumes (paths, workers, logging)
RESUME_MAY_CHANGE = ("root", "ann", "test_ann", "num_workers", "log_every", "checkpoint_every")


def det_schedule(d) -> dict:
    """{iters, lr, steps (iterations where the lr drops x0.1), warmup, batch} of the det section `d`."""
    b = d.batch_size
    iters = d.iters if d.iters is not None else max(1, round(24000 * 16 / b))
    lr = d.lr if d.lr is not None else 0.02 * b / 16
    warmup = d.warmup_iters if d.warmup_iters is not None else round(100 * 16 / b)
    return {"iters": iters, "lr": lr, "steps": [round(f * iters) for f in d.steps], "warmup": warmup, "batch": b}


def _lr_factor(s: dict):
    def f(it: int) -> float:
        warm = 0.001 + (1 - 0.001) * it / s["warmup"] if it < s["warmup"] else 1.0
        return warm * 0.1 ** sum(it >= m for m in s["steps"])
    return f


class _Shuffled:
    """This rank's indices of iteration `it` (a call): iteration i reads global positions i*B .. (i+1)*B - 1
    of an endless sequence of seeded permutations (one per pass over the set of `n`)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self._perms: dict = {}

    def _at(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                hash_seed("det-perm", self.seed, epoch)))}
        return int(self._perms[epoch][pos % self.n])

    def __call__(self, it: int) -> list:
        per = self.batch // self.world
        first = it * self.batch + self.rank * per
        return [self._at(p) for p in range(first, first + per)]


def _collate(batch):
    return tuple(zip(*batch))


def encoder_digest(encoder: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of the encoder's state dict: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k, v in sorted(encoder.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


@contextmanager
def folder_lock(folder: Path):
    """An exclusive lock (fcntl.flock) on FOLDER/.detection.lock for the block: a second `eval detection`
    on the folder is refused. The kernel releases it when the process ends, however it ends."""
    import fcntl

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; --out takes a folder (new or existing) to write into")
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".detection.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{folder} is in use by another `selfsup eval detection` (it holds {lock}): wait "
                              "for it to end, or give another --out") from None
        yield
    finally:
        os.close(fd)


def _flip(images: list, targets: list) -> None:
    """Each image (and its boxes) flipped left-right with probability 1/2 (torch's RNG), in place."""
    for i, (im, t) in enumerate(zip(images, targets)):
        if torch.rand(()) < 0.5:
            images[i] = im.flip(-1)
            b = t["boxes"].clone()
            b[:, [0, 2]] = im.shape[-1] - t["boxes"][:, [2, 0]]
            t["boxes"] = b


def run_detection(cfg, encoder: torch.nn.Module, out_dir: str | Path, init: str, encoder_text: str,
                  on_iteration=None, restart: bool = False) -> dict | None:
    """Train a Faster R-CNN on `encoder` (cfg.det), test it, return the scores (rank 0; None elsewhere).

    out_dir: this detector's folder (resumed when it holds a checkpoint). init: "ssl" or "random" (for
    the record and the resume check). encoder_text: where the backbone came from, for the protocol.
    on_iteration(it): called after each iteration (tests send themselves a signal from it). restart:
    discard a detector already in out_dir (else resumed; refused when its encoder or settings differ)."""
    d, env = cfg.det, setup_env(cfg)
    if d.batch_size % env.world:
        raise ConfigError(f"det.batch_size={d.batch_size} is not divisible by the number of processes {env.world}")
    train_ds, test_ds = _detection_sets(cfg)
    run = _DetectionRun(cfg, encoder, Path(out_dir), init, encoder_text, env, len(train_ds.classes))
    run.start(restart)
    s_per_iter = run.train(train_ds, on_iteration)
    scores = test_detector(run.model, test_ds, d.batch_size // env.world, env)
    return run.finish(scores, train_ds, test_ds, s_per_iter)


def _detection_sets(cfg) -> tuple:
    """(train, test) detection sets of cfg.det, read and checked (data.on_error); what was skipped is said."""
    train_ds, test_ds = detection_sets(cfg.det, cfg.data.on_error)
    for line in (train_ds.skipped, test_ds.skipped):
        if line:
            D.say(f"detection data: {line}")
    if len(train_ds) == 0 or len(test_ds) == 0:
        raise ConfigError(f"the detection sets are empty (train {len(train_ds)}, test {len(test_ds)} images)")
    return train_ds, test_ds


class _DetectionRun:
    """One detector run in its folder: the model (and its DDP wrap), the optimiser, the schedule, the
    iteration reached, the training seconds and the metrics log; started fresh or resumed (`start`),
    trained (`train`), checkpointed (`checkpoint`) and summed up (`finish`)."""

    def __init__(self, cfg, encoder, out: Path, init: str, encoder_text: str, env, classes: int):
        d = cfg.det
        self.cfg, self.d, self.env, self.out, self.init, self.encoder_text = cfg, d, env, out, init, encoder_text
        self.plan, self.ckpt_path = det_schedule(d), out / "checkpoints" / "last.pt"
        torch.manual_seed(hash_seed("det-init", cfg.eval.seed))
        model = build_detector(encoder, classes, norm=d.norm, trainable_layers=d.trainable_layers,
                               min_sizes=list(d.min_sizes), max_size=d.max_size, test_size=d.test_size,
                               fpn_channels=d.fpn_channels, head_dim=d.head_dim, rois=d.rois,
                               proposals=d.proposals, anchor_sizes=list(d.anchor_sizes), amp=env.amp)
        self.model = sync_batchnorm(model.to(env.device), env, d.norm == "sync")
        self.net = ddp_wrap(self.model, env)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=self.plan["lr"], momentum=0.9, weight_decay=d.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_factor(self.plan))
        self.it, self.elapsed, self.settings = 0, 0.0, OmegaConf.to_container(d)
        self.source = {"sha256": encoder_digest(encoder), "source": encoder_text}
        self.logger = MetricLogger(out, enabled=env.main)

    def start(self, restart: bool) -> None:
        """Resume the checkpoint in the folder (checked first), or start from iteration 0 (`restart`:
        the folder's checkpoint is removed, so a stop before the first new one cannot resume it)."""
        if self.ckpt_path.is_file() and not restart:
            ck = load_checkpoint(self.ckpt_path)
            self._check_resume(ck)
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self.it, self.elapsed = ck["iteration"], ck["elapsed"]
            self.logger.truncate_lines(ck["log_lines"])
            D.say(f"detection ({self.init}): resumed {self.out} at iteration {self.it} of {self.plan['iters']}")
            return
        if restart and self.env.main:
            self.ckpt_path.unlink(missing_ok=True)
        self.logger.truncate_lines(0)

    def _check_resume(self, ck: dict) -> None:
        """CheckpointError when the checkpoint's detector came from another encoder, or another init or
        det settings (but those of RESUME_MAY_CHANGE)."""
        was, path = ck.get("encoder", {}), self.ckpt_path
        fix = f"give a new --out, or add --restart to discard {self.out} and train from the start"
        if was.get("sha256") != self.source["sha256"]:
            old = (f"{was.get('source')} (weights {was.get('sha256')})" if was else
                   "an encoder it does not record (written by an older selfsup)")
            raise CheckpointError(f"{path} holds a detector trained from {old}, not from {self.source['source']} "
                                  f"(weights {self.source['sha256']}); resuming it would file its numbers under "
                                  f"the wrong encoder: {fix}")
        saved = {DET_RENAMED.get(k, k): v for k, v in ck.get("det_config", {}).items()}   # older: eval.det_<key>
        check_resume({**saved, "init": ck.get("init", "?")}, {**self.settings, "init": self.init}, RESUME_MAY_CHANGE,
                     lambda diff: CheckpointError(f"{path} was written with other detection settings; to resume, "
                                                  f"keep them ({'; '.join(diff)}), or {fix}"))

    def checkpoint(self) -> None:
        """Write checkpoints/last.pt (rank 0): the model, optimiser, schedule, position and what it started from."""
        if self.env.main:
            save_checkpoint({"format": 1, "kind": "detection", "init": self.init, "encoder": self.source,
                             "det_config": self.settings, "model": self.model.state_dict(),
                             "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                             "iteration": self.it, "elapsed": self.elapsed, "log_lines": self.logger.lines()},
                            self.ckpt_path)

    def train(self, train_ds, on_iteration) -> float | None:
        """The iterations from the one reached to the end, then a checkpoint; seconds per iteration in
        this process (None when none was left). A stop signal checkpoints and raises TrainingStopped."""
        d, env, first, t0 = self.d, self.env, self.it, time.perf_counter()
        loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=StepBatches(_Shuffled(len(train_ds), d.batch_size, env.rank, env.world,
                                                          self.cfg.eval.seed), self.it, self.plan["iters"]),
            num_workers=d.num_workers, collate_fn=_collate)
        self.bar = Progress(self.plan["iters"], f"detection ({self.init})", initial=self.it, enabled=env.main,
                            unit="iteration")
        self.net.train()
        set_test_size(self.model, False)
        with StopSignals() as stop:
            for images, targets in loader:
                t_it = time.perf_counter()
                loss, losses = self._step(images, targets)
                self.elapsed += time.perf_counter() - t_it
                self._log(loss, losses)
                if self.it % d.checkpoint_every == 0:
                    self.checkpoint()
                if on_iteration is not None:
                    on_iteration(self.it)
                if (env.world == 1 or self.it % d.log_every == 0) and (signum := stop.agreed(env.device)):
                    self._stop(signum)
        self.bar.close()
        self.checkpoint()
        return (time.perf_counter() - t0) / (self.it - first) if self.it > first else None

    def _step(self, images, targets) -> tuple:
        """One iteration (its random draws seeded by (eval.seed, iteration, rank)): (loss, the loss terms)."""
        env = self.env
        torch.manual_seed(hash_seed("det-step", self.cfg.eval.seed, self.it, env.rank))
        images = [im.to(env.device).float().div_(255) for im in images]
        targets = [{"boxes": t["boxes"].to(env.device), "labels": t["labels"].to(env.device)} for t in targets]
        _flip(images, targets)
        losses = self.net(images, targets)   # bf16 autocast (a GPU) inside, for the backbone and FPN only
        loss = sum(v.float() for v in losses.values())
        if not finite_everywhere(loss):   # every rank stops together: none is left waiting in a collective
            raise NonFiniteLossError(f"detection loss is {loss.item()} at iteration {self.it} (on this or another "
                                     f"rank): lower det.lr (now {self.plan['lr']:g}) or raise det.warmup_iters")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.it += 1
        return loss, losses

    def _log(self, loss, losses: dict) -> None:
        """A det_train event at every det.log_every-th and the last iteration; the progress bar."""
        if self.it % self.d.log_every == 0 or self.it == self.plan["iters"]:
            lr = self.opt.param_groups[0]["lr"]
            self.logger.log({"event": "det_train", "init": self.init, "step": self.it, "loss": loss.item(),
                             **{k: v.item() for k, v in losses.items()}, "lr": lr,
                             "s_per_iter": self.elapsed / max(self.it, 1)})
            self.bar.set(loss=loss.item(), lr=lr)
        self.bar.update()

    def _stop(self, signum: int) -> None:
        """A stop signal: checkpoint here, raise TrainingStopped (rank 0 says how to resume)."""
        self.bar.close()
        self.checkpoint()
        self.logger.close()
        raise stopped(signum, f"detection iteration {self.it}", self.ckpt_path,
                      "run the same `selfsup eval detection` command again to resume", self.env.main)

    def finish(self, scores: dict, train_ds, test_ds, s_per_iter: float | None) -> dict | None:
        """The result (rank 0; None elsewhere), logged as a det_test event; the log closed."""
        if not self.env.main:
            self.logger.close()
            return None
        env, plan = self.env, self.plan
        res = {"init": self.init, **scores, "iters": plan["iters"], "batch": plan["batch"],
               "train_images": len(train_ds), "test_images": len(test_ds), "classes": len(train_ds.classes),
               "s_per_iter": s_per_iter if s_per_iter is not None else self.elapsed / max(self.it, 1),
               "device": env.device.type, "processes": env.world, "encoder_sha256": self.source["sha256"]}
        res["protocol"] = det_protocol(self.cfg, plan, self.encoder_text)
        self.logger.log({"event": "det_test", "step": self.it, **{k: v for k, v in res.items() if k != "protocol"}})
        self.logger.close()
        return res


@torch.no_grad()
def test_detector(model, test_ds, batch: int, env) -> dict:
    """Detections of `model` on this rank's share of `test_ds` (at det.test_size), gathered on every
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
    d = cfg.det
    data = (f"VOC{'+'.join(str(y)[2:] for y in d.years)} trainval -> VOC07 test" if d.data == "voc"
            else f"COCO-format {Path(str(d.ann)).name} -> {Path(str(d.test_ann)).name}")
    sizes = list(d.min_sizes)
    scale = f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else f"{sizes[0]}"
    return (f"detection: torchvision Faster R-CNN, {cfg.model.backbone}-FPN ({d.fpn_channels} ch, box head "
            f"{d.head_dim}, {d.rois} RoIs/img), backbone from {encoder_text}, norm {d.norm}, trainable "
            f"layers {d.trainable_layers}; {data}; {s['iters']} iterations at batch {s['batch']}, SGD lr "
            f"{s['lr']:g} (warm-up {s['warmup']}, x0.1 at {s['steps']}), wd {d.weight_decay:g}; train scale "
            f"{scale} (max {d.max_size}) + flip, test {d.test_size}; AP = COCO-style mean over IoU 0.50:0.95, "
            "AP50 / AP75 (torchmetrics, pycocotools backend; difficult as iscrowd, ignored); voc07_ap50 / voc07_ap75 = "
            "VOC07 11-point AP at IoU 0.5 / 0.75, voc07_ap its mean over IoU 0.50:0.95 (detectron2's VOC AP50 / AP75 "
            "/ AP, as MoCo reports; difficult ignored)")
