"""Preference pairs built from a critic's scores of a pool of videos.

A round's videos form a pool (``vidpo.ipo.pool.read_video_pool``: every generated pair contributes its two videos,
the first videos then the second ones, with their captions, prompt ids and a prompt key). The critic scores the pool's
pixels (the shapes world's clips, or a latent model's decoded frames); the pairs written hold the videos the
policy trains on (the same clips, or the latents). Prompts are told apart by their key: the shapes world's
condition index, or a prompt's position in the prompt file. Instead of labelling the pairs as generated, the
critic scores each video once and:

* KTO (``build_kto_pairs``): videos at or above ``critic.desirable`` are desirable, at or below
  ``critic.undesirable`` undesirable (``vidpo.ipo.critic.pointwise_labels``); each desirable video is paired
  with an undesirable one of the same prompt, so the pairs directory carries the pointwise labels;
* ranked DPO (``build_ranked_pairs``): each prompt's top-scored videos are paired with its bottom-scored ones
  (``ranked_pairs``), optionally keeping only the widest score gaps (``widest_pairs``).

The result is an ordinary labelled pairs directory (shards + ``manifest.jsonl``) that training reads.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from vidpo.config import RunConfig
from vidpo.data.pairs import MANIFEST_FILE, PairRecord, shard_name, write_manifest
from vidpo.ipo.critic import pointwise_labels
from vidpo.ipo.pool import VideoPool, pool_scores
from vidpo.labeling.base import LabelingError
from vidpo.labeling.critic import PoolScorer
from vidpo.utils import atomic


def _write_pool_pairs(dst: Path, pool: VideoPool, first: list[int], second: list[int], segment_labels: torch.Tensor,
                      cfg: RunConfig, *, mode: str, source: str, stats: dict) -> dict:
    """Write pairs (``pool.latents[first[i]]`` preferred to ``pool.latents[second[i]]``, whole-video label +1, the
    given per-segment labels (P, S)) as shards, then ``stats`` (+ the pair count) to ``dst/label.json``, then
    ``dst/manifest.jsonl``; returns the stats."""
    shard_size = cfg.generate.shard_size
    conds = pool.cond_ids[first]
    videos = pool.latents
    records = []
    for k in range(0, len(first), shard_size):
        rows = list(range(k, min(len(first), k + shard_size)))
        name = shard_name(k // shard_size)
        tensors = {"first": videos[[first[i] for i in rows]], "second": videos[[second[i] for i in rows]]}
        if conds.shape[1]:
            tensors["cond_ids"] = conds[rows]
        atomic.save_safetensors(tensors, dst / name, metadata={"mode": mode, "split": "train"})
        for row, i in enumerate(rows):
            records.append(PairRecord(pair_id=f"{mode}-{i:06d}", shard=name, row=row, prompt_id=pool.prompt_ids[first[i]],
                                      cond_ids=conds[i].tolist(), caption=pool.captions[first[i]], mode=mode,
                                      labels=segment_labels[i].tolist(), video_label=1, label_source=source))
    stats = dict(stats, pairs=len(records))
    atomic.write_json(dst / "label.json", stats)
    write_manifest(dst / MANIFEST_FILE, records)   # last: its presence means the pairs are complete
    return stats


def build_kto_pairs(scorer: PoolScorer, pool: VideoPool, dst: Path, cfg: RunConfig, segment_ids: torch.Tensor, *,
                    source: str = "critic-pointwise") -> dict:
    """Score every video of ``pool`` (``scorer``: the critic), label it desirable / undesirable (``critic.pointwise``),
    and write ``dst``: pairs (desirable first, undesirable second, label +1) of videos of the same prompt.

    Within a prompt, every labelled video is used: the shorter list is cycled to the length of the longer.
    A prompt with no desirable or no undesirable video contributes nothing (the KTO objective reads each
    record as one desirable and one undesirable video of one condition)."""
    if (dst / MANIFEST_FILE).exists():
        return json.loads((dst / "label.json").read_text())
    c = cfg.critic
    labels = pointwise_labels(pool_scores(scorer, pool).video, c.pointwise, c.desirable, c.undesirable)
    index = pool.keys
    first, second = [], []
    for ci in index.unique().tolist():
        good = torch.nonzero((index == ci) & (labels > 0)).flatten().tolist()
        bad = torch.nonzero((index == ci) & (labels < 0)).flatten().tolist()
        for j in range(max(len(good), len(bad)) if good and bad else 0):
            first.append(good[j % len(good)])
            second.append(bad[j % len(bad)])
    if not first:
        raise LabelingError("KTO round: no prompt of the round has both a desirable and an undesirable video; "
                            "widen critic.desirable / critic.undesirable")
    segments = int(segment_ids.max()) + 1
    stats = {"videos": int(labels.numel()), "desirable": int((labels > 0).sum()),
             "undesirable": int((labels < 0).sum()), "pointwise": c.pointwise, "thresholds": [c.undesirable, c.desirable]}
    return _write_pool_pairs(dst, pool, first, second, torch.ones(len(first), segments, dtype=torch.long), cfg,
                             mode="kto", source=source, stats=stats)


def ranked_pairs(scores: torch.Tensor, prompt_index: torch.Tensor, fraction: float) -> tuple[list[int], list[int]]:
    """Best-versus-worst pairs of a scored pool: for each prompt with m >= 2 videos, its top
    k = max(1, round(fraction * m)) videos by score, each paired with each of its bottom k (k <= m // 2, so
    no video is on both sides). Returns (preferred indices, rejected indices), prompt by prompt."""
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"iterate.rank_fraction must be in (0, 0.5], got {fraction}")
    first, second = [], []
    for p in prompt_index.unique().tolist():
        members = torch.nonzero(prompt_index == p).flatten()
        m = members.numel()
        if m < 2:
            continue
        k = min(max(1, round(fraction * m)), m // 2)
        order = members[torch.argsort(scores[members], descending=True, stable=True)].tolist()
        for i in order[:k]:
            for j in order[-k:]:
                first.append(i)
                second.append(j)
    return first, second


def widest_pairs(scores: torch.Tensor, first: Sequence[int], second: Sequence[int], fraction: float
                 ) -> tuple[list[int], list[int]]:
    """The ``ceil(fraction * P)`` of P pairs with the largest score gap ``scores[first] - scores[second]``, in
    their original order (ties in the gap keep the earlier pair).

    Why a global cut on top of the per-prompt ranking: the critic's errors are not spread evenly. On the
    prompts it judges well its best and worst videos lie far apart; on the prompts it cannot tell apart (or
    where the policy's samples no longer differ) all its scores bunch together, and those pairs are the
    ones the oracle disagrees with (shapes world, round 3 of ``recipes/shapes/ipo.yaml``: ~65-85% agreement
    in the narrowest quarter against ~97-100% in the widest)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"iterate.margin_fraction must be in (0, 1], got {fraction}")
    if len(first) != len(second):
        raise ValueError(f"widest_pairs: {len(first)} preferred and {len(second)} rejected indices")
    if fraction == 1.0 or not first:
        return list(first), list(second)
    gap = scores[list(first)] - scores[list(second)]
    keep = max(1, math.ceil(fraction * len(first)))
    chosen = torch.argsort(gap, descending=True, stable=True)[:keep].sort().values.tolist()
    return [first[i] for i in chosen], [second[i] for i in chosen]


