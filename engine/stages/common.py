"""What every job of a run shares: logging to the run directory, sample grids, the config saved beside a
checkpoint, loading a policy from one, and the run report.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from vidpo.config import RunConfig, load_config, resolve_path
from vidpo.data.domains import exact_oracle
from vidpo.evaluation.evaluate import EvalResult
from vidpo.evaluation.report import write_report
from vidpo.evaluation.visualize import save_gif, save_png_grid
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_policy


def setup_logging(out_dir: Optional[Path] = None, verbose: bool = False) -> None:
    """Log to stderr and, when ``out_dir`` is given, to ``out_dir/vidpo.log``."""
    root = logging.getLogger("vidpo")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_vidpo_stderr", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        handler._vidpo_stderr = True
        root.addHandler(handler)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = os.path.abspath(Path(out_dir) / "vidpo.log")  # FileHandler stores absolute paths
        if not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(fmt)
            root.addHandler(fh)


def build_oracle(world):
    return exact_oracle(world)


def save_samples(result: EvalResult, world, directory: Path, name: str, grid: int) -> list[Path]:
    """``directory/name.gif`` (animated grid) and ``directory/name.png`` (frame strips) of the first
    ``grid`` samples, captioned."""
    n = min(grid, result.samples.shape[0])
    captions = world.captions(result.cond_ids[:n])
    gif = Path(directory) / f"{name}.gif"
    png = Path(directory) / f"{name}.png"
    save_gif(result.samples[:n], gif, nrow=min(8, n), captions=captions)
    save_png_grid(result.samples[:n], png, captions=captions)
    return [gif, png]


def load_policy_from(path: str | Path, cfg: RunConfig, world, device) -> torch.nn.Module:
    model = build_policy(cfg, world, device)
    ckpt.load_weights(model, resolve_path(path))
    return model


def config_for_checkpoint(path: str | Path, overrides=()) -> RunConfig:
    """The config saved beside a checkpoint (plus overrides), or the defaults when there is none."""
    found = ckpt.find_config(resolve_path(path))
    return load_config(found, overrides)


def write_run_report(out_dir: Path) -> None:
    """``report.html`` and its plots for the run in ``out_dir``."""
    write_report(out_dir)
