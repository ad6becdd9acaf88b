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

Under torchrun the sampling, the expensive part (``eval.steps`` forwards with guidance per video and model), is
split over the data-parallel groups: group g samples videos ``k = g, g + G, ...`` (every rank of a TP / CP group
the same ones, as its sharded forward needs), each from its own noise stream, so the videos equal one process's.
Every group runs the same number of forwards (a short group repeats its last video), because an FSDP forward is
a collective of all ranks. The latents (8 MB a Wan 480p video) are then gathered on every rank, and the decoding
is split too: rank r decodes the decode batches ``r, r + R, ...`` (the same batches as one process, so the same
frames), writes their mp4s, their uint8 frames (``eval/frames/``) and their clip statistics. Rank 0 then judges
from those frames, read one batch at a time (a decoded 480p video is 97 MB of frames: 32 per model would be 6 GB
held at once), and removes them. One process takes the same path, so a judge sees the same frames either way.
"""
from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from vidpo.config import ConfigError, RunConfig
from vidpo.data.domains import Domain, ShapesDomain
from vidpo.data.video_io import display_scale, from_uint8, to_uint8, write_mp4
from vidpo.data.video_rows import VideoRows
from vidpo.evaluation.evaluate import sample_videos
from vidpo.evaluation.judge import EVAL_DIR, JUDGED_NAME, judge_videos, video_path
from vidpo.evaluation.video_stats import clip_stats, paired_stats
from vidpo.models.vae import VideoVAE
from vidpo.stages.label import build_run_labeler
from vidpo.training.conditioning import Conditioning
from vidpo.utils import atomic

log = logging.getLogger("vidpo")


FRAMES_DIR = "frames"
"""Under ``RUN_DIR/eval/``: each judged video's uint8 frames, from its decoding to the end of the judging."""


def sample_split(sample, n: int, parallel) -> torch.Tensor:
    """``sample(rows)`` of rows ``0..n-1`` (module doc): in one process all of them; under torchrun each
    data-parallel group its share, padded to the same count, gathered in row order on every rank."""
    if parallel is None or parallel.world_size == 1:
        return sample(list(range(n)))
    groups, group = parallel.dp, parallel.dp_rank
    mine = list(range(group, n, groups))
    per_group = -(-n // groups)
    padded = mine + [mine[-1] if mine else 0] * (per_group - len(mine))   # equal forwards on every rank
    local = sample(padded)[:len(mine)] if padded else None
    share = (mine, None if local is None else local.cpu()) if parallel.tp_rank == 0 and parallel.cp_rank == 0 \
        else ([], None)
    gathered = [None] * parallel.world_size
    dist.all_gather_object(gathered, share)
    out = [None] * n
    for rows, values in gathered:
        for j, k in enumerate(rows):
            out[k] = values[j]
    return torch.stack(out)


def decode_split(vae: VideoVAE, latents: torch.Tensor, batch_size: int, parallel):
    """``(k, clip)`` of this rank's videos: the decode batches ``[0, b), [b, 2b), ...`` of ``latents`` dealt to the
    ranks in turn (one process: all of them), each clip float (3, F, H, W) on the CPU."""
    rank, ranks = (0, 1) if parallel is None else (parallel.rank, parallel.world_size)
    starts = list(range(0, latents.shape[0], batch_size))[rank::ranks]
    for start in starts:
        decoded = vae.decode(latents[start:start + batch_size]).cpu()
        yield from zip(range(start, start + decoded.shape[0]), decoded)


def frames_path(eval_dir: Path, prompt_id: str, seed: int, role: str) -> Path:
    """Where a judged video's uint8 frames wait for the judge (beside its mp4's name)."""
    return eval_dir / FRAMES_DIR / (video_path(eval_dir, prompt_id, seed, role).stem + ".safetensors")


def _read_frames(path: Path) -> torch.Tensor:
    return from_uint8(load_file(str(path))["frames"])


def judge_kind(cfg: RunConfig, domain: Domain) -> Optional[str]:
    """The labeller kind that judges (``eval.judge``), or None when the judged evaluation is off."""
    kind = cfg.eval.judge
    if kind == "auto":
        kind = "none" if isinstance(domain, ShapesDomain) else "label"
    if kind == "none":
        return None
    return cfg.label.labeler if kind == "label" else kind


def judged_evaluation(cfg: RunConfig, run_dir: str | Path, *, base: torch.nn.Module, policy: torch.nn.Module,
                      domain: Domain, conditioning: Conditioning, vae: VideoVAE, write: bool = True,
                      parallel=None) -> Optional[dict]:
    """Sample, decode, write and judge (module docstring); returns the summary for ``summary.json``, or None
    when ``eval.judge`` is 'none'. Under torchrun (``parallel``: the run's ParallelContext) every rank samples its
    data-parallel group's share of the videos and decodes its share of the decode batches; only the rank with
    ``write`` (rank 0) judges and writes the summary; the others return None."""
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
    latents = {}
    for role, model in (("base", base), ("policy", policy)):
        def sample(rows: list[int]) -> torch.Tensor:
            return sample_videos(model, cond[rows], shape, seed=cfg.seed, indices=[seeds[k] for k in rows],
                                 steps=cfg.eval.steps, cfg_scale=cfg.eval.cfg_scale,
                                 negative=None if negative is None else negative[rows],
                                 batch_size=cfg.sample.batch_size)
        latents[role] = sample_split(sample, n, parallel)
    scale = display_scale(domain.height, domain.width)
    mine = {}    # (role, k) -> this rank's clip statistics
    for role in ("base", "policy"):
        for k, clip in decode_split(vae, latents[role], cfg.generate.decode_batch_size, parallel):
            write_mp4(video_path(eval_dir, ids[k], seeds[k], role), clip, domain.fps, scale=scale)
            atomic.save_safetensors({"frames": to_uint8(clip)}, frames_path(eval_dir, ids[k], seeds[k], role))
            mine[role, k] = {name: float(v[0]) for name, v in clip_stats(clip[None]).items()}
    every = [mine]
    if parallel is not None and parallel.world_size > 1:
        every = [None] * parallel.world_size
        dist.all_gather_object(every, mine)   # also the barrier after which every rank's frames are on disk
    if not write:
        return None
    by_video = {key: values for part in every for key, values in part.items()}
    clips = {role: VideoRows([lambda p=frames_path(eval_dir, ids[k], seeds[k], role): _read_frames(p)
                              for k in range(n)]) for role in ("base", "policy")}
    stats = {role: {name: torch.tensor([by_video[role, k][name] for k in range(n)], dtype=torch.float64)
                    for name in by_video["base", 0]} for role in ("base", "policy")}
    comparison = judge_videos(labeler, clips["policy"], clips["base"], [p.text for p in chosen], ids, domain.fps,
                              seeds=seeds, order_seed=cfg.seed, cond_ids=domain.condition_ids(ids))
    comparison.save(eval_dir / JUDGED_NAME)
    shutil.rmtree(eval_dir / FRAMES_DIR, ignore_errors=True)
    summary = {**comparison.summary(), "judge": kind, "videos": n,
               "video_stats": paired_stats(stats["policy"], stats["base"])}
    atomic.write_json(eval_dir / "judged_summary.json", summary)
    log.info("judged evaluation (%s): policy vs base win rate %s over %d videos of %d prompts", kind,
             summary.get("win_rate"), n, summary["prompts"])
    return summary
