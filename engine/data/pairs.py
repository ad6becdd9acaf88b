"""Preference pairs on disk: latent shards (safetensors) + a JSONL manifest.

Layout of a pairs directory (what ``vidpo generate`` writes and ``vidpo label`` / training read)::

    shards/shard_00000.safetensors   first (S,C,T,H,W), second (S,C,T,H,W), [gt (S,C,T,H,W)], cond_ids (S,K)
    pairs.jsonl                      one line per generated pair (no labels)
    manifest.jsonl                   the same lines plus labels (written by ``vidpo label``)

A manifest line::

    {"pair_id": "p000012", "shard": "shards/shard_00000.safetensors", "row": 12, "prompt_id": "shapes-0013",
     "cond_ids": [1, 0, 3], "caption": "a blue square moving up", "mode": "structural", "eta": 0.63,
     "labels": [1, 0], "video_label": 1, "segment_seconds": 0.5, "label_source": "oracle",
     "label_status": ["ok", "tie"]}

``label_status`` says per segment what the label is (``vidpo.labeling.base``): ``ok`` (a verdict), ``tie``,
``unparseable`` (the judge's answer gave no verdict: a tie) or ``failed`` (no comparison was made: label 0, but
not a tie). Training (``trainable_records``) masks failed segments: they carry no label, so the DenseDPO loss
skips them like ties (neither its sum nor its normaliser counts them), the whole-video label is the majority of
the judged segments, the DenseDPO data rule counts non-tie segments among the judged ones, and a pair with no
judged segment does not train at all (a tie pair would still be a "winner" for ``pref.sft_source: winners``).
A manifest without a non-tie label does not train: all ties give a loss of 0.

Reading validates every line and names ``file:line`` in every complaint; with ``on_error="skip"`` a bad line
is counted and skipped (the messages are returned), with ``"raise"`` the first one stops the run.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from vidpo.utils import atomic

log = logging.getLogger("vidpo")

PAIRS_FILE = "pairs.jsonl"
MANIFEST_FILE = "manifest.jsonl"
SHARD_DIR = "shards"
STATUS_OK, STATUS_TIE, STATUS_UNPARSEABLE, STATUS_FAILED = "ok", "tie", "unparseable", "failed"
LABEL_STATUSES = (STATUS_OK, STATUS_TIE, STATUS_UNPARSEABLE, STATUS_FAILED)
"""What a segment label is (``label_status``): a verdict, a tie, an unparseable answer (a tie), or a failed
comparison (no label). The labellers (``vidpo.labeling``) write them."""


class PairDataError(ValueError):
    """A manifest line or shard that cannot be used; the message names the file, line and pair."""


@dataclass
class PairRecord:
    pair_id: str
    shard: str
    row: int
    cond_ids: list[int] = field(default_factory=list)
    """The toy world's structured condition (what its oracle reads); empty for prompt sets."""
    caption: str = ""
    prompt_id: Optional[str] = None
    """The id of the prompt in the run's prompt set (what the prompt-embedding cache is keyed by)."""
    mode: str = "vanilla"
    eta: Optional[float] = None
    labels: Optional[list[int]] = None
    video_label: Optional[int] = None
    segment_seconds: Optional[float] = None
    label_source: Optional[str] = None
    label_status: Optional[list[str]] = None
    """Per segment: ok / tie / unparseable / failed (None in manifests written before statuses: all judged)."""
    extra: dict = field(default_factory=dict)

    def failed_segments(self) -> int:
        """Segments whose comparison failed (no label)."""
        return sum(v == STATUS_FAILED for v in self.label_status or [])

    def judged_segments(self) -> int:
        """Segments with a label (a verdict, a tie or an unparseable answer), i.e. all but the failed ones."""
        return len(self.labels or []) - self.failed_segments()

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        data.update(self.extra)
        return json.dumps(data)


_REQUIRED = {"pair_id": str, "shard": str, "row": int}
_OPTIONAL_TYPES = {"cond_ids": list, "prompt_id": str, "caption": str}
_KNOWN = set(PairRecord.__dataclass_fields__) - {"extra"}


