"""Run logging: metrics.jsonl (one JSON object per event) and TensorBoard scalars."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricLogger:
    """Appends events to RUN_DIR/metrics.jsonl and scalars to RUN_DIR/tensorboard/ (and to `trackers`,
    W&B / MLflow, when given: the same scalars, and a "final" event as the run's summary). No-op when
    disabled (non-zero ranks)."""

    def __init__(self, run_dir: Path, enabled: bool = True, trackers=None):
        self.enabled, self.trackers = enabled, trackers
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def lines(self) -> int:
        """Number of complete events written so far (stored in checkpoints)."""
        if not (self.enabled and self.path.exists()):
            return 0
        return self.path.read_bytes().count(b"\n")

    def truncate_lines(self, n: int) -> None:
        """Keep the first `n` events and drop the rest (on resume: events logged after the checkpoint)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = self.path.read_text().splitlines(keepends=True)[:n]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def log(self, event: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        step = event.get("step", 0)
        scalars = {k: v for k, v in event.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")}
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        if self.trackers is not None:
            self.trackers.log(scalars, step)
            if event.get("event") == "final":
                self.trackers.final(event)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
