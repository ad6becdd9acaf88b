"""Reward-guided consistency distillation (T2V-Turbo-v2), objective ``consistency_distill``.

Source: T2V-Turbo-v2, arXiv 2410.05677, eq. 3-4, 8-11 (and LCM / consistency models before it).

**Consistency function** of a rectified-flow student with velocity network ``v_theta``::

    f_theta(x, t, c) = x - t * v_theta(x, t, c)                         (B, C, T, H, W)

the clean sample the velocity points at; ``f_theta(x, 0, c) = x`` holds exactly (the CM boundary condition
with c_skip = 1, c_out = -t). The student starts as a copy of the teacher, so its one-step output is the
teacher's x0-prediction from the first step.

**CD loss** (eq. 9). A preprocessed row (``vidpo.stages.preprocess``) holds ``x_{t_n}`` on the forward path and
the teacher's guided solver step ``x^_{t_{n-k}} = x_{t_n} + (t_{n-k} - t_n) v~``. The target is the student
itself, stop-gradient -- no EMA target network (the paper removes it to afford full fine-tuning)::

    L_CD = mean d( f_theta(x_{t_n}, t_n, c),  sg[ f_theta(x^_{t_{n-k}}, t_{n-k}, c) ] )
    d(a, b) = sqrt((a - b)^2 + c^2) - c   (pseudo-Huber, elementwise)   or   (a - b)^2

**Reward objective** (eq. 10-11) on the student's one-step prediction of the reward rows ``r`` (rows of the
routed subset, ``reward.subset``; at most ``reward.max_rows`` per micro-batch)::

    L = L_CD - mean_{b in r} R( f_theta(x_{t_n}, t_n, c)_b, c_b )          (vidpo.objectives.rewards.RewardMixture)

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
import warnings
from typing import Optional, Sequence

import torch

from vidpo.config import RunConfig
from vidpo.utils.seeding import generator, randn_per_sample

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