def parse_line(text: str, where: str, *, need_labels: bool) -> PairRecord:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PairDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise PairDataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for key, typ in _REQUIRED.items():
        if key not in data:
            raise PairDataError(f"{where}: missing key '{key}'")
        if not isinstance(data[key], typ) or (typ is int and isinstance(data[key], bool)):
            raise PairDataError(f"{where}: '{key}' must be {typ.__name__}, got {data[key]!r}")
    for key, typ in _OPTIONAL_TYPES.items():
        if key in data and not isinstance(data[key], typ):
            raise PairDataError(f"{where}: '{key}' must be {typ.__name__}, got {data[key]!r}")
    pid = data["pair_id"]
    if data["row"] < 0:
        raise PairDataError(f"{where}: pair {pid}: 'row' must be >= 0")
    labels = data.get("labels")
    if need_labels:
        if labels is None:
            raise PairDataError(f"{where}: pair {pid}: missing key 'labels' (run `vidpo label` first)")
        if not isinstance(labels, list) or not labels or any(v not in (-1, 0, 1) or isinstance(v, bool)
                                                               for v in labels):
            raise PairDataError(f"{where}: pair {pid}: 'labels' must be a non-empty list of -1/0/1, got {labels!r}")
        status = data.get("label_status")
        if status is not None:
            if (not isinstance(status, list) or len(status) != len(labels)
                    or any(v not in LABEL_STATUSES for v in status)):
                raise PairDataError(f"{where}: pair {pid}: 'label_status' must be a list of {len(labels)} of "
                                    f"{LABEL_STATUSES} (one per label), got {status!r}")
            wrong = [i for i, (v, y) in enumerate(zip(status, labels)) if (v == STATUS_OK) != (y != 0)]
            if wrong:
                raise PairDataError(f"{where}: pair {pid}: segment {wrong[0]} has label {labels[wrong[0]]} but "
                                    f"status {status[wrong[0]]!r} (only 'ok' labels are non-zero)")
    extra = {k: v for k, v in data.items() if k not in _KNOWN}
    known = {k: v for k, v in data.items() if k in _KNOWN}
    return PairRecord(**known, extra=extra)


def read_manifest(path: str | os.PathLike, *, need_labels: bool = True, on_error: str = "raise",
                  num_segments: Optional[int] = None) -> tuple[list[PairRecord], list[str]]:
    """All usable records of a manifest and the messages about skipped lines."""
    path = Path(path)
    if not path.exists():
        raise PairDataError(f"manifest not found: {path}")
    records, problems, seen = [], [], set()
    for lineno, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = parse_line(text, where, need_labels=need_labels)
            if rec.pair_id in seen:
                raise PairDataError(f"{where}: duplicate pair_id '{rec.pair_id}'")
            if need_labels and num_segments is not None and len(rec.labels) != num_segments:
                raise PairDataError(f"{where}: pair {rec.pair_id}: {len(rec.labels)} labels, but the recipe's "
                                    f"segments give {num_segments} (label.segment_seconds changed?)")
        except PairDataError as exc:
            if on_error == "raise":
                raise
            problems.append(str(exc))
            log.warning("skipping %s", exc)
            continue
        seen.add(rec.pair_id)
        records.append(rec)
    return records, problems


def trainable_records(records: list[PairRecord], pairs_dir: str | os.PathLike) -> tuple[list[PairRecord], int]:
    """The labelled records training may use, and how many were dropped because none of their segments was
    judged (every comparison failed). Failed segments of the others keep label 0, which the losses mask. A
    PairDataError names ``pairs_dir`` and says why when no segment of any record is a non-tie label."""
    kept = [r for r in records if r.judged_segments() > 0]
    if not any(v != 0 for r in kept for v in r.labels):
        segments = sum(len(r.labels) for r in records)
        failed = sum(r.failed_segments() for r in records)
        unparseable = sum(v == STATUS_UNPARSEABLE for r in records for v in r.label_status or [])
        if not records:
            why = "it has no labelled pairs"
        else:
            why = (f"none of its {segments} segment labels ({len(records)} pairs) prefers a video: "
                   f"{segments - failed - unparseable} ties, {unparseable} unparseable answers (ties), "
                   f"{failed} failed comparisons")
        hint = ("; rerun `vidpo label` to ask the failed ones again" if failed else
                "; an all-tie manifest trains at loss 0: check the labeller (label.labeler, its answers in "
                "label.json)")
        raise PairDataError(f"{Path(pairs_dir) / MANIFEST_FILE}: nothing to train on: {why}{hint}")
    failed = sum(r.failed_segments() for r in kept)
    if failed:
        log.warning("%s: %d failed comparisons (no label) are masked in training and %d pairs with no judged "
                    "segment are left out; rerun `vidpo label` to ask them again", Path(pairs_dir) / MANIFEST_FILE,
                    failed, len(records) - len(kept))
    return kept, len(records) - len(kept)


