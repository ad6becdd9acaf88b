"""The IPO critic: training with a Bradley-Terry loss that handles ties, accuracy, and labelling with it.

IPO (Yang et al., arXiv:2502.02088) trains a critic on a small human-labelled preference set and lets it
label the policy's new samples round after round: pairwise for DPO, pointwise (desirable / undesirable)
for KTO. Here the critic is any ``vidpo.models.critic.Critic``: the shapes world's toy network behind its adapter
(``vidpo.labeling.critic.ShapesCritic``) or the VLM critic (``critic.backbone``); this module trains, measures
and uses it through the one scoring interface, ``critic.score(clips, captions, segment_ids)``.

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
voting passes their distinct views of a pair (``Symmetries``, the toy critic's ``views``). A VLM critic has the
identity view alone.

**Pixels.** A pairs directory of the shapes world holds its pixels in the shards; a latent model's pairs are
read from their decoded frames (``vidpo.data.video_io.PairFrames``, uint8, 4x smaller in memory than floats).
A training set of up to 8 GiB of videos is loaded whole; a larger one (decoded Wan 480p frames are 97 MB a video)
stays on disk and each step reads its batch (``vidpo.data.video_rows``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo.config import RunConfig
from vidpo.config.loader import to_yaml
from vidpo.data.domains import ShapesDomain
from vidpo.data.pairs import MANIFEST_FILE, read_manifest
from vidpo.data.video_rows import IN_MEMORY_BYTES, VideoRows, load_if_small, pair_rows, take_rows
from vidpo.evaluation.evaluate import mean_ci
from vidpo.labeling.critic import as_critic, build_scorer, open_critic, score_clips, score_videos
from vidpo.models.critic import Critic, CriticScores, VideoCritic, save_critic
from vidpo.stages.common import setup_logging
from vidpo.training.modeling import build_domain, pick_device, run_segment_ids, set_threads
from vidpo.utils import atomic
from vidpo.utils.seeding import derive_seed, generator

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


# ----- preference data in memory -------------------------------------------------------------------------
@dataclass
class PreferenceData:
    """N labelled pairs (the critic's training / evaluation set): labels in memory, videos in memory or read on
    demand (``VideoRows``, indexed like the tensors: ``first[idx]`` reads a batch)."""

    first: torch.Tensor | VideoRows   # (N, 3, T, H, W) pixels: float in [-1, 1], or uint8 (decoded videos); unread
    second: torch.Tensor | VideoRows  # rows (vidpo.data.video_rows) when too large for memory (``load_if_small``)
    cond_ids: torch.Tensor       # (N, K) long: the shapes world's conditions (K = 0 for a prompt file)
    labels: torch.Tensor         # (N, S) long in {-1, 0, 1}
    video_labels: torch.Tensor   # (N,) long
    weights: torch.Tensor        # (N,) float: 1 for real labels, the PCE for pseudo-labels
    pair_ids: list
    captions: Optional[list] = None
    """(N,) the prompts the critic reads; None: the shapes world's captions of ``cond_ids`` (``captions_of``)."""
    prompt_ids: Optional[list] = None
    """(N,) prompt ids, where known."""

    def __len__(self) -> int:
        return len(self.pair_ids)

    def subset(self, index: Sequence[int]) -> "PreferenceData":
        idx = torch.as_tensor(list(index), dtype=torch.long)
        rows = idx.tolist()
        return PreferenceData(take_rows(self.first, idx), take_rows(self.second, idx), self.cond_ids[idx],
                              self.labels[idx], self.video_labels[idx], self.weights[idx],
                              [self.pair_ids[i] for i in rows],
                              captions=None if self.captions is None else [self.captions[i] for i in rows],
                              prompt_ids=None if self.prompt_ids is None else [self.prompt_ids[i] for i in rows])

    @staticmethod
    def concat(parts: Sequence["PreferenceData"]) -> "PreferenceData":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no labelled pairs to concatenate")
        dtypes = {p.first.dtype for p in parts}
        if len(dtypes) > 1:   # decoded (uint8) and float pixels together: all as floats
            parts = [dataclasses.replace(p, first=_float_videos(p.first), second=_float_videos(p.second))
                     for p in parts]

        def joined(name):
            lists = [getattr(p, name) for p in parts]
            return None if any(x is None for x in lists) else [v for x in lists for v in x]
        join = VideoRows.cat if any(isinstance(p.first, VideoRows) for p in parts) else torch.cat
        return PreferenceData(*(join([getattr(p, f) for p in parts]) for f in ("first", "second")),
                              *(torch.cat([getattr(p, f) for p in parts]) for f in
                                ("cond_ids", "labels", "video_labels", "weights")),
                              pair_ids=[i for p in parts for i in p.pair_ids], captions=joined("captions"),
                              prompt_ids=joined("prompt_ids"))


def _float_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x


def _float_videos(x: "torch.Tensor | VideoRows") -> "torch.Tensor | VideoRows":
    return x.map(_float_pixels) if isinstance(x, VideoRows) else _float_pixels(x)


def captions_of(data: PreferenceData, world=None) -> list[str]:
    """The captions of ``data``'s pairs: its own, or the shapes world's captions of its conditions."""
    if data.captions is not None:
        return list(data.captions)
    if world is None:
        raise ValueError("these preference pairs carry no captions and no world to caption their conditions")
    return world.captions(data.cond_ids)


def pair_pixels(pairs_dir: Path, records, key: str) -> VideoRows:
    """The ``key`` videos of ``records`` (n, 3, T, H, W), unread: decoded frames (uint8) when the pairs were decoded,
    else the shards' pixels (float; the shapes world's pairs are pixels)."""
    return pair_rows(pairs_dir, records, key, kind="pixels")


def load_preference_data(pairs_dir: str | Path, num_segments: Optional[int] = None, *,
                         records=None, memory_bytes: int = IN_MEMORY_BYTES) -> PreferenceData:
    """The labelled pairs of ``pairs_dir/manifest.jsonl`` (or the given records of that directory); their videos
    loaded when they hold at most ``memory_bytes``, else read batch by batch (``load_if_small``)."""
    pairs_dir = Path(pairs_dir)
    if records is None:
        records, problems = read_manifest(pairs_dir / MANIFEST_FILE, need_labels=True, on_error="skip",
                                          num_segments=num_segments)
        if problems:
            log.warning("critic data: %d unusable manifest lines in %s skipped", len(problems), pairs_dir)
    # The Davidson model trains a label 0 as a tie: a pair with a failed comparison (no label) is left out.
    records = [r for r in records if not r.failed_segments()]
    if not records:
        raise ValueError(f"{pairs_dir}: no labelled pairs")
    # A record without a whole-video label gets the majority vote of its segment labels.
    video = [r.video_label if r.video_label is not None else (sum(r.labels) > 0) - (sum(r.labels) < 0)
             for r in records]
    weights = [float(r.extra.get("weight", 1.0)) for r in records]
    cond = (torch.tensor([r.cond_ids for r in records], dtype=torch.long) if all(r.cond_ids for r in records)
            else torch.zeros(len(records), 0, dtype=torch.long))
    first, second = load_if_small(pair_pixels(pairs_dir, records, "first"), pair_pixels(pairs_dir, records, "second"),
                                  budget=memory_bytes)
    return PreferenceData(first=first, second=second,
                          cond_ids=cond,
                          labels=torch.tensor([r.labels for r in records], dtype=torch.long),
                          video_labels=torch.tensor(video, dtype=torch.long),
                          weights=torch.tensor(weights, dtype=torch.float32),
                          pair_ids=[r.pair_id for r in records],
                          captions=[r.caption or "" for r in records] if all(r.caption for r in records) else None,
                          prompt_ids=[r.prompt_id for r in records])


def critic_accuracy(critic: VideoCritic | Critic, data: PreferenceData, world=None,
                    segment_ids: Optional[torch.Tensor] = None, *, batch_size: int = 128) -> dict:
    """Agreement with ``data``'s labels (module doc): ``accuracy`` over non-tie video labels, its count ``n``,
    ``segment_accuracy`` over non-tie segment labels with its count ``segment_n``, ``correct`` (n,) per pair (for
    paired comparisons) and ``segment_correct``. ``world``: a toy critic's (or to caption ``data``)."""
    scorer, captions = as_critic(critic, world), captions_of(data, world)
    a = score_clips(scorer, data.first, captions, segment_ids, batch_size=batch_size)
    b = score_clips(scorer, data.second, captions, segment_ids, batch_size=batch_size)
    d, y = a.video - b.video, data.video_labels
    keep = y != 0
    hit = (torch.sign(d) == y.to(d.dtype)).double() + 0.5 * (d == 0).double()
    ds, ys = a.segments - b.segments, data.labels
    seg_keep = ys != 0
    seg_hit = (torch.sign(ds) == ys.to(ds.dtype)).double() + 0.5 * (ds == 0).double()
    return {"accuracy": float(hit[keep].mean()) if bool(keep.any()) else None, "n": int(keep.sum()),
            "segment_accuracy": float(seg_hit[seg_keep].mean()) if bool(seg_keep.any()) else None,
            "segment_n": int(seg_keep.sum()), "correct": hit[keep], "segment_correct": seg_hit[seg_keep],
            "pair_ids": [p for p, k in zip(data.pair_ids, keep.tolist()) if k]}


def pairs_within(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unordered pair (i, j), i < j, of videos with the same prompt key (``keys`` (N,)), prompt by prompt in
    increasing key order: (first (P,), second (P,)) indices."""
    first, second = [], []
    for prompt in keys.unique().tolist():
        members = torch.nonzero(keys == prompt).flatten().tolist()
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                first.append(members[a])
                second.append(members[b])
    return torch.tensor(first, dtype=torch.long), torch.tensor(second, dtype=torch.long)


def within_prompt_pairs(world, cond_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs_within`` the shapes world's conditions (their index is the prompt key)."""
    return pairs_within(world.condition_index(cond_ids))


def pool_accuracy(critic: VideoCritic | Critic, videos: torch.Tensor, cond_ids: torch.Tensor, truth: torch.Tensor, world,
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
    """Paired accuracy difference of two ``pool_accuracy`` results on the same videos: ``vidpo.evaluation.evaluate.mean_ci``
    over the prompts of each prompt's mean difference.

    Why over prompts: the pool's pairs share videos (each video is in 15-63 of them), so a normal interval over
    the pairs treats correlated pairs as independent and is too narrow; the prompts' videos are independent
    draws, so each prompt is one independent cluster."""
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
                 init: Optional[VideoCritic | Critic] = None) -> tuple[Critic, dict]:
    """Train a fresh critic (``vidpo.labeling.critic.build_scorer``: the VLM critic with ``critic.backbone``, else
    the toy network of ``world``) or a copy of ``init`` (a warm start) on ``data`` for ``critic.steps`` AdamW steps,
    through the scoring interface; returns (critic, info). ``segment_ids`` are the pixel frames' segments.

    Every draw (init, batches, views, dropout) comes from streams named ``(seed, *stream, ...)``, so a rerun
    reproduces the same critic. What trains is what requires gradients: the toy network whole, the VLM critic's
    head, tie parameter and LoRA factors. ``metrics_path`` receives one JSON row per 10 steps.
    """
    c = cfg.critic
    device = device or pick_device()
    if len(data) == 0:
        raise ValueError("critic training needs at least one labelled pair")
    if init is not None:
        critic = as_critic(copy.deepcopy(init), world).to(device)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(cfg.seed, *stream, "init"))
            critic = build_scorer(cfg, world).to(device)
    critic.log_tie.requires_grad_(c.learn_ties)
    params = [p for p in critic.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    def lr_factor(step: int) -> float:
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    views = critic.views(segment_ids)
    captions_all = captions_of(data, world)
    seg = segment_ids.to(device)
    rows, t0 = [], time.time()
    critic.train()
    for step in range(c.steps):
        g = generator(cfg.seed, *stream, "batch", step)
        idx = torch.randint(len(data), (min(c.batch_size, len(data)),), generator=g)
        chosen = (torch.randint(len(views), (len(idx),), generator=g) if c.augment
                  else torch.zeros(len(idx), dtype=torch.long))
        first, second = data.first[idx], data.second[idx]
        captions = [captions_all[i] for i in idx.tolist()]
        labels = data.labels[idx].clone()
        for k in chosen.unique().tolist():
            if k == 0:
                continue
            rows_k = chosen == k
            first[rows_k], second[rows_k] = views.clips(k, first[rows_k]), views.clips(k, second[rows_k])
            at = torch.nonzero(rows_k).flatten().tolist()
            for i, caption in zip(at, views.captions(k, [captions[i] for i in at])):
                captions[i] = caption
            labels[rows_k] = views.segments(k, labels[rows_k])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive_seed(cfg.seed, *stream, "dropout", step))
            out = critic.score(torch.cat([first, second]), captions + captions, seg)
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
        atomic.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    info = {"pairs": len(data), "weighted_pairs": round(float(data.weights.sum()), 2), "steps": c.steps,
            "nu": critic.tie_parameter, "seconds": round(time.time() - t0, 1),
            "final_loss": rows[-1]["critic_loss"] if rows else None, "symmetries": views.names, "kind": critic.kind}
    log.info("critic: trained on %d pairs (weight %.1f) for %d steps in %.1fs, nu=%.3f", len(data),
             info["weighted_pairs"], c.steps, info["seconds"], info["nu"])
    return critic, info


# ----- the jobs behind `vidpo critic train | eval` ------------------------------------------------------------
def _world_and_segments(cfg: RunConfig):
    """The recipe's shapes world (None for a prompt file) and the segments of the pixel frames its critic sees."""
    domain = build_domain(cfg)
    world = domain.world if isinstance(domain, ShapesDomain) else None
    return world, (run_segment_ids(cfg) if world is not None else run_segment_ids(cfg, domain, pixels=True))


def critic_train_job(cfg: RunConfig, out_dir: str | Path, pairs: Sequence[str | Path],
                     heldout: Sequence[str | Path] = ()) -> dict:
    """Train a critic on the labelled ``pairs`` directories into ``out_dir``; its accuracy on ``heldout`` (default:
    ``critic.heldout_fraction`` of ``pairs``, held out) goes into ``critic.json``, which is returned. A prompt-file
    recipe trains the VLM critic of ``critic.backbone`` on the pairs' decoded frames."""
    out = Path(out_dir)
    setup_logging(out)
    set_threads(cfg)
    world, seg = _world_and_segments(cfg)
    data = PreferenceData.concat([load_preference_data(p, int(seg.max()) + 1) for p in pairs])
    if heldout:
        heldout = PreferenceData.concat([load_preference_data(p, int(seg.max()) + 1) for p in heldout])
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
    return info


def critic_eval_job(cfg: RunConfig, critic_path: str | Path, pairs: Sequence[str | Path]) -> dict:
    """Accuracy of the critic at ``critic_path`` against the labels of each pairs directory."""
    world, seg = _world_and_segments(cfg)
    critic = open_critic(critic_path, world, pick_device())
    result = {}
    for directory in pairs:
        acc = critic_accuracy(critic, load_preference_data(directory, int(seg.max()) + 1), world, seg)
        result[str(directory)] = {k: acc[k] for k in ("accuracy", "n", "segment_accuracy")}
    return result
