"""Sampling with a model's own diffusers scheduler and classifier-free guidance: the adapters' sampler hook.

The toy DiT samples with the engine's Euler rectified-flow sampler (``vidpo.models.flow``). A diffusers model
was trained, and is evaluated and published, with its own scheduler: Wan 2.1 with flow-matching Euler or
UniPC over shifted sigmas, CogVideoX with DDIM or DPM-Solver++ over a v-prediction DDPM with integer
timesteps. The engine's Euler would treat CogVideoX's v-prediction as a velocity (wrong samples, so wrong
pairs and wrong evaluation) and would ignore Wan's time shift. ``SchedulerSampler`` runs the diffusers
pipelines' loop (``set_timesteps``, then per timestep: CFG over one batched call, ``scheduler.step``) over any
model in the engine's interface ``model(x, t, cond)``, so the same loop serves the single-device adapters and
their parallelized forms.

What a model family tells the loop (``SamplerSpec``):
  make_scheduler()          a fresh scheduler: multistep schedulers (UniPC, DPM) keep state across steps;
  model_time(sch, ts)       the engine time (B-broadcastable) at which the model is called for timestep ``ts``;
  level(sch, i)             the engine time of the state the scheduler expects before step ``i``: SDEdit enters
                            the loop there with ``x = interpolate(x0, eps, level(i))``;
  interpolate(x0, eps, t)   the model's own forward process (flow: (1-t) x0 + t eps; DDPM: add_noise at k).

Determinism: the starting noise of row k is ``randn_per_sample(..., seed, indices[k], stream)``. A stochastic
scheduler (CogVideoX's DPM injects fresh noise at every step) draws row k's step noise from its own generator
``(seed, stream, "steps", indices[k])`` (diffusers' ``randn_tensor`` takes one generator per row), so sample
``i`` never depends on which batch it lands in.

SDEdit (StructuralDPO pairs) on a scheduler's grid: the loop starts at the first step whose level is <= eta
(diffusers' img2img ``strength`` also keeps a suffix of the grid) from ``interpolate(x0, eps, level)``; a level
below every step of the grid leaves ``x0`` unchanged. Rows with different eta may start at different steps:
each start runs as its own group (its own scheduler), and the rows are put back in order.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from vidpo.models.flow import guided_velocity
from vidpo.utils.seeding import generator as stream_generator
from vidpo.utils.seeding import randn_per_sample

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Engine time at or below which a level counts as "reached" (the levels are float32 sigmas / k / 999).
_LEVEL_TOL = 1e-6


def has_sampler_hook(model) -> bool:
    """True when ``model`` samples with its own scheduler (a diffusers adapter); False for the toy DiT, which
    the engine samples with ``vidpo.models.flow``."""
    return callable(getattr(model, "sample", None)) and callable(getattr(model, "sdedit", None))


@dataclass
class SamplerSpec:
    """How one model family drives a diffusers scheduler (see the module docstring)."""

    make_scheduler: Callable[[], object]
    model_time: Callable[[object, torch.Tensor], torch.Tensor]
    level: Callable[[object, int], float]
    interpolate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _is_cogvideox_dpm(scheduler) -> bool:
    # CogVideoX's DPM-Solver++ has its own step signature (the previous x0 prediction and timestep go in, the
    # new x0 prediction comes out); CogVideoXPipeline special-cases it the same way.
    return type(scheduler).__name__ == "CogVideoXDPMScheduler"


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class SchedulerSampler:
    """Text-to-video and SDEdit with a diffusers scheduler over ``model_fn(x, t_engine, cond) -> prediction``
    (the prediction the scheduler's ``prediction_type`` expects: velocity for flow matching, v for CogVideoX).
    ``model_fn`` should return fp32; the state ``x`` is kept in fp32 between steps."""

    def __init__(self, model_fn: ModelFn, spec: SamplerSpec):
        self.model_fn = model_fn
        self.spec = spec

    # ----- the loop ---------------------------------------------------------------------------------------
    def timesteps(self, steps: int, device=None) -> tuple[object, torch.Tensor]:
        """A fresh scheduler with ``set_timesteps(steps)`` done, and its timesteps."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        scheduler = self.spec.make_scheduler()
        scheduler.set_timesteps(steps, device=device)
        return scheduler, scheduler.timesteps

    @torch.no_grad()
    def run(self, x: torch.Tensor, cond: torch.Tensor, null_cond: Optional[torch.Tensor], *, steps: int,
            cfg_scale: float, start: int = 0, generators: Optional[List[torch.Generator]] = None) -> torch.Tensor:
        """Denoise ``x`` (the state before step ``start`` of a ``steps``-step grid) to the end of the grid."""
        scheduler, timesteps = self.timesteps(steps, x.device)
        if start > 0 and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)     # multistep schedulers index their sigmas from here
        step_kwargs = {"generator": generators} if _accepts(scheduler.step, "generator") else {}
        batch = x.shape[0]
        old_x0 = None
        for i in range(start, len(timesteps)):
            timestep = timesteps[i]
            t = self.spec.model_time(scheduler, timestep).to(device=x.device, dtype=torch.float32).expand(batch)
            x_in = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
            out = guided_velocity(self.model_fn, x_in, t, cond, null_cond, cfg_scale).float()
            if _is_cogvideox_dpm(scheduler):
                back = timesteps[i - 1] if i > start else None
                x, old_x0 = scheduler.step(out, old_x0, timestep, back, x, return_dict=False, **step_kwargs)
            else:
                x = scheduler.step(out, timestep, x, return_dict=False, **step_kwargs)[0]
        return x.float()

    def _generators(self, seed: int, indices: Sequence[int], stream: str) -> Optional[List[torch.Generator]]:
        scheduler = self.spec.make_scheduler()
        stochastic = _is_cogvideox_dpm(scheduler) or bool(getattr(scheduler.config, "stochastic_sampling", False))
        if not stochastic:
            return None
        return [stream_generator(seed, stream, "steps", int(i)) for i in indices]

    # ----- text-to-video ----------------------------------------------------------------------------------
    def sample(self, cond: torch.Tensor, shape: Sequence[int], *, seed: int, indices: Sequence[int], steps: int,
               cfg_scale: float, stream: str = "sample", null_cond: Optional[torch.Tensor] = None,
               device=None) -> torch.Tensor:
        """``(len(indices), *shape)`` fp32 samples; row k starts from the noise of sample ``indices[k]``."""
        device = cond.device if device is None else device
        scheduler = self.spec.make_scheduler()
        noise = randn_per_sample((len(indices),) + tuple(shape), seed, indices, stream, device=device)
        x = noise * float(getattr(scheduler, "init_noise_sigma", 1.0))
        return self.run(x, cond, null_cond, steps=steps, cfg_scale=cfg_scale,
                        generators=self._generators(seed, indices, stream))

    # ----- SDEdit -------------------------------------------------------------------------------------------
    def levels(self, steps: int) -> list[float]:
        """The engine-time level of the state before each step of the ``steps``-step grid."""
        scheduler, timesteps = self.timesteps(steps)
        return [float(self.spec.level(scheduler, i)) for i in range(len(timesteps))]

    def start_index(self, eta: float, steps: int, levels: Optional[Sequence[float]] = None) -> int:
        """The first step of the ``steps``-step grid whose level is <= ``eta`` (``steps`` when none is)."""
        levels = self.levels(steps) if levels is None else levels
        return next((i for i, level in enumerate(levels) if level <= float(eta) + _LEVEL_TOL), len(levels))

    def sdedit(self, x0: torch.Tensor, cond: torch.Tensor, eta: float | torch.Tensor, *, seed: int,
               indices: Sequence[int], steps: int, cfg_scale: float, stream: str = "sample",
               null_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Re-generate the clean ``x0`` (B, ...) from level ``eta`` (a float, or (B,) per row) on this
        scheduler's grid. Row k's noise is that of sample ``indices[k]``; returns fp32."""
        batch = x0.shape[0]
        etas = eta.detach().double().cpu().reshape(-1) if torch.is_tensor(eta) else torch.full((batch,), float(eta),
                                                                                            dtype=torch.float64)
        if etas.numel() != batch:
            raise ValueError(f"SDEdit needs one eta per row ({batch}), got {etas.numel()}")
        if etas.min() < 0 or etas.max() > 1:
            raise ValueError(f"SDEdit level eta must be in [0, 1], got {eta}")
        x0 = x0.float()
        noise = randn_per_sample(tuple(x0.shape), seed, indices, stream, device=x0.device)
        levels = self.levels(steps)
        starts = [self.start_index(float(e), steps, levels) for e in etas]
        out = x0.clone()
        for start in sorted(set(starts)):
            if start >= len(levels):
                continue                        # eta below the whole grid: nothing to denoise
            rows = [k for k, s in enumerate(starts) if s == start]
            sel = torch.tensor(rows, device=x0.device)
            level = torch.full((len(rows),), levels[start], device=x0.device)
            x = self.spec.interpolate(x0[sel], noise[sel], level).float()
            gens = self._generators(seed, [indices[k] for k in rows], stream)
            null = None if null_cond is None else null_cond[sel]
            out[sel] = self.run(x, cond[sel], null, steps=steps, cfg_scale=cfg_scale, start=start, generators=gens)
        return out
