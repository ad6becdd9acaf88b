"""The single-model jobs behind ``vidpo train``, ``vidpo sample`` and ``vidpo eval``.

Each job takes a resolved config and an output directory, writes its results there (atomically), and
returns a small dict that the CLI prints. The preference pipeline (``generate``/``label``/``run``) lives
in ``vidpo.stages.pipeline`` and reuses these.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from vidpo.config import RunConfig, resolve_path, to_yaml
from vidpo.evaluation.evaluate import EvalResult, eval_conditions, evaluate_model, paired_delta, sample_model
from vidpo.objectives import ShapesSFTObjective
from vidpo.objectives.latent_sft import LatentSFTObjective
from vidpo.stages.common import build_oracle, load_policy_from, save_samples, setup_logging, write_run_report
from vidpo.stages.distill import train_distill
from vidpo.stages.pipeline import train_preference
from vidpo.training import checkpoint as ckpt
from vidpo.training.export import export_run
from vidpo.training.modeling import build_policy, build_world, pick_device, set_threads
from vidpo.training.policy import apply_activation_checkpointing
from vidpo.training.trainer import Trainer
from vidpo.utils import atomic
from vidpo.utils.seeding import seed_everything

log = logging.getLogger("vidpo")


# ----- vidpo train ------------------------------------------------------------------------------------
def train_job(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True) -> dict:
    """Train the policy with ``cfg.train.objective``; write checkpoints, metrics, samples, summary, report."""
    out_dir = Path(out_dir)
    setup_logging(out_dir)
    if cfg.data.source == "latents":  # flow matching on `vidpo cache` shards
        return train_latent_sft(cfg, out_dir, resume=resume)
    if cfg.train.objective == "consistency_distill":  # trains on `vidpo preprocess` shards

        return train_distill(cfg, out_dir, resume=resume)
    if cfg.train.objective != "sft":
        return train_preference(cfg, out_dir, resume=resume)["result"]
    set_threads(cfg)
    seed_everything(cfg.seed)
    device = pick_device()
    world = build_world(cfg)
    oracle = build_oracle(world)
    model = build_policy(cfg, world, device)
    if cfg.train.init_from:
        ckpt.load_weights(model, resolve_path(cfg.train.init_from))
    atomic.write_text(out_dir / "config.yaml", to_yaml(cfg))
    log.info("train: objective=%s preset=%s params=%.3fM device=%s out=%s", cfg.train.objective,
             cfg.model.preset, sum(p.numel() for p in model.parameters()) / 1e6, device, out_dir)

    objective = ShapesSFTObjective(cfg, world, device)
    eval_n = max(16, cfg.eval.num_samples // 4)

    def evaluate(m, step):
        return evaluate_model(m, cfg, world, oracle, num_samples=eval_n).flat()

    trainer = Trainer(cfg, out_dir, model, objective, device=device, evaluate=None, resume=resume)
    if cfg.train.eval_every > 0:
        trainer.evaluate = evaluate
    result = trainer.fit()
    final = evaluate_model(model, cfg, world, oracle)
    save_samples(final, world, out_dir / "samples", "final", cfg.eval.grid_conditions)
    summary = {"objective": "sft", "steps": result["steps"], "seconds": round(result["seconds"], 1),
               "final": final.summary(), "skipped_steps": result["skipped_steps"]}
    atomic.write_json(out_dir / "summary.json", summary)
    write_run_report(out_dir)
    return summary


# ----- vidpo sample -------------------------------------------------------------------------------------
def sample_job(cfg: RunConfig, checkpoint: str | Path, out_dir: str | Path, *, num: Optional[int] = None) -> dict:
    """Sample ``num`` clips (cycling over conditions) from a checkpoint; write tensors and grids."""
    out_dir = Path(out_dir)
    setup_logging(out_dir)
    device = pick_device()
    world = build_world(cfg)
    model = load_policy_from(checkpoint, cfg, world, device)
    n = num or cfg.sample.num_samples
    cond_ids = eval_conditions(world, n)
    clips = sample_model(model, world, cond_ids, seed=cfg.seed, indices=list(range(n)), steps=cfg.sample.steps,
                         cfg_scale=cfg.sample.cfg_scale, batch_size=cfg.sample.batch_size, stream="sample")
    atomic.save_safetensors({"clips": clips, "cond_ids": cond_ids}, out_dir / "samples.safetensors")
    result = EvalResult(total=torch.zeros(n), components={}, samples=clips, cond_ids=cond_ids)
    paths = save_samples(result, world, out_dir, "samples", min(n, 32))
    atomic.write_text(out_dir / "captions.txt", "\n".join(world.captions(cond_ids)) + "\n")
    return {"samples": n, "files": [str(p) for p in paths] + [str(out_dir / "samples.safetensors")]}


# ----- vidpo eval ---------------------------------------------------------------------------------------
def eval_job(cfg: RunConfig, checkpoint: str | Path, out_dir: str | Path, *, base: Optional[str | Path] = None,
             num: Optional[int] = None) -> dict:
    """Oracle scores of a checkpoint's samples (95% CI); with ``base``, the paired delta and win rate."""
    out_dir = Path(out_dir)
    setup_logging(out_dir)
    device = pick_device()
    world = build_world(cfg)
    oracle = build_oracle(world)
    model = load_policy_from(checkpoint, cfg, world, device)
    result = evaluate_model(model, cfg, world, oracle, num_samples=num)
    out = {"checkpoint": str(checkpoint), "num_samples": int(result.total.numel()), "model": result.summary()}
    save_samples(result, world, out_dir / "samples", "eval", cfg.eval.grid_conditions)
    if base is not None:
        base_model = load_policy_from(base, cfg, world, device)
        base_result = evaluate_model(base_model, cfg, world, oracle, num_samples=num)
        out["base"] = base_result.summary()
        out["delta"] = paired_delta(result, base_result)
        save_samples(base_result, world, out_dir / "samples", "base", cfg.eval.grid_conditions)
    atomic.write_json(out_dir / "eval.json", out)
    return out


