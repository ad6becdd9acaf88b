"""Consistency distillation of a release (``model.kind: wan | cogvideox``): train the student, export it where
diffusers loads it, and evaluate teacher against student by the judged evaluation.

**Student.** The release's transformer itself, with LoRA (the ``lora`` section) or fully fine-tuned, trained on
the preprocessed rows (``vidpo.stages.preprocess_real``) with ``vidpo.objectives.distill``'s loss: the target is
the student under stop-gradient (no EMA network), and the teacher is not in memory (its steps are in the
shards), so the process holds ONE transformer (``summary.json``'s ``residency``, measured inside the first
step: ``dit_models`` counts the diffusers ``*Transformer3DModel`` instances alive). Conditions are the cached
prompt embeddings; the optional reward mixture decodes the student's one-step prediction with the VAE
(``vidpo.objectives.rewards_models``); served judges weight the CD loss of the routed rows by the scores that
preprocessing recorded (``vidpo.objectives.rewards_served``; ``summary.json``'s ``served_rewards``: the weights'
min / mean / max and effective sample size).

**Export** (into ``OUT``): ``OUT/lora/`` in diffusers' layout (``vidpo.training.export``; a full fine-tune:
``OUT/transformer/``) and ``OUT/scheduler/scheduler_config.json``, the scheduler whose ``distill.eval_steps`` times
are the student's (``vidpo.objectives.distill_process``): Wan's ``FlowMatchEulerDiscreteScheduler``, CogVideoX's
``CogVideoXDDIMScheduler`` with the release's noise schedule and trailing timesteps::

    pipe = WanPipeline.from_pretrained(RELEASE)                  # CogVideoXPipeline
    pipe.load_lora_weights(OUT / "lora")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(OUT / "scheduler")   # CogVideoXDDIMScheduler
    video = pipe(prompt, num_inference_steps=4, guidance_scale=1.0).frames     # 4 network evaluations

**Evaluation** (``OUT/eval``; one warm-up clip per model first, so first-call costs are not timed): the teacher (the
release with its own scheduler, ``eval.steps`` steps, CFG ``eval.cfg_scale`` against each prompt's negative prompt)
as the base and the student (``ConsistencyStudent``: its k steps, no CFG) as the policy of
``vidpo.stages.judged_eval`` on the held-out prompts, from the same noise: judge win rate with its CI, video
statistics; plus network evaluations and wall time per clip of each, and (with reward models) each reward's score of
both models' judged videos with the paired difference's CI.
"""
from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from vidpo.config import ConfigError, RunConfig, to_yaml
from vidpo.data.video_io import read_mp4
from vidpo.evaluation.evaluate import mean_ci, sample_videos
from vidpo.evaluation.judge import EVAL_DIR, video_path
from vidpo.models.vae_grad import checkpointed_tiled_decode, set_tile_size
from vidpo.objectives.distill import ConsistencyDistillObjective, ConsistencyStudent
from vidpo.objectives.rewards import RewardMixture
from vidpo.objectives.rewards_models import build_model_rewards, model_reward_names
from vidpo.objectives.rewards_served import SCORES_DIR, score_videos, served_judges, served_row_weights
from vidpo.stages.common import setup_logging, write_run_report
from vidpo.stages.distill_eval import per_clip, sampling_meter
from vidpo.stages.judged_eval import judged_evaluation
from vidpo.stages.parts import latent_frames_of
from vidpo.stages.preprocess import DistillData, require_distill_data
from vidpo.stages.preprocess_real import (
    REAL_LAZY_KEYS,
    REAL_TRAIN_KEYS,
    distill_process,
    preprocess_real_job,
    release_data,
    student_schedule,
)
from vidpo.training.export import export_run
from vidpo.training.modeling import build_policy, pick_device, set_threads
from vidpo.training.policy import (
    apply_activation_checkpointing,
    initial_policy_with_lora,
    prepare_parallel_student,
    start_distributed,
)
from vidpo.training.trainer import Trainer
from vidpo.utils import atomic
from vidpo.utils.seeding import seed_everything

