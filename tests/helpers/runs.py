"""Reading what a training run wrote into its directory."""
from __future__ import annotations


def train_rows(run_dir) -> list:
    """The ``train`` rows of ``<run_dir>/metrics.jsonl``, in order."""
    from vidpo.training.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl", "train")


def train_losses(run_dir) -> list:
    """``[(step, loss), ...]`` of the run's ``train`` rows."""
    return [(r["step"], r["loss"]) for r in train_rows(run_dir)]
