"""The judged evaluation of a run: base and policy on the held-out prompts, video against video.

A real model has no exact oracle, so ``vidpo run`` evaluates it the way a person would: ``eval.judged_videos``
videos per model, the held-out prompts in turn (prompt ``k mod P`` for video ``k``), each model sampled from
the same noise (``(seed, "eval", eval.seed_offset + k)``) with the same guidance (``eval.cfg_scale``,
``eval.steps``, each prompt's negative prompt), decoded by the model's VAE and written to
``RUN_DIR/eval/videos/<prompt>_<seed>_{base,policy}.mp4``. A judge (``eval.judge``: the run's labeller, the VLM
asking both orders, people through a labels file, a critic) compares every pair at video level with the order
shown randomised and balanced (``vidpo.evaluation.judge``): the win rate with its 95% interval over prompts,
ties and failed comparisons counted apart. Model-free statistics of every video (flicker, frame difference,
motion: ``vidpo.evaluation.video_stats``) are compared pairwise with their intervals. Everything goes to
``RUN_DIR/eval/judged.json``; the run report shows the videos side by side with the verdicts.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import torch

from vidpo.config import ConfigError, RunConfig
from vidpo.data.domains import Domain, ShapesDomain
from vidpo.data.video_io import display_scale, write_mp4
from vidpo.evaluation.evaluate import sample_videos
from vidpo.evaluation.judge import EVAL_DIR, JUDGED_NAME, judge_videos, video_path
from vidpo.evaluation.video_stats import clip_stats, paired_stats
from vidpo.models.vae import VideoVAE
from vidpo.stages.label import build_run_labeler
from vidpo.training.conditioning import Conditioning
from vidpo.utils import atomic

log = logging.getLogger("vidpo")


def judge_kind(cfg: RunConfig, domain: Domain) -> Optional[str]:
    """The labeller kind that judges (``eval.judge``), or None when the judged evaluation is off."""
    kind = cfg.eval.judge
    if kind == "auto":
        kind = "none" if isinstance(domain, ShapesDomain) else "label"
    if kind == "none":
        return None
    return cfg.label.labeler if kind == "label" else kind


def judged_evaluation(cfg: RunConfig, run_dir: str | Path, *, base: torch.nn.Module, policy: torch.nn.Module,
                      domain: Domain, conditioning: Conditioning, vae: VideoVAE, write: bool = True) -> Optional[dict]:
    """Sample, decode, write and judge (module docstring); returns the summary for ``summary.json``, or None
    when ``eval.judge`` is 'none'. Under torchrun every rank samples (a sharded policy needs all of them in each
    forward) and only the rank with ``write`` decodes, judges and writes; the others return None."""
    kind = judge_kind(cfg, domain)
    if kind is None:
        return None
    judge_cfg = copy.deepcopy(cfg)
    judge_cfg.label.labeler = kind
    labeler = build_run_labeler(judge_cfg, getattr(domain, "world", None))
    prompts = domain.prompts("heldout")
    if not len(prompts):
        raise ConfigError("the judged evaluation needs held-out prompts: raise prompts.heldout_fraction or mark "
                          "prompts with \"split\": \"heldout\"")
    n = cfg.eval.judged_videos
    chosen = [prompts[k % len(prompts)] for k in range(n)]
    ids = [p.id for p in chosen]
    seeds = [cfg.eval.seed_offset + k for k in range(n)]
    cond = conditioning.for_prompts(ids)
    negative = conditioning.negative(ids, cond)
    try:
        shape = vae.latent_shape(domain.frames, domain.height, domain.width)
    except ValueError as exc:
        raise ConfigError(f"generate.frames / generate.height / generate.width: {exc}") from None
    eval_dir = Path(run_dir) / EVAL_DIR
    latents = {role: sample_videos(model, cond, shape, seed=cfg.seed, indices=seeds, steps=cfg.eval.steps,
                                   cfg_scale=cfg.eval.cfg_scale, negative=negative, batch_size=cfg.sample.batch_size)
               for role, model in (("base", base), ("policy", policy))}
    if not write:
        return None
    clips, stats = {}, {}
    for role in ("base", "policy"):
        pixels = torch.cat([vae.decode(latents[role][i:i + cfg.generate.decode_batch_size])
                            for i in range(0, n, cfg.generate.decode_batch_size)]).cpu()
        scale = display_scale(domain.height, domain.width)
        for prompt_id, seed, clip in zip(ids, seeds, pixels):
            write_mp4(video_path(eval_dir, prompt_id, seed, role), clip, domain.fps, scale=scale)
        clips[role], stats[role] = pixels, clip_stats(pixels)
    comparison = judge_videos(labeler, clips["policy"], clips["base"], [p.text for p in chosen], ids, domain.fps,
                              seeds=seeds, order_seed=cfg.seed, cond_ids=domain.condition_ids(ids))
    comparison.save(eval_dir / JUDGED_NAME)
    summary = {**comparison.summary(), "judge": kind, "videos": n,
               "video_stats": paired_stats(stats["policy"], stats["base"])}
    atomic.write_json(eval_dir / "judged_summary.json", summary)
    log.info("judged evaluation (%s): policy vs base win rate %s over %d videos of %d prompts", kind,
             summary.get("win_rate"), n, summary["prompts"])
    return summary
