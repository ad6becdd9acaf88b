"""What every preference labeller shares: the pair batch it reads, the result it returns, the registry.

A labeller compares the two videos of each pair segment by segment (DenseDPO, DESIGN.md section 1):
``labels[b, s]`` is ``+1`` when the first video of pair ``b`` is better in segment ``s``, ``-1`` when the
second is, and ``0`` for a tie. The whole-video label is the majority vote of the segment labels,
``sign(sum_s labels[b, s])`` (0 on a draw), which is also how DenseDPO turns GPT segment verdicts into a
global preference.

Every (pair, segment) also has a **status** (``LabelResult.status``): ``ok`` (a verdict for one video), ``tie``
(the judge called it even, or its two orders disagreed), ``unparseable`` (the judge answered, but nothing in the
answer decides: a counted tie, since asking again gives the same answer) or ``failed`` (the comparison could not
be made: connection refused, a timeout, an HTTP error, a reply body that is not a chat completion, a pair missing
from a human-labels file). A failed segment has label 0 but is *not* a tie: ``vidpo label`` stores it as failed,
asks it again on the next run, and training masks it out. Unparseable and failed segments get one message each
naming the pair and the segment, so a run can say how much of its signal is missing instead of silently
training on ties. Labellers with ``on_error="raise"`` raise ``LabelingError`` instead.

Labellers register under a short kind name with ``@register_labeler("kind")``; ``build_labeler(kind,
**options)`` builds one from a recipe's options. The kinds "oracle", "human" and "vlm" live in this
package; "critic" is registered by the critic's own module when it is imported.
"""
from __future__ import annotations

import dataclasses
import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from vidpo.config import ERROR_POLICIES
from vidpo.data.pairs import LABEL_STATUSES, STATUS_FAILED, STATUS_OK, STATUS_TIE, STATUS_UNPARSEABLE

KNOWN_KINDS = ("oracle", "human", "vlm", "critic")


"""Kinds a recipe may name; a kind is usable once the module defining it has been imported."""


class LabelingError(RuntimeError):
    """A comparison that could not be made under ``on_error="raise"``, or unusable labeller input."""


@dataclass
class PairBatch:
    """The pairs to label.

    ``first`` and ``second`` are decoded pixel clips ``(B, 3, T, H, W)`` in ``[-1, 1]``; pair ``b``
    compares ``first[b]`` with ``second[b]``, both generated from ``captions[b]``. ``segment_ids`` maps
    each of the ``T`` pixel frames to its segment ``0..S-1`` (contiguous, non-decreasing), as made by
    ``vidpo.data.segments.segment_ids``.
    """

    first: Tensor
    """(B, 3, T, H, W) pixel clips in [-1, 1]: the video that a label of +1 prefers."""

    second: Tensor
    """(B, 3, T, H, W) pixel clips in [-1, 1]: the video that a label of -1 prefers."""

    captions: list[str]
    """B prompts the videos were generated from."""

    pair_ids: list[str]
    """B stable ids, used in failure messages and as keys of the human-labels file."""

    segment_ids: Tensor
    """(T,) int64: pixel frame -> segment id, contiguous ids 0..S-1."""

    cond_ids: Optional[Tensor] = None
    """(B, K) int64 structured condition of the toy shapes world (read by the oracle only)."""

    fps: float = 8.0
    """Frames per second of the clips (sets segment times shown to a VLM)."""

    def __post_init__(self) -> None:
        if self.first.dim() != 5 or self.first.shape != self.second.shape:
            raise LabelingError(
                f"PairBatch: first and second must both be (B, 3, T, H, W) of one shape, got "
                f"{tuple(self.first.shape)} and {tuple(self.second.shape)}")
        batch, _, frames = self.first.shape[:3]
        if len(self.captions) != batch or len(self.pair_ids) != batch:
            raise LabelingError(
                f"PairBatch: {batch} pairs but {len(self.captions)} captions and {len(self.pair_ids)} pair ids")
        if len(set(self.pair_ids)) != batch:
            repeated = sorted({p for p in self.pair_ids if self.pair_ids.count(p) > 1})
            raise LabelingError(f"PairBatch: pair ids must be unique, repeated: {repeated}")
        if self.segment_ids.dim() != 1 or self.segment_ids.numel() != frames:
            raise LabelingError(
                f"PairBatch: segment_ids must be ({frames},) for {frames} frames, got {tuple(self.segment_ids.shape)}")
        check_segment_ids(self.segment_ids)
        if self.cond_ids is not None and self.cond_ids.shape[0] != batch:
            raise LabelingError(f"PairBatch: cond_ids has {self.cond_ids.shape[0]} rows for {batch} pairs")

    @property
    def batch_size(self) -> int:
        return self.first.shape[0]

    @property
    def num_segments(self) -> int:
        return num_segments(self.segment_ids)

    def segment_frames(self, segment: int) -> Tensor:
        """Indices (n,) of the pixel frames of ``segment``."""
        return torch.nonzero(self.segment_ids == segment, as_tuple=False).flatten()

    def segment_seconds(self, segment: int) -> tuple[float, float]:
        """(start, end) of ``segment`` in seconds: [first frame / fps, (last frame + 1) / fps)."""
        frames = self.segment_frames(segment)
        return float(frames[0]) / self.fps, float(frames[-1] + 1) / self.fps