def write_manifest(path: str | os.PathLike, records: list[PairRecord]) -> None:
    atomic.write_text(path, "".join(r.to_json() + "\n" for r in records))


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard_{index:05d}.safetensors"


class ShardReader:
    """Loads shards on demand (cached) and returns a record's tensors; a missing or unreadable shard is a
    PairDataError naming the shard file and the pair.

    ``rows_only``: :meth:`get` reads the record's row alone through the file's memory map (``safe_open``) and keeps
    only open handles, never a whole shard: what a pool of thousands of decoded videos read one by one needs (a
    shard of 64 decoded Wan pairs is ~12 GB). Whole-shard mode is faster when every row of a shard is read in turn."""

    def __init__(self, root: str | os.PathLike, max_cached: int = 8, *, rows_only: bool = False):
        self.root = Path(root)
        self.max_cached = max_cached
        self.rows_only = rows_only
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: dict[str, object] = {}

    def shard(self, name: str, pair_id: str = "?") -> dict[str, torch.Tensor]:
        if name not in self._cache:
            path = self.root / name
            if not path.exists():
                raise PairDataError(f"{path}: shard missing (needed by pair {pair_id})")
            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise PairDataError(f"{path}: shard unreadable ({exc}) (needed by pair {pair_id})") from None
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = tensors
        return self._cache[name]

    def _handle(self, name: str, pair_id: str):
        handle = self._handles.pop(name, None)
        if handle is None:
            path = self.root / name
            if not path.exists():
                raise PairDataError(f"{path}: shard missing (needed by pair {pair_id})")
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise PairDataError(f"{path}: shard unreadable ({exc}) (needed by pair {pair_id})") from None
            if len(self._handles) >= self.max_cached:
                self._handles.pop(next(iter(self._handles)))
        self._handles[name] = handle   # most recently used last
        return handle

    def _row(self, rec: PairRecord, key: str) -> torch.Tensor:
        handle = self._handle(rec.shard, rec.pair_id)
        if key not in handle.keys():
            raise PairDataError(f"{self.root / rec.shard}: no tensor '{key}' (pair {rec.pair_id})")
        rows = handle.get_slice(key)
        count = rows.get_shape()[0]
        if rec.row >= count:
            raise PairDataError(f"{self.root / rec.shard}: pair {rec.pair_id} row {rec.row} out of range "
                                f"({count} rows)")
        try:
            return rows[rec.row:rec.row + 1][0]
        except (SafetensorError, OSError, ValueError) as exc:
            raise PairDataError(f"{self.root / rec.shard}: pair {rec.pair_id} unreadable ({exc})") from None

    def get(self, rec: PairRecord, key: str) -> torch.Tensor:
        if self.rows_only:
            return self._row(rec, key)
        tensors = self.shard(rec.shard, rec.pair_id)
        if key not in tensors:
            raise PairDataError(f"{self.root / rec.shard}: no tensor '{key}' (pair {rec.pair_id})")
        t = tensors[key]
        if rec.row >= t.shape[0]:
            raise PairDataError(f"{self.root / rec.shard}: pair {rec.pair_id} row {rec.row} out of range "
                                f"({t.shape[0]} rows)")
        return t[rec.row]

    def check(self, rec: PairRecord) -> None:
        """Raise PairDataError if the record's tensors cannot be read."""
        self.get(rec, "first")
        self.get(rec, "second")


def validate_records(records: list[PairRecord], reader: ShardReader, on_error: str) -> tuple[list[PairRecord], list[str]]:
    """Drop (or raise on) records whose shard rows are missing."""
    good, problems = [], []
    for rec in records:
        try:
            reader.check(rec)
        except PairDataError as exc:
            if on_error == "raise":
                raise
            problems.append(str(exc))
            log.warning("skipping %s", exc)
            continue
        good.append(rec)
    return good, problems
