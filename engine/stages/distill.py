"""The consistency-distillation jobs: training the student (``train.objective: consistency_distill``) and
``vidpo distill`` (preprocess -> train -> teacher-vs-student evaluation, each stage resumable). A release
(``model.kind: wan``) goes to ``vidpo.stages.distill_real``; the shapes world's DiT stays here.

The objective itself (loss, boundary conditions, few-step sampling) is ``vidpo.objectives.distill``; the
teacher's preprocessed ODE steps come from ``vidpo.stages.preprocess``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from vidpo.config import ConfigError, RunConfig, resolve_path, to_yaml
from vidpo.evaluation.evaluate import EvalResult, eval_conditions
from vidpo.objectives.distill import ConsistencyDistillObjective, phase_boundaries, sample_student
from vidpo.objectives.rewards import build_reward_mixture
from vidpo.stages.common import build_oracle, save_samples, setup_logging, write_run_report
from vidpo.stages.distill_eval import compare
from vidpo.stages.distill_real import distill_real_job, train_distill_real
from vidpo.stages.preprocess import DistillData, load_teacher, preprocess_job, require_distill_data, teacher_grid
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_policy, build_world, loads_from_directory, pick_device, set_threads
from vidpo.training.trainer import Trainer
from vidpo.utils import atomic
from vidpo.utils.seeding import seed_everything

log = logging.getLogger("vidpo")


# ----- the job behind `vidpo train` with objective consistency_distill --------------------------------------
def train_distill(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True) -> dict:
    """Train the student from ``distill.data`` into ``out_dir``; write checkpoints, metrics, an evaluation of
    the student at ``distill.eval_steps`` steps, the residency measurement and ``summary.json``."""
    if loads_from_directory(cfg):   # a release (Wan): vidpo.stages.distill_real
        summary = train_distill_real(cfg, out_dir, resume=resume)
        return {k: v for k, v in summary.items() if k not in ("model", "release")}
    out_dir = Path(out_dir)
    setup_logging(out_dir)
    d = cfg.distill
    require_distill_data(cfg)
    set_threads(cfg)
    seed_everything(cfg.seed)
    device = pick_device()
    world = build_world(cfg)
    oracle = build_oracle(world)
    data = DistillData(d.data)
    grid = teacher_grid(cfg)
    for key in ("grid_steps", "skip", "shift"):
        if data.settings[key] != getattr(d, key):
            raise ConfigError(f"distill.{key}={getattr(d, key)!r} but the data in {data.directory} were made with "
                              f"{data.settings[key]!r}")
    model = build_policy(cfg, world, device)
    init = cfg.train.init_from or d.teacher   # the loader requires one of them
    ckpt.load_weights(model, resolve_path(init))
    rewards = build_reward_mixture(cfg.reward, oracle)
    boundaries = phase_boundaries(d.phases, grid, d.skip) if d.phases else None
    objective = ConsistencyDistillObjective(cfg, world, data, device, rewards=rewards, boundaries=boundaries)
    atomic.write_text(out_dir / "config.yaml", to_yaml(cfg))
    log.info("distill: %d rows, rewards %s on '%s' rows, student init %s, phases %s, device %s", len(data),
             rewards.names or "none", cfg.reward.subset, init, d.phases or "none (targets at t = 0)", device)

    def evaluate(m, step, n=None):
        n = n or max(16, cfg.eval.num_samples // 4)
        cond_ids = eval_conditions(world, n)
        clips = sample_student(m, world, cond_ids, seed=cfg.seed,
                               indices=[cfg.eval.seed_offset + i for i in range(n)], steps=d.eval_steps, grid=grid,
                               skip=d.skip, renoise=d.student_noise, batch_size=cfg.sample.batch_size)
        score = oracle.score(clips, cond_ids)
        return EvalResult(total=score.total.detach(), components={k: v.detach() for k, v in score.components.items()},
                          samples=clips, cond_ids=cond_ids, modes=oracle.failure_modes(clips, cond_ids))

    trainer = Trainer(cfg, out_dir, model, objective, device=device, resume=resume)
    if cfg.train.eval_every > 0:
        trainer.evaluate = lambda m, step: evaluate(m, step).flat()
    result = trainer.fit()
    final = evaluate(model, result["steps"], cfg.eval.num_samples)
    save_samples(final, world, out_dir / "samples", f"student_{d.eval_steps}step", cfg.eval.grid_conditions)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    summary = {"objective": "consistency_distill", "steps": result["steps"], "seconds": round(result["seconds"], 1),
               "student_steps": d.eval_steps, "final": final.summary(), "skipped_steps": result["skipped_steps"],
               "rewards": rewards.names, "reward_subset": cfg.reward.subset, "data": str(data.directory),
               "residency": {**(objective.residency or {}), "student_parameter_bytes": param_bytes,
                             "measured": objective.residency is not None}}
    atomic.write_json(out_dir / "summary.json", summary)
    return summary


def distill_job(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True) -> dict:
    """``vidpo distill``: preprocess into ``OUT/data`` (or ``distill.data``), train ``OUT/student``, compare the
    student with its teacher into ``OUT/eval``; each stage resumes."""
    out_dir = Path(out_dir)
    cfg.distill.data = cfg.distill.data or str(out_dir / "data")
    cfg.train.objective = "consistency_distill"
    if loads_from_directory(cfg):   # a release (Wan): vidpo.stages.distill_real
        return distill_real_job(cfg, out_dir, resume=resume)
    prep = preprocess_job(cfg, cfg.distill.data)
    train = train_distill(cfg, out_dir / "student", resume=resume)
    device = pick_device()
    world = build_world(cfg)
    teacher, _ = load_teacher(cfg, world, device)
    student = build_policy(cfg, world, device)
    ckpt.load_weights(student, out_dir / "student")
    table = compare(cfg, teacher, {"student": student.eval()}, out_dir / "eval", world=world)
    summary = {"preprocess": prep, "train": {k: train[k] for k in ("steps", "seconds", "rewards", "residency")},
               "eval": {"table": str(out_dir / "eval" / "distill_eval.md"),
                        "rows": [{"model": r["model"], "steps": r["steps"], "oracle": round(r["oracle"]["mean"], 4),
                                  "ms_per_clip": r["ms_per_clip"]} for r in table["rows"]]}}
    atomic.write_json(out_dir / "summary.json", summary)
    write_run_report(out_dir)     # OUT/report.html: the student's curves, the summary, the sample grids
    return summary