def train_latent_sft(cfg: RunConfig, out_dir, *, resume: bool = True) -> dict:
    """``vidpo train`` with ``data.source: latents``: the DiT sized by the cache (latent channels, text width)
    trained with this objective; checkpoints carry the loader position. Returns the run summary."""

    log = logging.getLogger("vidpo")
    out_dir = Path(out_dir)
    set_threads(cfg)
    seed_everything(cfg.seed)
    device = pick_device()
    model = build_policy(cfg, None, device)
    if cfg.train.init_from:
        ckpt.load_weights(model, resolve_path(cfg.train.init_from))
    model = apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    objective = LatentSFTObjective(cfg, device, process=model)   # a diffusers model's own process and target
    atomic.write_text(out_dir / "config.yaml", to_yaml(cfg))
    loader = objective.loader
    log.info("train: objective=sft data=latents (%d samples, latent %s, text %s) rank %d/%d params=%.3fM "
             "device=%s out=%s", len(loader.dataset), loader.dataset.latent_shape, loader.dataset.text_shape,
             loader.rank, loader.world_size, sum(p.numel() for p in model.parameters()) / 1e6, device, out_dir)
    try:
        trainer = Trainer(cfg, out_dir, model, objective, device=device, evaluate=None, resume=resume)
        result = trainer.fit()
    finally:
        objective.close()
    export_run(cfg, out_dir, model, from_checkpoint=False)   # a diffusers model: OUT/transformer/ (or OUT/lora/)
    summary = {"objective": "sft", "data": "latents", "steps": result["steps"],
               "seconds": round(result["seconds"], 1), "skipped_steps": result["skipped_steps"],
               "samples_consumed": loader.cursor, "last": result.get("last", {}),
               "bad_shards": len(loader.dataset.problems)}
    atomic.write_json(out_dir / "summary.json", summary)
    return summary
