"""Judged evaluation: base and policy videos of the same prompt and seed, compared by a judge.

A real model has no exact oracle. On the held-out prompts the base and the policy are sampled from the
same seeds and decoded to pixels, and every ``(policy, base)`` pair of one prompt and seed is shown to a
judge, any ``vidpo.labeling.Labeler`` (a VLM, people through a labels file, a critic, the toy world's
oracle), at video level: one segment spanning the whole clip (``segment_ids`` all zero). The VLM
labeller already asks both orders and keeps a verdict only when they agree (else a tie).

Order. Which video is shown as the labeller's *first* is randomised, balanced and seeded: a random
permutation from the stream ``(order_seed, "judge", "order")`` puts exactly ``n // 2`` of the ``n`` pairs
policy-first and the rest base-first, and the verdict is mapped back (``+1`` = the policy is better).
A judge that always prefers the first video therefore gives a win rate of ``(n // 2) / n`` (0.5 for even
``n``), not 1; ``first_shown_win_rate`` in the summary exposes such a bias.

Verdicts: ``+1`` the policy is better, ``-1`` the base is, ``0`` a tie. A comparison that failed (an
unreadable VLM reply, a timeout, a missing human label) is *counted apart* (``failed``) and left out of
the win rate, not counted as a tie.

Win rate and its interval. Pairs of one prompt share the prompt, so they are not independent samples:
the interval is over prompts. For prompt ``p`` with ``n_p`` judged pairs, ``y_p = wins_p + ties_p / 2``;
over the ``P`` prompts with at least one judged pair and ``N = sum_p n_p``::

    win_rate = sum_p y_p / N                                   (= (wins + ties / 2) / n)
    se^2     = P / (P - 1) * sum_p (y_p - win_rate * n_p)^2 / N^2
    ci95     = win_rate -+ t_{0.975, P-1} * se,  clipped to [0, 1]

the cluster-robust (ratio-estimator) interval. When every prompt has the same number of judged pairs
it *is* ``mean_ci`` of the per-prompt scores ``y_p / n_p`` (a t-interval over prompts); unequal counts
(failed comparisons) weight each prompt by its judged pairs. With one prompt there is no interval
(both bounds equal the win rate, as ``mean_ci`` does for one sample); with none the win rate is NaN
(``None`` in ``summary()``).

Evaluation directory layout (what ``vidpo.evaluation.report`` shows side by side)::

    RUN_DIR/eval/judged.json                            JudgedComparison.save(): {"summary", "pairs"}
    RUN_DIR/eval/videos/<stem>_base.mp4                 the base's video of one prompt and seed
    RUN_DIR/eval/videos/<stem>_policy.mp4               the policy's video of the same prompt and seed

with ``<stem> = video_stem(prompt_id, seed)``: the prompt id, then ``_<seed>`` (``"heldout-007", 3 ->
"heldout-007_3"``); an id with characters outside ``[A-Za-z0-9._-]`` has them replaced by ``_`` and gets
the first 8 hex digits of its SHA-1 appended, so two ids never share a file (``"a cat", 0 ->
"a_cat-<sha1[:8]>_0"``; the rule of ``vidpo.data.video_io.video_name``). The stem is also the pair id
the judge sees (in its failure messages, and as the key of a human-labels file).
Each record of ``judged.json``'s ``pairs`` names its two videos (paths relative to ``eval/``), its
prompt id, seed, caption, verdict, outcome, the order shown and, for a failed comparison, the message.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from vidpo.evaluation.evaluate import t_quantile_975
from vidpo.labeling.base import Labeler, LabelResult, PairBatch
from vidpo.utils import atomic, seeding

EVAL_DIR = "eval"
"""The evaluation folder of a run directory."""
VIDEO_DIR = "videos"
"""Videos folder under ``EVAL_DIR``."""
JUDGED_NAME = "judged.json"
"""The judged comparison under ``EVAL_DIR``."""
ROLES = ("base", "policy")
OUTCOMES = {1: "policy", -1: "base", 0: "tie"}

Clips = Union[Tensor, Sequence[Tensor]]


# ---------------------------------------------------------------------------------------------- layout
def video_stem(prompt_id, seed: int) -> str:
    """File stem of the videos of one prompt and seed: ``<safe prompt id>_<seed>`` (the module docstring)."""
    text = str(prompt_id)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    if safe != text or not safe or safe.startswith("."):
        safe = f"{'_' if safe.startswith('.') else ''}{safe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return f"{safe}_{int(seed)}"


def video_relpath(prompt_id, seed: int, role: str, ext: str = "mp4") -> str:
    """``videos/<stem>_<role>.<ext>``, relative to the evaluation folder; ``role`` is "base" or "policy"."""
    if role not in ROLES:
        raise ValueError(f"video role must be one of {ROLES}, got {role!r}")
    return f"{VIDEO_DIR}/{video_stem(prompt_id, seed)}_{role}.{ext.lstrip('.')}"


def video_path(eval_dir, prompt_id, seed: int, role: str, ext: str = "mp4") -> Path:
    """Where the video of ``role`` for ``(prompt_id, seed)`` goes under the evaluation folder ``eval_dir``."""
    return Path(eval_dir) / video_relpath(prompt_id, seed, role, ext)


# --------------------------------------------------------------------------------------------- win rate
def prompt_clustered_win_rate(verdicts: Tensor, prompt_ids: Sequence, judged: Optional[Tensor] = None) -> dict:
    """``{"mean", "ci95", "n", "prompts"}``: the win rate of verdicts (+1 / 0 / -1) with its 95% CI over
    prompts (the module docstring's formula). ``judged`` (bool, default all) selects the pairs counted."""
    verdicts = torch.as_tensor(verdicts).to(torch.int64).flatten()
    if len(prompt_ids) != verdicts.numel():
        raise ValueError(f"{verdicts.numel()} verdicts but {len(prompt_ids)} prompt ids")
    keep = torch.ones_like(verdicts, dtype=torch.bool) if judged is None else torch.as_tensor(judged).bool()
    scores: dict[str, list[float]] = {}  # prompt -> [y_p, n_p]
    for verdict, prompt, counted in zip(verdicts.tolist(), prompt_ids, keep.tolist()):
        if counted:
            entry = scores.setdefault(str(prompt), [0.0, 0.0])
            entry[0] += {1: 1.0, 0: 0.5, -1: 0.0}[verdict]
            entry[1] += 1.0
    total_n = sum(n for _, n in scores.values())
    num_prompts = len(scores)
    if total_n == 0:
        return {"mean": math.nan, "ci95": [math.nan, math.nan], "n": 0, "prompts": 0}
    rate = sum(y for y, _ in scores.values()) / total_n
    if num_prompts < 2:
        return {"mean": rate, "ci95": [rate, rate], "n": int(total_n), "prompts": num_prompts}
    residual = sum((y - rate * n) ** 2 for y, n in scores.values())
    se = math.sqrt(num_prompts / (num_prompts - 1) * residual / total_n ** 2)
    half = t_quantile_975(num_prompts - 1) * se
    return {"mean": rate, "ci95": [max(0.0, rate - half), min(1.0, rate + half)], "n": int(total_n),
            "prompts": num_prompts}


def presentation_order(n: int, order_seed: int) -> Tensor:
    """(n,) bool, True where the policy's video is shown first: exactly ``n // 2`` Trues, placed by a random
    permutation from the stream ``(order_seed, "judge", "order")``."""
    order = torch.zeros(n, dtype=torch.bool)
    if n:
        perm = torch.randperm(n, generator=seeding.generator(order_seed, "judge", "order"))
        order[perm[: n // 2]] = True
    return order


def _finite(value: float, digits: int = 6) -> Optional[float]:
    return round(float(value), digits) if math.isfinite(value) else None


# ------------------------------------------------------------------------------------------- the result
@dataclass
class JudgedComparison:
    """Per-pair verdicts of a judged comparison of a policy with its base (one pair per prompt and seed)."""

    prompt_ids: list[str]
    seeds: list[int]
    captions: list[str]
    verdicts: Tensor
    """(N,) int64: +1 the policy is better, -1 the base is, 0 a tie (also 0 where the comparison failed)."""
    failed: Tensor
    """(N,) bool: the comparison could not be made; counted apart, not in the win rate."""
    policy_first: Tensor
    """(N,) bool: the policy's video was shown to the judge as the first video."""
    messages: list[str] = field(default_factory=list)
    """The judge's failure messages (one per failed comparison, naming the pair)."""
    judge: str = "labeler"
    order_seed: int = 0

    @property
    def num_pairs(self) -> int:
        return len(self.prompt_ids)

    @property
    def judged(self) -> Tensor:
        return ~self.failed

    def _count(self, verdict: int) -> int:
        return int(((self.verdicts == verdict) & self.judged).sum())

    @property
    def wins(self) -> int:
        return self._count(1)

    @property
    def ties(self) -> int:
        return self._count(0)

    @property
    def losses(self) -> int:
        return self._count(-1)

    @property
    def num_failed(self) -> int:
        return int(self.failed.sum())

    def win_rate(self) -> dict:
        """``{"mean", "ci95", "n", "prompts"}``: (wins + ties / 2) / judged pairs, 95% CI over prompts."""
        return prompt_clustered_win_rate(self.verdicts, self.prompt_ids, self.judged)

    def first_shown_win_rate(self) -> float:
        """Share of judged pairs won by whichever video was shown first (ties count half): near 0.5 for an
        unbiased judge whatever the policy's quality, 1.0 for one that always picks the first video."""
        judged = self.judged
        if not bool(judged.any()):
            return math.nan
        shown = torch.where(self.policy_first, self.verdicts, -self.verdicts)[judged].double()
        return float(((shown + 1) / 2).mean())

    def per_prompt(self) -> dict[str, dict]:
        """``prompt -> {"pairs", "wins", "ties", "losses", "failed", "score"}`` (score: its win rate)."""
        out: dict[str, dict] = {}
        for verdict, prompt, failed in zip(self.verdicts.tolist(), self.prompt_ids, self.failed.tolist()):
            row = out.setdefault(prompt, {"pairs": 0, "wins": 0, "ties": 0, "losses": 0, "failed": 0})
            row["pairs"] += 1
            if failed:
                row["failed"] += 1
            else:
                row[{1: "wins", 0: "ties", -1: "losses"}[verdict]] += 1
        for row in out.values():
            judged = row["pairs"] - row["failed"]
            row["score"] = (row["wins"] + row["ties"] / 2) / judged if judged else None
        return out

    def summary(self) -> dict:
        """JSON-safe dict for summary.json: win rate with its CI over prompts, counts, the judge."""
        rate = self.win_rate()
        return {"judge": self.judge, "pairs": self.num_pairs, "prompts": len(set(self.prompt_ids)),
                "win_rate": {"mean": _finite(rate["mean"]), "ci95": [_finite(v) for v in rate["ci95"]]},
                "ci_over_prompts": rate["prompts"], "judged": rate["n"], "wins": self.wins, "ties": self.ties,
                "losses": self.losses, "failed": self.num_failed,
                "first_shown_win_rate": _finite(self.first_shown_win_rate()), "order_seed": self.order_seed}

    def _message_of(self, index: int) -> Optional[str]:
        pair_id = video_stem(self.prompt_ids[index], self.seeds[index])
        return next((m for m in self.messages if repr(pair_id) in m), None)

    def records(self, video_ext: str = "mp4") -> list[dict]:
        """One JSON record per pair (the ``pairs`` of ``judged.json``); video paths relative to ``eval/``."""
        rows = []
        for i in range(self.num_pairs):
            prompt, seed, verdict = self.prompt_ids[i], self.seeds[i], int(self.verdicts[i])
            failed = bool(self.failed[i])
            row = {"prompt_id": prompt, "seed": seed, "caption": self.captions[i],
                   "verdict": verdict, "outcome": "failed" if failed else OUTCOMES[verdict], "failed": failed,
                   "policy_first": bool(self.policy_first[i]),
                   "videos": {role: video_relpath(prompt, seed, role, video_ext) for role in ROLES}}
            if failed:
                row["message"] = self._message_of(i)
            rows.append(row)
        return rows

    def to_json(self, video_ext: str = "mp4") -> dict:
        return {"summary": self.summary(), "pairs": self.records(video_ext), "messages": list(self.messages)}

    def save(self, path, video_ext: str = "mp4") -> Path:
        """Write ``to_json`` atomically to ``path`` (by the layout: ``RUN_DIR/eval/judged.json``)."""
        atomic.write_json(path, self.to_json(video_ext))
        return Path(path)

    @classmethod
    def from_json(cls, data: dict) -> "JudgedComparison":
        """The comparison written by ``to_json`` / ``save`` (its per-pair records)."""
        pairs = data["pairs"]
        summary = data.get("summary", {})
        return cls(prompt_ids=[str(p["prompt_id"]) for p in pairs], seeds=[int(p["seed"]) for p in pairs],
                   captions=[str(p.get("caption", "")) for p in pairs],
                   verdicts=torch.tensor([int(p["verdict"]) for p in pairs], dtype=torch.int64),
                   failed=torch.tensor([bool(p.get("failed", False)) for p in pairs], dtype=torch.bool),
                   policy_first=torch.tensor([bool(p.get("policy_first", False)) for p in pairs], dtype=torch.bool),
                   messages=list(data.get("messages", [])), judge=str(summary.get("judge", "labeler")),
                   order_seed=int(summary.get("order_seed", 0)))


# ------------------------------------------------------------------------------------------- judging
def _clip_count(clips: Clips) -> int:
    return clips.shape[0] if isinstance(clips, Tensor) else len(clips)


def _take(clips: Clips, indices: list[int]) -> Tensor:
    if isinstance(clips, Tensor):
        return clips[indices].float()
    return torch.stack([clips[i] for i in indices]).float()


def _failed_pairs(result: LabelResult, pair_ids: list[str]) -> Optional[set[int]]:
    """Indices of the pairs whose (single-segment) comparison failed, or None when the messages do not say."""
    if result.status is not None:   # the labeller said which (an unparseable answer is a tie, not a failure)
        return {b for b, row in enumerate(result.status) if "failed" in row}
    if result.failed == 0:
        return set()
    if result.failed >= len(pair_ids):
        return set(range(len(pair_ids)))
    hits = {b for b, pair_id in enumerate(pair_ids) if any(repr(pair_id) in m for m in result.messages)}
    return hits if len(hits) == result.failed else None


def _label(labeler: Labeler, batch: PairBatch) -> LabelResult:
    result = labeler.label(batch)
    if tuple(result.video_labels.shape) != (batch.batch_size,):
        raise ValueError(f"judge {labeler.name!r} returned video labels of shape {tuple(result.video_labels.shape)}"
                         f" for {batch.batch_size} pairs")
    return result


def judge_videos(labeler: Labeler, policy_clips: Clips, base_clips: Clips, captions: Sequence[str],
                 prompt_ids: Sequence, fps: float, *, batch_size: int = 8, seeds: Optional[Sequence[int]] = None,
                 order_seed: int = 0, cond_ids: Optional[Tensor] = None) -> JudgedComparison:
    """Judge every pair ``(policy_clips[i], base_clips[i])`` of one prompt and seed with ``labeler``.

    ``policy_clips`` / ``base_clips``: (N, 3, F, H, W) pixel clips in [-1, 1], or N tensors (3, F, H, W)
    (stacked ``batch_size`` at a time, so N decoded videos need not sit in one tensor); ``captions[i]`` and
    ``prompt_ids[i]`` name pair i's prompt; ``seeds[i]`` its sampling seed (default: its index among the
    pairs of its prompt); ``(prompt_id, seed)`` must name each pair once. ``fps`` is the clips' frame rate.
    ``order_seed`` seeds the balanced presentation order; ``cond_ids`` (N, K) is passed on for the toy
    world's oracle labeller. Each pair is one segment (``segment_ids`` all zero) with pair id
    ``video_stem(prompt_id, seed)``; a labeller with ``on_error="raise"`` raises ``LabelingError``.
    """
    n = _clip_count(policy_clips)
    prompt_ids = [str(p) for p in prompt_ids]
    captions = [str(c) for c in captions]
    if _clip_count(base_clips) != n or len(captions) != n or len(prompt_ids) != n:
        raise ValueError(f"judge_videos: {n} policy clips, {_clip_count(base_clips)} base clips, "
                         f"{len(captions)} captions and {len(prompt_ids)} prompt ids: one of each per pair")
    if batch_size < 1:
        raise ValueError(f"judge_videos: batch_size must be >= 1, got {batch_size}")
    if seeds is None:
        seen: dict[str, int] = {}
        seeds = []
        for prompt in prompt_ids:
            seeds.append(seen.get(prompt, 0))
            seen[prompt] = seeds[-1] + 1
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"judge_videos: {len(seeds)} seeds for {n} pairs")
    pair_ids = [video_stem(p, s) for p, s in zip(prompt_ids, seeds)]
    if len(set(pair_ids)) != n:
        repeated = sorted({(p, s) for p, s, q in zip(prompt_ids, seeds, pair_ids) if pair_ids.count(q) > 1})
        raise ValueError(f"judge_videos: (prompt id, seed) must name each pair once, repeated: {repeated[:5]}")
    if cond_ids is not None and cond_ids.shape[0] != n:
        raise ValueError(f"judge_videos: cond_ids has {cond_ids.shape[0]} rows for {n} pairs")

    policy_first = presentation_order(n, order_seed)
    verdicts = torch.zeros(n, dtype=torch.int64)
    failed = torch.zeros(n, dtype=torch.bool)
    messages: list[str] = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        policy, base = _take(policy_clips, idx), _take(base_clips, idx)
        if policy.shape != base.shape:
            raise ValueError(f"judge_videos: pairs {pair_ids[idx[0]]!r}..: policy clips {tuple(policy.shape)} "
                             f"and base clips {tuple(base.shape)} differ in shape")
        swap = policy_first[idx].view(-1, 1, 1, 1, 1)
        first, second = torch.where(swap, policy, base), torch.where(swap, base, policy)
        del policy, base

        def batch_of(rows: list[int]) -> PairBatch:
            return PairBatch(first=first[rows], second=second[rows], captions=[captions[idx[r]] for r in rows],
                             pair_ids=[pair_ids[idx[r]] for r in rows],
                             segment_ids=torch.zeros(first.shape[2], dtype=torch.int64),
                             cond_ids=None if cond_ids is None else cond_ids[[idx[r] for r in rows]], fps=fps)

        rows = list(range(len(idx)))
        result = _label(labeler, batch_of(rows))
        shown = result.video_labels.to(torch.int64).clone()
        bad = _failed_pairs(result, [pair_ids[i] for i in idx])
        batch_messages = list(result.messages)
        if bad is None:  # the messages do not say which pairs failed: ask again one pair at a time
            bad, batch_messages = set(), []
            for r in rows:
                single = _label(labeler, batch_of([r]))
                shown[r] = int(single.video_labels[0])
                batch_messages.extend(single.messages)
                if single.failed:
                    bad.add(r)
        messages.extend(batch_messages)
        for r in rows:
            i = idx[r]
            failed[i] = r in bad
            verdicts[i] = 0 if r in bad else (int(shown[r]) if policy_first[i] else -int(shown[r]))
    return JudgedComparison(prompt_ids=prompt_ids, seeds=seeds, captions=captions, verdicts=verdicts, failed=failed,
                            policy_first=policy_first, messages=messages, judge=getattr(labeler, "name", "labeler"),
                            order_seed=order_seed)
