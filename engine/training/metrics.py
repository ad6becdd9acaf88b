"""Run metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl`` plus TensorBoard scalars.

Each row has ``step``, ``phase`` ("train" / "eval" / ...) and numeric fields. A resumed run first drops
the rows logged after its checkpoint's step, so the file always reads like one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from vidpo.utils import atomic


def _clean(value: Any):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


def read_metrics(path: str | os.PathLike, phase: str | None = None) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        if phase is None or row.get("phase") == phase:
            rows.append(row)
    return rows


class MetricsLogger:
    """Appends rows to metrics.jsonl (flushed per row) and mirrors them to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = True,
                 enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a")
        if tensorboard:
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, phase: str = "train", **values) -> dict:
        row = {"step": int(step), "phase": phase, "time": round(time.time(), 3)}
        row.update({k: _clean(v) for k, v in values.items()})
        if not self.enabled:
            return row
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key in ("step", "time", "phase") or not isinstance(value, (int, float)):
                    continue
                self._tb.add_scalar(f"{phase}/{key}", value, step)
        return row

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
