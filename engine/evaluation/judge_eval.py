"""How far to trust a judge: its labels against people's on the same pairs, and its position bias.

Given a judge's segment labels ``judge (N, S)`` and human labels ``human (N, S)`` of the same N pairs (values in
{+1 first better, -1 second better, 0 tie}), :func:`judge_agreement` reports

* **segment level** -- ``agreement``: the fraction of segments where judge and people give the same label (a tie
  is a label); ``decisive_agreement``: among segments that both call (no tie on either side), the fraction they
  call the same way (the judge's accuracy where it decides); ``coverage``: the fraction of segments people call
  that the judge calls too; ``judge_tie_rate`` and ``human_tie_rate``; the 3 x 3 confusion counts;
* **video level** -- the same on the whole-video labels, the majority vote ``sign(sum_s labels)`` of each side;
* **position bias** (a judge that asks in both orders, the VLM: ``orders[b][s] = [answer with A = first,
  answer with A = second]``, raw answers "A" / "B" / "TIE" before the order swap) -- ``first_shown_rate``: among
  answers that pick a video, the fraction that pick the one shown first ("A"). Each pair is asked both ways, so
  an unbiased judge gives 0.5 whatever the videos; ``tie_answer_rate``; ``order_consistency``: the fraction of
  segments whose two answers agree once the swap is undone.

**Confidence intervals** (``ci95``) are 95% percentile-bootstrap intervals **over pairs**: pairs are resampled
with replacement (``resamples`` times, a seeded stream) and each rate is recomputed as a ratio of sums over the
resampled pairs. The segments and the two answers of one pair are not independent (same prompt, same videos), so
resampling segments would give intervals that are too narrow.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

LABEL_NAMES = {1: "first", -1: "second", 0: "tie"}
CI_NOTE = ("95% percentile-bootstrap CIs over pairs ({resamples} resamples): pairs are resampled, not segments, "
           "because the segments and answers of one pair are not independent")


def ratio_ci(numerator: np.ndarray, denominator: np.ndarray, index: np.ndarray) -> dict:
    """``{"mean", "ci95", "n"}``: sum(numerator) / sum(denominator) over pairs and its bootstrap interval from the
    resampled pair indices ``index`` (R, N); None values where the denominator is 0."""
    num, den = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    total = float(den.sum())
    if total == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    mean = float(num.sum() / total)
    if index.size == 0:
        return {"mean": mean, "ci95": [mean, mean], "n": int(total)}
    sums_num, sums_den = num[index].sum(axis=1), den[index].sum(axis=1)
    valid = sums_den > 0
    ratios = sums_num[valid] / sums_den[valid]
    low, high = np.percentile(ratios, [2.5, 97.5]) if ratios.size else (mean, mean)
    return {"mean": mean, "ci95": [float(low), float(high)], "n": int(total)}


def _level(judge: np.ndarray, human: np.ndarray, index: np.ndarray) -> dict:
    """The agreement rates of labels (N, K) (K segments, or 1 whole-video label) with per-pair bootstrap CIs."""
    same = judge == human
    judge_calls, human_calls = judge != 0, human != 0
    both = judge_calls & human_calls
    ones = np.ones_like(judge, dtype=np.float64)
    per_pair = lambda mask: mask.astype(np.float64).sum(axis=1)  # noqa: E731
    confusion = {f"human_{LABEL_NAMES[h]}": {f"judge_{LABEL_NAMES[j]}": int(((human == h) & (judge == j)).sum())
                                            for j in (1, -1, 0)} for h in (1, -1, 0)}
    return {
        "agreement": ratio_ci(per_pair(same), per_pair(ones), index),
        "decisive_agreement": ratio_ci(per_pair(same & both), per_pair(both), index),
        "coverage": ratio_ci(per_pair(both), per_pair(human_calls), index),
        "judge_tie_rate": ratio_ci(per_pair(~judge_calls), per_pair(ones), index),
        "human_tie_rate": ratio_ci(per_pair(~human_calls), per_pair(ones), index),
        "confusion": confusion,
    }


def _position_bias(orders: Sequence, index: np.ndarray) -> dict:
    """First-shown rate, tie-answer rate and order consistency of raw per-order answers, with CIs over pairs."""
    n = len(orders)
    first, picked, ties, answered, consistent, both = (np.zeros(n) for _ in range(6))
    for p, segments in enumerate(orders):
        for pair_answers in segments:
            given = [a for a in pair_answers if a is not None]
            first[p] += sum(a == "A" for a in given)
            picked[p] += sum(a in ("A", "B") for a in given)
            ties[p] += sum(a == "TIE" for a in given)
            answered[p] += len(given)
            if len(given) == 2:
                straight = {"A": 1, "B": -1, "TIE": 0}[pair_answers[0]]
                swapped = {"A": -1, "B": 1, "TIE": 0}[pair_answers[1]]
                both[p] += 1
                consistent[p] += straight == swapped
    return {"first_shown_rate": ratio_ci(first, picked, index),
            "tie_answer_rate": ratio_ci(ties, answered, index),
            "order_consistency": ratio_ci(consistent, both, index),
            "answers": int(answered.sum()), "answers_picking_a_video": int(picked.sum())}


def judge_agreement(judge: Tensor, human: Tensor, orders: Optional[Sequence] = None, *, resamples: int = 2000,
                    seed: int = 0) -> dict:
    """Agreement of ``judge`` (N, S) with ``human`` (N, S) labels at segment and video level, and the judge's
    position bias from ``orders`` (None: the judge does not ask in two orders), with 95% bootstrap CIs over
    pairs (module docstring). ``seed`` names the bootstrap's random stream."""
    judge = torch.as_tensor(judge).to(torch.int64)
    human = torch.as_tensor(human).to(torch.int64)
    if judge.dim() != 2 or judge.shape != human.shape:
        raise ValueError(f"judge and human labels must both be (N, S) of one shape, got {tuple(judge.shape)} and "
                         f"{tuple(human.shape)}")
    if orders is not None and len(orders) != judge.shape[0]:
        raise ValueError(f"orders has {len(orders)} pairs but the labels have {judge.shape[0]}")
    n = judge.shape[0]
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n)) if n and resamples > 0 else np.zeros((0, n), dtype=np.int64)
    j, h = judge.numpy(), human.numpy()
    jv, hv = np.sign(j.sum(axis=1, keepdims=True)), np.sign(h.sum(axis=1, keepdims=True))
    return {"pairs": n, "segments_per_pair": int(judge.shape[1]), "ci": CI_NOTE.format(resamples=resamples),
            "segment": _level(j, h, index), "video": _level(jv, hv, index),
            "position_bias": _position_bias(orders, index) if orders is not None else None}


