"""Consistency-distillation preprocessing on a released model (``model.kind: wan | cogvideox``): the teacher's guided
ODE step of real clips, recorded into the same resumable shards as the shapes world's (``vidpo.stages.preprocess``).

Inputs: the release ``model.path`` (transformer, VAE, text encoder) and the prompt file ``prompts.path`` whose
training prompts name reference clips (JSONL ``"clip"``; optional ``"source": "curated" | "web"``, default
curated: the routing of motion guidance and rewards). The clips become VAE latents through ``vidpo cache``
(``vidpo.stages.real_clips``: ``DATA/clips/``), the prompts and their negative prompts become the text encoder's
embeddings (``DATA/prompt_embeddings/``); both are cached and resumable themselves.

**The process** (``vidpo.objectives.distill_process``): Wan is a rectified flow, ``x_t = (1 - t) x0 + t eps`` and
DDIM is Euler on its velocity; CogVideoX a v-prediction DDPM with integer timesteps ``k = round(t (N - 1))``,
``x_t = a_k x0 + s_k eps`` from the release's own scheduler config, DDIM on its v, and engine time 0 its clean end.

**Times.** A Wan student samples with the ``distill.eval_steps``-step sigmas ``s_0 = 1 > ... > s_k = 0`` of a
``FlowMatchEulerDiscreteScheduler`` (``distill.student_shift``, ``distill.student_terminal``; exported so that
``WanPipeline`` reproduces them); a CogVideoX student with ``CogVideoXDDIMScheduler``'s trailing timesteps
(999, 749, 499, 249 for 4 steps; exported so that ``CogVideoXPipeline`` reproduces them). The teacher's grid
``t_0 = 0 < ... < t_N = 1`` (N = ``distill.grid_steps``) splits each student interval into ``N / k`` equal parts
(whole timesteps for CogVideoX), so every student time is a training time ``t_n`` (n a multiple of the skip).

**One row**: prompt ``p`` (uniform over the training prompts with a clip), its clip's latents ``x0``, noise
``eps`` and ``n = k_skip * U{1..N/k_skip}`` drawn from the shard's stream ``(seed, "distill", "rows", shard)``::

    x_t    = a(t_n) x0 + s(t_n) eps                                      the release's forward path
    x_prev = step(x_t, t_n -> t_{n-k}, v~)                               DDIM (Euler on Wan's velocity)
    v~     = v_neg + w (v_cond - v_neg) + eta m grad g(x_t)              CFG against the NEGATIVE prompt's
                                                                         embeddings (the pipelines' uncond branch)

with ``w = distill.cfg_scale`` and the motion-guidance term of ``vidpo.models.motion_guidance`` read through the
family's probe (``vidpo.models.wan.motion.WanAttentionProbe``, ``vidpo.models.cogvideox.motion``: the documented
rules for their full 3-D attention), on rows whose source is in ``distill.motion_sources`` at ``t_n > 1 -
distill.motion_fraction``; ``A_ref`` comes from the DDIM inversion of the clip's own latents on the same grid.

**Shards**: ``DATA/shards/shard_*.safetensors`` with ``x_t, x_prev (S, C, T, H, W)`` float32, ``t, t_prev, energy``,
``n, prompt`` (index into ``meta.json``'s ``prompt_ids``), ``source``, ``motion`` (the shapes world's format; ``x0``
is not repeated: it is the row's prompt's clip in ``DATA/clips``, 1/3 of the bytes at scale); ``meta.json`` records
the settings (model, prompts, clips, grid, guidance; a DDPM's noise schedule) and refuses a rerun with other ones.
Shards are written atomically, each from its own stream; rank ``r`` of ``R`` writes shards ``r, r + R, ...``; a rerun
skips complete shards: after a kill nothing is redone and nothing is lost (``vidpo.stages.preprocess.write_shards``).

**Served judges** (``reward.models`` entries with ``rule: served_score``, ``vidpo.objectives.rewards_served``): before
the teacher is loaded, rank 0 has every judge score each routed clip (decoded as ``vidpo cache`` decodes it) against
its prompt into ``DATA/served_rewards/`` (answers cached as they arrive: a rerun asks only what is unanswered).
Here rather than at the start of training: this pass already reads the real clips and runs once per data, while
training then needs no server and stays a function of ``DATA`` (a rerun of training trains the same); the scores
are not part of the shards' settings, so a new judge costs its questions, never a teacher pass.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vidpo.config import DISTILL_SOURCES, ConfigError, RunConfig
from vidpo.data.prompts import PromptSet
from vidpo.models.cogvideox import COGVIDEOX_SCHEDULER
from vidpo.models.cogvideox.motion import CogVideoXAttentionProbe
from vidpo.models.cogvideox.motion import transformer_depth as cogvideox_depth
from vidpo.models.pipeline_dir import PipelineDirectory
from vidpo.models.wan.motion import WanAttentionProbe, transformer_depth
from vidpo.objectives.distill_process import DiffusionProcess, release_process
from vidpo.objectives.rewards_served import score_served_judges
from vidpo.stages.parts import open_model_dir
from vidpo.stages.preprocess import (
    DATA_VERSION,
    INDEX_FILE,
    META_FILE,
    _check_meta,
    guided_teacher_step,
    shard_path,
    shard_stats_of,
    write_shards,
)
from vidpo.stages.prompts import embed_prompts
from vidpo.stages.real_clips import encode_prompt_clips
from vidpo.training.conditioning import EmbeddingConditioning
from vidpo.training.modeling import DTYPES, build_domain, build_policy, pick_device, set_threads
from vidpo.utils import atomic
from vidpo.utils.seeding import generator

log = logging.getLogger("vidpo")

REAL_SHARD_KEYS = ("x_t", "x_prev", "t", "t_prev", "n", "prompt", "source", "motion", "energy")
REAL_LAZY_KEYS = ("x_t", "x_prev")   # read row by row in training (vidpo.stages.preprocess.DistillData)
REAL_TRAIN_KEYS = ("x_t", "x_prev", "t", "t_prev", "prompt", "source")
# How each family's temporal attention is read (motion guidance) and how deep its transformer is.
PROBES = {"wan": WanAttentionProbe, "cogvideox": CogVideoXAttentionProbe}
DEPTHS = {"wan": transformer_depth, "cogvideox": cogvideox_depth}


def check_release_family(cfg: RunConfig) -> None:
    """The real-model path distils Wan (rectified flow) and CogVideoX (v-prediction DDPM) releases."""
    if cfg.model.kind not in PROBES:
        raise ConfigError(f"model.kind={cfg.model.kind}: consistency distillation of a release supports "
                          f"{sorted(PROBES)}")
    if not cfg.prompts.path:
        raise ConfigError("consistency distillation of a release needs prompts.path: a prompt file whose training "
                          "prompts name reference clips (JSONL \"clip\")")


def distill_process(cfg: RunConfig) -> DiffusionProcess:
    """The release's diffusion process (``vidpo.objectives.distill_process``): CogVideoX's from the release's own
    ``scheduler/scheduler_config.json`` (its betas, SNR shift and zero-terminal-SNR rescaling), else CogVideoX-2B's."""
    check_release_family(cfg)
    if cfg.model.kind != "cogvideox":
        return release_process(cfg.model.kind)
    pipe = open_model_dir(cfg)
    config = pipe.scheduler_config() if pipe.has("scheduler") else COGVIDEOX_SCHEDULER
    return release_process(cfg.model.kind, config)


