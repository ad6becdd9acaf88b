"""The IPO critic: training with a Bradley-Terry loss that handles ties, accuracy, and labelling with it.

IPO (Yang et al., arXiv:2502.02088) trains a critic on a small human-labelled preference set and lets it
label the policy's new samples round after round: pairwise for DPO, pointwise (desirable / undesirable)
for KTO. Here the critic is ``vidpo.models.critic.VideoCritic``; this module trains, measures and uses it.

**Bradley-Terry with ties (Davidson, 1970).** For scores ``s_a, s_b`` of two videos of one prompt (whole
video or one segment), ``d = s_a - s_b`` and the tie weight ``nu = exp(log_tie) > 0``::

    P(a better) = e^{d/2} / Z,   P(b better) = e^{-d/2} / Z,   P(tie) = nu / Z,   Z = e^{d/2} + e^{-d/2} + nu

i.e. a softmax over the logits ``(-d/2, log nu, d/2)`` for the labels ``(-1, 0, +1)``; ``nu -> 0`` is plain
Bradley-Terry ``P(a better) = sigmoid(d)``. The loss of a pair with weight ``w`` (1 for a real label, the
PCE for a Dual-IPO pseudo-label) is ``w * [nll(d_video, y_video) + segment_weight * mean_s nll(d_s, y_s)]``,
and a batch's loss is ``sum_i w_i l_i / sum_i w_i``. Labelling calls a tie where it is the most likely
outcome, ``|d| < 2 max(log nu, 0)``, unless ``critic.tie_margin`` says otherwise; ``critic.min_confidence``
p also ties every pair whose winner's probability is below p (fewer labels, more of them right).

**Accuracy** against reference labels (the oracle's, or held-out human labels): over pairs whose reference
label is not a tie, the fraction where ``sign(d_video)`` agrees (a critic tie ``d = 0`` counts one half).

**Pointwise labels (KTO)**: a video is desirable when its score is at or above ``critic.desirable`` (a
quantile of the scored set, or an absolute score), undesirable at or below ``critic.undesirable``, else
unused.

**Ranked pairs (DPO)**: the critic scores a pool of videos; each prompt's top-scored videos are paired with
its bottom-scored ones (``ranked_pairs``), instead of labelling the pairs as generated.

**Symmetries.** The shapes world's judgement is unchanged by a horizontal flip (with left <-> right in the
caption), a vertical flip (up <-> down) and time reversal (every direction reversed; the segments'
order reverses too). They multiply the small seed set by up to 8 in training and give the Dual-IPO
voting passes their distinct views of a pair (``Symmetries``).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from vidpo.config import RunConfig
from vidpo.labeling.base import LabelingError, LabelResult, Labeler, PairBatch, register_labeler
from vidpo.models.critic import CriticScores, VideoCritic, load_critic
from vidpo.seeding import derive_seed, generator

log = logging.getLogger("vidpo")


# ----- Bradley-Terry with ties ----------------------------------------------------------------------------
def bt_ties_log_probs(d: torch.Tensor, log_tie: torch.Tensor) -> torch.Tensor:
    """``(...,)`` score differences -> ``(..., 3)`` log-probabilities of the labels (-1, 0, +1) (module doc)."""
    half = 0.5 * d
    logits = torch.stack([-half, log_tie.to(d.dtype).expand_as(d), half], dim=-1)
    return torch.log_softmax(logits, dim=-1)


def bt_ties_nll(d: torch.Tensor, labels: torch.Tensor, log_tie: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood ``(...,)`` of labels in {-1, 0, +1} under the Davidson model."""
    index = (labels.to(torch.long) + 1).unsqueeze(-1)
    return -bt_ties_log_probs(d, log_tie).gather(-1, index).squeeze(-1)