def check_segment_ids(segment_ids: Tensor) -> None:
    """Raise unless ``segment_ids`` is a non-decreasing run of every id 0..S-1 (what segments must be)."""
    ids = segment_ids.to(torch.int64)
    if ids.numel() == 0:
        raise LabelingError("segment_ids is empty: a clip needs at least one frame")
    steps = ids[1:] - ids[:-1]
    if int(ids[0]) != 0 or bool(((steps != 0) & (steps != 1)).any()):
        raise LabelingError(
            f"segment_ids must be contiguous ids 0, 0, .., 1, .., S-1 in frame order, got {ids.tolist()}")


def num_segments(segment_ids: Tensor) -> int:
    """S, the number of segments of a clip with these ``segment_ids``."""
    return int(segment_ids.max()) + 1


def majority_vote(labels: Tensor) -> Tensor:
    """Whole-video labels (B,) int64 from segment labels (B, S): ``sign(sum_s labels[:, s])``, 0 on a draw."""
    if labels.dim() != 2:
        raise ValueError(f"majority_vote expects (B, S) segment labels, got shape {tuple(labels.shape)}")
    return torch.sign(labels.to(torch.int64).sum(dim=1))


def statuses_of(labels: Tensor) -> list[list[str]]:
    """The statuses of labels (B, S) that were all judged: ``ok`` for a verdict, ``tie`` for a 0."""
    return [[STATUS_OK if v else STATUS_TIE for v in row] for row in labels.tolist()]


def status_counts(status: list[list[str]]) -> dict[str, int]:
    """How many (pair, segment) labels have each status (every status named, 0 when absent)."""
    counts = dict.fromkeys(LABEL_STATUSES, 0)
    for row in status:
        for value in row:
            counts[value] += 1
    return counts


