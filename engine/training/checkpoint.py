"""Checkpoints: ``RUN_DIR/checkpoints/step_NNNNNNN/`` written atomically, with everything exact resume needs.

A checkpoint directory holds
  ``model.safetensors``   the policy's weights (what ``vidpo sample/eval --ckpt`` and ``train.init_from`` read);
                          with ``train.ema_decay`` these are the EMA weights (vidpo.training.ema)
  ``online.safetensors``  only with ``train.ema_decay``: the optimizer's own weights, which resume reads
  ``lora.safetensors``    LoRA adapters on their own, when the policy has them (peft/diffusers key names)
  ``trainer_state.pt``    optimizer + LR schedule + global RNG states + step + loop state (data position,
                          bad-step counter, divergence guard, ...)
  ``config.yaml``         the resolved recipe, so a checkpoint alone rebuilds its model (and resume compares it)
  ``meta.json``           step, time, versions; ``suspect`` when written while the run was diverging
  ``checksums.json``      sha256 and size of every other file, written last
It is filled under a temporary name and renamed when complete, then ``checkpoints/latest`` (a one-line file)
is atomically pointed at it, then old checkpoints beyond ``keep`` are removed. A kill at any moment leaves
the previous complete checkpoint as ``latest``.

Damage after the fact (a disk error, a truncated copy, an edited ``latest``) is caught on resume:
``resume_point`` checks the checkpoint ``latest`` names against its checksums and, when a file is missing,
truncated or changed, names it and falls back to the newest intact step directory, saying which. Checkpoints
written before checksums existed are checked by reading their files. Pruning never removes ``latest``, the
newest intact checkpoints before it, nor (during a divergence) the newest one written before it began.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from vidpo.utils import atomic

log = logging.getLogger("vidpo")

STEP_PREFIX = "step_"
ONLINE_WEIGHTS = "online.safetensors"
CHECKSUMS = "checksums.json"
DIVERGED_DIR = "diverged"
REQUIRED_FILES = ("model.safetensors", "trainer_state.pt")
_STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d{{7}})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from or read; the message names the directory and the file(s)."""


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_of(path: str | os.PathLike) -> Optional[int]:
    """The step of a ``step_NNNNNNN`` directory name; None for any other name (temporary ones included)."""
    match = _STEP_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """The complete step directories under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of, reverse=True)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ----- checksums -------------------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike, chunk: int = 1 << 23) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """Every file of a checkpoint directory (relative, '/'-separated, sorted) but ``checksums.json`` itself."""
    directory = Path(directory)
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS and atomic.TMP_MARK not in p.name)


def checksum_entries(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, dict]:
    directory = Path(directory)
    return {name: {"sha256": file_digest(directory / name), "size": (directory / name).stat().st_size}
            for name in names}


def write_checksums(directory: str | os.PathLike, entries: Optional[dict[str, dict]] = None) -> None:
    """Write ``checksums.json`` (the last file of a checkpoint): ``entries`` (computed here when None, e.g.
    by several ranks in parallel) must cover ``checkpoint_files(directory)``."""
    directory = Path(directory)
    if entries is None:
        entries = checksum_entries(directory, checkpoint_files(directory))
    atomic.write_json(directory / CHECKSUMS, {"format": 1, "files": dict(sorted(entries.items()))})


def verify_checkpoint(path: str | os.PathLike, *, full: bool = True) -> list[str]:
    """What is wrong with a checkpoint directory, one line per file (its name first); [] when intact.

    With ``checksums.json``: every file it lists is there with its size and (``full``) its sha256. Without
    (a checkpoint from before checksums): with ``full`` its weights and trainer state are read, else only
    their presence is checked. ``full=False`` is cheap (sizes only), for pruning."""
    path = Path(path)
    listing = path / CHECKSUMS
    if not listing.exists():
        return _probe_unlisted(path) if full else [f"{n}: missing" for n in REQUIRED_FILES if not (path / n).is_file()]
    try:
        files = json.loads(listing.read_text())["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and {"sha256", "size"} <= set(v)
                                                  for v in files.values()):
            raise ValueError("no 'files' table of sha256 and size")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{CHECKSUMS}: unreadable ({e})"]
    problems = [f"{n}: not listed in {CHECKSUMS}" for n in REQUIRED_FILES if n not in files]
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name}: missing")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "grown"
            problems.append(f"{name}: {what} ({size} bytes, {CHECKSUMS} says {want['size']})")
        elif full and file_digest(f) != want["sha256"]:
            problems.append(f"{name}: corrupt (its sha256 differs from {CHECKSUMS})")
    return problems


def _probe_unlisted(path: Path) -> list[str]:
    """A checkpoint without checksums: intact when its files can be read."""
    problems = []
    for name in ("model.safetensors", ONLINE_WEIGHTS, "lora.safetensors"):
        f = path / name
        if name not in REQUIRED_FILES and not f.exists():
            continue
        try:
            load_file(str(f))
        except Exception as e:  # safetensors raises its own error types for truncated / garbage files
            problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
    try:
        torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # UnpicklingError, RuntimeError (a truncated zip), EOFError, OSError
        problems.append(f"trainer_state.pt: unreadable ({type(e).__name__}: {e})")
    dcp_dir = path / "dcp"
    if dcp_dir.is_dir():
        try:
            dcp.FileSystemReader(str(dcp_dir)).read_metadata()
        except Exception as e:
            problems.append(f"dcp/.metadata: unreadable ({type(e).__name__}: {e})")
    return problems


# ----- writing ---------------------------------------------------------------------------------------------
def checkpoint_meta(step: int, suspect: Optional[str] = None, **extra) -> dict:
    meta = {"step": step, "time": time.time(), "torch": torch.__version__, "python": platform.python_version(),
            **extra}
    if suspect:
        meta["suspect"] = suspect
    return meta


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model_state: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], config_yaml: str, lora_state: Optional[dict] = None,
                    lora_metadata: Optional[dict] = None, keep: int = 2,
                    online_state: Optional[dict[str, torch.Tensor]] = None, suspect: Optional[str] = None,
                    keep_before: Optional[int] = None) -> Path:
    """Write checkpoint ``step``; ``suspect`` (why) marks one written while the run was diverging, and pruning
    then keeps the newest checkpoint older than step ``keep_before`` (when the divergence began)."""
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
        atomic.write_json(tmp / "meta.json", checkpoint_meta(step, suspect))
        write_checksums(tmp)
    atomic.write_text(root / "latest", final.name + "\n")
    prune(root, keep, keep_before=keep_before)
    return final


def prune(root: Path, keep: int, *, keep_before: Optional[int] = None) -> None:
    """Remove old checkpoints once ``latest`` names a new one. Kept: ``latest``, the ``keep - 1`` newest intact
    (sizes match their checksums) older ones, and with ``keep_before`` the newest intact one older than that
    step. Step directories newer than ``latest`` (left by a run that was rolled back or fell back to an
    older checkpoint) are superseded and removed; damaged ones beyond those kept too."""
    if keep <= 0:
        return
    latest, _ = _read_latest(root)
    if latest is None:
        return
    newest = step_of(latest)
    older = [p for p in step_dirs(root) if step_of(p) < newest]
    intact = [p for p in older if not verify_checkpoint(p, full=False)]
    kept = {latest, *intact[:keep - 1]}
    if keep_before is not None:
        kept.update(next(([p] for p in intact if step_of(p) < keep_before), []))
    for p in step_dirs(root):
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


def roll_back(run_dir: str | os.PathLike, before: int) -> Optional[Path]:
    """After a divergence that began at step ``before``: point ``latest`` at the newest intact checkpoint older
    than it, then move the later ones to ``checkpoints/diverged/`` (kept for inspection; resume and pruning ignore
    them). Returns the checkpoint ``latest`` now names; None (and nothing changed) when there is no such one."""
    root = checkpoint_root(run_dir)
    good = next((p for p in step_dirs(root) if step_of(p) < before and not verify_checkpoint(p, full=False)), None)
    if good is None:
        return None
    atomic.write_text(root / "latest", good.name + "\n")
    for p in step_dirs(root):
        if step_of(p) >= before:
            target = root / DIVERGED_DIR / p.name
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(exist_ok=True)
            os.replace(p, target)
    return good


# ----- finding and reading ---------------------------------------------------------------------------------
def _read_latest(root: Path) -> tuple[Optional[Path], Optional[str]]:
    """(the directory ``root/latest`` names, None) or (None, what is wrong with it); (None, None) when absent."""
    pointer = root / "latest"
    if not pointer.exists():
        return None, None
    try:
        text = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{pointer} is unreadable ({e})"
    if not text:
        return None, f"{pointer} is empty (it should name a step_NNNNNNN directory)"
    if step_of(text) is None:
        return None, f"{pointer} holds {text[:60]!r}, not the name of a step_NNNNNNN directory"
    if not (root / text).is_dir():
        return None, f"{pointer} names {text}, which does not exist"
    return root / text, None


def resume_point(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a resumed run starts from, verified against its checksums: the one ``latest`` names, or,
    when it is damaged (or ``latest`` is missing, empty or garbage), the newest intact step directory before
    it, with a warning naming each damaged file and the checkpoint chosen. None when the run has no
    checkpoint; ``CheckpointError`` listing every problem when none is intact."""
    root = checkpoint_root(run_dir)
    steps = step_dirs(root)
    named, why = _read_latest(root)
    if named is None and why is None:
        if not steps:
            return None
        why = f"{root / 'latest'} is missing"
    if why is not None:
        log.warning("%s; looking for the newest intact checkpoint", why)
    candidates = ([named] if named is not None else []) + \
        [p for p in steps if named is None or step_of(p) < step_of(named)]
    damaged = []
    for candidate in candidates:
        problems = verify_checkpoint(candidate)
        if not problems:
            if damaged or why is not None:
                log.warning("resuming from %s, the newest intact checkpoint", candidate)
            return candidate
        log.warning("checkpoint %s is damaged: %s", candidate, "; ".join(problems))
        damaged.append(f"{candidate.name}: {'; '.join(problems)}")
    if not damaged:
        raise CheckpointError(f"{why}, and {root} holds no step_NNNNNNN directory to resume from; "
                              "start over with --no-resume")
    raise CheckpointError(f"no intact checkpoint to resume from in {root}: {' | '.join(damaged)}; restore the "
                          "files or start over with --no-resume")


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest`` names (not verified), or None when the run has none yet."""
    root = checkpoint_root(run_dir)
    named, why = _read_latest(root)
    if why is not None:
        raise CheckpointError(f"{why}; name a step directory of {root} instead (a resumed training run falls "
                              "back to the newest intact one by itself)")
    if named is None:
        return None
    if not (named / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{root / 'latest'} names {named.name}, which is missing or incomplete")
    return named


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


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; CheckpointError naming the file when it is not a readable one."""
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError ("header too large", "incomplete metadata"), OSError
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = True) -> Path:
    weights = find_weights(path)
    state = read_weights(weights)
    hint = "is the recipe's model preset the one it was trained with?"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # shapes that differ: weights of another model size (a user error, named)
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:300])
        raise CheckpointError(f"{weights}: weights do not fit the model: {first} ({hint})") from None
    # LoRA factors may be absent from a base checkpoint: that is expected, they start at their init.
    missing = [k for k in missing if ".lora_" not in k]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{weights}: weights do not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]} ({hint})")
    return weights


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    path = Path(checkpoint_dir) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError, a truncated zip (RuntimeError), EOFError
        raise CheckpointError(f"{path}: unreadable trainer state ({type(e).__name__}: {e})") from e


def read_meta(checkpoint_dir: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint_dir) / "meta.json").read_text())
