"""Dual-IPO critic self-refinement: pseudo-labels by majority vote, filtered and weighted by the PCE.

Dual-IPO (arXiv:2502.02088, "Self-Refined Preference Optimization") refines the critic between rounds
without new human labels:

1. **Votes.** The critic labels each new pair ``K`` times (``iterate.votes``), every pass stochastic:
   Monte-Carlo dropout with its own seed (the toy network's dropout; the VLM critic's head and LoRA dropout)
   and, with ``iterate.vote_augment``, a different label-preserving view of the pair (the critic's ``views``:
   the shapes world's flips and time reversal with the caption mapped; a VLM critic has the identity alone). The
   order of a pair needs no swapping: the critic scores each video on its own, so ``d(a, b) = -d(b, a)``
   holds exactly. A pass calls a tie when the critic's probability of the winner is below
   ``iterate.vote_min_confidence`` (and, with ``iterate.vote_keep_fraction`` f > 0, outside the pass' fraction f
   of the pairs with the largest score gap). The pseudo-label is the **mode** of the K labels in {-1, 0, +1} (a tie
   between the counts of two labels gives 0); ``agreement`` = its count / K. A tie vote is not kept. The
   "new pairs" are the round's generated pairs, or (``iterate.refine_pairs: within_prompt``) every pair of
   two of the round's videos with one prompt: ~2N^2 / prompts pairs instead of N for the same scoring cost,
   since each pass scores each video once.

2. **Preference Certainty Estimate.** The paper defines the PCE from DPO's implicit reward
   ``R(y|x) = log pi_theta(y|x) / pi_ref(y|x)`` and the dataset-average reward ``Q`` but its equation did
   not survive; vidpo implements, for a pseudo-label saying ``y_w`` beats ``y_l``::

       R(y|x)   = -beta * mean_m [ err_theta(y; t_m, eps_m) - err_ref(y; t_m, eps_m) ]          (Diffusion-DPO)
       err(y; t, eps) = mean_{C,T,H,W} (v(x_t, t, x) - (eps - y))^2,   x_t = (1 - t) y + t eps

   (a diffusers model's own forward process, target and timestep draw where it has them: ``process``; y is then
   the video's latents and x the prompt's text embeddings)
       Q        = mean of R over the round's 2N videos (each once, however many pairs it is in)
       tau      = iterate.pce_temperature, or (when 0) the standard deviation of R over those 2N videos
       PCE      = 1/2 * [ sigmoid((R(y_w|x) - Q) / tau) + sigmoid((Q - R(y_l|x)) / tau) ]

   ``(t_m, eps_m)``, m = 1..M (``iterate.pce_timesteps``), are drawn once per pair and shared by its two
   videos (within-prompt pairs: once per prompt, shared by all its videos), ``t`` in ``[flow.t_min,
   flow.t_max]`` as in training; theta is the policy that generated the pairs and ref its reference in the
   round that trained it. The two terms are KTO-style values of the
   winner above the population's reference point and of the loser below it, so PCE is in (0, 1), equals
   1/2 when the policy is indifferent, and **PCE > 1/2 exactly when R(y_w|x) > R(y_l|x)**: the policy's
   implicit reward agrees with the critic's vote (Q shifts both terms equally and cancels from that
   decision). Q and tau matter for the *weight*: a winner well above the average and a loser well below
   it give PCE near 1, two videos on the same side of Q give PCE near 1/2. Dividing by tau makes the PCE
   independent of beta's scale.

3. **Filter and weight.** Pseudo-labels with ``PCE > iterate.pce_threshold`` (0.5) are kept; the critic
   is retrained from scratch (``iterate.refine_steps``) on the seed labels (weight 1) plus the kept
   pseudo-labels (weight = PCE) with the weighted Bradley-Terry loss of ``vidpo.ipo.critic.critic_loss``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from vidpo.data.video_rows import load_if_small
from vidpo.ipo.critic import PreferenceData, pairs_within
from vidpo.ipo.pool import POOL_CHUNK_BYTES, VideoPool, pool_videos
from vidpo.labeling.answer_cache import AnswerCache
from vidpo.labeling.base import PairBatch
from vidpo.labeling.critic import as_critic, labels_from_differences, score_clips, tie_margin_of
from vidpo.labeling.vlm import VLMConfig, VLMLabeler
from vidpo.models import flow
from vidpo.utils import atomic
from vidpo.utils.seeding import derive_seed, generator

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
    n = first.shape[0]
    return indexed_votes(critic, torch.cat([first, second]), torch.cat([cond_ids, cond_ids]), torch.arange(n),
                         torch.arange(n, 2 * n), world, segment_ids, passes=passes, seed=seed, dropout=dropout,
                         augment=augment, tie_margin=tie_margin, min_confidence=min_confidence,
                         granularity=granularity, batch_size=batch_size)


def indexed_votes(critic, videos: torch.Tensor, cond_ids: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                  world, segment_ids: torch.Tensor, **kw) -> VoteResult:
    """``pool_votes`` for the shapes world: videos (N, C, T, H, W) of the conditions ``cond_ids`` (N, 3)."""
    return pool_votes(as_critic(critic, world), videos, world.captions(cond_ids), first, second, segment_ids, **kw)


def pool_votes(critic, videos: torch.Tensor, captions, first: torch.Tensor, second: torch.Tensor,
               segment_ids: torch.Tensor, *, passes: int, seed: int, dropout: bool = True, augment: bool = True,
               tie_margin: Optional[float] = None, min_confidence: float = 0.0, keep_fraction: float = 0.0,
               granularity: str = "video", batch_size: int = 128) -> VoteResult:
    """The votes of ``critic_votes`` over pairs given as indices into one set of videos (N, 3, T, H, W) with their
    captions: pair i is ``(videos[first[i]], videos[second[i]])``, both of one prompt.

    ``keep_fraction`` f > 0 replaces the fixed margin with one per pass: each pass votes only on its fraction f
    of the pairs with the largest |score difference| (and calls the rest ties), so a sharper critic does not let
    more votes through than a blunter one (``iterate.vote_keep_fraction``).

    The critic scores each video on its own, so one pass scores each of the N videos once, in that pass' view
    and dropout draw, whatever the number of pairs (the within-prompt pairs of N videos are ~N^2 / 2 / prompts)."""
    if passes < 1:
        raise ValueError(f"iterate.votes must be >= 1, got {passes}")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"iterate.vote_keep_fraction must be in [0, 1], got {keep_fraction}")
    views = critic.views(segment_ids)
    margin = tie_margin_of(critic, tie_margin, min_confidence)
    seg_votes, video_votes = [], []
    for k in range(passes):
        view = k % len(views) if augment else 0
        s = score_clips(critic, videos, captions, segment_ids, batch_size=batch_size, views=views, view=view,
                        dropout_seed=derive_seed(seed, "vote", k) if dropout else None)
        d_seg, d_video = s.segments[first] - s.segments[second], s.video[first] - s.video[second]
        seg_margin = video_margin = margin
        if keep_fraction > 0:   # the (1 - f) quantile of this pass' |d|: only larger differences vote
            video_margin = max(margin, float(torch.quantile(d_video.abs().double(), 1.0 - keep_fraction)))
            seg_margin = max(margin, float(torch.quantile(d_seg.abs().double().flatten(), 1.0 - keep_fraction)))
        seg_votes.append(labels_from_differences(d_seg, seg_margin))
        video_votes.append(labels_from_differences(d_video, video_margin))
    video_stack = torch.stack(video_votes)
    video, agreement = mode_vote(video_stack)
    if granularity == "segment":
        labels, _ = mode_vote(torch.stack(seg_votes))
    else:   # one verdict per pair, copied to every segment (as the critic labeller does)
        labels = video[:, None].expand(-1, seg_votes[0].shape[1]).contiguous()
    return VoteResult(labels=labels, video_labels=video, agreement=agreement.float(), passes=video_stack)


def _signed(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels as a ``PairBatch`` holds them, in [-1, 1]: a decoded pool's uint8 frames are mapped there."""
    return pixels.float() / 127.5 - 1.0 if pixels.dtype == torch.uint8 else pixels