log = logging.getLogger("vidpo")

SCHEDULER_DIR = "scheduler"


def build_student(cfg: RunConfig, device):
    """The release's transformer (``train.init_from`` if set) + LoRA when the recipe has one; no reference copy."""
    model, lora_state = initial_policy_with_lora(cfg, None, device)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    return model, lora_state


def _reward_parameters(rewards: RewardMixture) -> list:
    """The distinct parameters of the mixture's reward models (a model scoring under two names counts once)."""
    seen = {}
    for term in rewards.terms:
        for p in getattr(getattr(term.reward, "model", None), "parameters", lambda: [])():
            seen.setdefault(id(p), p)
    return list(seen.values())


def differentiable_decode(vae, latent_frames: Optional[int] = None, *, checkpoint_tiles: bool = True):
    """The VAE's decode with gradients (``DiffusersVAE.decode`` runs under no_grad): latents -> pixels in [-1, 1];
    with ``latent_frames`` K, of the first K latent frames only (``reward.decode_latent_frames``: the VAEs are causal
    in time, so these are the whole clip's first ``1 + k (K - 1)`` pixel frames). ``checkpoint_tiles``
    (``reward.decode_checkpoint``): in the VAE's spatial tiles, each recomputed in the backward
    (``vidpo.models.vae_grad``); else the whole clip at once, untiled."""
    def decode(latents: torch.Tensor) -> torch.Tensor:
        if latent_frames is not None:
            latents = latents[:, :, :latent_frames]
        z = vae.denormalize(latents.to(vae.device)).to(vae.dtype)
        pixels = checkpointed_tiled_decode(vae.vae, z) if checkpoint_tiles else vae.vae.decode(z).sample
        return pixels.float().clamp(-1.0, 1.0)
    return decode


def check_decode_prefix(cfg: RunConfig) -> None:
    """``reward.decode_latent_frames`` that a family's VAE decodes as the whole clip's first frames: any K for Wan
    (causal, one latent frame at a time); for CogVideoX an odd K >= 3 (its decoder takes the latent frames in pairs,
    the first three together; a prefix of another length is cut where the whole clip's is not)."""
    k = cfg.reward.decode_latent_frames
    if k is not None and cfg.model.kind == "cogvideox" and (k < 3 or k % 2 == 0):
        raise ConfigError(f"reward.decode_latent_frames = {k}: CogVideoX's VAE decodes a prefix of 3, 5, 7, ... latent "
                          "frames as the whole clip's first frames (it decodes the latent frames in pairs, the first "
                          "three together)")


def reward_frames(cfg: RunConfig, vae, frames: int) -> int:
    """The pixel frames the rewards see: the clip's ``frames``, or those of its first ``reward.decode_latent_frames``
    latent frames."""
    k = cfg.reward.decode_latent_frames
    return frames if k is None else min(frames, vae.pixel_frames(k))


def export_scheduler(cfg: RunConfig, out_dir: str | Path) -> Path:
    """``OUT/scheduler/scheduler_config.json``: the student's schedule as diffusers loads it."""
    scheduler, _, _ = student_schedule(cfg)
    folder = Path(out_dir) / SCHEDULER_DIR
    with atomic.atomic_dir(folder) as tmp:
        scheduler.save_pretrained(str(tmp))
    return folder


def _check_data(cfg: RunConfig, data: DistillData) -> None:
    d = cfg.distill
    for key in ("grid_steps", "skip", "eval_steps", "student_shift", "student_terminal"):
        if data.settings.get(key) != getattr(d, key):
            raise ConfigError(f"distill.{key}={getattr(d, key)!r} but the data in {data.directory} were made with "
                              f"{data.settings.get(key)!r}")


