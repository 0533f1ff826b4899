"""The trainer: one run of any method, made of parts that each do one job.

    setup.py      the process group, device, precision, threads          -> Env
    runs.py       the run directory (fresh, or the run to resume)
    data.py       the training set, its index schedule, each step's views -> TrainData
    step.py       the model, the optimiser, and the one training step     -> TrainStep
    guard.py      what a NaN or infinite loss does (train.nonfinite)      -> Guard
    signals.py    SIGTERM / SIGINT: finish the step, checkpoint, exit resumable (preemption)
    checkpoint.py what a checkpoint holds, written atomically             -> RunState
    logging.py    metrics.jsonl and TensorBoard
    export.py     encoder.safetensors

`Trainer` wires them together and runs the loop; it knows nothing of any one method.
"""
from __future__ import annotations

import shlex
import time

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import validate
from ..data.splits import load_eval_data, pixels
from ..errors import CollectiveTimeoutError, NonFiniteLossError, SelfsupError
from ..eval.features import extract_features
from ..eval.monitor import monitor_eval
from ..parallel import distributed as D
from ..progress import Progress
from .checkpoint import RunState, capture, restore, save_checkpoint
from .collapse import CollapseAlarm, embedding_stats
from .data import TrainData, crop_specs, make_views
from .export import export_encoder, read_export
from .guard import Guard, check_params
from .logging import MetricLogger
from .runs import checkpoint_path, open_run
from .setup import setup_env
from .signals import StopSignals, stopped
from .trackers import Trackers, check_trackers
from .step import TrainStep, build_model, check_input_size, make_optimizer, micro_batch_line, wrap_model

__all__ = ["Trainer", "train", "NonFiniteLossError", "export_encoder"]


def train(cfg: DictConfig, resume: str | None = None) -> dict:
    """Train `cfg` (or resume the run in directory `resume`); return the final metrics.

    Rank 0 writes RUN_DIR/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/last.pt,
    encoder.safetensors}. Under torchrun, the encoder and head are wrapped in DDP.
    """
    owns_group = not D.is_dist()   # a process group made by the caller is left to the caller
    try:
        return Trainer(cfg, resume).fit()
    except RuntimeError as e:
        if isinstance(e, SelfsupError) or not (D.is_dist() and D.is_timeout(e)):
            raise
        then = (f"resume from the last checkpoint with `selfsup train --resume {cfg.run_dir}`"
                if cfg.run_dir and checkpoint_path(cfg.run_dir).exists() else
                "start the run again (it has no checkpoint yet: --resume-if-exists starts it over in its run_dir)")
        raise CollectiveTimeoutError(
            f"a collective did not complete within dist.timeout_s={cfg.dist.timeout_s:g} s: a rank is stuck or dead "
            f"(rank {D.rank()} of {D.world_size()} gave up waiting). Look at the other ranks and their nodes, then "
            f"{then}; raise dist.timeout_s if one rank legitimately works alone that long (a slow checkpoint save "
            "or kNN monitor).") from None
    finally:
        if owns_group:
            D.cleanup_distributed()