def build_ranked_pairs(scorer: PoolScorer, pool: VideoPool, dst: Path, cfg: RunConfig, segment_ids: torch.Tensor,
                       fraction: float, *, margin_fraction: float = 1.0, source: str = "critic-ranked") -> dict:
    """Score every video of ``pool`` (``scorer``: the critic) and write ``dst``: the best-versus-worst pairs of
    each prompt (``ranked_pairs``), preferred video first. Segment labels are the signs of the segment score
    differences (DenseDPO reads them; a whole-video objective reads the +1 video label).

    Why: a critic that is ~80% right on a random pair of two samples is far surer of a pair whose scores
    lie at the two ends of a prompt's ranking (on the shapes base ~98% agreement with the oracle for
    fraction 0.25), so the policy trains on fewer wrong labels and larger quality gaps. ``margin_fraction`` < 1
    then keeps only the widest pairs of the whole pool (``widest_pairs``)."""
    if (dst / MANIFEST_FILE).exists():
        return json.loads((dst / "label.json").read_text())
    scores = pool_scores(scorer, pool)
    first, second = ranked_pairs(scores.video, pool.keys, fraction)
    if not first:
        raise LabelingError("ranked pairs: no prompt of the round has two videos")
    ranked = len(first)
    first, second = widest_pairs(scores.video, first, second, margin_fraction)
    seg_labels = torch.sign(scores.segments[first] - scores.segments[second]).long()
    gap = scores.video[first] - scores.video[second]
    stats = {"videos": int(scores.video.numel()), "rank_fraction": fraction, "margin_fraction": margin_fraction,
             "ranked_pairs": ranked,
             "prompts": int(pool.keys[first].unique().numel()),
             "critic_score_gap": round(float(gap.mean()), 4)}
    return _write_pool_pairs(dst, pool, first, second, seg_labels, cfg, mode="ranked", source=source, stats=stats)