def release_phase_edges(cfg: RunConfig) -> Optional[torch.Tensor]:
    """Phased targets of a release student (``distill.phases``): the phases are the intervals of its own
    ``eval_steps`` sigmas (CogVideoX: timesteps), which the exported scheduler steps along (its Euler / DDIM step from
    ``s_i`` to ``s_{i+1}`` is the phased sampler's), so the edges are those times, increasing; None for plain
    targets."""
    d = cfg.distill
    if not d.phases:
        return None
    if d.phases != d.eval_steps:
        raise ConfigError(f"distill.phases = {d.phases}: a release student's phases are the intervals of its "
                          f"distill.eval_steps = {d.eval_steps} sigmas (the exported scheduler's steps); set them "
                          "equal, or 0 for targets at t = 0")
    _, sigmas, _ = student_schedule(cfg)
    return sigmas.flip(0).float()


def train_distill_real(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True, export_dir=None,
                       release=None) -> dict:
    """Train the student of a release from ``distill.data`` into ``out_dir`` and export it into ``export_dir``
    (default ``out_dir``); returns the summary (also ``out_dir/summary.json``). ``release``: the data directory's
    ``release_data`` when the caller has it."""
    out_dir = Path(out_dir)
    export_dir = Path(export_dir) if export_dir is not None else out_dir
    setup_logging(out_dir)
    d = cfg.distill
    require_distill_data(cfg)
    set_threads(cfg)
    seed_everything(cfg.seed)
    parallel = start_distributed(cfg, None, latent_frames_of(cfg))   # None for one process
    if parallel is not None and parallel.cp > 1:
        raise ConfigError(f"parallel.cp = {parallel.cp}: a release student trains data parallel (FSDP) and tensor "
                          "(+ sequence) parallel; context parallel is not supported here (the rewards decode whole "
                          "clips): set parallel.cp=1")
    main = parallel is None or parallel.is_main
    device = parallel.device if parallel is not None else pick_device()
    data = DistillData(d.data, keys=REAL_TRAIN_KEYS, lazy_keys=REAL_LAZY_KEYS)
    _check_data(cfg, data)
    release = release if release is not None else release_data(cfg, data.directory, device, clips=False)
    if list(release.prompts.ids) != data.settings["prompt_ids"]:
        raise ConfigError(f"{data.directory}: its rows index other training prompts than {cfg.prompts.path} gives now")
    model, lora_state = build_student(cfg, device) if parallel is None else prepare_parallel_student(cfg, parallel)
    rewards, reward_names = RewardMixture([]), []
    vae = None
    row_weights, served = served_row_weights(cfg.reward, data.directory, list(release.prompts.ids), release.source,
                                             data.tensors["prompt"])
    if served:
        w = served["weights"]
        log.info("served judges %s: CD weights of %d routed rows in [%.3g, %.3g], ESS %.1f", sorted(served["judges"]),
                 w["rows"], w["min"] or 0.0, w["max"] or 0.0, w["ess"])
    if model_reward_names(cfg.reward):
        vae = release.pipe.vae(device, torch.float32)
        vae.vae.requires_grad_(False)   # the reward's gradient reaches the student through it, never its weights
        check_decode_prefix(cfg)
        if cfg.reward.decode_checkpoint and cfg.reward.decode_tile:
            try:
                set_tile_size(vae.vae, *cfg.reward.decode_tile)
            except ValueError as exc:
                raise ConfigError(f"reward.decode_tile = {list(cfg.reward.decode_tile)}: {exc}") from None
        decode = differentiable_decode(vae, cfg.reward.decode_latent_frames,
                                      checkpoint_tiles=cfg.reward.decode_checkpoint)
        rewards = build_model_rewards(cfg.reward, [p.text for p in release.prompts], decode=decode,
                                      device=device)
        reward_names = rewards.names
    objective = ConsistencyDistillObjective(cfg, None, data, device, rewards=rewards,
                                            condition=lambda ids: release.cond_of(ids.cpu()).to(model.dtype),
                                            prompt_key="prompt",
                                            frames=(reward_frames(cfg, vae, release.domain.frames) if vae is not None
                                                    else release.domain.frames),
                                            boundaries=release_phase_edges(cfg), row_weights=row_weights,
                                            process=distill_process(cfg), parallel=parallel)
    if main:
        atomic.write_text(out_dir / "config.yaml", to_yaml(cfg))
    log.info("distill (%s): %d rows, rewards %s on '%s' rows, device %s", cfg.model.kind, len(data),
             reward_names or "none", cfg.reward.subset, device)
    trainer = Trainer(cfg, out_dir, model, objective, device=device, resume=resume, lora_state=lora_state,
                      parallel=parallel)
    result = trainer.fit()
    if not main:      # rank 0 exports the consolidated checkpoint and writes the summary
        return {"steps": result["steps"], "model": model, "release": release}
    exported = export_run(cfg, export_dir, model, from_checkpoint=parallel is not None, checkpoints=out_dir)
    scheduler_dir = export_scheduler(cfg, export_dir)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())   # this rank's shards
    summary = {"objective": "consistency_distill", "model_kind": cfg.model.kind, "steps": result["steps"],
               "seconds": round(result["seconds"], 1), "student_steps": d.eval_steps,
               "skipped_steps": result["skipped_steps"], "rewards": reward_names, "reward_subset": cfg.reward.subset,
               "served_rewards": served,
               "data": str(data.directory), "export": {"weights": str(exported), "scheduler": str(scheduler_dir)},
               "residency": {**(objective.residency or {}), "student_parameter_bytes": param_bytes,
                             "vae_parameter_bytes": (sum(p.numel() * p.element_size() for p in vae.vae.parameters())
                                                     if vae is not None else 0),
                             "reward_parameter_bytes": sum(p.numel() * p.element_size()
                                                           for p in _reward_parameters(rewards)),
                             "measured": objective.residency is not None}}
    atomic.write_json(out_dir / "summary.json", summary)
    return {**summary, "model": model, "release": release}