def student_schedule(cfg: RunConfig) -> tuple:
    """``(scheduler, sigmas (k + 1,), teacher grid (N + 1,))`` of a release student (module doc)."""
    return distill_process(cfg).student_schedule(cfg.distill)


@dataclass
class ReleaseData:
    """What the real path's stages share: the release, the prompts, their cached embeddings and clip latents
    (read from the caches by row, never all at once: at scale they do not fit in memory)."""

    pipe: PipelineDirectory
    domain: object
    conditioning: EmbeddingConditioning
    prompts: PromptSet                   # training prompts with a clip, in file order (a row's "prompt" index)
    source: torch.Tensor                 # (P,) index into DISTILL_SOURCES
    clips: Optional[object]              # RealClipLatents of the prompts' clips (None: not needed)
    digest: dict                         # what determines the rows (for meta.json)

    def _ids(self, index: torch.Tensor) -> list[str]:
        ids = self.prompts.ids
        return [ids[i] for i in index.tolist()]

    def cond_of(self, index: torch.Tensor) -> torch.Tensor:
        """(n, L, D) embeddings of training prompts ``index``."""
        return self.conditioning.for_prompts(self._ids(index))

    def negative_of(self, index: torch.Tensor) -> torch.Tensor:
        """(n, L, D) embeddings of their negative prompts (WanPipeline's unconditional branch)."""
        return self.conditioning.negative(self._ids(index), None)

    def latents_of(self, index: torch.Tensor) -> torch.Tensor:
        """(n, C, T, H, W) float32 VAE latents of their clips."""
        return self.clips.get(self._ids(index)).float()


