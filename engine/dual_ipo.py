"""Dual-IPO critic self-refinement: pseudo-labels by majority vote, filtered and weighted by the PCE.

Dual-IPO (arXiv:2502.02088, "Self-Refined Preference Optimization") refines the critic between rounds
without new human labels:

1. **Votes.** The critic labels each new pair ``K`` times (``iterate.votes``), every pass stochastic:
   Monte-Carlo dropout with its own seed and, with ``iterate.vote_augment``, a different label-preserving
   view of the pair (``vidpo.critic.Symmetries``: flips and time reversal with the caption mapped). The
   order of a pair needs no swapping: the critic scores each video on its own, so ``d(a, b) = -d(b, a)``
   holds exactly. A pass calls a tie when the critic's probability of the winner is below
   ``iterate.vote_min_confidence``. The pseudo-label is the **mode** of the K labels in {-1, 0, +1} (a tie
   between the counts of two labels gives 0); ``agreement`` = its count / K. A tie vote is not kept.

2. **Preference Certainty Estimate.** The paper defines the PCE from DPO's implicit reward
   ``R(y|x) = log pi_theta(y|x) / pi_ref(y|x)`` and the dataset-average reward ``Q`` but its equation did
   not survive; vidpo implements, for a pseudo-label saying ``y_w`` beats ``y_l``::

       R(y|x)   = -beta * mean_m [ err_theta(y; t_m, eps_m) - err_ref(y; t_m, eps_m) ]          (Diffusion-DPO)
       err(y; t, eps) = mean_{C,T,H,W} (v(x_t, t, x) - (eps - y))^2,   x_t = (1 - t) y + t eps
       Q        = mean of R over the 2N videos of the N pairs being pseudo-labelled
       tau      = iterate.pce_temperature, or (when 0) the standard deviation of R over those 2N videos
       PCE      = 1/2 * [ sigmoid((R(y_w|x) - Q) / tau) + sigmoid((Q - R(y_l|x)) / tau) ]

   ``(t_m, eps_m)``, m = 1..M (``iterate.pce_timesteps``), are drawn once per pair and shared by its two
   videos, ``t`` in ``[flow.t_min, flow.t_max]`` as in training; theta is the policy that generated the
   pairs and ref its reference in the round that trained it. The two terms are KTO-style values of the
   winner above the population's reference point and of the loser below it, so PCE is in (0, 1), equals
   1/2 when the policy is indifferent, and **PCE > 1/2 exactly when R(y_w|x) > R(y_l|x)**: the policy's
   implicit reward agrees with the critic's vote (Q shifts both terms equally and cancels from that
   decision). Q and tau matter for the *weight*: a winner well above the average and a loser well below
   it give PCE near 1, two videos on the same side of Q give PCE near 1/2. Dividing by tau makes the PCE
   independent of beta's scale.

3. **Filter and weight.** Pseudo-labels with ``PCE > iterate.pce_threshold`` (0.5) are kept; the critic
   is retrained from scratch on the seed labels (weight 1) plus the kept pseudo-labels (weight = PCE) with
   the weighted Bradley-Terry loss of ``vidpo.critic.critic_loss``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from vidpo import atomic
from vidpo.critic import (PreferenceData, Symmetries, labels_from_differences, score_videos, tie_margin_of)
from vidpo.models import flow
from vidpo.seeding import derive_seed, generator

log = logging.getLogger("vidpo")

PSEUDO_FILE = "pseudo.jsonl"
"""Pseudo-labels of a pairs directory (every voted pair, with its PCE and whether it was kept)."""

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class VoteResult:
    """Majority vote of K critic passes over B pairs with S segments."""

    labels: torch.Tensor        # (B, S) int64: mode of the passes' segment labels ('segment' granularity),
                                # else the whole-video vote copied to every segment
    video_labels: torch.Tensor  # (B,) int64 mode of the passes' whole-video labels
    agreement: torch.Tensor     # (B,) float: share of the passes that gave the video label
    passes: torch.Tensor        # (K, B) int64 each pass' whole-video label


def mode_vote(votes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode over dim 0 of labels in {-1, 0, +1}: ``(K, ...) -> (label (...), share of K (...))``.

    When the two most frequent labels have equal counts the result is 0 (no majority)."""
    counts = torch.stack([(votes == v).sum(0) for v in (-1, 0, 1)], dim=-1)    # (..., 3)
    top, arg = counts.max(-1)
    contested = (counts == top.unsqueeze(-1)).sum(-1) > 1
    label = torch.where(contested, torch.zeros_like(arg), arg - 1)
    share = torch.where(contested, torch.zeros_like(top), top).double() / votes.shape[0]
    return label.long(), share