def evaluate_real(cfg: RunConfig, out_dir: str | Path, student: torch.nn.Module, release) -> dict:
    """Teacher vs student on the held-out prompts (module doc) into ``out_dir/eval``; returns the summary."""
    device = pick_device()
    process = distill_process(cfg)
    _, sigmas, _ = process.student_schedule(cfg.distill)
    teacher = build_policy(cfg, None, device).eval()
    policy = ConsistencyStudent(student.eval(), sigmas, process.sample_student)
    vae = release.pipe.vae(device, torch.float32, tiling=cfg.generate.vae_tiling)
    shape = vae.latent_shape(release.domain.frames, release.domain.height, release.domain.width)
    warm_ids = [release.domain.prompts("heldout")[0].id] if len(release.domain.prompts("heldout")) else []
    for model in (teacher, policy) if warm_ids else ():   # one warm-up clip each: first calls are not timed
        cond = release.conditioning.for_prompts(warm_ids)
        sample_videos(model, cond, shape, seed=cfg.seed, indices=[0], steps=1, cfg_scale=cfg.eval.cfg_scale,
                      negative=release.conditioning.negative(warm_ids, cond), stream="warmup")
    with sampling_meter(teacher) as teacher_meter, sampling_meter(policy) as student_meter:
        judged = judged_evaluation(cfg, out_dir, base=teacher, policy=policy, domain=release.domain,
                                   conditioning=release.conditioning, vae=vae)
    cost = {"teacher": {"steps": cfg.eval.steps, "cfg_scale": cfg.eval.cfg_scale, **per_clip(teacher_meter)},
            "student": {"steps": policy.steps, "cfg_scale": 1.0, **per_clip(student_meter)}}
    t_s, s_s = cost["teacher"]["seconds_per_clip"], cost["student"]["seconds_per_clip"]
    cost["speedup"] = round(t_s / s_s, 2) if s_s > 0 else None
    del teacher
    gc.collect()
    out = {"judged": judged, "cost": cost}
    if judged is not None and (model_reward_names(cfg.reward) or served_judges(cfg.reward)):
        out["rewards"] = eval_rewards(cfg, out_dir, release)
    atomic.write_json(Path(out_dir) / "eval" / "distill_eval.json", out)
    return out


