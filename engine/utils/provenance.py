"""Provenance of what a run writes: the settings that produced an artefact, recorded beside it.

A directory a stage fills over several runs (cache shards, prompt embeddings) records the settings it was made
with in a JSON file the first time; every later run compares its own settings with the record and refuses to
add to the directory when any differ, naming them, so shards made with different settings never mix.
"""
from __future__ import annotations

import json
from pathlib import Path

from vidpo.utils import atomic


class SettingsMismatch(ValueError):
    """An artefact was made with other settings than the run asks for; the message names the keys."""


def record_or_check(path: str | Path, settings: dict, *, what: str) -> None:
    """Write ``settings`` to ``path`` when it does not exist; else raise SettingsMismatch naming every key whose
    value differs from the recorded one (``what`` names the artefact in the message)."""
    path = Path(path)
    if not path.exists():
        atomic.write_json(path, settings)
        return
    old = json.loads(path.read_text())
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
        raise SettingsMismatch(f"{path}: {what} made with other settings ({', '.join(differ)} differ); use another "
                               "directory, or delete this one to start over")
