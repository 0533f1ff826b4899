"""Faults that must never lose a user's work (issue 13): SIGKILL at random moments, many during a
checkpoint save, then resume bit-exact; a full disk ends with one line and leaves no partial file."""
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TINY, assert_same_model
from selfsup.config import load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.engine.trainer import train

ENV = dict(os.environ, OMP_NUM_THREADS="1")
ARGS = TINY + ["train.epochs=1", "train.max_steps=40", "train.checkpoint_every=1", "eval.every=0", "train.log_every=1"]


def test_ten_sigkills_at_random_moments_then_resume_is_bit_exact(tmp_path):
    """Every step saves (checkpoint_every=1), so most kills land in or next to a save. After each kill
    the checkpoint must load; the run continued by --resume each time ends equal to an uninterrupted one."""
    train(load_config(None, ARGS + [f"run_dir={tmp_path / 'a'}"]))
    run, ckpt = tmp_path / "b", tmp_path / "b/checkpoints/last.pt"
    rng = random.Random(0)
    cmd = [sys.executable, "-m", "selfsup", "train", *ARGS, f"run_dir={run}"]
    steps = []
    for _ in range(10):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        start = load_checkpoint(ckpt)["step"] if ckpt.exists() else 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:   # wait for a step past the start
            if ckpt.exists() and load_checkpoint(ckpt)["step"] > start:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.15))
        proc.kill()
        proc.wait()
        if proc.returncode == 0:   # it finished before the kill: fine, nothing to resume
            break
        steps.append(load_checkpoint(ckpt)["step"])   # loads: never a partial file
        cmd = [sys.executable, "-m", "selfsup", "train", "--resume", str(run)]
    out = subprocess.run([sys.executable, "-m", "selfsup", "train", "--resume", str(run)], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not list(run.glob("checkpoints/*.tmp"))   # stale temp files of killed saves are cleaned
    assert steps == sorted(steps) and len(steps) >= 5
    assert_same_model(tmp_path / "a", run)


def _tmpfs(size: str):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    d = tempfile.mkdtemp()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d], capture_output=True).returncode:
        pytest.skip("could not mount a tmpfs here")
    return Path(d)


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint():
    disk = _tmpfs("96k")
    try:
        out = subprocess.run([sys.executable, "-m", "selfsup", "train", *ARGS, f"run_dir={disk / 'run'}"],
                             capture_output=True, text=True, env=ENV, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
        assert "selfsup: error: No space left on device" in out.stderr and "free some space" in out.stderr
        assert not list(disk.glob("**/*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)])
        os.rmdir(disk)
