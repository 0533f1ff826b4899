"""Preemption (issue 13): SIGTERM and SIGINT mid-run finish the step, write a checkpoint, print one line
with the command that resumes, and exit 75 (SIGTERM: EX_TEMPFAIL, resumable) or 130 (SIGINT), never with a
traceback; the resumed run ends bit-identical to an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, assert_same_model
from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train

ARGS = TINY + ["train.max_steps=60", "train.log_every=1", "eval.every=0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("preempt") / "full"
    train(load_config(None, ARGS + [f"run_dir={run}"]))
    return run


def _train_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"event": "train"' in line for line in path.read_text().splitlines())


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_signal_checkpoints_and_resume_matches_uninterrupted(tmp_path, uninterrupted, sig, code):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "selfsup", "train", *ARGS, f"run_dir={run}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while _train_steps(run) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    lines = [line for line in (out + err).splitlines() if "stopped by" in line]
    step = load_checkpoint(run / "checkpoints/last.pt")["step"]
    assert 3 <= step < 60
    assert lines == [f"selfsup: stopped by {sig.name} after step {step}; checkpoint saved in "
                     f"{run / 'checkpoints/last.pt'}; resume with: selfsup train --resume {run}"]
    resumed = subprocess.run([sys.executable, "-m", "selfsup", "train", "--resume", str(run)],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 60
    assert_same_model(uninterrupted, run)


def test_stop_signals_restores_the_previous_handlers():
    from selfsup.engine.signals import StopSignals
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)    # recorded, not a KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)   # a second signal changes nothing
        time.sleep(0.01)
        assert stop.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_to_the_whole_process_group_with_loader_workers(tmp_path):
    """SLURM signals every process of the job, DataLoader workers included: they leave the stop to the
    main process (no 'worker killed by signal' traceback)."""
    from selfsup.data.fake import make_fake_imagenet

    make_fake_imagenet(str(tmp_path / "fake"), classes=3, train_per_class=12, val_per_class=4, min_size=40,
                       max_size=90)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfsup", "train", "pic-imagenet", "data.name=imagenet-zip",
         f"data.root={tmp_path / 'fake'}", "device=cpu", "data.image_size=48", "model.backbone=resnet_small",
         "model.width=8", "model.head_hidden=32", "model.proj_dim=16", "pic.large_size=32", "pic.small_size=16",
         "train.batch_size=12", "train.epochs=40", "data.window=24", "data.stride=12", "train.threads=1",
         "train.log_every=1", "eval.every=0", "data.num_workers=2", f"run_dir={run}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        deadline = time.time() + 120
        while _train_steps(run) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert sum("stopped by SIGTERM" in line for line in err.splitlines()) == 1