def critic_votes(critic, first: torch.Tensor, second: torch.Tensor, cond_ids: torch.Tensor, world,
                 segment_ids: torch.Tensor, *, passes: int, seed: int, dropout: bool = True, augment: bool = True,
                 tie_margin: Optional[float] = None, min_confidence: float = 0.0, granularity: str = "video",
                 batch_size: int = 128) -> VoteResult:
    """K stochastic critic passes over the pairs (first[i], second[i]) and their majority vote (module doc)."""
    if passes < 1:
        raise ValueError(f"iterate.votes must be >= 1, got {passes}")
    symmetries = Symmetries(world, segment_ids)
    margin = tie_margin_of(critic, tie_margin, min_confidence)
    seg_votes, video_votes = [], []
    for k in range(passes):
        view = k % len(symmetries) if augment else 0
        kw = dict(batch_size=batch_size, symmetries=symmetries, view=view,
                  dropout_seed=derive_seed(seed, "vote", k) if dropout else None)
        a = score_videos(critic, first, cond_ids, world, segment_ids, **kw)
        b = score_videos(critic, second, cond_ids, world, segment_ids, **kw)
        seg_votes.append(labels_from_differences(a.segments - b.segments, margin))
        video_votes.append(labels_from_differences(a.video - b.video, margin))
    video_stack = torch.stack(video_votes)
    video, agreement = mode_vote(video_stack)
    if granularity == "segment":
        labels, _ = mode_vote(torch.stack(seg_votes))
    else:   # one verdict per pair, copied to every segment (as the critic labeller does)
        labels = video[:, None].expand(-1, seg_votes[0].shape[1]).contiguous()
    return VoteResult(labels=labels, video_labels=video, agreement=agreement.float(), passes=video_stack)


