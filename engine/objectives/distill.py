"""Reward-guided consistency distillation (T2V-Turbo-v2), objective ``consistency_distill``.

Source: T2V-Turbo-v2, arXiv 2410.05677, eq. 3-4, 8-11 (and LCM / consistency models before it).

**Consistency function** of a rectified-flow student with velocity network ``v_theta``::

    f_theta(x, t, c) = x - t * v_theta(x, t, c)                         (B, C, T, H, W)

the clean sample the velocity points at; ``f_theta(x, 0, c) = x`` holds exactly (the CM boundary condition
with c_skip = 1, c_out = -t). The student starts as a copy of the teacher, so its one-step output is the
teacher's x0-prediction from the first step.

**CD loss** (eq. 9). A preprocessed row (``vidpo.preprocess``) holds ``x_{t_n}`` on the forward path and
the teacher's guided solver step ``x^_{t_{n-k}} = x_{t_n} + (t_{n-k} - t_n) v~``. The target is the student
itself, stop-gradient -- no EMA target network (the paper removes it to afford full fine-tuning)::

    L_CD = mean d( f_theta(x_{t_n}, t_n, c),  sg[ f_theta(x^_{t_{n-k}}, t_{n-k}, c) ] )
    d(a, b) = sqrt((a - b)^2 + c^2) - c   (pseudo-Huber, elementwise)   or   (a - b)^2

**Reward objective** (eq. 10-11) on the student's one-step prediction of the reward rows ``r`` (rows of the
routed subset, ``reward.subset``; at most ``reward.max_rows`` per micro-batch)::

    L = L_CD - mean_{b in r} R( f_theta(x_{t_n}, t_n, c)_b, c_b )          (vidpo.rewards.RewardMixture)

**Multi-step sampling** (consistency models' multistep sampler) at times ``tau_1 = 1 > ... > tau_s``, evenly
spaced multiples of the skip on the teacher's grid: ``x <- eps``; repeat ``x0^ = f_theta(x, tau_j)`` then
``x <- (1 - tau_{j+1}) x0^ + tau_{j+1} z_j`` with fresh noise ``z_j`` (``sampler_noise: fresh``) or with the
noise the student implies, ``z_j = x + (1 - tau_j) v`` (``predicted``: deterministic, which makes the sampler
Euler with large steps); the last ``x0^`` is the sample. One network evaluation per step, no CFG pass.

The student is not conditioned on the guidance scale w or strength eta (the tiny DiT has no such
embedding): it is distilled for the recipe's fixed w and eta.
"""
from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo.config import RunConfig
from vidpo.seeding import generator, randn_per_sample

log = logging.getLogger("vidpo")

SOURCE_CODES = {"curated": 0, "web": 1}


