"""The single-model jobs behind ``vidpo train``, ``vidpo sample`` and ``vidpo eval``.

Each job takes a resolved config and an output directory, writes its results there (atomically), and
returns a small dict that the CLI prints. The preference pipeline (``generate``/``label``/``run``) lives
in ``vidpo.pipeline`` and reuses these.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from vidpo import atomic
from vidpo import checkpoint as ckpt
from vidpo.config import RunConfig
from vidpo.evaluate import EvalResult, evaluate_model, paired_delta
from vidpo.modeling import build_policy, build_world, pick_device, set_threads
from vidpo.recipe import load_config, resolve_path, to_yaml
from vidpo.seeding import seed_everything

log = logging.getLogger("vidpo")


def setup_logging(out_dir: Optional[Path] = None, verbose: bool = False) -> None:
    """Log to stderr and, when ``out_dir`` is given, to ``out_dir/vidpo.log``."""
    root = logging.getLogger("vidpo")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_vidpo_stderr", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        handler._vidpo_stderr = True
        root.addHandler(handler)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = os.path.abspath(Path(out_dir) / "vidpo.log")  # FileHandler stores absolute paths
        if not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
            fh = logging.FileHandler(path)
            fh.setFormatter(fmt)
            root.addHandler(fh)


def build_oracle(world):
    from vidpo.data.oracle import ShapesOracle

    return ShapesOracle(world)


def save_samples(result: EvalResult, world, directory: Path, name: str, grid: int) -> list[Path]:
    """``directory/name.gif`` (animated grid) and ``directory/name.png`` (frame strips) of the first
    ``grid`` samples, captioned."""
    from vidpo.visualize import save_gif, save_png_grid

    n = min(grid, result.samples.shape[0])
    captions = world.captions(result.cond_ids[:n])
    gif = Path(directory) / f"{name}.gif"
    png = Path(directory) / f"{name}.png"
    save_gif(result.samples[:n], gif, nrow=min(8, n), captions=captions)
    save_png_grid(result.samples[:n], png, captions=captions)
    return [gif, png]


def load_policy_from(path: str | Path, cfg: RunConfig, world, device) -> torch.nn.Module:
    model = build_policy(cfg, world, device)
    ckpt.load_weights(model, resolve_path(path))
    return model


def config_for_checkpoint(path: str | Path, overrides=()) -> RunConfig:
    """The config saved beside a checkpoint (plus overrides), or the defaults when there is none."""
    found = ckpt.find_config(resolve_path(path))
    return load_config(found, overrides)


# ----- vidpo train ------------------------------------------------------------------------------------
def train_job(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True) -> dict:
    """Train the policy with ``cfg.train.objective``; write checkpoints, metrics, samples, summary, report."""
    from vidpo.trainer import Trainer

    out_dir = Path(out_dir)
    setup_logging(out_dir)
    if cfg.data.source == "latents":  # issue 7: flow matching on `vidpo cache` shards
        from vidpo.objectives.latent_sft import train_latent_sft

        return train_latent_sft(cfg, out_dir, resume=resume)
    if cfg.train.objective == "consistency_distill":  # issue 9: trains on `vidpo preprocess` shards
        from vidpo.objectives.distill import train_distill

        return train_distill(cfg, out_dir, resume=resume)
    if cfg.train.objective != "sft":
        from vidpo.pipeline import train_preference

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
    from vidpo.objectives import ShapesSFTObjective

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
    _report(out_dir)
    return summary


def _report(out_dir: Path) -> None:
    try:
        from vidpo.report import write_report
    except ImportError:
        return
    write_report(out_dir)


# ----- vidpo sample -------------------------------------------------------------------------------------
def sample_job(cfg: RunConfig, checkpoint: str | Path, out_dir: str | Path, *, num: Optional[int] = None) -> dict:
    """Sample ``num`` clips (cycling over conditions) from a checkpoint; write tensors and grids."""
    from vidpo.evaluate import eval_conditions, sample_model

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
