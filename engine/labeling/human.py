"""Preference labels written by people, read from a JSONL file.

One JSON object per line, one line per pair (blank lines are skipped; extra keys such as an annotator
name are kept out of the way and ignored):

    {"pair_id": "r0-000017", "labels": [1, -1, 0, 0]}   per segment: +1 first better, -1 second, 0 tie
    {"pair_id": "r0-000018", "label": -1}               whole video: the same label in every segment

A line that cannot be used names the file and line (``labels.jsonl:7: ...``) and what is wrong: bad
JSON, not an object, a missing key, a value not in {-1, 0, 1}, a pair labelled twice, or (once the
batch is known) a number of segment labels that differs from the batch's. ``on_error`` decides whether
such a line stops the run ("raise") or its pair's segments are reported and have status ``failed`` (policy
"tie": label 0 but no tie; ``vidpo label`` asks again on its next run, training masks them); ``on_missing``
does the same for a pair of the batch that has no line. Annotation may go on while a run
waits: the file is read again whenever its size or modification time changes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from vidpo.labeling.base import (
    STATUS_FAILED,
    Labeler,
    LabelingError,
    LabelResult,
    PairBatch,
    check_policy,
    register_labeler,
    statuses_of,
)
from vidpo.utils.atomic import write_text

VALID_LABELS = (-1, 0, 1)


@dataclass
class HumanRecord:
    """What one line of the file says about one pair."""

    pair_id: str
    """The pair the line is about."""

    line: int
    """1-based line number in the file."""

    labels: Optional[list[int]] = None
    """Per-segment labels, when the line gives ``labels``."""

    label: Optional[int] = None
    """Whole-video label, when the line gives ``label`` (broadcast to every segment)."""

    error: Optional[str] = None
    """Why the line is unusable ("path:line: ..."), when its pair id could still be read."""

    def segment_labels(self, num_segments: int, where: str) -> list[int]:
        """The S labels of this pair; ValueError naming ``where`` when the count does not match."""
        if self.error is not None:
            raise ValueError(self.error)
        if self.labels is None:
            return [self.label] * num_segments
        if len(self.labels) != num_segments:
            raise ValueError(f"{where}: pair {self.pair_id!r} has {len(self.labels)} segment labels but the "
                             f"batch's clips have {num_segments} segments")
        return list(self.labels)


def _check_value(value, what: str) -> Optional[str]:
    """None if ``value`` is a valid label, else what is wrong with it (bools are not labels)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in VALID_LABELS:
        return f"{what} = {json.dumps(value)} is not one of -1, 0, 1"
    return None


def parse_line(text: str, where: str) -> tuple[Optional[HumanRecord], Optional[str]]:
    """(record, None) for a usable line, (record with error, None) when only the pair id is readable,
    (None, error) when not even the pair id is. ``where`` is "path:line" and starts every error."""
    line = int(where.rsplit(":", 1)[1])
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"{where}: bad JSON ({err.msg} at column {err.colno})"
    if not isinstance(obj, dict):
        return None, (f"{where}: expected a JSON object like {{\"pair_id\": \"...\", \"labels\": [1, -1, 0]}}, "
                      f"got {type(obj).__name__}")
    if "pair_id" not in obj:
        return None, f"{where}: missing key 'pair_id' (keys present: {sorted(obj)})"
    pair_id = obj["pair_id"]
    if not isinstance(pair_id, str) or not pair_id:
        return None, f"{where}: 'pair_id' must be a non-empty string, got {json.dumps(pair_id)}"

    def broken(problem: str) -> tuple[HumanRecord, None]:
        return HumanRecord(pair_id, line, error=f"{where}: pair {pair_id!r}: {problem}"), None

    has_labels, has_label = "labels" in obj, "label" in obj
    if has_labels and has_label:
        return broken("give either 'labels' (per segment) or 'label' (whole video), not both")
    if not has_labels and not has_label:
        return broken(f"missing key 'labels' (one per segment) or 'label' (whole video); keys present: {sorted(obj)}")
    if has_label:
        problem = _check_value(obj["label"], "'label'")
        return broken(problem) if problem else (HumanRecord(pair_id, line, label=obj["label"]), None)
    labels = obj["labels"]
    if not isinstance(labels, list) or not labels:
        return broken(f"'labels' must be a non-empty list of -1, 0, 1, got {json.dumps(labels)}")
    for index, value in enumerate(labels):
        problem = _check_value(value, f"'labels'[{index}]")
        if problem:
            return broken(problem)
    return HumanRecord(pair_id, line, labels=list(labels)), None