def _source_of(prompt) -> int:
    source = prompt.extra.get("source", "curated")
    if source not in DISTILL_SOURCES:
        raise ConfigError(f"{prompt.where or prompt.id}: \"source\": {source!r} is not one of {list(DISTILL_SOURCES)}")
    return DISTILL_SOURCES.index(source)


def _model_digest(pipe: PipelineDirectory) -> str:
    """The transformer's config and its weight files' names and sizes (hashing 28 GB of weights would take
    minutes; a different checkpoint differs in config or sizes, and the path is recorded beside)."""
    h = hashlib.sha256((pipe.path / "transformer" / "config.json").read_bytes())
    for f in sorted((pipe.path / "transformer").glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def release_data(cfg: RunConfig, data_dir: str | Path, device, *, clips: bool = True) -> ReleaseData:
    """Embed every prompt once (the encoder is released right after) into ``data_dir/prompt_embeddings`` and, with
    ``clips``, encode the prompts' clips into ``data_dir/clips``; return the training prompts that have a clip."""
    check_release_family(cfg)
    pipe = open_model_dir(cfg, "vae", "text_encoder", "tokenizer")
    domain = build_domain(cfg)
    train = PromptSet([p for p in domain.prompts("train") if p.clip is not None], domain.all_prompts.source)
    if not len(train):
        raise ConfigError(f"{domain.all_prompts.source}: no training prompt names a \"clip\": consistency "
                          "distillation starts the teacher's ODE from real clips")
    source = torch.tensor([_source_of(p) for p in train], dtype=torch.long)   # bad input fails before model work
    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    text = pipe.text_encoder(device, compute, max_length=cfg.prompts.max_sequence_length)
    embeddings = embed_prompts(cfg, domain.all_prompts, text, data_dir)
    del text
    gc.collect()
    conditioning = EmbeddingConditioning(embeddings, dtype=DTYPES[cfg.model.dtype])
    ids = list(train.ids)
    reader, clips_digest = None, None
    if clips:
        reader = encode_prompt_clips(cfg, domain, pipe, data_dir)
        clips_digest = hashlib.sha256((Path(data_dir) / "clips" / "latents" / "index.json").read_bytes()
                                      ).hexdigest()[:16]
    digest = {"model_kind": cfg.model.kind, "model": _model_digest(pipe), "model_dtype": cfg.model.dtype,
              "prompt_ids": ids, "prompts": embeddings.root.name, "clips": clips_digest}
    return ReleaseData(pipe, domain, conditioning, train, source, reader, digest)


def content_settings(cfg: RunConfig, data: ReleaseData) -> dict:
    d = cfg.distill
    # A DDPM's rows depend on its noise schedule too (a Wan release's settings stay as they always were).
    process = {} if cfg.model.kind == "wan" else {"process": distill_process(cfg).config}
    return {"version": DATA_VERSION, "seed": cfg.seed, **data.digest, **process, "shard_size": d.shard_size,
            "grid_steps": d.grid_steps, "skip": d.skip, "eval_steps": d.eval_steps, "student_shift": d.student_shift,
            "student_terminal": d.student_terminal, "cfg_scale": d.cfg_scale, "motion_scale": d.motion_scale,
            "motion_fraction": d.motion_fraction, "motion_block": d.motion_block,
            "motion_sources": sorted(d.motion_sources)}


def draw_rows(cfg: RunConfig, data: ReleaseData, shard: int, grid: torch.Tensor) -> dict:
    """The random part of shard ``shard``: ``shard_size`` rows of prompts (clips), noise and timesteps."""
    d = cfg.distill
    size = d.shard_size
    g = generator(cfg.seed, "distill", "rows", shard)
    prompt = torch.randint(len(data.prompts), (size,), generator=g)
    shape = tuple(data.latents_of(prompt[:1]).shape[1:])
    noise = torch.randn((size,) + shape, generator=g)
    n = d.skip * torch.randint(1, d.grid_steps // d.skip + 1, (size,), generator=g)
    return {"prompt": prompt, "source": data.source[prompt], "noise": noise, "n": n, "t": grid[n],
            "t_prev": grid[n - d.skip]}


def compute_shard(cfg: RunConfig, teacher, data: ReleaseData, shard: int, rows: int, grid: torch.Tensor,
                  device) -> tuple:
    drawn = {k: v[:rows] for k, v in draw_rows(cfg, data, shard, grid).items()}
    parts, energies, ratios = [], [], []
    step = max(1, cfg.distill.batch_size)
    depth = DEPTHS[cfg.model.kind](teacher)
    process = distill_process(cfg)
    for start in range(0, rows, step):
        chunk = {k: v[start:start + step] for k, v in drawn.items()}
        chunk["x0"] = data.latents_of(chunk["prompt"])
        out = guided_teacher_step(cfg, teacher, chunk, data.cond_of(chunk["prompt"]).to(teacher.dtype),
                                  data.negative_of(chunk["prompt"]).to(teacher.dtype), grid, device, depth=depth,
                                  probe=PROBES[cfg.model.kind], process=process)
        parts.append(out)
        if out["stats"]:
            stats = out["stats"]
            energies.append(stats["energy"].float().cpu())
            ratios.append((stats["guidance_rms"] / stats["velocity_rms"].clamp_min(1e-12)).float().cpu())
    tensors = {k: drawn[k] for k in ("prompt", "source", "n", "t", "t_prev")}
    for key in ("x_t", "x_prev", "motion", "energy"):
        tensors[key] = torch.cat([p[key] for p in parts])
    stats = {"rows": rows, "motion_rows": int(tensors["motion"].sum()),
             "curated_rows": int((tensors["source"] == 0).sum()),
             "mean_energy": float(torch.cat(energies).mean()) if energies else None,
             "mean_guidance_to_velocity": float(torch.cat(ratios).mean()) if ratios else None}
    return tensors, stats


def preprocess_real_job(cfg: RunConfig, out_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                        progress: Optional[bool] = None, release: Optional[ReleaseData] = None) -> dict:
    """``vidpo preprocess`` on a release: this rank's shards into ``out_dir`` (module doc); the index once every
    shard is complete. ``release``: ``release_data(cfg, out_dir, ...)`` when the caller has it (the text encoder
    is then not loaded again). Returns counts and timing."""
    out_dir = Path(out_dir)
    d = cfg.distill
    set_threads(cfg)
    device = pick_device()
    out_dir.mkdir(parents=True, exist_ok=True)
    _, sigmas, grid = student_schedule(cfg)
    data = release if release is not None else release_data(cfg, out_dir, device)
    digest = _check_meta(out_dir, content_settings(cfg, data), d.num_rows)
    # The served judges score the routed clips before the teacher is loaded: an unreachable server is one error
    # before any model work, and no GPU memory is held while waiting on HTTP. Rank 0 asks; the answers are cached.
    served = score_served_judges(cfg, out_dir, list(data.prompts.ids), data.source, data.domain) if rank == 0 else {}
    teacher = build_policy(cfg, None, device).eval().requires_grad_(False)   # the release itself, no LoRA
    t0 = time.time()
    show = cfg.train.progress if progress is None else progress
    computed, skipped, _ = write_shards(
        out_dir, digest, d.num_rows, d.shard_size,
        lambda shard, rows: compute_shard(cfg, teacher, data, shard, rows, grid, device),
        keys=REAL_SHARD_KEYS, progress=show, rank=rank, world_size=world_size)
    seconds = time.time() - t0
    num_shards = math.ceil(d.num_rows / d.shard_size)
    summary = {"out": str(out_dir), "rows": d.num_rows, "shards": num_shards, "computed": computed,
               "skipped": skipped, "seconds": round(seconds, 1), "settings_digest": digest,
               "student_sigmas": [round(float(s), 6) for s in sigmas], "prompts": len(data.prompts)}
    if served:
        summary["served_rewards"] = served
    paths = [shard_path(out_dir, k) for k in range(num_shards)]
    if all(p.exists() for p in paths):
        stats = [shard_stats_of(p) for p in paths]
        guided = [s["mean_guidance_to_velocity"] for s in stats if s.get("mean_guidance_to_velocity") is not None]
        summary.update(motion_rows=sum(s["motion_rows"] for s in stats),
                       curated_rows=sum(s["curated_rows"] for s in stats),
                       # rms of eta grad g over rms of the CFG velocity: how strongly motion guidance steers
                       mean_guidance_to_velocity=sum(guided) / len(guided) if guided else None)
        atomic.write_json(out_dir / INDEX_FILE, {"summary": summary, "shards": stats})
    log.info("preprocess (%s): %d shards (%d computed, %d already complete) on rank %d/%d, %.1fs", cfg.model.kind,
             num_shards, computed, skipped, rank, world_size, seconds)
    return summary


def read_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / META_FILE).read_text())