def _rate(stats: Optional[dict]) -> str:
    if stats is None or stats["mean"] is None:
        return "n/a"
    low, high = stats["ci95"]
    return f"{stats['mean']:.3f} [{low:.3f}, {high:.3f}]"


def markdown_report(report: dict) -> str:
    """A short Markdown page of a ``judge_agreement`` report (plus what the caller added: judge, files)."""
    lines = [f"# Judge agreement: {report.get('judge', 'judge')} vs human labels", ""]
    for key in ("pairs_dir", "human_file", "model"):
        if report.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{report[key]}`")
    lines += [f"- pairs: {report['pairs']} ({report['segments_per_pair']} segments each)",
              f"- {report['ci']}", ""]
    lines += ["| rate | segment | video |", "|---|---|---|"]
    for name in ("agreement", "decisive_agreement", "coverage", "judge_tie_rate", "human_tie_rate"):
        lines.append(f"| {name.replace('_', ' ')} | {_rate(report['segment'][name])} | {_rate(report['video'][name])} |")
    bias = report.get("position_bias")
    lines.append("")
    if bias is None:
        lines.append("Position bias: n/a (this judge does not ask in both orders).")
    else:
        lines += ["| position bias | value |", "|---|---|",
                  f"| first-shown rate (unbiased: 0.5) | {_rate(bias['first_shown_rate'])} |",
                  f"| tie answers | {_rate(bias['tie_answer_rate'])} |",
                  f"| order consistency | {_rate(bias['order_consistency'])} |",
                  f"| answers (picking a video) | {bias['answers']} ({bias['answers_picking_a_video']}) |"]
    if report.get("failed_comparisons"):
        lines += ["", f"{report['failed_comparisons']} comparisons failed (no judgement): their "
                      f"{report.get('pairs_with_failed_comparisons', '?')} pairs are left out of the rates."]
    lines += ["", "Rates are mean [95% CI]. Agreement counts a tie as a label; decisive agreement is the judge's "
              "accuracy on segments both call; coverage is the share of people's calls the judge also makes."]
    return "\n".join(lines) + "\n"