def critic_loss(first: CriticScores, second: CriticScores, labels: torch.Tensor, video_labels: torch.Tensor,
                log_tie: torch.Tensor, weights: Optional[torch.Tensor] = None,
                segment_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Weighted Davidson NLL of B pairs: labels (B, S) and video_labels (B,) in {-1, 0, +1}, weights (B,)."""
    d_video = first.video - second.video
    per_pair = bt_ties_nll(d_video, video_labels, log_tie)
    if segment_weight > 0:
        per_pair = per_pair + segment_weight * bt_ties_nll(first.segments - second.segments, labels, log_tie).mean(1)
    w = torch.ones_like(per_pair) if weights is None else weights.to(per_pair)
    loss = (w * per_pair).sum() / w.sum().clamp_min(1e-12)
    nontie = video_labels != 0
    agree = (torch.sign(d_video) == video_labels.to(d_video.dtype)).float()
    metrics = {"critic_loss": float(loss.detach()), "nu": math.exp(float(log_tie.detach())),
               "train_accuracy": float(agree[nontie].mean()) if bool(nontie.any()) else float("nan")}
    return loss, metrics


def tie_margin_of(critic: VideoCritic, margin: Optional[float], min_confidence: float = 0.0) -> float:
    """The labelling tie margin on |d|: ``margin`` if given, else the Davidson rule ``2 max(log nu, 0)``;
    raised, with ``min_confidence`` p > 0, to the d* where the winner's probability reaches p:
    ``1/p - 1 = e^{-d*} + nu e^{-d*/2}``, i.e. ``d* = -2 ln u`` with ``u = (sqrt(nu^2 + 4 (1/p - 1)) - nu) / 2``."""
    if not 0.0 <= min_confidence < 1.0:
        raise ValueError(f"critic.min_confidence must be in [0, 1), got {min_confidence}")
    nu = critic.tie_parameter
    out = float(margin) if margin is not None else 2.0 * max(math.log(nu), 0.0)
    if min_confidence > 0:
        u = (math.sqrt(nu * nu + 4.0 * (1.0 / min_confidence - 1.0)) - nu) / 2.0
        out = max(out, -2.0 * math.log(u))
    return out


def labels_from_differences(d: torch.Tensor, margin: float) -> torch.Tensor:
    """+1 where d > margin, -1 where d < -margin, else 0 (int64, shape of d)."""
    return (d > margin).long() - (d < -margin).long()


# ----- symmetries of the shapes world ---------------------------------------------------------------------
@dataclass(frozen=True)
class Symmetry:
    name: str
    dims: tuple                  # clip dims to flip: 4 = W, 3 = H, 2 = T
    direction_map: torch.Tensor  # (n_directions,) new direction index of each old one
    reverses_time: bool


class Symmetries:
    """Label-preserving transforms of (clips, condition, segment labels) of a ``ShapesWorld``.

    Index 0 is the identity. A transform is offered only when the world's direction vocabulary is closed
    under it (e.g. 'left' exists for 'right') and, for time reversal, when the segments are symmetric
    in time (reversing the frames maps segment s onto segment S-1-s).
    """

    def __init__(self, world, segment_ids: torch.Tensor):
        vectors = world.direction_vectors
        seg = segment_ids.to(torch.long)
        time_ok = bool(torch.equal(seg.flip(0), seg.max() - seg))
        self.items: list[Symmetry] = []
        for hflip in (False, True):
            for vflip in (False, True):
                for reverse in (False, True):
                    if reverse and not time_ok:
                        continue
                    sign = torch.tensor([-1.0 if hflip else 1.0, -1.0 if vflip else 1.0]) * (-1.0 if reverse else 1.0)
                    mapped = _direction_permutation(vectors, sign)
                    if mapped is None:
                        continue
                    dims = tuple(d for d, on in ((4, hflip), (3, vflip), (2, reverse)) if on)
                    name = "+".join(n for n, on in (("hflip", hflip), ("vflip", vflip), ("reverse", reverse)) if on)
                    self.items.append(Symmetry(name or "identity", dims, mapped, reverse))

    def __len__(self) -> int:
        return len(self.items)

    def clips(self, k: int, clips: torch.Tensor) -> torch.Tensor:
        dims = self.items[k].dims
        return clips.flip(dims) if dims else clips

    def cond_ids(self, k: int, cond_ids: torch.Tensor) -> torch.Tensor:
        out = cond_ids.clone()
        out[:, 2] = self.items[k].direction_map.to(cond_ids.device)[cond_ids[:, 2]]
        return out

    def segments(self, k: int, per_segment: torch.Tensor) -> torch.Tensor:
        """Segment-indexed values (B, S) seen through transform k (and back: every transform is an involution)."""
        return per_segment.flip(-1) if self.items[k].reverses_time else per_segment


def _direction_permutation(vectors: torch.Tensor, sign: torch.Tensor) -> Optional[torch.Tensor]:
    target = vectors * sign
    mapped = []
    for v in target:
        hit = torch.nonzero((vectors - v).abs().sum(1) < 1e-6).flatten()
        if hit.numel() == 0:
            return None
        mapped.append(int(hit[0]))
    return torch.tensor(mapped, dtype=torch.long)


# ----- preference data in memory -------------------------------------------------------------------------
@dataclass
class PreferenceData:
    """N labelled pairs held in memory (the critic's training / evaluation set)."""

    first: torch.Tensor          # (N, C, T, H, W)
    second: torch.Tensor         # (N, C, T, H, W)
    cond_ids: torch.Tensor       # (N, K) long
    labels: torch.Tensor         # (N, S) long in {-1, 0, 1}
    video_labels: torch.Tensor   # (N,) long
    weights: torch.Tensor        # (N,) float: 1 for real labels, the PCE for pseudo-labels
    pair_ids: list

    def __len__(self) -> int:
        return len(self.pair_ids)

    def subset(self, index: Sequence[int]) -> "PreferenceData":
        idx = torch.as_tensor(list(index), dtype=torch.long)
        return PreferenceData(self.first[idx], self.second[idx], self.cond_ids[idx], self.labels[idx],
                              self.video_labels[idx], self.weights[idx], [self.pair_ids[i] for i in idx.tolist()])

    @staticmethod
    def concat(parts: Sequence["PreferenceData"]) -> "PreferenceData":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no labelled pairs to concatenate")
        return PreferenceData(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                ("first", "second", "cond_ids", "labels", "video_labels", "weights")),
                              pair_ids=[i for p in parts for i in p.pair_ids])


def load_preference_data(pairs_dir: str | Path, num_segments: Optional[int] = None, *,
                         records=None) -> PreferenceData:
    """The labelled pairs of ``pairs_dir/manifest.jsonl`` (or the given records of that directory)."""
    from vidpo.data.pairs import MANIFEST_FILE, ShardReader, read_manifest

    pairs_dir = Path(pairs_dir)
    if records is None:
        records, problems = read_manifest(pairs_dir / MANIFEST_FILE, need_labels=True, on_error="skip",
                                          num_segments=num_segments)
        if problems:
            log.warning("critic data: %d unusable manifest lines in %s skipped", len(problems), pairs_dir)
    if not records:
        raise ValueError(f"{pairs_dir}: no labelled pairs")
    reader = ShardReader(pairs_dir)
    # A record without a whole-video label gets the majority vote of its segment labels.
    video = [r.video_label if r.video_label is not None else (sum(r.labels) > 0) - (sum(r.labels) < 0)
             for r in records]
    weights = [float(r.extra.get("weight", 1.0)) for r in records]
    return PreferenceData(first=torch.stack([reader.get(r, "first") for r in records]).float(),
                          second=torch.stack([reader.get(r, "second") for r in records]).float(),
                          cond_ids=torch.tensor([r.cond_ids for r in records], dtype=torch.long),
                          labels=torch.tensor([r.labels for r in records], dtype=torch.long),
                          video_labels=torch.tensor(video, dtype=torch.long),
                          weights=torch.tensor(weights, dtype=torch.float32),
                          pair_ids=[r.pair_id for r in records])


# ----- scoring ----------------------------------------------------------------------------------------------
def build_critic(cfg: RunConfig, world) -> VideoCritic:
    from vidpo.models.dit.config import DiTConfig

    dcfg = DiTConfig(in_channels=3, patch_size=tuple(cfg.critic.patch_size), width=cfg.critic.width,
                     depth=cfg.critic.depth, num_heads=cfg.critic.num_heads, cond_vocab_size=world.vocab_size,
                     attention="sdpa" if cfg.model.attention == "auto" else cfg.model.attention)
    return VideoCritic(dcfg, dropout=cfg.critic.dropout, tie_init=cfg.critic.tie_init,
                       frame_differences=cfg.critic.frame_differences)


@torch.no_grad()
def score_videos(critic: VideoCritic, clips: torch.Tensor, cond_ids: torch.Tensor, world,
                 segment_ids: torch.Tensor, *, batch_size: int = 128, symmetries: Optional[Symmetries] = None,
                 view: int = 0, dropout_seed: Optional[int] = None) -> CriticScores:
    """Critic scores of clips (n, C, T, H, W) on CPU, in the clips' own frame / segment order.

    ``view`` k > 0 scores transform k of ``symmetries`` (and maps the frames and segments back);
    ``dropout_seed`` turns Monte-Carlo dropout on with that seed (one draw per call).
    """
    device = next(critic.parameters()).device
    critic.eval()
    if dropout_seed is not None:
        critic.set_dropout(True)
    devices = [device] if device.type == "cuda" else []
    frames, segments = [], []
    try:
        with torch.random.fork_rng(devices=devices):
            if dropout_seed is not None:
                torch.manual_seed(dropout_seed)
            for start in range(0, clips.shape[0], batch_size):
                x, c = clips[start:start + batch_size], cond_ids[start:start + batch_size]
                if view:
                    x, c = symmetries.clips(view, x), symmetries.cond_ids(view, c)
                out = critic(x.to(device), world.tokens(c).to(device), segment_ids)
                f, s = out.frames.cpu(), out.segments.cpu()
                if view and symmetries.items[view].reverses_time:
                    f = f.flip(1)
                frames.append(f)
                segments.append(symmetries.segments(view, s) if view else s)
    finally:
        critic.set_dropout(False)
    frames_t = torch.cat(frames)
    return CriticScores(frames=frames_t, segments=torch.cat(segments), video=frames_t.mean(1))


def critic_accuracy(critic: VideoCritic, data: PreferenceData, world, segment_ids: torch.Tensor, *,
                    batch_size: int = 128) -> dict:
    """Agreement with ``data``'s labels (module doc): ``accuracy`` over non-tie video labels, its count ``n``,
    ``segment_accuracy`` over non-tie segment labels, and ``correct`` (n,) per pair (for paired comparisons)."""
    a = score_videos(critic, data.first, data.cond_ids, world, segment_ids, batch_size=batch_size)
    b = score_videos(critic, data.second, data.cond_ids, world, segment_ids, batch_size=batch_size)
    d, y = a.video - b.video, data.video_labels
    keep = y != 0
    hit = (torch.sign(d) == y.to(d.dtype)).double() + 0.5 * (d == 0).double()
    ds, ys = a.segments - b.segments, data.labels
    seg_keep = ys != 0
    seg_hit = (torch.sign(ds) == ys.to(ds.dtype)).double() + 0.5 * (ds == 0).double()
    return {"accuracy": float(hit[keep].mean()) if bool(keep.any()) else None, "n": int(keep.sum()),
            "segment_accuracy": float(seg_hit[seg_keep].mean()) if bool(seg_keep.any()) else None,
            "correct": hit[keep], "pair_ids": [p for p, k in zip(data.pair_ids, keep.tolist()) if k]}


def within_prompt_pairs(world, cond_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unordered pair (i, j), i < j, of videos with the same prompt: (first (P,), second (P,)) indices."""
    index = world.condition_index(cond_ids)
    first, second = [], []
    for prompt in index.unique().tolist():
        members = torch.nonzero(index == prompt).flatten().tolist()
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                first.append(members[a])
                second.append(members[b])
    return torch.tensor(first, dtype=torch.long), torch.tensor(second, dtype=torch.long)


def pool_accuracy(critic: VideoCritic, videos: torch.Tensor, cond_ids: torch.Tensor, truth: torch.Tensor, world,
                  segment_ids: torch.Tensor, *, batch_size: int = 128) -> dict:
    """Agreement with ``truth`` (N,) reference scores (the oracle's) over every within-prompt pair of ``videos``
    (N, C, T, H, W): ``accuracy``, ``n``, ``correct`` (n,) per pair (for paired comparisons, ``pool_gain``) and
    ``prompt`` (n,), each pair's prompt index.

    Why: a run's fresh pairs are a few hundred at most, and accuracy over 128 pairs moves by +-0.04 between
    critics that are equally good; the same videos hold ~7x as many within-prompt pairs, for the cost of one
    scoring pass."""
    first, second = within_prompt_pairs(world, cond_ids)
    y = torch.sign(truth[first].double() - truth[second].double())
    scores = score_videos(critic, videos, cond_ids, world, segment_ids, batch_size=batch_size).video.double()
    d, keep = scores[first] - scores[second], y != 0
    hit = (torch.sign(d) == y).double() + 0.5 * (d == 0).double()
    return {"accuracy": float(hit[keep].mean()) if bool(keep.any()) else None, "n": int(keep.sum()),
            "correct": hit[keep], "prompt": world.condition_index(cond_ids)[first][keep]}


def pool_gain(after: dict, before: dict) -> dict:
    """Paired accuracy difference of two ``pool_accuracy`` results on the same videos: ``vidpo.evaluate.mean_ci``
    over the prompts of each prompt's mean difference.

    Why over prompts: the pool's pairs share videos (each video is in 15-63 of them), so a normal interval over
    the pairs treats correlated pairs as independent and is too narrow; the prompts' videos are independent
    draws, so each prompt is one independent cluster."""
    from vidpo.evaluate import mean_ci

    diff, prompt = after["correct"] - before["correct"], before["prompt"]
    if not torch.equal(prompt, after["prompt"]):
        raise ValueError("pool_gain needs two pool_accuracy results over the same videos")
    return mean_ci(torch.stack([diff[prompt == p].mean() for p in prompt.unique()]))


def pointwise_labels(scores: torch.Tensor, mode: str, desirable: float, undesirable: float) -> torch.Tensor:
    """KTO labels (n,) int64 from scores (n,): +1 desirable, -1 undesirable, 0 unused (module doc)."""
    scores = scores.double().flatten()
    if mode == "quantile":
        if not 0.0 <= undesirable < desirable <= 1.0:
            raise ValueError(f"critic quantiles need 0 <= undesirable < desirable <= 1, got "
                             f"undesirable={undesirable}, desirable={desirable}")
        hi, lo = torch.quantile(scores, desirable), torch.quantile(scores, undesirable)
    elif mode == "threshold":
        if not undesirable < desirable:
            raise ValueError(f"critic thresholds need undesirable < desirable, got {undesirable} >= {desirable}")
        hi, lo = torch.tensor(desirable, dtype=scores.dtype), torch.tensor(undesirable, dtype=scores.dtype)
    else:
        raise ValueError(f"critic.pointwise must be 'quantile' or 'threshold', got {mode!r}")
    return (scores >= hi).long() - ((scores <= lo) & (scores < hi)).long()


# ----- training -------------------------------------------------------------------------------------------
def train_critic(cfg: RunConfig, data: PreferenceData, world, segment_ids: torch.Tensor, *,
                 stream: Sequence[object] = ("critic",), device=None, metrics_path: Optional[Path] = None,
                 init: Optional[VideoCritic] = None) -> tuple[VideoCritic, dict]:
    """Train a fresh critic (or a copy of ``init``: a warm start) on ``data`` for ``critic.steps`` AdamW steps;
    returns (critic, info).

    Every draw (init, batches, symmetries, dropout) comes from streams named ``(seed, *stream, ...)``, so a
    rerun reproduces the same critic. ``metrics_path`` receives one JSON row per 10 steps.
    """
    from vidpo.modeling import pick_device

    c = cfg.critic
    device = device or pick_device()
    if len(data) == 0:
        raise ValueError("critic training needs at least one labelled pair")
    if init is not None:
        critic = copy.deepcopy(init).to(device)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(cfg.seed, *stream, "init"))
            critic = build_critic(cfg, world).to(device)
    critic.log_tie.requires_grad_(c.learn_ties)
    params = [p for p in critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    def lr_factor(step: int) -> float:
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    symmetries = Symmetries(world, segment_ids)
    seg = segment_ids.to(device)
    rows, t0 = [], time.time()
    critic.train()
    for step in range(c.steps):
        g = generator(cfg.seed, *stream, "batch", step)
        idx = torch.randint(len(data), (min(c.batch_size, len(data)),), generator=g)
        views = (torch.randint(len(symmetries), (len(idx),), generator=g) if c.augment
                 else torch.zeros(len(idx), dtype=torch.long))
        first, second, cond = data.first[idx], data.second[idx], data.cond_ids[idx]
        labels = data.labels[idx].clone()
        for k in views.unique().tolist():
            if k == 0:
                continue
            rows_k = views == k
            first[rows_k], second[rows_k] = symmetries.clips(k, first[rows_k]), symmetries.clips(k, second[rows_k])
            cond[rows_k] = symmetries.cond_ids(k, cond[rows_k])
            labels[rows_k] = symmetries.segments(k, labels[rows_k])
        tokens = world.tokens(cond).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(cfg.seed, *stream, "dropout", step))
            out = critic(torch.cat([first, second]).to(device), torch.cat([tokens, tokens]), seg)
        n = len(idx)
        a = type(out)(frames=out.frames[:n], segments=out.segments[:n], video=out.video[:n])
        b = type(out)(frames=out.frames[n:], segments=out.segments[n:], video=out.video[n:])
        loss, metrics = critic_loss(a, b, labels.to(device), data.video_labels[idx].to(device), critic.log_tie,
                                    data.weights[idx].to(device), c.segment_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % 10 == 0 or step + 1 == c.steps:
            rows.append({"step": step + 1, "phase": "critic", **metrics, "lr": scheduler.get_last_lr()[0]})
    critic.eval()
    if metrics_path is not None:
        from vidpo import atomic

        atomic.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    info = {"pairs": len(data), "weighted_pairs": round(float(data.weights.sum()), 2), "steps": c.steps,
            "nu": critic.tie_parameter, "seconds": round(time.time() - t0, 1),
            "final_loss": rows[-1]["critic_loss"] if rows else None, "symmetries": [s.name for s in symmetries.items]}
    log.info("critic: trained on %d pairs (weight %.1f) for %d steps in %.1fs, nu=%.3f", len(data),
             info["weighted_pairs"], c.steps, info["seconds"], info["nu"])
    return critic, info


# ----- the labeller ---------------------------------------------------------------------------------------
def cond_ids_from_captions(world, captions: Sequence[str]) -> torch.Tensor:
    """Parse shapes-world captions ('a red circle moving left') back into condition ids (n, 3)."""
    out = []
    for caption in captions:
        words = caption.split()
        try:
            colour, shape, direction = words[-4], words[-3], words[-1]
            out.append([world.colours.index(colour), world.shapes.index(shape), world.directions.index(direction)])
        except (IndexError, ValueError):
            raise LabelingError(f"the critic labeller cannot read the condition of caption {caption!r} "
                                "(expected 'a <colour> <shape> moving <direction>' of this world)") from None
    return torch.tensor(out, dtype=torch.long)


@register_labeler("critic")
class CriticLabeler(Labeler):
    """Labels pairs (and scores single videos) with a trained ``VideoCritic``; it never fails a comparison."""

    name = "critic"

    def __init__(self, cfg: Optional[RunConfig] = None, world=None, *, critic: Optional[VideoCritic] = None,
                 checkpoint: Optional[str] = None, tie_margin: Optional[float] = None,
                 min_confidence: Optional[float] = None, granularity: Optional[str] = None,
                 batch_size: Optional[int] = None) -> None:
        """From a run config (``critic.checkpoint``, ``critic.tie_margin``, ``critic.min_confidence``,
        ``critic.granularity``), or from a
        ready ``critic`` / ``checkpoint``; explicit keywords win over the config. ``world`` maps conditions to
        the critic's tokens."""
        from vidpo.modeling import build_world, pick_device
        from vidpo.recipe import resolve_path

        if world is None:
            if cfg is None:
                raise ValueError("CriticLabeler needs world= (or cfg= to build it)")
            world = build_world(cfg)
        self.world = world
        c = cfg.critic if cfg is not None else None
        if critic is None:
            checkpoint = checkpoint or (c.checkpoint if c is not None else None)
            if not checkpoint:
                raise LabelingError("label.labeler=critic needs critic.checkpoint (a critic trained with "
                                    "`vidpo critic train`), e.g. --set critic.checkpoint=runs/critic")
            critic = load_critic(resolve_path(checkpoint), pick_device())
        self.critic = critic.eval()
        margin = tie_margin if tie_margin is not None else (c.tie_margin if c is not None else None)
        confidence = min_confidence if min_confidence is not None else (c.min_confidence if c is not None else 0.0)
        self.tie_margin = tie_margin_of(self.critic, margin, confidence)
        self.granularity = granularity or (c.granularity if c is not None else "video")
        if self.granularity not in ("segment", "video"):
            raise ValueError(f"critic granularity must be 'segment' or 'video', got {self.granularity!r}")
        self.batch_size = batch_size or (c.batch_size_eval if c is not None else 128)

    def _cond(self, cond_ids: Optional[torch.Tensor], captions: Sequence[str]) -> torch.Tensor:
        return cond_ids.to(torch.long) if cond_ids is not None else cond_ids_from_captions(self.world, captions)

    def label(self, batch: PairBatch) -> LabelResult:
        cond = self._cond(batch.cond_ids, batch.captions)
        kw = dict(batch_size=self.batch_size)
        a = score_videos(self.critic, batch.first, cond, self.world, batch.segment_ids, **kw)
        b = score_videos(self.critic, batch.second, cond, self.world, batch.segment_ids, **kw)
        if self.granularity == "segment":
            labels = labels_from_differences(a.segments - b.segments, self.tie_margin)
        else:
            verdict = labels_from_differences(a.video - b.video, self.tie_margin)
            labels = verdict[:, None].expand(-1, batch.num_segments).contiguous()
        return LabelResult.from_labels(labels)

    def label_pointwise(self, clips: torch.Tensor, captions: list[str], segment_ids: torch.Tensor,
                        cond_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Critic scores (n, S) per segment ('video' granularity: the whole-video score in every segment)."""
        out = score_videos(self.critic, clips, self._cond(cond_ids, captions), self.world, segment_ids,
                           batch_size=self.batch_size)
        if self.granularity == "video":
            return out.video[:, None].expand(-1, out.segments.shape[1]).contiguous()
        return out.segments


# ----- pairs built from the critic's scores of a pool of videos (KTO, ranked DPO) --------------------------
PoolScorer = Callable[[torch.Tensor, torch.Tensor], CriticScores]
"""``(videos (n, C, T, H, W), cond_ids (n, K)) -> scores``: what ranks a pool of videos (the critic; the
oracle in the ceiling ablation of ``vidpo iterate``)."""


def critic_scorer(critic: VideoCritic, cfg: RunConfig, world, segment_ids: torch.Tensor) -> PoolScorer:
    """The critic as a ``PoolScorer``."""
    def score(videos: torch.Tensor, cond: torch.Tensor) -> CriticScores:
        return score_videos(critic, videos, cond, world, segment_ids, batch_size=cfg.critic.batch_size_eval)
    return score


def read_pool(src: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every video of the generated pairs in ``src`` as one pool: (videos (2N, C, T, H, W), cond_ids (2N, K))."""
    from vidpo.data.pairs import PAIRS_FILE, ShardReader, read_manifest

    records, _ = read_manifest(src / PAIRS_FILE, need_labels=False, on_error="skip")
    reader = ShardReader(src)
    videos = torch.cat([torch.stack([reader.get(r, "first") for r in records]),
                        torch.stack([reader.get(r, "second") for r in records])]).float()
    return videos, torch.tensor([r.cond_ids for r in records] * 2, dtype=torch.long)


def _write_pool_pairs(dst: Path, videos: torch.Tensor, cond: torch.Tensor, first: list[int], second: list[int],
                      segment_labels: torch.Tensor, cfg: RunConfig, world, *, mode: str, source: str,
                      stats: dict) -> dict:
    """Write pairs (``videos[first[i]]`` preferred to ``videos[second[i]]``, whole-video label +1, the given
    per-segment labels (P, S)) as shards, then ``stats`` (+ the pair count) to ``dst/label.json``, then
    ``dst/manifest.jsonl``; returns the stats."""
    from vidpo import atomic
    from vidpo.data.pairs import MANIFEST_FILE, PairRecord, shard_name, write_manifest

    shard_size = cfg.generate.shard_size
    conds = cond[first]
    captions = world.captions(conds)
    records = []
    for k in range(0, len(first), shard_size):
        rows = list(range(k, min(len(first), k + shard_size)))
        name = shard_name(k // shard_size)
        atomic.save_safetensors({"first": videos[[first[i] for i in rows]], "second": videos[[second[i] for i in rows]],
                                 "cond_ids": conds[rows]}, dst / name, metadata={"mode": mode, "split": "train"})
        for row, i in enumerate(rows):
            records.append(PairRecord(pair_id=f"{mode}-{i:06d}", shard=name, row=row, cond_ids=conds[i].tolist(),
                                      caption=captions[i], mode=mode, labels=segment_labels[i].tolist(),
                                      video_label=1, label_source=source))
    stats = dict(stats, pairs=len(records))
    atomic.write_json(dst / "label.json", stats)
    write_manifest(dst / MANIFEST_FILE, records)   # last: its presence means the pairs are complete
    return stats


def build_kto_pairs(scorer: PoolScorer, src: Path, dst: Path, cfg: RunConfig, world,
                    segment_ids: torch.Tensor, *, source: str = "critic-pointwise") -> dict:
    """Score every video of ``src`` (``scorer``: the critic), label it desirable / undesirable (``critic.pointwise``),
    and write ``dst``: pairs (desirable first, undesirable second, label +1) of videos of the same prompt.

    Within a prompt, every labelled video is used: the shorter list is cycled to the length of the longer.
    A prompt with no desirable or no undesirable video contributes nothing (the KTO objective reads each
    record as one desirable and one undesirable video of one condition)."""
    from vidpo.data.pairs import MANIFEST_FILE

    if (dst / MANIFEST_FILE).exists():
        return json.loads((dst / "label.json").read_text())
    c = cfg.critic
    videos, cond = read_pool(src)
    labels = pointwise_labels(scorer(videos, cond).video, c.pointwise, c.desirable, c.undesirable)
    index = world.condition_index(cond)
    first, second = [], []
    for ci in index.unique().tolist():
        good = torch.nonzero((index == ci) & (labels > 0)).flatten().tolist()
        bad = torch.nonzero((index == ci) & (labels < 0)).flatten().tolist()
        for j in range(max(len(good), len(bad)) if good and bad else 0):
            first.append(good[j % len(good)])
            second.append(bad[j % len(bad)])
    if not first:
        raise LabelingError(f"KTO round: no prompt of {src} has both a desirable and an undesirable video; "
                            "widen critic.desirable / critic.undesirable")
    segments = int(segment_ids.max()) + 1
    stats = {"videos": int(labels.numel()), "desirable": int((labels > 0).sum()),
             "undesirable": int((labels < 0).sum()), "pointwise": c.pointwise, "thresholds": [c.undesirable, c.desirable]}
    return _write_pool_pairs(dst, videos, cond, first, second, torch.ones(len(first), segments, dtype=torch.long),
                             cfg, world, mode="kto", source=source, stats=stats)


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


def build_ranked_pairs(scorer: PoolScorer, src: Path, dst: Path, cfg: RunConfig, world,
                       segment_ids: torch.Tensor, fraction: float, *, margin_fraction: float = 1.0,
                       source: str = "critic-ranked") -> dict:
    """Score every video of ``src`` (``scorer``: the critic) and write ``dst``: the best-versus-worst pairs of
    each prompt (``ranked_pairs``), preferred video first. Segment labels are the signs of the segment score
    differences (DenseDPO reads them; a whole-video objective reads the +1 video label).

    Why: a critic that is ~80% right on a random pair of two samples is far surer of a pair whose scores
    lie at the two ends of a prompt's ranking (on the shapes base ~98% agreement with the oracle for
    fraction 0.25), so the policy trains on fewer wrong labels and larger quality gaps. ``margin_fraction`` < 1
    then keeps only the widest pairs of the whole pool (``widest_pairs``)."""
    from vidpo.data.pairs import MANIFEST_FILE

    if (dst / MANIFEST_FILE).exists():
        return json.loads((dst / "label.json").read_text())
    videos, cond = read_pool(src)
    scores = scorer(videos, cond)
    first, second = ranked_pairs(scores.video, world.condition_index(cond), fraction)
    if not first:
        raise LabelingError(f"ranked pairs: no prompt of {src} has two videos")
    ranked = len(first)
    first, second = widest_pairs(scores.video, first, second, margin_fraction)
    seg_labels = torch.sign(scores.segments[first] - scores.segments[second]).long()
    gap = scores.video[first] - scores.video[second]
    stats = {"videos": int(scores.video.numel()), "rank_fraction": fraction, "margin_fraction": margin_fraction,
             "ranked_pairs": ranked,
             "prompts": int(world.condition_index(cond[first]).unique().numel()),
             "critic_score_gap": round(float(gap.mean()), 4)}
    return _write_pool_pairs(dst, videos, cond, first, second, seg_labels, cfg, world, mode="ranked",
                             source=source, stats=stats)


# ----- CLI: vidpo critic train | eval ---------------------------------------------------------------------
def cmd_critic_train(args) -> int:
    from vidpo import atomic
    from vidpo.jobs import setup_logging
    from vidpo.models.critic import save_critic
    from vidpo.modeling import build_world, set_threads
    from vidpo.pipeline import run_segment_ids
    from vidpo.recipe import load_config, to_yaml

    cfg = load_config(args.recipe, args.overrides)
    out = Path(args.out)
    setup_logging(out)
    set_threads(cfg)
    world, seg = build_world(cfg), run_segment_ids(cfg)
    data = PreferenceData.concat([load_preference_data(p, int(seg.max()) + 1) for p in args.pairs])
    if args.heldout:
        heldout = PreferenceData.concat([load_preference_data(p, int(seg.max()) + 1) for p in args.heldout])
    else:
        order = torch.randperm(len(data), generator=generator(cfg.seed, "critic-split")).tolist()
        cut = int(round(len(data) * cfg.critic.heldout_fraction))
        heldout = data.subset(order[:cut]) if cut else None
        data = data.subset(order[cut:])
    critic, info = train_critic(cfg, data, world, seg, metrics_path=out / "metrics.jsonl")
    if heldout is not None and len(heldout):
        acc = critic_accuracy(critic, heldout, world, seg)
        info["heldout"] = {k: acc[k] for k in ("accuracy", "n", "segment_accuracy")}
    save_critic(critic, out / "critic.safetensors")
    atomic.write_text(out / "config.yaml", to_yaml(cfg))
    atomic.write_json(out / "critic.json", info)
    print(json.dumps(info, indent=2))
    return 0


def cmd_critic_eval(args) -> int:
    from vidpo.modeling import build_world, pick_device
    from vidpo.pipeline import run_segment_ids
    from vidpo.recipe import load_config

    cfg = load_config(args.recipe, args.overrides)
    world, seg = build_world(cfg), run_segment_ids(cfg)
    critic = load_critic(args.critic, pick_device())
    result = {}
    for pairs in args.pairs:
        acc = critic_accuracy(critic, load_preference_data(pairs, int(seg.max()) + 1), world, seg)
        result[str(pairs)] = {k: acc[k] for k in ("accuracy", "n", "segment_accuracy")}
    print(json.dumps(result, indent=2))
    return 0


def add_critic_verbs(sub, add_set) -> None:
    p = sub.add_parser("critic", help="train / evaluate the IPO critic on labelled preference pairs",
                       description="The IPO critic: a segment-level video scorer trained with a Bradley-Terry "
                                   "loss that handles ties.")
    verbs = p.add_subparsers(dest="critic_verb", metavar="SUBVERB")
    verbs.required = True
    t = verbs.add_parser("train", help="train a critic on labelled pairs directories; report held-out accuracy")
    t.add_argument("recipe", help="recipe giving the world and the critic section")
    t.add_argument("--pairs", nargs="+", required=True, help="labelled pairs directories (manifest.jsonl)")
    t.add_argument("--heldout", nargs="+", help="labelled pairs to report accuracy on (default: hold out "
                                                "critic.heldout_fraction of --pairs)")
    t.add_argument("--out", required=True, help="critic directory (critic.safetensors, critic.json)")
    add_set(t)
    t.set_defaults(func=cmd_critic_train)
    e = verbs.add_parser("eval", help="accuracy of a critic against the labels of pairs directories")
    e.add_argument("recipe")
    e.add_argument("--critic", required=True, help="critic directory or critic.safetensors")
    e.add_argument("--pairs", nargs="+", required=True)
    add_set(e)
    e.set_defaults(func=cmd_critic_eval)
