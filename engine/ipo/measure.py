"""What measures an iterate run: the shapes world's exact oracle, or (a prompt file) the judged evaluation.

The shapes world has an exact oracle, so a run there measures everything against it, and never trains on it after
the seed labels: the policy's score (``vidpo.evaluation.evaluate``), the critic's accuracy on fresh oracle-labelled
pairs and over every within-prompt pair of their videos (``fresh_pair_accuracy``), how often the oracle agrees with
the labels the policy trained on, and with the kept and dropped pseudo-labels (``pseudo_label_quality``). The
oracle also ranks a pool in the ceiling ablation (``oracle_scorer``).

A prompt file has no oracle: those measurements are absent from its rows, not estimated. Each round's policy is
compared with the initial policy by the judged evaluation (``vidpo.stages.judged_eval``: both models on the held-out
prompts from the same noise, decoded, judged video against video by ``eval.judge``; the win rate with its 95%
interval over prompts and the model-free video statistics), written to ``DIR/round_<r>/eval/``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo.data.oracle import COMPONENTS
from vidpo.data.pairs import MANIFEST_FILE
from vidpo.evaluation.evaluate import brief_ci, mean_ci
from vidpo.ipo.critic import PreferenceData, critic_accuracy, load_preference_data, pool_accuracy, pool_gain
from vidpo.ipo.dual import read_pseudo_rows
from vidpo.ipo.layout import RunLayout
from vidpo.ipo.pool import read_pool
from vidpo.models.critic import CriticScores
from vidpo.stages.judged_eval import judged_evaluation
from vidpo.stages.label import label_pairs


def oracle_label(run: RunLayout, pairs_dir: Path, *, granularity: str, tie_margin: float) -> None:
    """Label ``pairs_dir`` with the shapes oracle (skipped when labelled)."""
    if (pairs_dir / MANIFEST_FILE).exists():
        return
    cfg = copy.deepcopy(run.cfg)
    cfg.label.labeler, cfg.label.granularity, cfg.label.tie_margin = "oracle", granularity, tie_margin
    label_pairs(cfg, pairs_dir)


def oracle_video_labels(run: RunLayout, data: PreferenceData) -> torch.Tensor:
    """The oracle's whole-video verdicts (N,) of in-memory pairs (for measurements only, never for training)."""
    with torch.no_grad():
        d = (run.oracle.score(data.first[:], data.cond_ids).total.double()
             - run.oracle.score(data.second[:], data.cond_ids).total.double())
    return torch.sign(d).long()


def oracle_scorer(run: RunLayout):
    """The oracle as a ``vidpo.labeling.critic.PoolScorer`` (the ceiling ablation, ``iterate.round_labeler=oracle``)."""
    def score(videos: torch.Tensor, captions: Sequence[str], cond: torch.Tensor) -> CriticScores:
        with torch.no_grad():
            out = run.oracle.score(videos, cond, run.segment_ids)
        frames = torch.stack([out.frame_components[k] for k in COMPONENTS]).mean(0)
        return CriticScores(frames=frames, segments=out.segments, video=out.total)
    return score


def agreement(labels: torch.Tensor, truth: torch.Tensor) -> Optional[float]:
    keep = (labels != 0) & (truth != 0)
    return float((labels[keep] == truth[keep]).double().mean()) if bool(keep.any()) else None


def labels_agreement(run: RunLayout, pairs_dir: Path) -> float:
    """How often the oracle prefers the preferred video of labelled pairs (what the policy trains on)."""
    data = load_preference_data(pairs_dir, run.num_segments)
    return agreement(data.video_labels, oracle_video_labels(run, data))


def pseudo_label_quality(run: RunLayout, pairs_dir: Path) -> dict:
    """Oracle agreement of the kept and of the dropped pseudo-labels (a measurement; not used for training)."""
    rows = read_pseudo_rows(pairs_dir)
    videos, cond = read_pool(pairs_dir)   # each pair is two indices into the round's videos: score each once
    with torch.no_grad():
        truth_scores = run.oracle.score(videos, cond).total.double()
    first = torch.tensor([r["first_video"] for r in rows], dtype=torch.long)
    second = torch.tensor([r["second_video"] for r in rows], dtype=torch.long)
    truth = torch.sign(truth_scores[first] - truth_scores[second]).long()
    votes = torch.tensor([r["video_label"] for r in rows], dtype=torch.long)
    kept = torch.tensor([bool(r["kept"]) for r in rows], dtype=torch.bool)
    return {"oracle_agreement_kept": agreement(votes[kept], truth[kept]),
            "oracle_agreement_dropped": agreement(votes[~kept], truth[~kept]),
            "oracle_agreement_all_votes": agreement(votes, truth)}


class FreshPairs:
    """A round's fresh oracle-labelled pairs (``DIR/round_<r>/pairs_eval``) and every within-prompt pair of their
    videos: the critic's accuracy on both (``vidpo.ipo.critic.critic_accuracy`` / ``pool_accuracy``)."""

    def __init__(self, run: RunLayout, pairs_dir: Path):
        self.run = run
        self.pairs = load_preference_data(pairs_dir, run.num_segments)
        self.videos = torch.cat([self.pairs.first[:], self.pairs.second[:]])
        self.cond = torch.cat([self.pairs.cond_ids, self.pairs.cond_ids])
        with torch.no_grad():
            self.truth = run.oracle.score(self.videos, self.cond).total

    def accuracy(self, critic) -> dict:
        return critic_accuracy(critic, self.pairs, self.run.world, self.run.segment_ids)

    def pool(self, critic) -> dict:
        return pool_accuracy(critic, self.videos, self.cond, self.truth, self.run.world, self.run.segment_ids)

    def row(self, before: dict, pool_before: dict, after: Optional[dict] = None,
            pool_after: Optional[dict] = None) -> dict:
        """The round row's critic-accuracy fields (before -> after refinement when the critic was refined)."""
        if after is None:
            return {"critic_accuracy": before["accuracy"], "critic_accuracy_before_refine": None,
                    "critic_accuracy_pool": pool_before["accuracy"], "critic_accuracy_pool_before_refine": None}
        return {"critic_accuracy": after["accuracy"], "critic_accuracy_before_refine": before["accuracy"],
                "critic_accuracy_gain": brief_ci(mean_ci(after["correct"] - before["correct"])),
                "critic_accuracy_pool": pool_after["accuracy"],
                "critic_accuracy_pool_before_refine": pool_before["accuracy"],
                "critic_accuracy_pool_gain": brief_ci(pool_gain(pool_after, pool_before))}


def judged_round(run: RunLayout, r: int, base: torch.nn.Module, policy: torch.nn.Module) -> dict:
    """Policy r against the initial policy on the held-out prompts (``vidpo.stages.judged_eval``), into
    ``DIR/round_<r>/eval/``; its summary (win rate with a 95% CI over prompts, ties, video statistics)."""
    parts = run.parts
    judged = judged_evaluation(run.cfg, run.out / f"round_{r}", base=base, policy=policy, domain=parts.domain,
                               conditioning=parts.conditioning, vae=parts.vae, write=run.is_main,
                               parallel=run.parallel)
    return judged if judged is not None else {"judge": "none"}