JUDGE_VOTES_FILE = "vlm_votes.jsonl"
"""The answers of the judge's voting passes, beside the pairs (``vidpo.labeling.answer_cache``)."""


def vote_batch_pairs(videos, cap: int = 64, budget: int = POOL_CHUNK_BYTES) -> int:
    """Pairs per judge batch: ``cap``, or fewer when their two videos each would hold more than ``budget`` bytes
    (a decoded Wan 480p video is 97 MB: 11 pairs in 2 GiB, where 64 would stack 12 GB of frames)."""
    first = videos[0]
    per_video = first.numel() * first.element_size()
    return max(1, min(cap, budget // max(1, 2 * per_video)))


def judge_votes(config: VLMConfig, videos: torch.Tensor, captions, first: torch.Tensor, second: torch.Tensor,
                segment_ids: torch.Tensor, fps: float, *, passes: int, seed: int, temperature: float,
                granularity: str = "video", cache: Optional[AnswerCache] = None,
                batch_size: Optional[int] = None) -> VoteResult:
    """The votes of ``pool_votes`` from K sampled judgements of a served VLM judge instead of critic passes.

    Pass k asks every pair (every segment, in both orders, as ``vidpo.labeling.vlm`` does) at ``temperature`` with
    the request seed ``derive_seed(seed, "judge-vote", k)``: the seed makes the passes distinct requests (the answer
    cache keys them apart, so a rerun asks nothing again) and repeatable on a server that honours it. A pass' label
    is the order-swap-consistent verdict (an inconsistent or failed comparison is that pass' tie); the
    pseudo-label is the mode over the K passes, per video and, with ``granularity`` 'segment', per segment.
    ``batch_size`` pairs are stacked at a time (default ``vote_batch_pairs``); the votes do not depend on it."""
    if passes < 1:
        raise ValueError(f"iterate.votes must be >= 1, got {passes}")
    batch_size = batch_size or (vote_batch_pairs(videos) if len(first) else 1)
    seg_votes, video_votes = [], []
    for k in range(passes):
        extra = dict(config.extra_body, seed=derive_seed(seed, "judge-vote", k) % 2 ** 31)
        labeler = VLMLabeler(dataclasses.replace(config, temperature=temperature, extra_body=extra), cache=cache)
        seg, video = [], []
        for start in range(0, len(first), batch_size):
            a, b = first[start:start + batch_size], second[start:start + batch_size]
            batch = PairBatch(first=_signed(videos[a]), second=_signed(videos[b]), captions=[captions[int(i)] for i in a],
                              pair_ids=[f"vote-{int(i):06d}-{int(j):06d}" for i, j in zip(a, b)],
                              segment_ids=segment_ids, fps=fps)
            result = labeler.label(batch)
            seg.append(result.labels.to(torch.int64))
            video.append(result.video_labels.to(torch.int64))
        seg_votes.append(torch.cat(seg))
        video_votes.append(torch.cat(video))
    video_stack = torch.stack(video_votes)
    video_labels, agreement = mode_vote(video_stack)
    if granularity == "segment":
        labels, _ = mode_vote(torch.stack(seg_votes))
    else:
        labels = video_labels[:, None].expand(-1, seg_votes[0].shape[1]).contiguous()
    return VoteResult(labels=labels, video_labels=video_labels, agreement=agreement.float(), passes=video_stack)


def implicit_rewards(policy: VelocityFn, reference: VelocityFn, first: torch.Tensor, second: torch.Tensor,
                     tokens: torch.Tensor, *, beta: float, seed: int, draws: int, t_min: float, t_max: float,
                     batch_size: int = 64, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """DPO implicit rewards R (B,), (B,) of the two videos of each pair (formula in the module doc).

    ``policy`` / ``reference`` map ``(x_t, t, tokens) -> v``. Draw m of pair i uses the stream
    ``(seed, "pce", m, i)`` for both of its videos, whatever the batching."""
    n = first.shape[0]
    keys = torch.cat([torch.arange(n), torch.arange(n)])
    rewards = video_implicit_rewards(policy, reference, torch.cat([first, second]), torch.cat([tokens, tokens]), keys,
                                     beta=beta, seed=seed, draws=draws, t_min=t_min, t_max=t_max,
                                     batch_size=2 * batch_size, device=device)
    return rewards[:n], rewards[n:]


@torch.no_grad()
def video_implicit_rewards(policy: VelocityFn, reference: VelocityFn, videos: torch.Tensor, tokens: torch.Tensor,
                           keys: torch.Tensor, *, beta: float, seed: int, draws: int, t_min: float, t_max: float,
                           batch_size: int = 128, device="cpu", process=None) -> torch.Tensor:
    """Implicit rewards R (N,) of N videos; video i's draw m uses the stream ``(seed, "pce", m, keys[i])``.

    Videos that are compared share a key (the two of a pair, or every video of one prompt), so their rewards see
    the same (t, noise) draws and the draws' variance cancels from R(y_w) - R(y_l), the PCE's decision.

    ``process``: a diffusers model's hooks (``sample_timesteps``, ``interpolate``, ``training_target``: its own
    forward process and target, timesteps in [t_min, t_max]); None: the rectified flow of the shapes world."""
    if process is not None:
        return _process_rewards(policy, reference, videos, tokens, keys, beta=beta, seed=seed, draws=draws,
                                t_range=_TimeRange(t_min, t_max), batch_size=batch_size, device=device,
                                process=process)
    rewards = torch.zeros(videos.shape[0], dtype=torch.float64)
    for start in range(0, videos.shape[0], batch_size):
        rows = range(start, min(videos.shape[0], start + batch_size))
        x0 = videos[rows.start:rows.stop].float().to(device)
        tok = tokens[rows.start:rows.stop].to(device)
        for m in range(draws):
            gens = [generator(seed, "pce", m, int(keys[i])) for i in rows]
            t = torch.cat([flow.sample_timesteps(1, g, t_min=t_min, t_max=t_max) for g in gens]).to(device)
            eps = torch.stack([torch.randn(videos.shape[1:], generator=g) for g in gens]).to(device)
            x_t = flow.interpolate(x0, eps, t)
            target = eps - x0
            err_theta = (policy(x_t, t, tok).float() - target).pow(2).mean((1, 2, 3, 4))
            err_ref = (reference(x_t, t, tok).float() - target).pow(2).mean((1, 2, 3, 4))
            rewards[rows.start:rows.stop] += (-beta * (err_theta - err_ref)).double().cpu() / draws
    return rewards


class _TimeRange:
    """The flow fields a diffusers model's ``sample_timesteps`` reads: a standard logit-normal in [t_min, t_max]."""

    def __init__(self, t_min: float, t_max: float):
        self.logit_mean, self.logit_std, self.t_min, self.t_max = 0.0, 1.0, t_min, t_max


def _process_rewards(policy: VelocityFn, reference: VelocityFn, videos: torch.Tensor, tokens: torch.Tensor,
                     keys: torch.Tensor, *, beta: float, seed: int, draws: int, t_range: _TimeRange, batch_size: int,
                     device, process) -> torch.Tensor:
    """``video_implicit_rewards`` through a model's own forward process, target and timestep draw."""
    rewards = torch.zeros(videos.shape[0], dtype=torch.float64)
    for start in range(0, videos.shape[0], batch_size):
        rows = range(start, min(videos.shape[0], start + batch_size))
        x0 = videos[rows.start:rows.stop].float().to(device)
        tok = tokens[rows.start:rows.stop].to(device)
        for m in range(draws):
            gens = [generator(seed, "pce", m, int(keys[i])) for i in rows]
            t = torch.cat([process.sample_timesteps(1, g, t_range) for g in gens]).to(device)
            eps = torch.stack([torch.randn(videos.shape[1:], generator=g) for g in gens]).to(device)
            x_t = process.interpolate(x0, eps, t)
            target = process.training_target(x0, eps, t).float()
            err_theta = (policy(x_t, t, tok).float() - target).pow(2).flatten(1).mean(1)
            err_ref = (reference(x_t, t, tok).float() - target).pow(2).flatten(1).mean(1)
            rewards[rows.start:rows.stop] += (-beta * (err_theta - err_ref)).double().cpu() / draws
    return rewards


def preference_certainty(r_first: torch.Tensor, r_second: torch.Tensor, video_labels: torch.Tensor, *,
                         temperature: float = 0.0, population: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, float, float]:
    """PCE (B,) of pseudo-labels ``video_labels`` (B,) given implicit rewards (B,), (B,); returns (pce, Q, tau).

    PCE = 1/2 [sigmoid((R_w - Q) / tau) + sigmoid((Q - R_l) / tau)] (module doc); a tie vote gets PCE 0.
    Q and tau are the mean and standard deviation of ``population`` (the rewards of every video once), by
    default of the 2B rewards given (right when each video is in one pair)."""
    rewards = (torch.cat([r_first, r_second]) if population is None else population).double()
    q = float(rewards.mean())
    tau = float(temperature) if temperature > 0 else float(rewards.std(unbiased=False))
    tau = max(tau, 1e-12)
    first_wins = video_labels > 0
    r_w = torch.where(first_wins, r_first.double(), r_second.double())
    r_l = torch.where(first_wins, r_second.double(), r_first.double())
    pce = 0.5 * (torch.sigmoid((r_w - q) / tau) + torch.sigmoid((q - r_l) / tau))
    return torch.where(video_labels != 0, pce, torch.zeros_like(pce)), q, tau


# ----- one refinement's pseudo-labels -------------------------------------------------------------------
def refinement_pairs(keys: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which pairs of a round's pool of 2N videos (the generated pairs' first videos, then their second ones; ``keys``
    (2N,) their prompt keys, ``vidpo.ipo.pairing.prompt_keys``) are pseudo-labelled (``iterate.refine_pairs``):
    ``(first (P,), second (P,), draw keys (2N,))``.

    'generated': the N generated pairs (i, N + i); the implicit-reward draws are shared per pair.
    'within_prompt': every pair of two videos of one prompt (``vidpo.ipo.critic.pairs_within``); the draws
    are shared per prompt, so every compared pair shares them."""
    n = keys.shape[0] // 2
    if mode == "generated":
        return torch.arange(n), torch.arange(n, 2 * n), torch.cat([torch.arange(n), torch.arange(n)])
    if mode == "within_prompt":
        first, second = pairs_within(keys)
        return first, second, keys.long()
    raise ValueError(f"iterate.refine_pairs must be 'generated' or 'within_prompt', got {mode!r}")


def pool_implicit_rewards(pool: VideoPool, policy: VelocityFn, reference: VelocityFn, cfg, *, tokens: torch.Tensor,
                          stream: tuple = ("pseudo",), device="cpu", process=None,
                          videos: Optional[Sequence[int]] = None) -> torch.Tensor:
    """The implicit rewards ``pseudo_label_pairs`` reads, of the pool's ``videos`` (default: all), in that order.
    Each video's draws depend on its key alone (``video_implicit_rewards``), so the rewards of a share of the
    videos equal those of the whole pool: ranks can each compute theirs (``vidpo.ipo.rounds``)."""
    it = cfg.iterate
    _, _, keys = refinement_pairs(pool.keys, it.refine_pairs)
    rows = list(range(len(pool))) if videos is None else list(videos)
    if not rows:
        return torch.zeros(0, dtype=torch.float64)
    return video_implicit_rewards(policy, reference, pool.latents.take(rows), tokens[rows], keys[rows],
                                  beta=cfg.pref.beta, seed=derive_seed(cfg.seed, *stream), draws=it.pce_timesteps,
                                  t_min=cfg.flow.t_min,
                                  t_max=cfg.flow.t_max, device=device, process=process)


def pseudo_label_pairs(pairs_dir: str | Path, pool: VideoPool, critic, policy: Optional[VelocityFn],
                       reference: Optional[VelocityFn], cfg, segment_ids: torch.Tensor, *, tokens: torch.Tensor,
                       stream: tuple = ("pseudo",), device="cpu", process=None, fps: float = 8.0,
                       rewards: Optional[torch.Tensor] = None) -> dict:
    """Vote, compute the PCE and write ``pairs_dir/pseudo.jsonl`` (every voted pair, its vote, PCE, ``kept``).

    ``pool`` is the videos of the unlabelled ``pairs.jsonl`` of ``pairs_dir`` (``vidpo.ipo.pairing.read_video_pool``):
    the critic (or, with ``iterate.vote_source: judge``, the served judge at ``fps``) votes on its pixels, the
    implicit rewards read its latents with ``tokens`` (2N, ...), the model
    conditioning of each video (``process``: a diffusers model's hooks, ``video_implicit_rewards``). It votes on
    the pairs ``iterate.refine_pairs`` names; each line gives the pair's two videos as indices into the pool
    (``first_video``, ``second_video``). ``rewards``: the pool's implicit rewards when already computed
    (``pool_implicit_rewards``; ``policy`` and ``reference`` are then not used). Returns counts and the reward
    statistics."""
    pairs_dir = Path(pairs_dir)
    it = cfg.iterate
    first, second, keys = refinement_pairs(pool.keys, it.refine_pairs)
    seed = derive_seed(cfg.seed, *stream)
    if it.vote_source == "judge":
        votes = judge_votes(cfg.label.vlm, pool.pixels, pool.captions, first, second, segment_ids, fps,
                            passes=it.votes, seed=seed, temperature=it.vote_temperature,
                            granularity=cfg.critic.granularity, cache=AnswerCache(pairs_dir / JUDGE_VOTES_FILE))
    else:
        votes = pool_votes(critic, pool.pixels, pool.captions, first, second, segment_ids, passes=it.votes,
                           seed=seed, dropout=it.vote_dropout, augment=it.vote_augment,
                           tie_margin=cfg.critic.tie_margin, min_confidence=it.vote_min_confidence,
                           keep_fraction=it.vote_keep_fraction, granularity=cfg.critic.granularity,
                           batch_size=cfg.critic.batch_size_eval)
    if rewards is None:
        rewards = pool_implicit_rewards(pool, policy, reference, cfg, tokens=tokens, stream=stream, device=device,
                                        process=process)
    r_first, r_second = rewards[first], rewards[second]
    pce, q, tau = preference_certainty(r_first, r_second, votes.video_labels, temperature=it.pce_temperature,
                                       population=rewards)
    kept = (pce > it.pce_threshold) & (votes.video_labels != 0)
    lines = []
    for i in range(len(first)):
        a, b = int(first[i]), int(second[i])
        row = {"pair_id": f"{it.refine_pairs}-{a:06d}-{b:06d}", "first_video": a, "second_video": b,
               "cond_ids": pool.cond_ids[a].tolist(), "caption": pool.captions[a]}
        if pool.prompt_ids[a] is not None:
            row["prompt_id"] = pool.prompt_ids[a]
        row.update({"labels": votes.labels[i].tolist(), "video_label": int(votes.video_labels[i]),
                    "label_source": f"{it.vote_source}-vote", "agreement": round(float(votes.agreement[i]), 4),
                    "reward_first": float(r_first[i]), "reward_second": float(r_second[i]),
                    "pce": round(float(pce[i]), 6), "weight": round(float(pce[i]), 6), "kept": bool(kept[i])})
        lines.append(json.dumps(row))
    atomic.write_text(pairs_dir / PSEUDO_FILE, "\n".join(lines) + "\n")
    stats = {"pairs": len(lines), "pairing": it.refine_pairs, "videos": len(pool),
             "vote_ties": int((votes.video_labels == 0).sum()), "kept": int(kept.sum()),
             "kept_fraction": float(kept.double().mean()), "reward_mean_Q": q, "reward_std_tau": tau,
             "mean_agreement": float(votes.agreement.mean()),
             "pce_mean_kept": float(pce[kept].mean()) if bool(kept.any()) else None}
    log.info("dual-ipo: %d %s pairs voted (%d ties), %d pseudo-labels kept with PCE > %.2f (Q=%.4f, tau=%.4f)",
             stats["pairs"], it.refine_pairs, stats["vote_ties"], stats["kept"], it.pce_threshold, q, tau)
    return stats


def read_pseudo_rows(pairs_dir: str | Path) -> list[dict]:
    """The lines of ``pairs_dir/pseudo.jsonl`` (one voted pair each)."""
    path = Path(pairs_dir) / PSEUDO_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_pseudo_labels(pairs_dir: str | Path, num_segments: int) -> Optional[PreferenceData]:
    """The kept pseudo-labels of ``pairs_dir/pseudo.jsonl`` as weighted preference data (weight = PCE; the pool's
    pixels: decoded frames when the pairs were decoded); None when the PCE kept none."""
    pairs_dir = Path(pairs_dir)
    rows = [r for r in read_pseudo_rows(pairs_dir) if r["kept"]]
    if not rows:
        return None
    videos = pool_videos(pairs_dir)   # unread: only the kept pairs' videos are ever read
    first = torch.tensor([r["first_video"] for r in rows], dtype=torch.long)
    second = torch.tensor([r["second_video"] for r in rows], dtype=torch.long)
    labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    if labels.shape[1] != num_segments:
        raise ValueError(f"{pairs_dir / PSEUDO_FILE}: pseudo-labels have {labels.shape[1]} segments, the run has "
                         f"{num_segments}")
    cond = torch.tensor([r["cond_ids"] for r in rows], dtype=torch.long).reshape(len(rows), -1) \
        if all(r["cond_ids"] for r in rows) else torch.zeros(len(rows), 0, dtype=torch.long)
    first_videos, second_videos = load_if_small(videos.take(first), videos.take(second))
    return PreferenceData(first=first_videos, second=second_videos, cond_ids=cond, labels=labels,
                          video_labels=torch.tensor([r["video_label"] for r in rows], dtype=torch.long),
                          weights=torch.tensor([float(r["weight"]) for r in rows], dtype=torch.float32),
                          pair_ids=[r["pair_id"] for r in rows], captions=[r["caption"] for r in rows],
                          prompt_ids=[r.get("prompt_id") for r in rows])