# ----- the math ------------------------------------------------------------------------------------------
def consistency_function(model_fn, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """``f(x, t, c) = x - t v(x, t, c)`` with ``t`` (B,) broadcast over ``(B, C, T, H, W)``."""
    v = model_fn(x, t, cond)
    return x - t.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * v.to(x.dtype)


def cd_distance(prediction: torch.Tensor, target: torch.Tensor, distance: str = "huber",
                huber_c: float = 0.001) -> torch.Tensor:
    """Mean over all elements of the pseudo-Huber ``sqrt(d^2 + c^2) - c`` or squared error ``d^2``."""
    diff = prediction - target
    if distance == "huber":
        return (torch.sqrt(diff * diff + huber_c * huber_c) - huber_c).mean()
    if distance == "l2":
        return (diff * diff).mean()
    raise ValueError(f"unknown CD distance {distance!r}; valid: 'huber', 'l2'")


def cd_loss(model, x_t: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor, t_prev: torch.Tensor,
            cond: torch.Tensor, *, distance: str = "huber", huber_c: float = 0.001):
    """``(L_CD, prediction, target)``: prediction keeps the graph, the target is the student under ``no_grad``."""
    prediction = consistency_function(model, x_t, t, cond)
    with torch.no_grad():
        target = consistency_function(model, x_prev, t_prev, cond)
    compute = torch.promote_types(prediction.dtype, torch.float32)   # bf16 under autocast -> fp32; fp64 stays
    return cd_distance(prediction.to(compute), target.to(compute), distance, huber_c), prediction, target


def student_times(steps: int, grid: torch.Tensor, skip: int) -> torch.Tensor:
    """``(steps,)`` decreasing sampling times: evenly spaced multiples of ``skip`` on the increasing grid
    ``t_0 = 0 .. t_N = 1``, starting at ``t_N = 1`` (indices ``k * round(N/k * (1 - j/steps))``)."""
    chain = (grid.numel() - 1) // skip
    if not 1 <= steps <= chain:
        raise ValueError(f"student steps must be in [1, {chain}] for a grid of {grid.numel() - 1} intervals "
                         f"and skip {skip}, got {steps}")
    index = [skip * round(chain * (1 - j / steps)) for j in range(steps)]
    return grid[torch.tensor(index)]


@torch.no_grad()
def consistency_sample(model_fn, noise: torch.Tensor, cond: torch.Tensor, times: torch.Tensor, *,
                       renoise: str = "fresh", seed: int = 0, indices: Sequence[int] = (),
                       stream: str = "cm") -> torch.Tensor:
    """Multistep consistency sampling (module doc) from ``noise`` at ``times[0]``; returns the last x0^.
    Fresh noise for step j of sample i comes from the stream ``(seed, stream, j, i)``."""
    if renoise not in ("fresh", "predicted"):
        raise ValueError(f"renoise must be 'fresh' or 'predicted', got {renoise!r}")
    batch = noise.shape[0]
    bcast = (batch,) + (1,) * (noise.dim() - 1)
    x = noise
    x0 = noise
    for j in range(times.numel()):
        t = times[j].to(noise.device).expand(batch)
        v = model_fn(x, t, cond).to(x.dtype)
        x0 = x - t.view(bcast).to(x.dtype) * v
        if j + 1 == times.numel():
            break
        t_next = float(times[j + 1])
        if renoise == "fresh":
            z = randn_per_sample(tuple(noise.shape), seed, indices, stream, j, device=noise.device, dtype=noise.dtype)
        else:
            z = x + (1 - t.view(bcast).to(x.dtype)) * v
        x = (1 - t_next) * x0 + t_next * z
    return x0


@torch.no_grad()
def sample_student(model, world, cond_ids: torch.Tensor, *, seed: int, indices: Sequence[int], steps: int,
                   grid: torch.Tensor, skip: int, renoise: str = "fresh", batch_size: int = 64,
                   stream: str = "eval") -> torch.Tensor:
    """Student samples for ``cond_ids`` with initial noise ``(seed, stream, indices[k])`` (the noise the
    teacher's evaluation uses for the same sample, so the two are paired); CPU fp32 clips in [-1, 1]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    shape = (3, world.frames, world.height, world.width)
    times = student_times(steps, grid, skip)
    out = []
    for start in range(0, len(indices), batch_size):
        idx = list(indices[start:start + batch_size])
        tokens = world.tokens(cond_ids[start:start + len(idx)]).to(device)
        noise = randn_per_sample((len(idx),) + shape, seed, idx, stream, device=device)
        x = consistency_sample(lambda x, t, c: model(x.to(dtype), t.to(dtype), c).float(), noise, tokens, times,
                               renoise=renoise, seed=seed, indices=idx, stream=f"{stream}/cm")
        out.append(x.float().cpu())
    model.train(was_training)
    return torch.cat(out).clamp(-1, 1)


# ----- what the training process holds ---------------------------------------------------------------------
def resident_parameters() -> dict:
    """Every ``nn.Module`` alive in this process that owns parameters, grouped by class: instance counts and
    distinct parameter bytes (storages counted once). "No teacher in memory" means one ``VideoDiT``."""
    gc.collect()
    seen, total, counts = set(), 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # isinstance() on deprecated torch aliases in gc's list warns
        modules = [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module)]
    for module in modules:
        if type(module).__name__.endswith("DiT"):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
        for p in module.parameters(recurse=False):
            key = (p.device.type, p.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += p.untyped_storage().nbytes()
    return {"dit_models": counts, "parameter_bytes": total}


# ----- the objective ---------------------------------------------------------------------------------------
class ConsistencyDistillObjective:
    """``micro_batch`` draws preprocessed rows; ``loss`` is ``L_CD - R`` (module doc)."""

    name = "consistency_distill"

    def __init__(self, cfg: RunConfig, world, data, device: torch.device, rewards=None):
        self.cfg = cfg
        self.world = world
        self.data = data
        self.device = device
        self.rewards = rewards if rewards else None
        subset = cfg.reward.subset
        self.reward_source = None if subset == "all" else SOURCE_CODES[subset]
        self.residency: Optional[dict] = None

    def micro_batch(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        g = generator(cfg.seed, "data", step, micro)
        index = torch.randint(len(self.data), (cfg.train.batch_size,), generator=g)
        batch = {k: v.to(self.device) for k, v in self.data.rows(index).items()}
        if self.rewards is not None:
            source = batch["source"].cpu()
            eligible = torch.ones_like(source, dtype=torch.bool) if self.reward_source is None \
                else source == self.reward_source
            # The first max_rows eligible rows of the (random) draw: a random subset of the routed data.
            chosen = eligible & (eligible.long().cumsum(0) <= cfg.reward.max_rows)
            batch["reward_rows"] = chosen.to(self.device)
            batch["frames"] = self.rewards.draw_frames(index.numel(), self.world.frames, g)
        return batch

    def loss(self, model, batch: dict):
        d = self.cfg.distill
        cond_ids = batch["cond_ids"]
        tokens = self.world.tokens(cond_ids.cpu()).to(self.device)
        loss_cd, prediction, _ = cd_loss(model, batch["x_t"], batch["t"], batch["x_prev"], batch["t_prev"], tokens,
                                         distance=d.distance, huber_c=d.huber_c)
        loss = loss_cd
        metrics = {"cd": float(loss_cd.detach())}
        if self.rewards is not None:
            rows = batch["reward_rows"]
            metrics["reward_rows"] = float(rows.sum())
            if bool(rows.any()):
                frames = batch["frames"][rows.cpu()]
                total, parts = self.rewards(prediction[rows].float(), cond_ids[rows], frames)
                loss = loss - total.mean()
                metrics["reward"] = float(total.detach().mean())
                for name, value in parts.items():
                    metrics[f"reward/{name}"] = float(value.detach().mean())
        if self.residency is None:
            # Measured inside the first step, while the step's graph is alive: what training really holds.
            self.residency = resident_parameters()
        return loss, metrics

    def state_dict(self) -> dict:
        return {}  # every micro-batch is a pure function of (seed, step, micro)

    def load_state_dict(self, state: dict) -> None:
        pass


# ----- the job behind `vidpo train` with objective consistency_distill --------------------------------------
def train_distill(cfg: RunConfig, out_dir: str | Path, *, resume: bool = True) -> dict:
    """Train the student from ``distill.data`` into ``out_dir``; write checkpoints, metrics, an evaluation of
    the student at ``distill.eval_steps`` steps, the residency measurement and ``summary.json``."""
    from vidpo import atomic
    from vidpo import checkpoint as ckpt
    from vidpo.evaluate import EvalResult, eval_conditions
    from vidpo.jobs import build_oracle, save_samples, setup_logging
    from vidpo.modeling import build_policy, build_world, pick_device, set_threads
    from vidpo.preprocess import DistillData, teacher_grid
    from vidpo.recipe import ConfigError, resolve_path, to_yaml
    from vidpo.rewards import build_reward_mixture
    from vidpo.seeding import seed_everything
    from vidpo.trainer import Trainer

    out_dir = Path(out_dir)
    setup_logging(out_dir)
    d = cfg.distill
    if not d.data:
        raise ConfigError("train.objective=consistency_distill needs distill.data: run `vidpo preprocess RECIPE "
                          "--out DATA` first and --set distill.data=DATA (or use `vidpo distill`)")
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
    init = cfg.train.init_from or d.teacher
    if not init:
        raise ConfigError("the student needs initial weights: set distill.teacher (or train.init_from)")
    ckpt.load_weights(model, resolve_path(init))
    rewards = build_reward_mixture(cfg.reward, oracle)
    objective = ConsistencyDistillObjective(cfg, world, data, device, rewards=rewards)
    atomic.write_text(out_dir / "config.yaml", to_yaml(cfg))
    log.info("distill: %d rows, rewards %s on '%s' rows, student init %s, device %s", len(data),
             rewards.names or "none", cfg.reward.subset, init, device)

    def evaluate(m, step, n=None):
        n = n or max(16, cfg.eval.num_samples // 4)
        cond_ids = eval_conditions(world, n)
        clips = sample_student(m, world, cond_ids, seed=cfg.seed,
                               indices=[cfg.eval.seed_offset + i for i in range(n)], steps=d.eval_steps, grid=grid,
                               skip=d.skip, renoise=d.sampler_noise, batch_size=cfg.sample.batch_size)
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
    from vidpo import atomic
    from vidpo import checkpoint as ckpt
    from vidpo.distill_eval import compare
    from vidpo.modeling import build_policy, build_world, pick_device
    from vidpo.preprocess import load_teacher, preprocess_job

    out_dir = Path(out_dir)
    cfg.distill.data = cfg.distill.data or str(out_dir / "data")
    cfg.train.objective = "consistency_distill"
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
    return summary