@torch.no_grad()
def implicit_rewards(policy: VelocityFn, reference: VelocityFn, first: torch.Tensor, second: torch.Tensor,
                     tokens: torch.Tensor, *, beta: float, seed: int, draws: int, t_min: float, t_max: float,
                     batch_size: int = 64, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """DPO implicit rewards R (B,), (B,) of the two videos of each pair (formula in the module doc).

    ``policy`` / ``reference`` map ``(x_t, t, tokens) -> v``. Draw m of pair i uses the stream
    ``(seed, "pce", m, i)``, whatever the batching."""
    rewards = torch.zeros(2, first.shape[0], dtype=torch.float64)
    for start in range(0, first.shape[0], batch_size):
        rows = range(start, min(first.shape[0], start + batch_size))
        x0 = torch.cat([first[rows.start:rows.stop], second[rows.start:rows.stop]]).float().to(device)
        tok = tokens[rows.start:rows.stop].to(device)
        tok2 = torch.cat([tok, tok])
        for m in range(draws):
            gens = [generator(seed, "pce", m, i) for i in rows]
            t = torch.cat([flow.sample_timesteps(1, g, t_min=t_min, t_max=t_max) for g in gens])
            eps = torch.stack([torch.randn(first.shape[1:], generator=g) for g in gens])
            t2, eps2 = torch.cat([t, t]).to(device), torch.cat([eps, eps]).to(device)
            x_t = flow.interpolate(x0, eps2, t2)
            target = eps2 - x0
            err_theta = (policy(x_t, t2, tok2).float() - target).pow(2).mean((1, 2, 3, 4))
            err_ref = (reference(x_t, t2, tok2).float() - target).pow(2).mean((1, 2, 3, 4))
            r = (-beta * (err_theta - err_ref)).double().cpu() / draws
            n = len(rows)
            rewards[0, rows.start:rows.stop] += r[:n]
            rewards[1, rows.start:rows.stop] += r[n:]
    return rewards[0], rewards[1]


def preference_certainty(r_first: torch.Tensor, r_second: torch.Tensor, video_labels: torch.Tensor, *,
                         temperature: float = 0.0) -> tuple[torch.Tensor, float, float]:
    """PCE (B,) of pseudo-labels ``video_labels`` (B,) given implicit rewards (B,), (B,); returns (pce, Q, tau).

    PCE = 1/2 [sigmoid((R_w - Q) / tau) + sigmoid((Q - R_l) / tau)] (module doc); a tie vote gets PCE 0."""
    rewards = torch.cat([r_first, r_second]).double()
    q = float(rewards.mean())
    tau = float(temperature) if temperature > 0 else float(rewards.std(unbiased=False))
    tau = max(tau, 1e-12)
    first_wins = video_labels > 0
    r_w = torch.where(first_wins, r_first.double(), r_second.double())
    r_l = torch.where(first_wins, r_second.double(), r_first.double())
    pce = 0.5 * (torch.sigmoid((r_w - q) / tau) + torch.sigmoid((q - r_l) / tau))
    return torch.where(video_labels != 0, pce, torch.zeros_like(pce)), q, tau


# ----- one refinement's pseudo-labels -------------------------------------------------------------------
def pseudo_label_pairs(pairs_dir: str | Path, critic, policy: VelocityFn, reference: VelocityFn, cfg, world,
                       segment_ids: torch.Tensor, *, stream: tuple = ("pseudo",), device="cpu") -> dict:
    """Vote, compute the PCE and write ``pairs_dir/pseudo.jsonl`` (every pair, its vote, PCE, ``kept``).

    Reads the unlabelled ``pairs.jsonl`` of ``pairs_dir``. Returns counts and the reward statistics."""
    from vidpo.data.pairs import PAIRS_FILE, ShardReader, read_manifest

    pairs_dir = Path(pairs_dir)
    records, _ = read_manifest(pairs_dir / PAIRS_FILE, need_labels=False, on_error="skip")
    reader = ShardReader(pairs_dir)
    first = torch.stack([reader.get(r, "first") for r in records]).float()
    second = torch.stack([reader.get(r, "second") for r in records]).float()
    cond_ids = torch.tensor([r.cond_ids for r in records], dtype=torch.long)
    it = cfg.iterate
    seed = derive_seed(cfg.seed, *stream)
    votes = critic_votes(critic, first, second, cond_ids, world, segment_ids, passes=it.votes, seed=seed,
                         dropout=it.vote_dropout, augment=it.vote_augment, tie_margin=cfg.critic.tie_margin,
                         min_confidence=it.vote_min_confidence, granularity=cfg.critic.granularity,
                         batch_size=cfg.critic.batch_size_eval)
    r_first, r_second = implicit_rewards(policy, reference, first, second, world.tokens(cond_ids),
                                         beta=cfg.pref.beta, seed=seed, draws=it.pce_timesteps,
                                         t_min=cfg.flow.t_min, t_max=cfg.flow.t_max, device=device)
    pce, q, tau = preference_certainty(r_first, r_second, votes.video_labels, temperature=it.pce_temperature)
    kept = (pce > it.pce_threshold) & (votes.video_labels != 0)
    lines = []
    for i, rec in enumerate(records):
        row = json.loads(rec.to_json())
        row.update({"labels": votes.labels[i].tolist(), "video_label": int(votes.video_labels[i]),
                    "label_source": "critic-vote", "agreement": round(float(votes.agreement[i]), 4),
                    "reward_first": float(r_first[i]), "reward_second": float(r_second[i]),
                    "pce": round(float(pce[i]), 6), "weight": round(float(pce[i]), 6), "kept": bool(kept[i])})
        lines.append(json.dumps(row))
    atomic.write_text(pairs_dir / PSEUDO_FILE, "\n".join(lines) + "\n")
    stats = {"pairs": len(records), "vote_ties": int((votes.video_labels == 0).sum()), "kept": int(kept.sum()),
             "kept_fraction": float(kept.double().mean()), "reward_mean_Q": q, "reward_std_tau": tau,
             "mean_agreement": float(votes.agreement.mean()),
             "pce_mean_kept": float(pce[kept].mean()) if bool(kept.any()) else None}
    log.info("dual-ipo: %d pairs voted (%d ties), %d pseudo-labels kept with PCE > %.2f (Q=%.4f, tau=%.4f)",
             stats["pairs"], stats["vote_ties"], stats["kept"], it.pce_threshold, q, tau)
    return stats


def load_pseudo_labels(pairs_dir: str | Path, num_segments: int, *, kept_only: bool = True) -> Optional[PreferenceData]:
    """The (kept) pseudo-labels of ``pairs_dir/pseudo.jsonl`` as weighted preference data (weight = PCE)."""
    from vidpo.critic import load_preference_data
    from vidpo.data.pairs import read_manifest

    path = Path(pairs_dir) / PSEUDO_FILE
    records, _ = read_manifest(path, need_labels=True, on_error="skip", num_segments=num_segments)
    if kept_only:
        records = [r for r in records if r.extra.get("kept")]
    if not records:
        return None
    return load_preference_data(pairs_dir, num_segments, records=records)
