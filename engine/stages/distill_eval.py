"""Teacher vs distilled students: oracle score (and its motion component) with 95% CIs, and sampling time.

Rows: the teacher with Euler + classifier-free guidance at each of ``distill.teacher_steps`` (two network
evaluations per step: the conditional and null branches in one batched call), and every student at each
of ``distill.student_steps`` (one evaluation per step, ``vidpo.objectives.distill.sample_student``).

Every row samples the same conditions from the same initial noise (``("eval", seed_offset + i)``), so
per-sample scores are paired across rows; ``delta_vs_ref`` is the paired difference to the reference row
(the teacher at its largest step count) with its 95% CI (``vidpo.evaluation.evaluate.paired_delta``); every student
after the first also gets ``delta_vs_baseline``, its paired difference to the first student at the same steps.

Sampling time per clip is the wall time of sampling all ``n`` clips (batches of ``sample.batch_size``)
divided by ``n``, best of ``repeats`` runs after a warm-up batch, so a busy shared machine inflates it as
little as possible; the network evaluations per clip (NFE) are reported beside it as the load-free measure.

Output: ``OUT/distill_eval.json`` (every row), ``OUT/distill_eval.md`` (the table), ``OUT/samples/*.gif|png``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from vidpo.config import RunConfig, resolve_path
from vidpo.evaluation.evaluate import EvalResult, eval_conditions, paired_delta, sample_model
from vidpo.objectives.distill import sample_student
from vidpo.stages.common import build_oracle, save_samples, setup_logging
from vidpo.stages.preprocess import load_teacher, teacher_grid
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_policy, build_world, pick_device, set_threads
from vidpo.utils import atomic

log = logging.getLogger("vidpo")


def timed_sampling(sample: Callable[[list], torch.Tensor], indices: list, *, repeats: int = 1,
                   warmup: int = 4) -> tuple[torch.Tensor, float]:
    """``(clips, seconds per clip)``: best of ``repeats`` full runs, after a warm-up on ``warmup`` samples."""
    if warmup:
        sample(indices[:warmup])
    best, clips = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        clips = sample(indices)
        best = min(best, time.perf_counter() - start)
    return clips, best / len(indices)


@contextlib.contextmanager
def sampling_meter(model: torch.nn.Module):
    """Within the block, count the network evaluations of ``model`` (rows through its forward: a CFG step of a
    batch of B clips is 2B) and time its ``sample`` calls; yields ``{"nfe": rows, "seconds": s, "clips": n}``
    (n: rows of the noise each ``sample`` call started from). Used where a stage samples through the model's own
    ``sample`` hook (the judged evaluation of a release)."""
    meter = {"nfe": 0, "seconds": 0.0, "clips": 0}

    def count(module, args, kwargs):
        x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
        meter["nfe"] += int(x.shape[0])
    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    original = model.sample

    def timed(cond, *args, **kwargs):
        start = time.perf_counter()
        out = original(cond, *args, **kwargs)
        meter["seconds"] += time.perf_counter() - start
        meter["clips"] += int(out.shape[0])
        return out
    model.sample = timed
    try:
        yield meter
    finally:
        hook.remove()
        del model.sample


def per_clip(meter: dict) -> dict:
    """``{"nfe_per_clip", "seconds_per_clip", "clips"}`` of a ``sampling_meter``."""
    n = max(1, meter["clips"])
    return {"nfe_per_clip": meter["nfe"] / n, "seconds_per_clip": round(meter["seconds"] / n, 4),
            "clips": meter["clips"]}


def evaluate_row(name: str, kind: str, steps: int, sample: Callable[[list], torch.Tensor], world, oracle,
                 cond_ids: torch.Tensor, indices: list, *, repeats: int = 1) -> tuple[dict, EvalResult]:
    """One table row: sample, time, score."""
    clips, per_clip = timed_sampling(sample, indices, repeats=repeats)
    with torch.no_grad():
        score = oracle.score(clips, cond_ids)
    result = EvalResult(total=score.total, components=dict(score.components), samples=clips, cond_ids=cond_ids,
                        modes=oracle.failure_modes(clips, cond_ids))
    summary = result.summary()
    row = {"model": name, "kind": kind, "steps": steps, "nfe_per_clip": steps * (2 if kind == "teacher" else 1),
           "oracle": summary["oracle"], "motion": summary["oracle/motion"],
           "components": {k: round(v["mean"], 4) for k, v in summary.items() if k != "oracle"},
           "ms_per_clip": round(1000 * per_clip, 3)}
    return row, result


def compare(cfg: RunConfig, teacher, students: Dict[str, torch.nn.Module], out_dir: str | Path, *,
            num_samples: Optional[int] = None, repeats: int = 1, world=None, oracle=None) -> dict:
    """The teacher-vs-students table (module doc) into ``out_dir``; returns ``{"rows": [...], ...}``."""
    out_dir = Path(out_dir)
    world = world or build_world(cfg)
    oracle = oracle or build_oracle(world)
    d = cfg.distill
    grid = teacher_grid(cfg)
    n = num_samples or cfg.eval.num_samples
    cond_ids = eval_conditions(world, n)
    indices = [cfg.eval.seed_offset + i for i in range(n)]
    position = {idx: k for k, idx in enumerate(indices)}
    batch = cfg.sample.batch_size
    rows, results = [], {}

    def conds(idx):
        return cond_ids[[position[i] for i in idx]]

    for steps in d.teacher_steps:
        def sample(idx, steps=steps):
            return sample_model(teacher, world, conds(idx), seed=cfg.seed, indices=idx, steps=steps,
                                cfg_scale=d.cfg_scale, batch_size=batch)
        row, res = evaluate_row("teacher", "teacher", steps, sample, world, oracle, cond_ids, indices, repeats=repeats)
        rows.append(row)
        results[("teacher", steps)] = res
        log.info("distill-eval: teacher %d steps: oracle %.4f, %.2f ms/clip", steps, row["oracle"]["mean"],
                 row["ms_per_clip"])
    for name, student in students.items():
        for steps in d.student_steps:
            def sample(idx, student=student, steps=steps):
                return sample_student(student, world, conds(idx), seed=cfg.seed, indices=idx, steps=steps,
                                      grid=grid, skip=d.skip, renoise=d.student_noise, batch_size=batch)
            row, res = evaluate_row(name, "student", steps, sample, world, oracle, cond_ids, indices, repeats=repeats)
            rows.append(row)
            results[(name, steps)] = res
            log.info("distill-eval: %s %d steps: oracle %.4f, %.2f ms/clip", name, steps, row["oracle"]["mean"],
                     row["ms_per_clip"])
    reference = ("teacher", max(d.teacher_steps)) if d.teacher_steps else None
    if reference is not None:
        ref_ms = next(r["ms_per_clip"] for r in rows if (r["model"], r["steps"]) == reference)
        for row in rows:
            delta = paired_delta(results[(row["model"], row["steps"])], results[reference])
            row["delta_vs_ref"] = delta["oracle"]
            row["motion_delta_vs_ref"] = delta["oracle/motion"]
            row["speedup_vs_ref"] = round(ref_ms / row["ms_per_clip"], 2) if row["ms_per_clip"] > 0 else None
    # Students after the first are also compared with the first one at the same step count (paired), so a
    # variant's gain over the plain CD student carries its own CI.
    names = list(students)
    for row in rows:
        if row["kind"] == "student" and row["model"] != names[0]:
            delta = paired_delta(results[(row["model"], row["steps"])], results[(names[0], row["steps"])])
            row["delta_vs_baseline"] = {"baseline": names[0], **delta["oracle"]}
            row["motion_delta_vs_baseline"] = delta["oracle/motion"]
    for (name, steps), res in results.items():
        save_samples(res, world, out_dir / "samples", f"{name}_{steps}step", cfg.eval.grid_conditions)
    out = {"num_samples": n, "reference": list(reference) if reference else None, "rows": rows,
           "cfg_scale": d.cfg_scale, "device": str(next(teacher.parameters()).device),
           "threads": torch.get_num_threads()}
    atomic.write_json(out_dir / "distill_eval.json", out)
    atomic.write_text(out_dir / "distill_eval.md", markdown_table(out))
    return out


def _ci(stats: dict) -> str:
    lo, hi = stats["ci95"]
    return f"{stats['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(result: dict) -> str:
    ref = result.get("reference")
    lines = [f"n = {result['num_samples']} paired samples per row; CIs are 95%; reference = "
             f"{ref[0]} at {ref[1]} steps" if ref else f"n = {result['num_samples']}", "",
             "| model | steps | NFE/clip | oracle | motion | delta vs ref | delta vs first student | ms/clip "
             "| speed-up |",
             "|---|---:|---:|---|---|---|---|---:|---:|"]
    for r in result["rows"]:
        delta = _ci(r["delta_vs_ref"]) if "delta_vs_ref" in r else ""
        versus = _ci(r["delta_vs_baseline"]) if "delta_vs_baseline" in r else ""
        lines.append(f"| {r['model']} | {r['steps']} | {r['nfe_per_clip']} | {_ci(r['oracle'])} | {_ci(r['motion'])} "
                     f"| {delta} | {versus} | {r['ms_per_clip']:.2f} | {r.get('speedup_vs_ref', '')} |")
    return "\n".join(lines) + "\n"


def distill_eval_job(cfg: RunConfig, out_dir: str | Path, students: Dict[str, str], *,
                     teacher: Optional[str] = None, num: Optional[int] = None, repeats: int = 1) -> dict:
    """``vidpo distill-eval``: load the teacher (``--teacher`` or ``distill.teacher``) and the named student
    checkpoints, and write the comparison table."""
    out_dir = Path(out_dir)
    setup_logging(out_dir)
    set_threads(cfg)
    device = pick_device()
    world = build_world(cfg)
    if teacher:
        cfg.distill.teacher = teacher
    teacher_model, _ = load_teacher(cfg, world, device)
    models = {}
    for name, path in students.items():
        model = build_policy(cfg, world, device)
        ckpt.load_weights(model, resolve_path(path))
        models[name] = model.eval()
    result = compare(cfg, teacher_model, models, out_dir, num_samples=num, repeats=repeats, world=world)
    print(markdown_table(result), end="")
    return {"out": str(out_dir), "rows": [{k: r[k] for k in ("model", "steps", "ms_per_clip")} |
                                          {"oracle": round(r["oracle"]["mean"], 4)} for r in result["rows"]]}