class Trainer:
    """A training run: `Trainer(cfg, resume).fit()`. Building it sets everything up in order (the
    config is checked again against the real number of processes before any file or data is
    touched); `fit` runs the steps, the kNN monitor, checkpoints and the export."""

    def __init__(self, cfg: DictConfig, resume: str | None = None):
        self.cfg, self.env = cfg, setup_env(cfg)
        validate(cfg, self.env.world)
        check_trackers(cfg)
        run = open_run(cfg, resume, self.env.main)   # refusals come before anything is written
        self.run_dir = run.dir
        try:
            self._build(run.ckpt)
        except BaseException:   # a start that fails leaves no run directory (or files in an empty one)
            if getattr(self, "logger", None) is not None:
                self.logger.close()
            run.abandon()
            raise
        run.commit(cfg)   # config.yaml, once start-up is over

    def _build(self, ckpt: dict | None) -> None:
        """Data, model, optimiser, logger, and the checkpoint's state (a resume) or the data's (a fresh start)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        init_from = cfg.model.get("init_from")   # a fresh run from an exported encoder; a resume has its own
        init = read_export(init_from, cfg) if init_from and ckpt is None else None
        self.data = TrainData(cfg, self.env)
        self.eval_data = self._eval_data()
        self.model, self.channels_last = build_model(cfg, len(self.data.ds), self.env, init)
        check_input_size(self.model.backbone, self.data.size)
        opt, sched = make_optimizer(self.model, cfg, self.data.steps_per_epoch)
        self.state = RunState(self.model, opt, sched, self.data.sampler, self.data.aug_gen,
                              self.data.steps_per_epoch)
        trackers = Trackers(cfg, self.run_dir, OmegaConf.to_container(cfg, resolve=True)) if self.env.main else None
        self.logger = MetricLogger(self.run_dir, enabled=self.env.main, trackers=trackers)
        if ckpt is not None:
            self._resume(ckpt)
        else:
            self.model.init_from_data(self._encode)   # a fresh start: state that starts from the data
        self.crops = crop_specs(self.model, self.data.aug)   # what streamed data cuts while decoding
        self.train_step = TrainStep(self.model, wrap_model(self.model, cfg, self.env), opt, sched, self.env.amp,
                         cfg.train.micro_batch)
        if self.env.main and (line := micro_batch_line(cfg, self.env.world, self.model)):
            print(line)
        self.guard = Guard(cfg.train, self.model, self.env.device, checkpoint_path(self.run_dir),
                           self.data.steps_per_epoch, self.data.restart, self.logger)
        self.saved_step, self.skipped_images, self.knn, self.knn_step = -1, 0, {}, -1
        self.alarm = CollapseAlarm(cfg.log.collapse_std, cfg.log.collapse_rank)
        self.last = {"step": self.state.step}

    # ------------------------------------------------------------------ set-up parts
    def _eval_data(self):
        """(train, test) of the kNN monitor, or None (eval.every=0, an unlabelled or one-class train split)."""
        c, split = self.cfg, self.cfg.eval.train_split
        if c.eval.every <= 0:
            return None
        if c.data.labels == "none":
            D.say("data.labels=none: kNN monitor off (no labels to score it); embed, visualize and export "
                  "work on this run, kNN and linear evaluation need a labelled split")
            return None
        # an unlabelled training split is said before any test split is looked for (a flat folder has none)
        unlabelled = split == c.data.train_split and _unlabelled(self.data.ds)
        if not unlabelled:
            train, test = load_eval_data(c, self.data.ds, self.data.stream)
            unlabelled = _unlabelled(train)
        if unlabelled:
            D.say(f"split '{split}' has no labels: kNN monitor off (give the images one sub-folder per "
                  "class to score it, or set eval.every=0 to silence this)")
            return None
        if train.num_classes == 1:
            D.say(f"split '{split}' has one class only: kNN monitor off (it would score 1.0 by construction)")
            return None
        return train, test

    def _encode(self, net, train_bn: bool = False) -> torch.Tensor:
        """Unit-norm features of the training images under `net` (clean views): what a method starts from."""
        c, env = self.cfg, self.env
        return extract_features(net, pixels(self.data.ds), c.train.batch_size, env.device, c.data.image_size,
                                env.amp, train_bn=train_bn)

    def _resume(self, ckpt: dict) -> None:
        restore(self.state, ckpt, self.env.device)
        self.state.elapsed_before = ckpt["elapsed"]
        self.logger.truncate_lines(ckpt["log_lines"])
        step, spe = self.state.step, self.data.steps_per_epoch
        D.say(f"resumed {self.run_dir} at step {step} (epoch {step // spe}, batch {step % spe})")

    # ------------------------------------------------------------------ the loop
    def fit(self, hook=None) -> dict:
        """Train to the end (train.epochs, or train.max_steps); return the final metrics. `hook(trainer)`,
        when given, runs after every step; it returning True ends the run there, as its end (a budget:
        `selfsup bench methods`)."""
        s, total = self.state, self.data.total_steps
        self.t_start = time.perf_counter()
        self.t_log, self.step_log = self.t_start, s.step
        self.bar = Progress(total, "train", initial=s.step, every_s=self.cfg.train.progress_s, enabled=self.env.main)
        self.train_step.net.train()
        with StopSignals() as stop:   # SIGTERM / SIGINT: checkpoint and stop after the step (signals.py)
            while s.step < total:
                self._train_step()
                if hook is not None and hook(self):
                    break
                if (self.env.world == 1 or s.step % self.cfg.train.log_every == 0) and \
                        (signum := stop.agreed(self.env.device)):
                    self._stop(signum)
            self.bar.close()
            return self._finish()

    def _stop(self, signum: int) -> None:
        """A preemption: checkpoint here, say where and how to resume (rank 0), raise TrainingStopped."""
        self.checkpoint()
        self.bar.close()
        self.logger.close()
        raise stopped(signum, f"step {self.state.step}", checkpoint_path(self.run_dir),
                      f"resume with: selfsup train --resume {shlex.quote(str(self.run_dir))}", self.env.main)

    def _train_step(self) -> None:
        """One step of the run: data, forward/backward, the guard, the update, then what is due."""
        s, t = self.state, self.cfg.train
        self.guard.bn.save()
        batch = self.data.next(s.step, self.crops)
        if batch.skipped:
            self._log_skipped(batch.skipped)
        views = make_views(self.model, self.data, batch, self.channels_last)
        out = self.train_step.forward_backward(views, batch.index)
        if not self.guard.loss_ok(out["loss"], s.step):
            if self.guard.recover(out["loss"], s) == "skip":
                self.bar.update(1)
            else:
                self.bar.reset(self.data.total_steps, s.step)
            return
        self.train_step.update()
        s.step += 1
        if s.step % t.log_every == 0 or s.step == self.data.total_steps:
            self._log_train(out)
        self.bar.update(1)   # after the log: a progress line shows this step's loss when it was logged
        if t.checkpoint_every and s.step % t.checkpoint_every == 0:
            self.checkpoint()
        if s.step % self.data.steps_per_epoch == 0:   # an epoch's end
            epoch = s.step // self.data.steps_per_epoch
            if self.eval_data is not None and epoch % self.cfg.eval.every == 0:
                self._monitor()
                if self.env.main:
                    self.bar.write(f"epoch {epoch}: knn_top1 {self.knn['knn_top1']:.4f}")
            self.checkpoint()

    def _finish(self) -> dict:
        s = self.state
        epoch = s.step // self.data.steps_per_epoch
        if self.eval_data is not None and self.knn_step != s.step:
            self._monitor()
        self.checkpoint()
        final = {"event": "final", "run_dir": str(self.run_dir), "step": s.step, "epoch": epoch,
                 "loss": self.last.get("loss"), "wall_time": self.wall(), **self.knn}
        if self.env.main:
            export_encoder(self.model.encoder, self.run_dir / "encoder.safetensors")
            self.logger.log(final)
        self.logger.close()
        return final

    def wall(self) -> float:
        """Training seconds of the run, over every process that took part in it."""
        return self.state.elapsed_before + time.perf_counter() - self.t_start

    # ------------------------------------------------------------------ logging, monitor, checkpoints
    def _log_train(self, out: dict) -> None:
        s, loss = self.state, out["loss"]
        self.guard.check_loss(loss, s.step)
        now = time.perf_counter()
        views_s = ((s.step - self.step_log) * self.cfg.train.batch_size * self.model.n_views
                   / max(now - self.t_log, 1e-9))
        self.t_log, self.step_log = now, s.step
        self.last = {"event": "train", "step": s.step, "epoch": s.step // self.data.steps_per_epoch,
                     "loss": D.all_reduce_mean(loss.detach()).item(), "lr": s.opt.param_groups[0]["lr"],
                     "views_per_s": views_s, "wall_time": self.wall()}
        self.last.update({k: float(v) for k, v in out.items() if k not in ("loss", "embedding")})
        emb = out["embedding"]
        self.last.update(embedding_stats(emb))
        if self.env.main and (warning := self.alarm.check(self.last, self.last["epoch"], emb[0].numel())):
            self.bar.write(f"[selfsup] {warning}")
        if self.skipped_images:
            self.last["skipped_images"] = self.skipped_images
        self.logger.log(self.last)
        self.bar.set(**{"epoch": self.last["epoch"], "loss": self.last["loss"], "lr": self.last["lr"],
                        "views/s": round(views_s)})

    def _log_skipped(self, skipped: list) -> None:
        self.skipped_images += len(skipped)
        self.logger.log({"event": "skipped_images", "step": self.state.step, "count": len(skipped),
                         "total": self.skipped_images, "examples": skipped[:3]})

    def _monitor(self) -> None:
        """The kNN monitor now; logged as a `knn` event."""
        s, env = self.state, self.env
        train_ds = self.eval_data[0]
        self.knn = monitor_eval(self.model, self.cfg, *self.eval_data, env.device, env.amp, train_ds is self.data.ds)
        self.knn_step = s.step
        self.logger.log({"event": "knn", "step": s.step, "epoch": s.step // self.data.steps_per_epoch, **self.knn,
                         "wall_time": self.wall()})

    def checkpoint(self) -> None:
        """Write checkpoints/last.pt (once per step at most; collective: every rank calls it)."""
        s = self.state
        if self.saved_step == s.step:
            return
        self.saved_step = s.step
        check_params(self.model, s.step, self.run_dir / "checkpoints")
        ck = capture(s, OmegaConf.to_yaml(self.cfg), self.wall(), self.logger.lines())
        if self.env.main:
            save_checkpoint(ck, checkpoint_path(self.run_dir))


def _unlabelled(ds) -> bool:
    """Whether a split has unlabelled items (label -1): the kNN monitor cannot score it."""
    return bool((torch.as_tensor(ds.labels) < 0).any())
