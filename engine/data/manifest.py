"""Manifests of real clips and of preference pairs, as JSONL or Parquet, validated line by line.

A **clip manifest** lists the videos that ``vidpo cache`` encodes (one JSON object per line, or one Parquet
row)::

    {"clip_id": "c0001", "path": "clips/cat.webm", "caption": "a cat jumps onto a table",
     "fps": 30.0, "start": 1.5, "end": 4.0, "ground_truth": true}

=============  ========  ================================================================================
key            required  meaning
=============  ========  ================================================================================
path           yes       video file; a relative path is resolved against the manifest's directory
caption        yes       the prompt the text encoder embeds (may be empty for unconditional clips)
clip_id        no        unique id (default: ``path``, plus ``@start`` when a start is given)
fps            no        the file's native frame rate (default: read from the container header)
start / end    no        seconds; only frames in ``[start, end)`` are sampled
ground_truth   no        (default true) the clip is a real video that may serve as the SDEdit ground truth
                         ``x0_gt`` of structural pairs with its caption (DESIGN.md, StructuralDPO)
=============  ========  ================================================================================

Unknown keys are kept in ``ClipRecord.extra``. A *folder* of videos with same-named ``.txt`` caption files
works as a clip manifest too (``clips_from_folder``).

A **pair manifest** is the preference pipeline's manifest (``vidpo.data.pairs``: two latent references by
``shard`` + ``row``, per-segment ``labels``, ``segment_seconds``, ``label_source``). This module adds its
Parquet form (same columns as the JSONL keys, same validation through ``pairs.parse_line``) and clip-level
pairs (``first`` / ``second`` video paths instead of latent refs) for labels gathered on raw videos.

Every complaint names ``file:line`` (JSONL, 1-based) or ``file:row N`` (Parquet, 0-based); with
``on_error="skip"`` a bad entry is counted, logged and skipped, with ``"raise"`` the first one stops.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

from vidpo.data.pairs import PairDataError, PairRecord, parse_line
from vidpo.utils import atomic

log = logging.getLogger("vidpo")

ON_ERROR = ("skip", "raise")


class ManifestError(ValueError):
    """A manifest entry that cannot be used; the message starts with ``file:line`` (or ``file:row N``)."""


# ----- reading rows of either format -------------------------------------------------------------------
def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ManifestError(f"{path}: unknown manifest format '{suffix}' (use .jsonl or .parquet)")


def _parquet_module():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet manifests need pyarrow (pip install pyarrow)") from None
    return pa, pq


def iter_rows(path: str | os.PathLike) -> Iterator[Tuple[str, object]]:
    """``(where, row)`` for every entry: ``row`` is a decoded dict, or a ManifestError for an undecodable
    JSONL line (so the caller applies its error policy to it like to any other bad entry)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    if _format_of(path) == "jsonl":
        for lineno, text in enumerate(path.read_text().splitlines(), 1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as exc:
                yield where, ManifestError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
        return
    _, pq = _parquet_module()
    try:
        table = pq.read_table(str(path))
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise ManifestError(f"{path}: unreadable Parquet file ({exc})") from None
    for index, row in enumerate(table.to_pylist()):
        # Parquet stores a missing optional value as null (and float columns may hold NaN): both mean "absent".
        clean = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        yield f"{path}:row {index}", clean


def _write_rows(path: Path, rows: list[dict]) -> None:
    if _format_of(path) == "jsonl":
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return
    pa, pq = _parquet_module()
    # Columns are the union of every row's keys (from_pylist would take the first row's only); a key a row
    # lacks is stored as null, which reading treats as absent.
    keys = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.table({k: pa.array([row.get(k) for row in rows]) for k in keys}) if rows else pa.table({})
    with atomic.atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def _collect(path, parse: Callable[[str, dict], object], key: Callable[[object], str], on_error: str,
             check: Optional[Callable[[str, object], None]] = None) -> tuple[list, list[str]]:
    """Parse every row with ``parse(where, row)``; duplicate keys and ``check`` failures are errors too."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR)}")
    records, problems, seen = [], [], set()
    for where, row in iter_rows(path):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise ManifestError(f"{where}: expected an object, got {type(row).__name__}")
            rec = parse(where, row)
            if key(rec) in seen:
                raise ManifestError(f"{where}: duplicate id '{key(rec)}'")
            if check is not None:
                check(where, rec)
        except (ManifestError, PairDataError) as exc:
            if on_error == "raise":
                raise ManifestError(str(exc)) from None
            problems.append(str(exc))
            log.warning("skipping %s", exc)
            continue
        seen.add(key(rec))
        records.append(rec)
    return records, problems


# ----- field checks ----------------------------------------------------------------------------------------
def _get(row: dict, key: str, types, where: str, *, required: bool = False, default=None):
    if key not in row:
        if required:
            raise ManifestError(f"{where}: missing key '{key}'")
        return default
    value = row[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ManifestError(f"{where}: '{key}' must be {_type_names(types)}, got {value!r}")
    if not isinstance(value, types):
        raise ManifestError(f"{where}: '{key}' must be {_type_names(types)}, got {value!r}")
    return value


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = [{int: "a number", float: "a number", str: "a string", bool: "true/false", list: "a list"}.get(t, t.__name__)
             for t in types]
    return " or ".join(dict.fromkeys(names))


def _seconds(row: dict, key: str, where: str) -> Optional[float]:
    value = _get(row, key, (int, float), where)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ManifestError(f"{where}: '{key}' must be a finite number of seconds >= 0, got {row[key]!r}")
    return value


# ----- clip manifests ------------------------------------------------------------------------------------
@dataclass
class ClipRecord:
    """One entry of a clip manifest (see the module docstring); ``path`` is absolute once read."""

    clip_id: str
    path: str
    caption: str
    fps: Optional[float] = None
    start: Optional[float] = None
    end: Optional[float] = None
    ground_truth: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self, relative_to: Optional[Path] = None) -> dict:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        if relative_to is not None:
            try:
                data["path"] = os.path.relpath(self.path, relative_to)
            except ValueError:  # another drive on Windows: keep the absolute path
                pass
        data.update(self.extra)
        return data


_CLIP_KEYS = set(ClipRecord.__dataclass_fields__) - {"extra"}


def parse_clip(where: str, row: dict, base_dir: Path) -> ClipRecord:
    path = _get(row, "path", str, where, required=True)
    if not path.strip():
        raise ManifestError(f"{where}: 'path' is empty")
    caption = _get(row, "caption", str, where, required=True)
    fps = _get(row, "fps", (int, float), where)
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ManifestError(f"{where}: 'fps' must be > 0, got {fps!r}")
    start, end = _seconds(row, "start", where), _seconds(row, "end", where)
    if end is not None and end <= (start or 0.0):
        raise ManifestError(f"{where}: 'end' ({end}) must be after 'start' ({start or 0.0})")
    ground_truth = _get(row, "ground_truth", bool, where, default=True)
    full = Path(path) if Path(path).is_absolute() else base_dir / path
    default_id = path if start is None else f"{path}@{start:g}"
    clip_id = _get(row, "clip_id", str, where, default=default_id)
    if not clip_id:
        raise ManifestError(f"{where}: 'clip_id' is empty")
    extra = {k: v for k, v in row.items() if k not in _CLIP_KEYS}
    return ClipRecord(clip_id=clip_id, path=str(full), caption=caption, fps=None if fps is None else float(fps),
                      start=start, end=end, ground_truth=ground_truth, extra=extra)


VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


def clips_from_folder(folder: str | os.PathLike, *, on_error: str = "raise") -> tuple[list[ClipRecord], list[str]]:
    """A folder of videos with their captions beside them (``clip.mp4`` + ``clip.txt``, the usual layout of
    video-text datasets), as a clip manifest: ids are the paths relative to the folder, in sorted order. A
    video without its caption file is a bad entry."""
    folder = Path(folder)
    records, problems = [], []
    for video in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        caption_file = video.with_suffix(".txt")
        rel = str(video.relative_to(folder))
        if not caption_file.is_file():
            message = f"{video}: no caption file {caption_file.name} beside it"
            if on_error == "raise":
                raise ManifestError(message)
            problems.append(message)
            log.warning("skipping %s", message)
            continue
        records.append(ClipRecord(clip_id=rel, path=str(video), caption=caption_file.read_text().strip()))
    if not records and not problems:
        raise ManifestError(f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return records, problems


def read_clip_manifest(path: str | os.PathLike, *, on_error: str = "raise",
                       check_files: bool = False) -> tuple[list[ClipRecord], list[str]]:
    """All usable clips of a JSONL / Parquet manifest (or of a folder, ``clips_from_folder``) and the
    messages about skipped entries.

    ``check_files`` also treats a missing video file as a bad entry (``vidpo cache`` leaves that to the
    decoder, which counts it with the other unusable videos)."""
    path = Path(path)
    if path.is_dir():
        return clips_from_folder(path, on_error=on_error)
    base_dir = path.resolve().parent

    def check(where, rec):
        if check_files and not Path(rec.path).is_file():
            raise ManifestError(f"{where}: video file not found: {rec.path}")

    return _collect(path, lambda where, row: parse_clip(where, row, base_dir), lambda r: r.clip_id, on_error,
                    check)


def write_clip_manifest(path: str | os.PathLike, records: Sequence[ClipRecord]) -> None:
    """Write ``records`` atomically (format from the suffix); paths are stored relative to the manifest."""
    path = Path(path)
    _write_rows(path, [r.to_dict(relative_to=path.resolve().parent) for r in records])


# ----- pair manifests ------------------------------------------------------------------------------------
def _check_labels(num_segments: Optional[int]):
    def check(where, rec):
        if num_segments is not None and rec.labels is not None and len(rec.labels) != num_segments:
            raise ManifestError(f"{where}: pair {rec.pair_id}: {len(rec.labels)} labels, but the recipe's "
                                f"segments give {num_segments} (label.segment_seconds changed?)")
    return check


def read_pair_manifest(path: str | os.PathLike, *, need_labels: bool = True, on_error: str = "raise",
                       num_segments: Optional[int] = None) -> tuple[list[PairRecord], list[str]]:
    """Latent-ref pairs (``vidpo.data.pairs.PairRecord``) from JSONL or Parquet, validated exactly like the
    pipeline's JSONL manifests (``pairs.parse_line``)."""

    def parse(where, row):
        return parse_line(json.dumps(row), where, need_labels=need_labels)

    return _collect(path, parse, lambda r: r.pair_id, on_error, _check_labels(num_segments))


def write_pair_manifest(path: str | os.PathLike, records: Sequence[PairRecord]) -> None:
    """Write latent-ref pairs atomically as JSONL or Parquet (by suffix)."""
    _write_rows(Path(path), [json.loads(r.to_json()) for r in records])


@dataclass
class ClipPairRecord:
    """Two videos of one prompt with per-segment preference labels (+1: first better, -1: second, 0: tie)."""

    pair_id: str
    first: str
    second: str
    caption: str
    labels: Optional[list[int]] = None
    segment_seconds: Optional[float] = None
    label_source: Optional[str] = None
    ground_truth: Optional[str] = None
    """The real clip both videos were SDEdit-regenerated from (structural pairs), if any."""
    extra: dict = field(default_factory=dict)

    def to_dict(self, relative_to: Optional[Path] = None) -> dict:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        if relative_to is not None:
            for key in ("first", "second", "ground_truth"):
                if key in data:
                    data[key] = os.path.relpath(data[key], relative_to)
        data.update(self.extra)
        return data


_CLIP_PAIR_KEYS = set(ClipPairRecord.__dataclass_fields__) - {"extra"}


def parse_clip_pair(where: str, row: dict, base_dir: Path, *, need_labels: bool) -> ClipPairRecord:
    pair_id = _get(row, "pair_id", str, where, required=True)
    paths = {}
    for key in ("first", "second", "ground_truth"):
        value = _get(row, key, str, where, required=key != "ground_truth")
        if value is not None:
            paths[key] = str(Path(value) if Path(value).is_absolute() else base_dir / value)
    caption = _get(row, "caption", str, where, required=True)
    labels = _get(row, "labels", list, where, required=need_labels)
    if labels is not None and (not labels or any(isinstance(v, bool) or v not in (-1, 0, 1) for v in labels)):
        raise ManifestError(f"{where}: pair {pair_id}: 'labels' must be a non-empty list of -1/0/1, got {labels!r}")
    seconds = _get(row, "segment_seconds", (int, float), where)
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise ManifestError(f"{where}: pair {pair_id}: 'segment_seconds' must be > 0, got {seconds!r}")
    source = _get(row, "label_source", str, where)
    extra = {k: v for k, v in row.items() if k not in _CLIP_PAIR_KEYS}
    return ClipPairRecord(pair_id=pair_id, first=paths["first"], second=paths["second"], caption=caption,
                          labels=None if labels is None else [int(v) for v in labels],
                          segment_seconds=None if seconds is None else float(seconds), label_source=source,
                          ground_truth=paths.get("ground_truth"), extra=extra)


def read_clip_pair_manifest(path: str | os.PathLike, *, need_labels: bool = True, on_error: str = "raise",
                            num_segments: Optional[int] = None) -> tuple[list[ClipPairRecord], list[str]]:
    """Clip-level pairs (two video paths each) from JSONL or Parquet."""
    path = Path(path)
    base_dir = path.resolve().parent
    return _collect(path, lambda where, row: parse_clip_pair(where, row, base_dir, need_labels=need_labels),
                    lambda r: r.pair_id, on_error, _check_labels(num_segments))


def write_clip_pair_manifest(path: str | os.PathLike, records: Sequence[ClipPairRecord]) -> None:
    path = Path(path)
    _write_rows(path, [r.to_dict(relative_to=path.resolve().parent) for r in records])
