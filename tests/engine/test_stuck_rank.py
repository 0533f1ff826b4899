"""A stuck rank under torchrun (issue 13): with one worker stopped (SIGSTOP, as a hung node) the other
gives up after dist.timeout_s and the job ends with one `selfsup: error:` line naming the timeout,
instead of hanging silently."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _train_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum('"event": "train"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def test_stopped_rank_ends_the_job_within_the_timeout(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "selfsup", "train", *TINY, "train.max_steps=1000", "train.log_every=1", "eval.every=0",
           "dist.timeout_s=10", f"run_dir={run}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    stopped = None
    try:
        deadline = time.time() + 180
        while _train_steps(run) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        (stopped,) = [p for p in _children(proc.pid) if _rank_of(p) == 1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        out, err = proc.communicate(timeout=150)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if stopped is not None and Path(f"/proc/{stopped}").exists():
            os.kill(stopped, signal.SIGKILL)
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("selfsup: error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("selfsup: error: a collective did not complete within dist.timeout_s=10 s: a rank "
                                "is stuck or dead (rank 0 of 2 gave up waiting)"), errors[0]
    assert elapsed < 90, elapsed   # 10 s timeout + torchrun's 30 s grace before it SIGKILLs the stopped rank