class HumanLabelFile:
    """The parsed file: ``records`` by pair id, and ``problems`` (line, message) of lines without a
    readable pair id."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"human labels file {self.path} does not exist")
        self.records: dict[str, HumanRecord] = {}
        self.problems: list[tuple[int, str]] = []
        with open(self.path, encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                record, problem = parse_line(text, f"{self.path}:{number}")
                if record is None:
                    self.problems.append((number, problem))
                elif record.pair_id in self.records:
                    earlier = self.records[record.pair_id]
                    # Two lines disagreeing or not, the annotation of this pair is in doubt: keep neither.
                    self.records[record.pair_id] = HumanRecord(
                        record.pair_id, number, error=f"{self.path}:{number}: pair {record.pair_id!r} is labelled "
                                                      f"again (first on line {earlier.line})")
                else:
                    self.records[record.pair_id] = record

    def errors(self) -> list[str]:
        """Every problem of the file, in line order."""
        broken = [(r.line, r.error) for r in self.records.values() if r.error is not None]
        return [message for _, message in sorted(broken + self.problems)]


def _segment_span(num_segments: int) -> str:
    return "segment 0" if num_segments == 1 else f"segments 0-{num_segments - 1}"


@register_labeler("human")
class HumanLabeler(Labeler):
    """Labels looked up by pair id in a JSONL file written by annotators."""

    name = "human"

    def __init__(self, path: str | os.PathLike, on_missing: str = "raise", on_error: str = "raise") -> None:
        self.path = Path(path)
        self.on_missing = check_policy(on_missing, "human labeller on_missing")
        self.on_error = check_policy(on_error, "human labeller on_error")
        self._file: Optional[HumanLabelFile] = None
        self._stamp: Optional[tuple[int, int]] = None
        self._unreported: list[str] = []
        self.reload()

    def reload(self) -> bool:
        """Read the file again if it changed since the last read; True when it was (re)read."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"human labels file {self.path} does not exist") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return False
        labels_file = HumanLabelFile(self.path)
        if self.on_error == "raise" and labels_file.errors():
            raise LabelingError(labels_file.errors()[0])
        self._file, self._stamp = labels_file, stamp
        # Lines without a pair id belong to no batch; report them once, with the next result.
        self._unreported = [f"human: {message}" for _, message in labels_file.problems]
        return True

    def label(self, batch: PairBatch) -> LabelResult:
        """Labels (B, S) from the file; broken or missing pairs are failed (counted) or raise, by policy."""
        self.reload()
        num_segments = batch.num_segments
        labels = torch.zeros(batch.batch_size, num_segments, dtype=torch.int64)
        messages, failed_pairs = list(self._unreported), set()
        self._unreported = []
        span = _segment_span(num_segments)
        for b, pair_id in enumerate(batch.pair_ids):
            record = self._file.records.get(pair_id)
            if record is None:
                message = f"human: pair {pair_id!r} has no line in {self.path}"
                if self._file.problems:
                    message += f" ({len(self._file.problems)} line(s) without a readable pair id, first: " \
                               f"{self._file.problems[0][1]})"
                if self.on_missing == "raise":
                    raise LabelingError(message)
                messages.append(f"{message}; {span} failed (no label)")
                failed_pairs.add(b)
                continue
            try:
                labels[b] = torch.tensor(record.segment_labels(num_segments, f"{self.path}:{record.line}"))
            except ValueError as err:
                if self.on_error == "raise":
                    raise LabelingError(str(err)) from None
                messages.append(f"human: {err}; {span} failed (no label)")
                failed_pairs.add(b)
        status = statuses_of(labels)
        for b in failed_pairs:
            status[b] = [STATUS_FAILED] * num_segments
        return LabelResult.from_labels(labels, messages=messages, status=status)


def save_label_file(path: str | os.PathLike, pair_ids: Sequence[str], labels: Tensor) -> None:
    """Write labels (B, S) in the human-labels format, atomically (e.g. model labels for people to review)."""
    if labels.dim() != 2 or labels.shape[0] != len(pair_ids):
        raise ValueError(f"labels must be (B, S) with B = {len(pair_ids)} pair ids, got {tuple(labels.shape)}")
    lines = [json.dumps({"pair_id": pair_id, "labels": row}) for pair_id, row in zip(pair_ids, labels.tolist())]
    write_text(path, "".join(line + "\n" for line in lines))
