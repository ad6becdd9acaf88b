"""Exact preference labels from the shapes world's oracle (``vidpo.data.oracle.ShapesOracle``).

The toy world knows what every clip should show (its structured condition ``cond_ids``), so its oracle
scores a clip per segment without error, and the labels it gives are the ground truth the other
labellers (VLM, critic, people) are measured against. Two modes:

* ``mode="segment"`` (DenseDPO): ``labels[b, s] = oracle.prefer(first, second, ...)[b, s]``, i.e. +1 when
  segment ``s`` of the first clip outscores that of the second by more than ``tie_margin``, -1 for the
  reverse, 0 otherwise;
* ``mode="video"`` (vanilla Flow-DPO labels, one judgement per pair): with the oracle's whole-clip
  totals ``d = total(first) - total(second)``, ``y = +1 if d > tie_margin, -1 if d < -tie_margin,
  else 0`` is copied to every segment, so the majority vote and every segment label equal ``y``.

The oracle never fails, so ``failed`` is always 0. It scores single clips as well (``label_pointwise``),
which KTO's desirable/undesirable labels need.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vidpo.data.domains import exact_oracle
from vidpo.labeling.base import Labeler, LabelingError, LabelResult, PairBatch, register_labeler

ORACLE_MODES = ("segment", "video")


@register_labeler("oracle")
class OracleLabeler(Labeler):
    """Ground-truth labels of the shapes world, per segment or per whole video."""

    name = "oracle"

    def __init__(self, world=None, *, oracle=None, tie_margin: float = 0.0, mode: str = "segment") -> None:
        """``world``: the shapes world the clips come from (an oracle is built for it), or pass a ready
        ``oracle`` (anything with ``prefer`` and ``score``, like the shapes world's). ``tie_margin`` >= 0:
        score differences up to it are ties. ``mode``: "segment" or "video" (see the module doc)."""
        if (world is None) == (oracle is None):
            raise ValueError("OracleLabeler needs exactly one of world= (the shapes world) or oracle=")
        if mode not in ORACLE_MODES:
            raise ValueError(f"oracle labeller mode must be one of {ORACLE_MODES}, got {mode!r}")
        if not tie_margin >= 0:
            raise ValueError(f"oracle labeller tie_margin must be >= 0, got {tie_margin!r}")
        self.oracle = oracle if oracle is not None else exact_oracle(world)
        self.tie_margin = float(tie_margin)
        self.mode = mode

    @staticmethod
    def _cond_ids(cond_ids: Optional[Tensor], count: int) -> Tensor:
        if cond_ids is None:
            raise LabelingError("the oracle labeller needs cond_ids (the shapes world's structured condition "
                                "of every clip); this batch has none")
        if cond_ids.shape[0] != count:
            raise LabelingError(f"cond_ids has {cond_ids.shape[0]} rows for {count} clips")
        return cond_ids

    def label(self, batch: PairBatch) -> LabelResult:
        """Labels (B, S) int64 from the oracle; ``failed`` is 0."""
        cond_ids = self._cond_ids(batch.cond_ids, batch.batch_size)
        shape = (batch.batch_size, batch.num_segments)
        if self.mode == "segment":
            labels = self.oracle.prefer(batch.first, batch.second, cond_ids, batch.segment_ids, self.tie_margin)
            labels = torch.as_tensor(labels).to(torch.int64)
            if tuple(labels.shape) != shape:
                raise LabelingError(f"oracle.prefer returned labels of shape {tuple(labels.shape)}, expected {shape}")
        else:
            difference = (self.oracle.score(batch.first, cond_ids, batch.segment_ids).total.double()
                          - self.oracle.score(batch.second, cond_ids, batch.segment_ids).total.double())
            verdict = (difference > self.tie_margin).long() - (difference < -self.tie_margin).long()
            labels = verdict.reshape(-1, 1).expand(shape).contiguous()
        return LabelResult.from_labels(labels.cpu())

    def label_pointwise(self, clips: Tensor, captions: list[str], segment_ids: Tensor,
                        cond_ids: Optional[Tensor] = None) -> Tensor:
        """Oracle scores (n, S) float per segment of clips (n, 3, T, H, W); "video" mode gives the whole-clip
        total in every segment. ``captions`` are not needed (the condition is ``cond_ids``)."""
        cond_ids = self._cond_ids(cond_ids, clips.shape[0])
        score = self.oracle.score(clips, cond_ids, segment_ids)
        if self.mode == "video":
            num = int(segment_ids.max()) + 1
            return score.total.reshape(-1, 1).expand(-1, num).contiguous()
        return score.segments