@dataclass
class LabelResult:
    """Labels of a ``PairBatch`` with the status of each; failed and unparseable comparisons have label 0."""

    labels: Tensor
    """(B, S) int64 in {+1, -1, 0}: +1 the first video is better in segment s, -1 the second, 0 tie or no label."""

    video_labels: Tensor
    """(B,) int64 whole-video labels, the majority vote of ``labels`` (failed segments, 0, do not vote)."""

    failed: int = 0
    """Segment comparisons that could not be made (timeout, HTTP error, a reply that is no chat completion,
    a bad or missing human-labels line): status ``failed``, asked again by a rerun of ``vidpo label``."""

    messages: list[str] = field(default_factory=list)
    """One human-readable line per failed or unparseable comparison, naming the pair id and the segment(s); a
    failure that hits every segment of a pair (a bad human-labels line) is one line naming them all."""

    status: Optional[list[list[str]]] = None
    """(B, S) statuses in ``LABEL_STATUSES``; None when the labeller did not say (then ``statuses()`` derives
    ``ok`` / ``tie`` from the labels, and ``failed`` alone counts failures)."""

    unparseable: int = 0
    """Segment comparisons the judge answered without a decidable verdict: status ``unparseable``, a tie."""

    @classmethod
    def from_labels(cls, labels: Tensor, failed: int = 0, messages: Optional[list[str]] = None,
                    status: Optional[list[list[str]]] = None) -> "LabelResult":
        """A result whose whole-video labels are the majority vote of ``labels`` (B, S). With ``status`` (B, S),
        ``failed`` and ``unparseable`` are counted from it (``failed`` must then be left 0 or agree)."""
        labels = labels.to(torch.int64)
        if bool(((labels < -1) | (labels > 1)).any()):
            raise ValueError(f"labels must be in {{-1, 0, 1}}, got values {sorted(set(labels.flatten().tolist()))}")
        unparseable = 0
        if status is not None:
            status = [list(row) for row in status]
            if len(status) != labels.shape[0] or any(len(row) != labels.shape[1] for row in status):
                raise ValueError(f"status must be {tuple(labels.shape)} like the labels")
            for row, values in zip(status, labels.tolist()):
                for value, label in zip(row, values):
                    if value not in LABEL_STATUSES:
                        raise ValueError(f"status must be one of {LABEL_STATUSES}, got {value!r}")
                    if (value == STATUS_OK) != (label != 0):
                        raise ValueError(f"status {value!r} with label {label}: only 'ok' labels are non-zero")
            counts = status_counts(status)
            if failed and failed != counts[STATUS_FAILED]:
                raise ValueError(f"failed = {failed} but the status holds {counts[STATUS_FAILED]} failed segments")
            failed, unparseable = counts[STATUS_FAILED], counts[STATUS_UNPARSEABLE]
        return cls(labels=labels, video_labels=majority_vote(labels), failed=failed, messages=list(messages or []),
                   status=status, unparseable=unparseable)

    def statuses(self) -> list[list[str]]:
        """``status``, or ``ok`` / ``tie`` from the labels when the labeller gave none."""
        return self.status if self.status is not None else statuses_of(self.labels)

    @property
    def tie_fraction(self) -> float:
        """Fraction of segment labels that are 0 (ties, unparseable and failed ones included)."""
        return float((self.labels == 0).double().mean()) if self.labels.numel() else 0.0


class Labeler(ABC):
    """Turns a ``PairBatch`` into per-segment preference labels."""

    name: str = "labeler"

    @abstractmethod
    def label(self, batch: PairBatch) -> LabelResult:
        """Labels (B, S) of the pairs of ``batch``, their majority vote, and the failed comparisons."""

    def label_pointwise(self, clips: Tensor, captions: list[str], segment_ids: Tensor,
                        cond_ids: Optional[Tensor] = None) -> Tensor:
        """Scores (n, S) float of single clips (n, 3, T, H, W) per segment, higher is better (for KTO).

        Only labellers with an absolute notion of quality can do this; pairwise ones raise.
        """
        raise NotImplementedError(
            f"the {self.name!r} labeller compares pairs of videos and cannot score a single video; "
            "use a pointwise labeller ('oracle' or 'critic') for KTO-style desirable/undesirable labels")


def check_policy(value: str, what: str) -> str:
    """``value`` if it is a valid error policy, else a ValueError naming ``what`` and the choices."""
    if value not in ERROR_POLICIES:
        raise ValueError(f"{what} must be one of {ERROR_POLICIES}, got {value!r}")
    return value


_REGISTRY: dict[str, Callable[..., Labeler]] = {}


def register_labeler(kind: str) -> Callable:
    """Class decorator: make ``build_labeler(kind, **options)`` construct ``cls(**options)``."""

    def decorate(cls):
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"labeller kind {kind!r} is already registered to {_REGISTRY[kind].__qualname__}")
        _REGISTRY[kind] = cls
        return cls

    return decorate


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


def build_labeler(kind: str, **options) -> Labeler:
    """The labeller registered as ``kind``, constructed with ``options`` (its constructor's keywords)."""
    if kind not in _REGISTRY:
        if kind in KNOWN_KINDS:
            raise LabelingError(
                f"labeller kind {kind!r} is not registered yet: import the module that defines it "
                f"(its class is decorated with @register_labeler({kind!r})); registered: {registered_kinds()}")
        close = difflib.get_close_matches(kind, list(KNOWN_KINDS) + registered_kinds(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LabelingError(f"unknown labeller kind {kind!r}{hint}; registered: {registered_kinds()}")
    return _REGISTRY[kind](**options)


def dataclass_from_options(cls, options: dict, where: str):
    """``cls(**options)``, but an unknown key is an error naming it and the closest field of ``cls``."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown option {key!r}{hint}; valid options: {names}")
    return cls(**options)