def eval_rewards(cfg: RunConfig, out_dir: str | Path, release) -> dict:
    """The reward models' scores of the judged videos (``OUT/eval/videos``, as people and the judge saw them):
    ``{name: {"policy", "base", "delta": mean_ci(student - teacher)}}``; image rewards average every frame. Served
    judges score them too (``vidpo.objectives.rewards_served.score_videos``, answers cached in
    ``OUT/eval/served_rewards``), over the pairs both of whose videos got a score (``pairs``, ``problems``)."""
    prompts = release.domain.prompts("heldout")
    n = cfg.eval.judged_videos
    chosen = [prompts[k % len(prompts)] for k in range(n)]
    mixture = build_model_rewards(cfg.reward, [p.text for p in chosen])
    index = torch.arange(n)
    scores = {}
    with torch.no_grad():
        for role in ("base", "policy"):
            clips = torch.stack([read_mp4(video_path(Path(out_dir) / EVAL_DIR, p.id, cfg.eval.seed_offset + k, role))
                                 for k, p in enumerate(chosen)])
            for term in mixture.terms:
                reward = term.reward
                if reward.kind == "image":
                    frames = clips.shape[2]
                    flat = clips.transpose(1, 2).reshape(n * frames, *clips.shape[1:2], *clips.shape[3:])
                    value = reward(flat, index.repeat_interleave(frames)).view(n, frames).mean(1)
                else:
                    value = reward(clips, index)
                scores.setdefault(reward.name, {})[role] = value.double()
    out = {name: {"policy": float(v["policy"].mean()), "base": float(v["base"].mean()),
                  "delta": mean_ci(v["policy"] - v["base"])} for name, v in scores.items()}
    # Served judges score the same mp4s; a video they could not score drops its pair from the comparison.
    eval_dir = Path(out_dir) / EVAL_DIR
    videos = {role: [(f"{role}:{p.id}:{cfg.eval.seed_offset + k}",
                      video_path(eval_dir, p.id, cfg.eval.seed_offset + k, role)) for k, p in enumerate(chosen)]
              for role in ("base", "policy")}
    served = score_videos(cfg, eval_dir / SCORES_DIR, videos, [p.text for p in chosen], release.domain.fps)
    for name, v in served.items():
        both = ~(v["policy"].isnan() | v["base"].isnan())
        out[name] = {"policy": float(v["policy"][both].mean()) if both.any() else None,
                     "base": float(v["base"][both].mean()) if both.any() else None,
                     "delta": mean_ci(v["policy"][both] - v["base"][both]) if both.sum() > 1 else None,
                     "pairs": int(both.sum()), "problems": v["problems"]}
    return out


def distill_real_job(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True) -> dict:
    """``vidpo distill`` on a release: preprocess into ``OUT/data`` (or ``distill.data``) -> train ``OUT/student``
    (exported to ``OUT/lora`` + ``OUT/scheduler``) -> teacher vs student into ``OUT/eval`` -> ``OUT/report.html``;
    each stage resumes."""
    out_dir = Path(out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("`vidpo distill` of a release runs in one process; under torchrun run its stages: "
                          f"`vidpo preprocess RECIPE --out {out_dir}/data --rank R --world-size N` (N processes), "
                          f"`torchrun --nproc-per-node N -m vidpo train RECIPE --out {out_dir}/student --set "
                          f"distill.data={out_dir}/data`, then `vidpo distill RECIPE --out {out_dir}` in one process "
                          "(the data and the trained student are kept; it exports and evaluates)")
    setup_logging(out_dir)
    release = release_data(cfg, cfg.distill.data, pick_device())   # the text encoder is loaded once, then freed
    prep = preprocess_real_job(cfg, cfg.distill.data, release=release)
    trained = train_distill_real(cfg, out_dir / "student", resume=resume, export_dir=out_dir, release=release)
    student, release = trained.pop("model"), trained.pop("release")
    evaluation = evaluate_real(cfg, out_dir, student, release)
    summary = {"preprocess": prep,
               "train": {k: trained[k] for k in ("steps", "seconds", "rewards", "served_rewards", "residency",
                                                 "export")},
               "eval": evaluation}
    atomic.write_json(out_dir / "summary.json", summary)
    write_run_report(out_dir)     # OUT/report.html: the student's curves, the summary, teacher and student videos
    return summary
