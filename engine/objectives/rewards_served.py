"""Served judges as distillation rewards: a VLM over HTTP scores each training clip once; its score weights the
consistency-distillation loss of the routed rows (a reward-weighted regression, since a score has no gradient).

A served judge is a ``reward.models`` entry with ``rule: served_score`` (the endpoint fields of ``label.vlm``:
``base_url``, ``model``, ``answer_format``, ``format``, ...; its ``question``, integer ``scale`` and ``frames``;
``vidpo.config.distill.served_problems``), weighted by name under ``reward.image`` or ``reward.video`` like a local
reward model. It sits in the same mixture: the local models stay differentiable rewards on the student's decoded
one-step prediction (``vidpo.objectives.rewards_models``), the judges weight the CD loss.

**Scores** (``score_served_judges``, run by ``vidpo preprocess`` on a release). Every clip of the routed subset
(``reward.subset``: the prompt file's training prompts with a ``"clip"`` of that ``source``) is decoded as
``vidpo cache`` decodes it for the VAE (``DATA/clips/manifest.jsonl``, the run's fps / frames / size / resize), and
judge ``j`` answers its question about the clip and its prompt, pointwise, on its scale ``[low, high]``
(``vidpo.labeling.vlm_score``: ``kind: video`` one question showing ``frames`` frames; ``kind: image`` one question
per frame, averaged). Every reply is appended to ``DATA/served_rewards/NAME/vlm_answers.jsonl`` as it arrives, so a
killed pass loses nothing and its rerun asks only what has no reply yet; ``DATA/served_rewards/scores.json`` keeps
each judge's scores, the status of every clip and its problems. A clip whose question failed (no reply) or whose
reply has no score on the scale has no score: a problem, listed, and a neutral weight below; never a score of 0.

**Weights** (``served_weights``). Over the routed rows ``r in R`` of the data (rows drawn from routed clips; each
row carries its clip's scores), with ``s_j(r)`` judge ``j``'s score and ``gamma_j`` its weight under
``reward.image`` / ``reward.video``::

    mu_j, sd_j = mean, std of s_j(r) over the routed rows whose clip judge j scored       (population std)
    z_j(r)     = (s_j(r) - mu_j) / sd_j        0 for a clip judge j did not score, or when sd_j = 0  (neutral)
    u(r)       = exp( sum_j gamma_j z_j(r) )
    w(r)       = u(r) / mean_{r' in R} u(r')     r in R          (mean 1 over the routed rows)
    w(r)       = 1                               r not in R
    L_CD       = mean_b  w_b * mean_{elements} d( f(x_{t_n}, t_n, c)_b,  sg[f(x_prev, t_{n-k}, c)_b] )

(``vidpo.objectives.distill.cd_distance``). An exponentiated, standardised reward as a regression weight is
reward-weighted regression's form (Peters and Schaal 2007; as in RAFT / reward-weighted fine-tuning of diffusion
models); with ``gamma = 0`` it is the plain CD loss. A row's weight depends only on its clip, so it is one number per
training prompt (``(P,)``), indexed by the row's ``prompt``. The weights' minimum, mean, maximum and effective
sample size ``ESS = (sum_R w)^2 / sum_R w^2`` (Kish; ``|R|`` when all are 1) go into the training summary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo.config import DISTILL_SOURCES, ConfigError, VLMConfig
from vidpo.config.distill import SERVED_RULE, served_scale, served_vlm_config
from vidpo.data.decode import ClipDecoder, SamplingSpec, VideoDecodeError
from vidpo.data.manifest import read_clip_manifest
from vidpo.data.video_io import read_mp4
from vidpo.labeling.answer_cache import ANSWERS_FILE, AnswerCache
from vidpo.labeling.base import STATUS_FAILED
from vidpo.labeling.vlm import ServerUnreachable
from vidpo.labeling.vlm_request import clips_to_uint8
from vidpo.labeling.vlm_score import ItemScore, ScoreItem, ServedScorer
from vidpo.utils import atomic

log = logging.getLogger("vidpo")

SCORES_DIR = "served_rewards"
SCORES_FILE = "scores.json"
TRANSPORT_FIELDS = ("base_url", "api_key_env", "timeout_s", "max_retries", "retry_backoff_s", "concurrency")


@dataclass
class ServedJudge:
    """One served judge of the mixture: its name, kind, weight ``gamma`` and endpoint."""

    name: str
    kind: str
    gamma: float
    spec: dict
    config: VLMConfig
    low: int
    high: int

    @property
    def question(self) -> Optional[str]:
        return self.spec.get("question")

    @property
    def fingerprint(self) -> str:
        """A hash of what determines the judge's answers: its entry but ``gamma`` and the transport fields (where the
        server is and how it is reached: the answer cache's request hash leaves them out too)."""
        blob = json.dumps({k: v for k, v in self.spec.items() if k not in TRANSPORT_FIELDS}, sort_keys=True,
                          default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def is_served(reward_cfg, name: str) -> bool:
    spec = (reward_cfg.models or {}).get(name)
    return isinstance(spec, dict) and spec.get("rule") == SERVED_RULE


def served_judges(reward_cfg) -> list[ServedJudge]:
    """The served judges weighted under ``reward.image`` / ``reward.video`` (a zero weight drops one), in order."""
    judges = []
    for kind, table in (("image", reward_cfg.image), ("video", reward_cfg.video)):
        for name, gamma in (table or {}).items():
            if not is_served(reward_cfg, name) or float(gamma) == 0.0:
                continue
            spec = dict(reward_cfg.models[name])
            if spec["kind"] != kind:
                raise ConfigError(f"reward.{kind}: {name!r} is a {spec['kind']}-text judge (reward.models.{name}.kind);"
                                  f" list it under reward.{spec['kind']}")
            low, high = served_scale(spec)
            judges.append(ServedJudge(name, kind, float(gamma), spec, served_vlm_config(spec), low, high))
    return judges


def routed(subset: str, source: torch.Tensor) -> torch.Tensor:
    """``(P,)`` bool: the prompts whose rows ``reward.subset`` routes the rewards to (``source``: index into
    ``DISTILL_SOURCES``)."""
    if subset == "all":
        return torch.ones_like(source, dtype=torch.bool)
    return source == DISTILL_SOURCES.index(subset)


# ----- the weights ------------------------------------------------------------------------------------------------
def served_weights(scores: torch.Tensor, gammas: Sequence[float], routed_prompts: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """``(P,)`` float64 weight of each prompt's rows (module doc) from ``scores (J, P)`` (NaN: not scored), the
    judges' ``gammas (J,)``, ``routed_prompts (P,)`` bool and ``counts (P,)`` rows of the data per prompt."""
    scores = scores.double()
    counts = counts.double() * routed_prompts.double()
    log_u = torch.zeros(scores.shape[1], dtype=torch.float64)
    for j, gamma in enumerate(gammas):
        valid = routed_prompts & ~torch.isnan(scores[j])
        c = counts * valid.double()
        if float(c.sum()) <= 0:
            continue
        s = torch.where(valid, scores[j], torch.zeros_like(scores[j]))
        mu = (c * s).sum() / c.sum()
        sd = torch.sqrt((c * (s - mu) ** 2).sum() / c.sum())
        if float(sd) > 0:
            log_u = log_u + float(gamma) * torch.where(valid, (s - mu) / sd, torch.zeros_like(s))
    weights = torch.ones_like(log_u)
    total = float(counts.sum())
    if total > 0:
        shift = float(log_u[counts > 0].max())
        u = torch.exp(log_u - shift)                     # exp(... - max): no overflow, the same ratio
        weights = torch.where(routed_prompts, u / ((counts * u).sum() / total), weights)
    return weights


def weight_stats(weights: torch.Tensor, routed_prompts: torch.Tensor, counts: torch.Tensor) -> dict:
    """Min, mean, max and effective sample size of the weights over the routed rows (module doc)."""
    mask = routed_prompts & (counts > 0)
    rows = int(counts[mask].sum())
    if not rows:
        return {"rows": 0, "min": None, "mean": None, "max": None, "ess": 0.0, "ess_fraction": None}
    w, c = weights[mask].double(), counts[mask].double()
    ess = float((c * w).sum() ** 2 / (c * w * w).sum())
    return {"rows": rows, "min": float(w.min()), "mean": float((c * w).sum() / c.sum()), "max": float(w.max()),
            "ess": ess, "ess_fraction": ess / rows}


# ----- the scores -------------------------------------------------------------------------------------------------
def scores_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / SCORES_DIR / SCORES_FILE


def _read_scores_file(data_dir: str | Path) -> dict:
    path = scores_path(data_dir)
    return json.loads(path.read_text()) if path.exists() else {"judges": {}}


def _media_id(clip, spec: SamplingSpec) -> str:
    """What identifies the pixels a clip shows: its file (path, size) and how it is decoded."""
    size = Path(clip.path).stat().st_size if Path(clip.path).exists() else -1
    return f"{clip.path}|{size}|{clip.start}|{clip.end}|{spec.fps}|{spec.frames}|{spec.height}x{spec.width}|" \
           f"{spec.resize}"


def score_served_judges(cfg, data_dir: str | Path, prompt_ids: Sequence[str], source: torch.Tensor,
                        domain) -> dict:
    """Score the routed clips of training prompts ``prompt_ids`` (``source (P,)``) by every served judge into
    ``data_dir/served_rewards`` (module doc); returns per judge the clips scored, asked and cached, and the
    problems. The clips are read from ``data_dir/clips/manifest.jsonl`` (``vidpo.stages.real_clips``)."""
    judges = served_judges(cfg.reward)
    if not judges:
        return {}
    data_dir = Path(data_dir)
    manifest = data_dir / "clips" / "manifest.jsonl"
    records, _ = read_clip_manifest(manifest, on_error="skip")
    by_id = {r.clip_id: r for r in records}
    wanted = [pid for pid, keep in zip(prompt_ids, routed(cfg.reward.subset, source).tolist()) if keep]
    spec = SamplingSpec(fps=domain.fps, frames=domain.frames, height=domain.height, width=domain.width,
                        resize=cfg.cache.resize)
    seconds = domain.frames / domain.fps if domain.fps else 1.0
    book = _read_scores_file(data_dir)
    out = {}
    for judge in judges:
        t0 = time.time()
        cache = AnswerCache(data_dir / SCORES_DIR / judge.name / ANSWERS_FILE)
        scorer = ServedScorer(judge.config, judge.kind, judge.low, judge.high, question=judge.question, cache=cache)
        picked = scorer.pick(domain.frames)
        items = [ScoreItem(pid, by_id[pid].caption, _media_id(by_id[pid], spec), seconds=seconds)
                 for pid in wanted if pid in by_id]
        results = {pid: ItemScore(pid, None, STATUS_FAILED, [], f"served score: clip {pid!r}: not in {manifest}")
                   for pid in wanted if pid not in by_id}
        todo = [item for item in items if not scorer.answered(item, domain.frames)]
        decoder = ClipDecoder(spec, cfg.cache.decoder, workers=1, batch_size=1, on_error="skip") if todo else None
        chunk = max(1, 2 * judge.config.concurrency)   # decoded frames of a few clips at a time: bounded memory
        try:
            done = {item.item_id for item in todo}
            ready = [item for item in items if item.item_id not in done]
            for result in scorer.score(ready, domain.frames):
                results[result.item_id] = result
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                decoded = decoder.decode_batch([by_id[item.item_id] for item in part])
                sendable = []
                for item, pixels in zip(part, decoded):
                    if isinstance(pixels, VideoDecodeError):
                        results[item.item_id] = ItemScore(item.item_id, None, STATUS_FAILED, [],
                                                          f"served score: clip {item.item_id!r}: {pixels}")
                        continue
                    item.frames = clips_to_uint8(pixels[None].cpu())[0][picked]
                    sendable.append(item)
                for result in scorer.score(sendable, domain.frames):
                    results[result.item_id] = result
                for item in part:
                    item.frames = None
        except ServerUnreachable as err:
            raise ServerUnreachable(f"served judge reward.models.{judge.name}: {err}".replace(
                "label.vlm.base_url", f"reward.models.{judge.name}.base_url")) from None
        finally:
            if decoder is not None:
                decoder.close()
        ordered = [results[pid] for pid in wanted]
        problems = [r.message for r in ordered if r.message]
        book["judges"][judge.name] = {
            "fingerprint": judge.fingerprint, "kind": judge.kind, "scale": [judge.low, judge.high],
            "scores": {r.item_id: r.score for r in ordered}, "status": {r.item_id: r.status for r in ordered},
            "answers": {r.item_id: r.answers for r in ordered}, "problems": problems}
        atomic.write_json(scores_path(data_dir), book)
        stats = scorer.client.stats.summary(time.time() - t0)
        out[judge.name] = {"clips": len(wanted), "scored": sum(r.score is not None for r in ordered),
                           "problems": len(problems), "asked": stats["requests"], "cached": stats["cached_answers"],
                           "seconds": round(time.time() - t0, 2)}
        for message in problems[:5]:
            log.warning("%s", message)
        log.info("served judge %s: %d of %d routed clips scored, %d problems (neutral weight), %d requests, "
                 "%d answers from the cache", judge.name, out[judge.name]["scored"], len(wanted), len(problems),
                 stats["requests"], stats["cached_answers"])
    return out


def score_videos(cfg, answers_dir: str | Path, videos: dict, captions: Sequence[str], fps: float) -> dict:
    """Every served judge's scores of evaluation videos: ``videos`` ``{role: [(video id, path of its mp4)]}`` in the
    order of ``captions``; returns ``{judge: {role: (n,) float64, NaN where unscored}, "problems": [...]}``. The
    replies go to ``answers_dir/NAME/vlm_answers.jsonl``, so a rerun asks nothing again. An evaluation ranks models,
    it weights no data: a problem leaves that video's score out of the comparison."""
    out = {}
    for judge in served_judges(cfg.reward):
        cache = AnswerCache(Path(answers_dir) / judge.name / ANSWERS_FILE)
        scorer = ServedScorer(judge.config, judge.kind, judge.low, judge.high, question=judge.question, cache=cache)
        scores, problems = {}, []
        try:
            for role, listed in videos.items():
                items = []
                for (video_id, path), caption in zip(listed, captions):
                    clip = read_mp4(path)
                    picked = scorer.pick(clip.shape[1])
                    item = ScoreItem(video_id, caption, f"{path}|{Path(path).stat().st_size}",
                                     frames=clips_to_uint8(clip[None])[0][picked], seconds=clip.shape[1] / fps)
                    items.append((item, clip.shape[1]))
                results = [scorer.score([item], frames)[0] for item, frames in items]
                scores[role] = torch.tensor([math.nan if r.score is None else r.score for r in results],
                                            dtype=torch.float64)
                problems += [r.message for r in results if r.message]
        except ServerUnreachable as err:
            raise ServerUnreachable(f"served judge reward.models.{judge.name}: {err}".replace(
                "label.vlm.base_url", f"reward.models.{judge.name}.base_url")) from None
        out[judge.name] = {**scores, "problems": problems}
    return out


def served_row_weights(reward_cfg, data_dir: str | Path, prompt_ids: Sequence[str], source: torch.Tensor,
                       row_prompts: torch.Tensor) -> tuple[Optional[torch.Tensor], dict]:
    """``(weights (P,) float32 | None, summary)`` of the served judges for training on ``data_dir``'s rows
    (``row_prompts``: each row's prompt index); None without served judges. Refuses data whose scores are
    missing or were asked with another judge entry (the message names the command that scores them)."""
    judges = served_judges(reward_cfg)
    if not judges:
        return None, {}
    book = _read_scores_file(data_dir)
    mask = routed(reward_cfg.subset, source)
    wanted = [pid for pid, keep in zip(prompt_ids, mask.tolist()) if keep]
    scores = torch.full((len(judges), len(prompt_ids)), math.nan, dtype=torch.float64)
    problems = {}
    for j, judge in enumerate(judges):
        entry = book["judges"].get(judge.name)
        missing = [] if entry is None else [pid for pid in wanted if pid not in entry["scores"]]
        if entry is None or entry["fingerprint"] != judge.fingerprint or missing:
            why = ("has no scores" if entry is None else "was scored with another entry" if
                   entry["fingerprint"] != judge.fingerprint else f"has no score for clips {missing[:3]}")
            raise ConfigError(f"served judge reward.models.{judge.name} {why} in {scores_path(data_dir)}: run "
                              f"`vidpo preprocess RECIPE --out {data_dir}` with this recipe (complete shards are "
                              "skipped; only the judge's missing questions are asked)")
        for p, pid in enumerate(prompt_ids):
            value = entry["scores"].get(pid) if mask[p] else None
            scores[j, p] = math.nan if value is None else float(value)
        problems[judge.name] = len(entry["problems"])
    counts = torch.bincount(row_prompts.long().flatten(), minlength=len(prompt_ids))
    weights = served_weights(scores, [judge.gamma for judge in judges], mask, counts)
    neutral = mask & torch.isnan(scores).any(0) & (counts > 0)
    summary = {"judges": {judge.name: {"kind": judge.kind, "gamma": judge.gamma, "scale": [judge.low, judge.high],
                                       "problems": problems[judge.name]} for judge in judges},
               "weights": weight_stats(weights, mask, counts), "neutral_rows": int(counts[neutral].sum())}
    return weights.float(), summary
