"""Checkpoints: ``RUN_DIR/checkpoints/step_NNNNNNN/`` written atomically, with everything exact resume needs.

A checkpoint directory holds
  ``model.safetensors``   the policy's weights (what ``vidpo sample/eval --ckpt`` and ``train.init_from`` read);
                          with ``train.ema_decay`` these are the EMA weights (vidpo.training.ema)
  ``online.safetensors``  only with ``train.ema_decay``: the optimizer's own weights, which resume reads
  ``lora.safetensors``    LoRA adapters on their own, when the policy has them (peft/diffusers key names)
  ``trainer_state.pt``    optimizer + LR schedule + global RNG states + step + loop state (data position,
                          bad-step counter, ...)
  ``config.yaml``         the resolved recipe, so a checkpoint alone rebuilds its model
  ``meta.json``           step, time, versions
It is filled under a temporary name and renamed when complete, then ``checkpoints/latest`` (a one-line file)
is atomically pointed at it, then old checkpoints beyond ``keep`` are removed. A kill at any moment leaves
the previous complete checkpoint as ``latest``.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from vidpo.utils import atomic

STEP_PREFIX = "step_"
ONLINE_WEIGHTS = "online.safetensors"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], config_yaml: str, lora_state: Optional[dict] = None,
                    lora_metadata: Optional[dict] = None, keep: int = 2,
                    online_state: Optional[dict[str, torch.Tensor]] = None) -> Path:
    root = checkpoint_root(run_dir)
    atomic.clean_leftovers(root)
    final = root / f"{STEP_PREFIX}{step:07d}"
    with atomic.atomic_dir(final) as tmp:
        atomic.save_safetensors({k: v.detach().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        if online_state is not None:
            atomic.save_safetensors({k: v.detach().cpu() for k, v in online_state.items()}, tmp / ONLINE_WEIGHTS)
        if lora_state:
            atomic.save_safetensors({k: v.detach().cpu() for k, v in lora_state.items()}, tmp / "lora.safetensors",
                                    metadata={k: str(v) for k, v in (lora_metadata or {}).items()})
        atomic.torch_save(dict(trainer_state, step=step, rng=rng_state()), tmp / "trainer_state.pt")
        atomic.write_text(tmp / "config.yaml", config_yaml)
        atomic.write_json(tmp / "meta.json", {"step": step, "time": time.time(), "torch": torch.__version__,
                                              "python": platform.python_version()})
    atomic.write_text(root / "latest", final.name + "\n")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
                   and atomic.TMP_MARK not in p.name)
    latest = latest_checkpoint(root.parent)
    for old in steps[:-keep]:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest`` names, or None when the run has none yet."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def find_weights(path: str | os.PathLike) -> Path:
    """Resolve a user-given checkpoint reference to a ``model.safetensors`` file: a .safetensors file, a
    checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return p
    if (p / "model.safetensors").exists():
        return p / "model.safetensors"
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest / "model.safetensors"
    raise FileNotFoundError(f"no weights at '{path}': expected a .safetensors file, a checkpoint directory "
                            f"with model.safetensors, or a run directory with checkpoints/latest")


def find_config(path: str | os.PathLike) -> Optional[Path]:
    """The config.yaml beside a checkpoint's weights, if any."""
    weights = find_weights(path)
    cfg = weights.parent / "config.yaml"
    return cfg if cfg.exists() else None


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> Path:
    weights = find_weights(path)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # LoRA factors may be absent from a base checkpoint: that is expected, they start at their init.
    missing = [k for k in missing if ".lora_" not in k]
    if strict and (missing or unexpected):
        raise RuntimeError(f"{weights}: weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]} (is the recipe's model preset the one it was trained with?)")
    return weights


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    return torch.load(Path(checkpoint_dir) / "trainer_state.pt", map_location="cpu", weights_only=False)


def read_meta(checkpoint_dir: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint_dir) / "meta.json").read_text())
