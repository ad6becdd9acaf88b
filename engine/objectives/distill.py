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

A served judge (a VLM over HTTP: a score, no gradient) enters as a per-row weight of the CD loss instead,
``L_CD = mean_b w_b mean d(..)_b`` with ``w = exp(sum_j gamma_j z_j)`` normalised to mean 1 over the routed rows
and 1 elsewhere (``vidpo.objectives.rewards_served``).

**Multi-step sampling** (consistency models' multistep sampler) at times ``tau_1 = 1 > ... > tau_s``, evenly
spaced multiples of the skip on the teacher's grid: ``x <- eps``; repeat ``x0^ = f_theta(x, tau_j)`` then
``x <- (1 - tau_{j+1}) x0^ + tau_{j+1} z_j`` with fresh noise ``z_j`` (``sampler_noise: fresh``) or with the
noise the student implies, ``z_j = x + (1 - tau_j) v`` (``predicted``: deterministic, which makes the sampler
Euler with large steps); the last ``x0^`` is the sample. One network evaluation per step, no CFG pass.

**Phased targets** (``distill.phases = P``; Phased Consistency Models, arXiv 2405.18407, and TCD's multistep form).
The edges ``s_0 = 0 < s_1 < ... < s_P = 1`` are the P-step sampler's times (``phase_boundaries``); a point of phase
``(s_m, s_{m+1}]`` maps to the start of its phase instead of t = 0 (``phase_end``), both sides of the loss to the
same ``s_m``::

    f_theta(x, t, c) = x + (s_m - t) v_theta(x, t, c)                  (c_skip = 1, c_out = s_m - t)
    L_CD = mean d( f_theta(x_{t_n}, t_n, c),  sg[ f_theta(x^_{t_{n-k}}, t_{n-k}, c) ] )     (t_{n-k} = s_m: x^ itself)

and the student samples deterministically along the edges, ``x <- x + (s_m - s_{m+1}) v_theta(x, s_{m+1})`` (the
``predicted`` chain above at the edges). The reward rows still score the one-step clean sample ``x - t v_theta``.

The student is not conditioned on the guidance scale w or strength eta (the tiny DiT has no such
embedding): it is distilled for the recipe's fixed w and eta.

**Rectified-flow models from a release (Wan).** The boundary conditions in their flow-matching form: with
``x_t = (1 - t) x0 + t eps`` (Wan's sigma = t) and the network's velocity ``v_theta ~ eps - x0``, the
consistency function is parameterised as ``f_theta(x, t) = c_skip(t) x + c_out(t) v_theta(x, t)`` with::

    c_skip(t) = 1,   c_out(t) = -t          =>   f_theta(x, t, c) = x - t v_theta(x, t, c),   f_theta(x, 0, c) = x

the same ``consistency_function`` as above: the boundary condition ``f(x, 0) = x`` holds exactly for every
network, no sigma_data smoothing of LCM's ``c_skip = s^2 / ((t/e)^2 + s^2)`` is needed (that form exists because
an eps-prediction's x0 = (x - sigma eps) / alpha is unbounded at small alpha; the velocity form is not).

Its **k-step sampler is diffusers' ``FlowMatchEulerDiscreteScheduler``** at sigmas ``s_0 = 1 > ... > s_{k-1} > s_k
= 0`` (``flow_student_scheduler``: ``shift`` and ``shift_terminal``, so that ``WanPipeline`` reproduces it from the
exported ``scheduler_config.json`` and ``num_inference_steps = k``, ``guidance_scale = 1``). The deterministic
multistep consistency sampler (``predicted`` re-noising) IS that Euler chain: ``(1 - s') (x - s v) + s' (x + (1 -
s) v) = x + (s' - s) v``, and its last step is ``f(x, s_{k-1})``. ``refined_grid`` builds the teacher's grid from
those sigmas (each student interval split into ``grid_steps / k`` equal parts), so the student's times are
exactly training times (multiples of the skip) and the exported schedule is the one it was trained for.

**A v-prediction DDPM release (CogVideoX)** has its own path, DDIM step, consistency function (the DDIM jump to the
clean end, or to the phase's start) and student scheduler (``CogVideoXDDIMScheduler``, trailing timesteps):
``vidpo.objectives.distill_process``, passed to ``cd_loss`` and the objective as ``process``.
"""
from __future__ import annotations

import gc
import warnings
from typing import Callable, Optional, Sequence

import torch

from vidpo.config import RunConfig
from vidpo.parallel.mappings import reduce_from_group
from vidpo.training.distributed import weighted_means
from vidpo.utils.seeding import generator, randn_per_sample

SOURCE_CODES = {"curated": 0, "web": 1}


# ----- the math ------------------------------------------------------------------------------------------
def consistency_function(model_fn, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                         end: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``f(x, t, c) = x - t v(x, t, c)`` with ``t`` (B,) broadcast over ``(B, C, T, H, W)``; with ``end`` (B,) the
    phased form ``f(x, t, c) = x + (end - t) v(x, t, c)`` (the point at time ``end`` the velocity points at;
    ``end = t`` gives ``x`` exactly)."""
    v = model_fn(x, t, cond).to(x.dtype)
    shape = (-1,) + (1,) * (x.dim() - 1)
    if end is None:
        return x - t.to(x.dtype).view(shape) * v
    return x + (end.to(x.dtype) - t.to(x.dtype)).view(shape) * v


def phase_boundaries(phases: int, grid: torch.Tensor, skip: int) -> torch.Tensor:
    """``(phases + 1,)`` increasing phase edges ``s_0 = 0 < s_1 < ... < s_P = 1``: the times of the ``phases``-step
    sampler (``student_times``) and 0. The grid's ``N / k`` solver steps must split evenly into the phases, so every
    edge is a training time and a solver step never crosses one."""
    chain = (grid.numel() - 1) // skip
    if phases < 1 or chain % phases:
        raise ValueError(f"distill.phases = {phases} must divide grid_steps / skip = {chain}")
    return grid[torch.arange(phases + 1) * (skip * chain // phases)]


def phase_end(t: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """``(B,)`` the start of each time's phase: the largest edge strictly below ``t`` (``s_m`` for ``t`` in
    ``(s_m, s_{m+1}]``; a time on an edge belongs to the phase below it, which the sampler's step from it covers)."""
    edges = boundaries.to(device=t.device, dtype=t.dtype)
    index = torch.searchsorted(edges, t.contiguous(), right=False) - 1
    return edges[index.clamp_min(0)]


def cd_distance(prediction: torch.Tensor, target: torch.Tensor, distance: str = "huber",
                huber_c: float = 0.001, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over all elements of the pseudo-Huber ``sqrt(d^2 + c^2) - c`` or squared error ``d^2``; with ``weight``
    (B,) the weighted mean over rows of each row's mean, ``mean_b w_b mean_{elements of b} d`` (the served judges'
    reward weights, ``vidpo.objectives.rewards_served``; all ones: the unweighted value)."""
    diff = prediction - target
    if distance == "huber":
        elementwise = torch.sqrt(diff * diff + huber_c * huber_c) - huber_c
    elif distance == "l2":
        elementwise = diff * diff
    else:
        raise ValueError(f"unknown CD distance {distance!r}; valid: 'huber', 'l2'")
    if weight is None:
        return elementwise.mean()
    return (elementwise.flatten(1).mean(1) * weight.to(elementwise)).mean()


def cd_loss(model, x_t: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor, t_prev: torch.Tensor,
            cond: torch.Tensor, *, distance: str = "huber", huber_c: float = 0.001,
            end: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None, process=None):
    """``(L_CD, prediction, target)``: prediction keeps the graph, the target is the student under ``no_grad``.
    ``end`` (B,): phased targets (module doc), both sides map to the start of ``t``'s phase (``t_prev >= end``);
    ``weight`` (B,): per-row weights of the loss (``cd_distance``); ``process``: the diffusion process whose
    consistency function is used (``vidpo.objectives.distill_process``; None: rectified flow, as above)."""
    f = consistency_function if process is None else process.consistency_function
    prediction = f(model, x_t, t, cond, end)
    with torch.no_grad():
        target = f(model, x_prev, t_prev, cond, end)
    compute = torch.promote_types(prediction.dtype, torch.float32)   # bf16 under autocast -> fp32; fp64 stays
    return cd_distance(prediction.to(compute), target.to(compute), distance, huber_c, weight), prediction, target


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


# ----- rectified-flow students of a release (Wan): the scheduler WanPipeline loads ---------------------------
FLOW_TRAIN_TIMESTEPS = 1000


def flow_student_scheduler(steps: int, *, shift: float = 1.0, terminal: Optional[float] = None):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` whose ``steps``-step sigmas are the student's times: time
    shift ``shift``, last sigma before 0 stretched to ``terminal`` (default ``1 / steps``; none for one step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if steps < 1:
        raise ValueError(f"student steps must be >= 1, got {steps}")
    if steps == 1:
        terminal = None
    elif terminal is None:
        terminal = 1.0 / steps
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_TRAIN_TIMESTEPS, shift=float(shift),
                                           shift_terminal=None if terminal is None else float(terminal))


def student_sigmas(scheduler, steps: int) -> torch.Tensor:
    """``(steps + 1,)`` float32 decreasing sigmas ``1 = s_0 > ... > s_steps = 0`` the scheduler samples with (its own
    ``set_timesteps``, as ``WanPipeline`` calls it)."""
    scheduler.set_timesteps(steps, device="cpu")
    sigmas = scheduler.sigmas.detach().float().cpu().clone()
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas[1:] >= sigmas[:-1]).any()) or float(sigmas[-1]) != 0:
        raise ValueError(f"the student scheduler's {steps}-step sigmas are not strictly decreasing to 0: "
                         f"{sigmas.tolist()} (check distill.student_shift / distill.student_terminal)")
    return sigmas


def refined_grid(sigmas: torch.Tensor, grid_steps: int) -> torch.Tensor:
    """``(grid_steps + 1,)`` increasing teacher grid ``0 .. 1`` whose every ``grid_steps / k``-th point is one of the
    ``k + 1`` decreasing student ``sigmas`` (exactly: the float32 values themselves); each student interval is
    split into equal parts."""
    steps = sigmas.numel() - 1
    if grid_steps % steps:
        raise ValueError(f"distill.grid_steps = {grid_steps} must be a multiple of the student's {steps} steps")
    per = grid_steps // steps
    s = sigmas.flip(0).double()
    pieces = [s[j] + (s[j + 1] - s[j]) * torch.arange(per, dtype=torch.float64) / per for j in range(steps)]
    return torch.cat(pieces + [s[-1:]]).float()


@torch.no_grad()
def sample_flow_student(model_fn, noise: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The student's k-step sample from ``noise`` as ``WanPipeline`` + ``FlowMatchEulerDiscreteScheduler`` compute it
    (guidance 1: one evaluation per step), ``x <- x + (s_{i+1} - s_i) v(x, s_i)`` with the scheduler's roundings:
    the step in float32 plus ``dt * v`` in the model's dtype, the new latents stored in the model's dtype (bf16
    for a bf16 model, as the pipeline keeps them). Returns float32."""
    x = noise.float()
    batch = x.shape[0]
    for i in range(sigmas.numel() - 1):
        t = sigmas[i].to(x.device).expand(batch)
        v = model_fn(x, t, cond)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]).to(x.device) * v).to(v.dtype)
    return x.float()


class ConsistencyStudent(torch.nn.Module):
    """A distilled diffusers adapter seen by the stages that sample through a model's ``sample`` hook (the judged
    evaluation): ``sample`` runs ``sampler(model_fn, noise, cond, sigmas)`` (default ``sample_flow_student``; a
    v-prediction release: ``VPredictionProcess.sample_student``) at its own sigmas, whatever steps / guidance the
    caller asks for (the student is distilled for one schedule, without CFG)."""

    def __init__(self, model: torch.nn.Module, sigmas: torch.Tensor, sampler: Optional[Callable] = None):
        super().__init__()
        self.model = model
        self.sampler = sampler or sample_flow_student
        self.register_buffer("sigmas", sigmas.float().cpu(), persistent=False)

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    def forward(self, x, t, cond):
        return self.model(x, t, cond)

    def null_condition(self, cond):
        return self.model.null_condition(cond)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, shape, *, seed: int, indices: Sequence[int], stream: str = "sample",
               **_ignored) -> torch.Tensor:
        device = next(self.model.parameters()).device
        noise = randn_per_sample((len(indices),) + tuple(shape), seed, indices, stream, device=device)
        was_training = self.model.training
        self.model.eval()
        out = self.sampler(self, noise, cond.to(device), self.sigmas)   # through forward: meters see it
        self.model.train(was_training)
        return out

    def sdedit(self, *args, **kwargs):
        raise NotImplementedError("a consistency student samples from noise only")


# ----- what the training process holds ---------------------------------------------------------------------
def resident_parameters() -> dict:
    """Every ``nn.Module`` alive in this process that owns parameters, grouped by class: instance counts and
    distinct parameter bytes (storages counted once; under FSDP this rank's shards). "No teacher in memory" means
    one ``VideoDiT`` (a release: one diffusers ``*Transformer3DModel``, or its ``Parallel*Transformer`` under
    torchrun; the key keeps its historical name ``dit_models``)."""
    gc.collect()
    seen, total, counts = set(), 0, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # isinstance() on deprecated torch aliases in gc's list warns
        modules = [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module)]
    for module in modules:
        name = type(module).__name__
        name = name[len("FSDP"):] if name.startswith("FSDP") else name    # FSDP2 subclasses the module it shards
        parallel_form = name.startswith("Parallel") and name.endswith("Transformer")
        if name.endswith(("DiT", "Transformer3DModel")) or parallel_form:
            counts[name] = counts.get(name, 0) + 1
        for p in module.parameters(recurse=False):
            local = p.to_local() if hasattr(p, "to_local") else p           # an FSDP / TP DTensor: this rank's part
            try:
                storage = local.untyped_storage()
                key = (local.device.type, storage.data_ptr())
            except RuntimeError:   # a storage FSDP has freed (resized to 0): nothing resident
                continue
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return {"dit_models": counts, "parameter_bytes": total}


# ----- the objective ---------------------------------------------------------------------------------------
class ConsistencyDistillObjective:
    """``micro_batch`` draws preprocessed rows; ``loss`` is ``L_CD - R`` (module doc)."""

    name = "consistency_distill"

    def __init__(self, cfg: RunConfig, world, data, device: torch.device, rewards=None, *,
                 condition: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, prompt_key: str = "cond_ids",
                 frames: Optional[int] = None, boundaries: Optional[torch.Tensor] = None,
                 row_weights: Optional[torch.Tensor] = None, process=None, parallel=None):
        """``condition(batch[prompt_key]) -> cond`` maps a row's prompt to the model's condition (default: the shapes
        world's tokens of ``cond_ids``; a release: the cached prompt embeddings of the row's ``prompt`` index);
        ``frames``: pixel frames the image rewards pick from (default the world's); ``boundaries``: the phase edges
        (``phase_boundaries``) that ``distill.phases > 0`` needs; ``row_weights`` (P,): the CD loss weight of a
        row by its prompt index ``batch[prompt_key]`` (the served judges', ``vidpo.objectives.rewards_served``);
        ``process``: the release's diffusion process (``vidpo.objectives.distill_process``; None: rectified flow);
        ``parallel``: the run's ``ParallelContext`` under torchrun (data parallel: every rank draws the global
        micro-batch, as one process does, and keeps its rows; its loss is its share of the global loss, summed over
        the data-parallel group so that every rank holds the global loss)."""
        if cfg.distill.phases and boundaries is None:
            raise ValueError(f"distill.phases = {cfg.distill.phases} needs the phase edges of the teacher's grid; "
                             "pass phase_boundaries(...) (the shapes world) or release_phase_edges(cfg) (a release)")
        self.boundaries = boundaries if cfg.distill.phases else None
        self.cfg = cfg
        self.world = world
        self.data = data
        self.device = device
        self.rewards = rewards if rewards else None
        self.condition = condition or (lambda ids: world.tokens(ids.cpu()))
        self.prompt_key = prompt_key
        self.frames = frames if frames is not None else world.frames
        subset = cfg.reward.subset
        self.reward_source = None if subset == "all" else SOURCE_CODES[subset]
        self.residency: Optional[dict] = None
        self.row_weights = None if row_weights is None else row_weights.detach().float().cpu()
        self.process = process
        self.parallel = parallel if parallel is not None and parallel.dp > 1 else None

    def micro_batch(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        g = generator(cfg.seed, "data", step, micro)
        index = torch.randint(len(self.data), (cfg.train.batch_size,), generator=g)
        # Under data parallel, only this rank's rows are read; every random draw stays the whole batch's.
        rows = self.parallel.dp_rows(index.numel()) if self.parallel is not None else slice(None)
        batch = {k: v.to(self.device) for k, v in self.data.rows(index[rows]).items()}
        batch["batch_rows"] = index.numel()
        if self.row_weights is not None:
            batch["cd_weight"] = self.row_weights[batch[self.prompt_key].cpu().long()].to(self.device)
        if self.rewards is not None:
            source = self.data.tensors["source"][index]        # the whole draw's, as one process routes it
            eligible = torch.ones_like(source, dtype=torch.bool) if self.reward_source is None \
                else source == self.reward_source
            # The first max_rows eligible rows of the (random) draw: a random subset of the routed data.
            chosen = eligible & (eligible.long().cumsum(0) <= cfg.reward.max_rows)
            batch["reward_rows_total"] = int(chosen.sum())
            batch["reward_rows"] = chosen[rows].to(self.device)
            batch["frames"] = self.rewards.draw_frames(index.numel(), self.frames, g)[rows]
        return batch

    def loss(self, model, batch: dict):
        d = self.cfg.distill
        cond_ids = batch[self.prompt_key]
        tokens = self.condition(cond_ids).to(self.device)
        end = None if self.boundaries is None else phase_end(batch["t"], self.boundaries)
        loss_cd, prediction, _ = cd_loss(model, batch["x_t"], batch["t"], batch["x_prev"], batch["t_prev"], tokens,
                                         distance=d.distance, huber_c=d.huber_c, end=end,
                                         weight=batch.get("cd_weight"), process=self.process)
        if end is not None:
            # The rewards score the one-step clean sample (x - t v for a flow), recovered from the phased one.
            if self.process is None:
                shape = (-1,) + (1,) * (prediction.dim() - 1)
                t = batch["t"].to(prediction.dtype).view(shape)
                x_t = batch["x_t"]
                prediction = x_t + (prediction - x_t) * (t / (t - end.to(prediction.dtype).view(shape)))
            else:
                prediction = self.process.clean_from(batch["x_t"], batch["t"], prediction, end)
        # This rank's share of the global loss: its rows are an equal part of the batch's (data parallel).
        share = batch[self.prompt_key].shape[0] / batch.get("batch_rows", batch[self.prompt_key].shape[0])
        loss = loss_cd * share
        metrics = {"cd": float(loss_cd.detach())}
        weights = {"cd": 1.0}               # each metric's data-parallel weight (its local count)
        if "cd_weight" in batch:
            metrics["cd_weight_mean"] = float(batch["cd_weight"].mean())
            weights["cd_weight_mean"] = float(batch["cd_weight"].numel())
        if self.rewards is not None:
            rows = batch["reward_rows"]
            if bool(rows.any()):
                frames = batch["frames"][rows.cpu()]
                total, parts = self.rewards(prediction[rows].float(), cond_ids[rows], frames)
                loss = loss - total.sum() / batch["reward_rows_total"]     # the mean over the whole batch's rows
                metrics["reward"] = float(total.detach().mean())
                for name, value in parts.items():
                    metrics[f"reward/{name}"] = float(value.detach().mean())
                weights.update({k: float(rows.sum()) for k in metrics if k.startswith("reward")})
        if self.parallel is not None:
            # Summed over the group (identity backward): every rank holds the global loss, and the gradients the
            # training loop sums over ranks are the global ones.
            loss = reduce_from_group(loss, self.parallel.dp_group)
            reward_keys = [f"reward/{name}" for name in self.rewards.names] + ["reward"] if self.rewards else []
            for key in reward_keys:        # a rank without reward rows weighs 0 in the mean
                metrics.setdefault(key, 0.0)
                weights.setdefault(key, 0.0)
            metrics = weighted_means({k: (v, weights[k]) for k, v in metrics.items()}, self.parallel.dp_group,
                                     device=loss.device)
        if self.rewards is not None:
            metrics["reward_rows"] = float(batch["reward_rows_total"])
        if self.residency is None:
            # Measured inside the first step, while the step's graph is alive: what training really holds.
            self.residency = resident_parameters()
        return loss, metrics

    def state_dict(self) -> dict:
        return {}  # every micro-batch is a pure function of (seed, step, micro)

    def load_state_dict(self, state: dict) -> None:
        pass


