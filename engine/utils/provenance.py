"""Provenance of what a run writes: the settings that produced an artefact, recorded beside it.

A directory a stage fills over several runs (cache shards, prompt embeddings) records the settings it was made
with in a JSON file the first time; every later run compares its own settings with the record and refuses to
add to the directory when any differ, naming them and both values, so shards made with different settings
never mix. Pairs folders (``vidpo generate``) and training runs (``vidpo train``) keep such a record too; their
verbs start the folder over on ``--overwrite``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from vidpo.utils import atomic


class SettingsMismatch(ValueError):
    """An artefact was made with other settings than the run asks for; the message names the keys."""


def record_or_check(path: str | Path, settings: dict, *, what: str,
                    remedy: str = "use another directory, or delete this one to start over") -> None:
    """Write ``settings`` to ``path`` when it does not exist; else raise SettingsMismatch naming every key whose
    value differs from the recorded one, with the recorded and the asked-for value (``what`` names the artefact
    in the message, ``remedy`` says what the user can do)."""
    path = Path(path)
    if not path.exists():
        atomic.write_json(path, settings)
        return
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise SettingsMismatch(f"{path}: unreadable settings record ({exc}). To go on, {remedy}") from None
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
        changes = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(settings.get(k))}" for k in differ)
        raise SettingsMismatch(f"{path}: {what} made with other settings ({', '.join(differ)} differ): {changes}. "
                               f"To go on, {remedy}")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 48 else text[:45] + "..."


def digest(value) -> str:
    """sha1 (16 hex digits) of a settings value: a config section (dataclass), dict, list or scalar."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def file_fingerprint(path: str | Path, *, window: int = 1 << 20) -> str:
    """Content identity of a (weights) file, cheap for any size: sha1 (16 hex digits) of its size and of its first
    and last ``window`` bytes. The same weights copied or linked elsewhere have the same fingerprint (a path would
    differ); weights trained further differ in both ends (a safetensors header holds the tensors' offsets)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(window))
        if size > window:
            fh.seek(max(window, size - window))
            h.update(fh.read(window))
    return h.hexdigest()[:16]
