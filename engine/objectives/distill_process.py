"""The diffusion process a release's consistency distillation runs on: its forward path, the teacher's solver step,
the ODE inversion of motion guidance, the consistency function and the student's schedule and sampler, for the
two parameterisations the releases use (``vidpo.objectives.distill`` has the loss and the objective).

Both processes are Gaussian paths ``x_t = a(t) x0 + s(t) eps`` in engine time ``t`` in [0, 1] (t = 1 the noise
end, t = 0 the clean end) whose network predicts a velocity-like ``v``; from ``(x, v)`` at time ``t``::

    x0^(x, t)  = predicted clean sample        eps^(x, t) = predicted noise
    step(x, t -> t', v) = a(t') x0^ + s(t') eps^                            (DDIM, deterministic)

**Rectified flow (Wan, the toy DiT)** ``FlowProcess``: ``a = 1 - t``, ``s = t``, ``v ~ eps - x0``,
``x0^ = x - t v``, ``eps^ = x + (1 - t) v``, so DDIM is the Euler step ``x + (t' - t) v``. Its code is the
flow functions of ``vidpo.objectives.distill`` and ``vidpo.models`` (the shapes world's roundings, bit for bit).

**v-prediction DDPM (CogVideoX)** ``VPredictionProcess``: integer timesteps ``k = round(t (N - 1))`` (N = 1000, the
adapter's engine time), ``a = sqrt(abar_k)``, ``s = sqrt(1 - abar_k)`` from the release scheduler's
``alphas_cumprod`` (scaled-linear betas, SNR shift, zero-terminal-SNR rescaling: ``abar_999 = 0``), and::

    v   = a eps - s x0                     x0^ = a x - s v         eps^ = s x + a v

Engine time 0 is the CLEAN end, ``a = 1, s = 0`` -- not the DDPM's k = 0 level (``abar_0`` = 0.9975 for
CogVideoX, noise std 0.05). That is where CogVideoXDDIMScheduler's last step lands (``prev_timestep < 0``:
``final_alpha_cumprod = 1``, ``set_alpha_to_one``) and where LCM's boundary condition ``c_skip(0) = 1,
c_out(0) = 0`` puts the consistency function's anchor. So the **consistency function** is the DDIM jump to the
phase end ``e`` (0 without phases)::

    f(x, t) = a(e) x0^(x, t) + s(e) eps^(x, t)          f(x, 0) = x0^ at e = 0;   f(x, e) = x exactly at t = e

with no smoothed ``c_skip``: at every student time ``k > 0`` it is exactly what the exported scheduler computes
(LCM's ``c_skip = 0.25 / ((10 k)^2 + 0.25)`` would differ from it by up to 2.5e-3 at k = 1), and the boundary
holds exactly because time 0 is the clean end itself.

**The student's schedule** is diffusers' ``CogVideoXDDIMScheduler`` with the release's config and
``timestep_spacing: trailing`` (the zero-terminal-SNR convention: the first step at k = 999, pure noise), exported
so that ``CogVideoXPipeline`` samples it with ``num_inference_steps = k``, ``guidance_scale = 1``. Its step from
timestep ``e_j`` goes to ``e_j - N // k``; that is the next timestep only when k divides N (k = 3 evaluates at
332 a state made for 333), so the student's steps must divide ``num_train_timesteps``. The teacher's grid splits
each student interval (the clean end 0 < e_{k-1} < ... < e_0 = 999) into ``grid_steps / k`` parts of whole
timesteps, so every student time is a training time. The student sampler is that scheduler's loop, as the pipeline
runs it (``sample_vpred_student``).

**Motion guidance** on a v-prediction teacher adds ``eta grad g`` to the guided ``v`` as on a velocity: the DDIM
step's ``x'`` depends on ``v`` through ``-(a(t') s(t) - s(t') a(t)) v`` with a positive factor for ``t' < t``, so
the step descends the energy as the Euler step does (vidpo.models.motion_guidance). The reference latent is the
DDIM inversion of the clip: ``step`` upwards through the grid on ``v_cond``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from vidpo.config import ConfigError
from vidpo.models import flow
from vidpo.models import motion_guidance as mg
from vidpo.objectives.distill import (
    consistency_function,
    flow_student_scheduler,
    refined_grid,
    sample_flow_student,
    student_sigmas,
)

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype).view((-1,) + (1,) * (like.dim() - 1))


class DiffusionProcess:
    """``x_t = a(t) x0 + s(t) eps`` with a v-like prediction (module doc); subclasses give ``coefficients`` and the
    student's schedule."""

    name = "process"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a(t), s(t))`` float64 of engine times ``t`` (B,)."""
        raise NotImplementedError

    def _ab(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, s = self.coefficients(torch.as_tensor(t).reshape(-1))
        return _bcast(a, like), _bcast(s, like)

    # ----- the path and the solver ----------------------------------------------------------------------------
    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._ab(t, x0)
        return a * x0 + s * eps

    def predictions(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0^, eps^)`` of ``x`` at ``t`` given the network's ``v`` (the parameterisation's own)."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, t: torch.Tensor, t_to: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """DDIM from ``t`` to ``t_to`` (either direction): ``a(t') x0^ + s(t') eps^``."""
        x0, eps = self.predictions(x, t, v)
        a, s = self._ab(t_to, x)
        return a * x0 + s * eps

    def invert(self, model_fn: ModelFn, x0: torch.Tensor, cond: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """DDIM inversion of clean ``x0`` through increasing ``times`` (K + 1,): ``(K + 1, B, ...)``, entry i at
        ``times[i]``."""
        out, x = [x0], x0
        batch = x0.shape[0]
        for i in range(times.numel() - 1):
            t_now = times[i].expand(batch).to(x0.device)
            x = self.step(x, t_now, times[i + 1].expand(batch), model_fn(x, t_now, cond).to(x.dtype))
            out.append(x)
        return torch.stack(out)

    # ----- consistency ------------------------------------------------------------------------------------------
    def consistency_function(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                             end: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``f(x, t) = step(x, t -> end)`` (end 0: the clean end, ``x0^``)."""
        v = model_fn(x, t, cond).to(x.dtype)
        if end is None:
            return self.predictions(x, t, v)[0]
        return self.step(x, t, end, v)

    def clean_from(self, x: torch.Tensor, t: torch.Tensor, f: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """The one-step ``x0^`` behind a phased ``f = step(x, t -> end)``: both are linear in ``(x0^, eps^)``, so
        ``x0^ = (s f - s_e x) / (s a_e - s_e a)`` (the denominator is > 0 for ``t > end``)."""
        a, s = self._ab(t, x)
        a_e, s_e = self._ab(end, x)
        return (s * f - s_e * x) / (s * a_e - s_e * a)

    # ----- the student --------------------------------------------------------------------------------------------
    def student_schedule(self, distill_cfg) -> tuple:
        """``(scheduler to export, student times (k + 1,) decreasing to 0, teacher grid (N + 1,) increasing)``."""
        raise NotImplementedError

    def sample_student(self, model_fn: ModelFn, noise: torch.Tensor, cond: torch.Tensor,
                       sigmas: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FlowProcess(DiffusionProcess):
    """Rectified flow (module doc): the flow functions of ``vidpo.objectives.distill`` and ``vidpo.models``."""

    name = "flow"

    def coefficients(self, t):
        t = t.double()
        return 1.0 - t, t

    def predictions(self, x, t, v):
        t = _bcast(torch.as_tensor(t).reshape(-1), x)
        return x - t * v, x + (1 - t) * v

    def interpolate(self, x0, eps, t):
        return flow.interpolate(x0, eps, t)

    def step(self, x, t, t_to, v):
        return x + (_bcast(torch.as_tensor(t_to).reshape(-1), x) - _bcast(torch.as_tensor(t).reshape(-1), x)) * v

    def invert(self, model_fn, x0, cond, times):
        return mg.invert(model_fn, x0, cond, times)

    def consistency_function(self, model_fn, x, t, cond, end=None):
        return consistency_function(model_fn, x, t, cond, end)

    def clean_from(self, x, t, f, end):
        shape = (-1,) + (1,) * (f.dim() - 1)
        t = t.to(f.dtype).view(shape)
        return x + (f - x) * (t / (t - end.to(f.dtype).view(shape)))

    def student_schedule(self, distill_cfg):
        d = distill_cfg
        scheduler = flow_student_scheduler(d.eval_steps, shift=d.student_shift, terminal=d.student_terminal)
        sigmas = student_sigmas(scheduler, d.eval_steps)
        _check_grid(d)
        return scheduler, sigmas, refined_grid(sigmas, d.grid_steps)

    def sample_student(self, model_fn, noise, cond, sigmas):
        return sample_flow_student(model_fn, noise, cond, sigmas)


def _check_grid(d) -> None:
    if d.grid_steps % (d.eval_steps * d.skip):
        raise ConfigError(f"distill.grid_steps = {d.grid_steps} must be a multiple of distill.eval_steps * "
                          f"distill.skip = {d.eval_steps * d.skip}: every student time must be a training time")


class VPredictionProcess(DiffusionProcess):
    """A v-prediction DDPM with integer timesteps (CogVideoX; module doc), from its scheduler config."""

    name = "v_prediction"

    def __init__(self, scheduler_config: dict):
        from diffusers import CogVideoXDDIMScheduler

        config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        if config.get("prediction_type", "v_prediction") != "v_prediction":
            raise ConfigError(f"the release's scheduler predicts {config.get('prediction_type')!r}; consistency "
                              "distillation of a DDPM release supports v_prediction (CogVideoX)")
        # The student's scheduler: the release's noise schedule, trailing spacing (the first step at pure noise).
        self.scheduler_class = CogVideoXDDIMScheduler
        self.config = {**config, "timestep_spacing": "trailing"}
        reference = CogVideoXDDIMScheduler.from_config(self.config)
        self.num_train_timesteps = int(reference.config.num_train_timesteps)
        self.alphas_cumprod = reference.alphas_cumprod.double().clone()

    def timesteps_of(self, t: torch.Tensor) -> torch.Tensor:
        """Engine time -> integer timestep ``round(t (N - 1))`` (the adapter's own mapping)."""
        top = self.num_train_timesteps - 1
        return torch.round(t.double() * top).long().clamp(0, top)

    def coefficients(self, t):
        k = self.timesteps_of(t.cpu())
        abar = torch.where(k == 0, torch.ones((), dtype=torch.float64), self.alphas_cumprod[k])
        return abar.sqrt(), (1.0 - abar).clamp_min(0.0).sqrt()

    def predictions(self, x, t, v):
        a, s = self._ab(t, x)          # v = a eps - s x0 with a^2 + s^2 = 1
        return a * x - s * v, s * x + a * v

    def student_scheduler(self, steps: int):
        if steps < 1 or self.num_train_timesteps % steps:
            raise ConfigError(f"distill.eval_steps = {steps} must divide the scheduler's num_train_timesteps = "
                              f"{self.num_train_timesteps}: DDIM steps from each timestep to the one "
                              f"num_train_timesteps // steps below it, which must be the student's next time")
        return self.scheduler_class.from_config(self.config)

    def student_schedule(self, distill_cfg):
        d = distill_cfg
        if d.student_shift != 1.0 or d.student_terminal is not None:
            raise ConfigError("distill.student_shift / distill.student_terminal shape a flow student's sigmas; a "
                              "v-prediction student samples at its DDIM scheduler's trailing timesteps (leave them "
                              "at 1.0 / null)")
        _check_grid(d)
        scheduler = self.student_scheduler(d.eval_steps)
        scheduler.set_timesteps(d.eval_steps, device="cpu")
        top = self.num_train_timesteps - 1
        steps = [int(k) for k in scheduler.timesteps] + [0]              # e_0 = 999 > ... > e_{k-1} > clean end
        per = d.grid_steps // d.eval_steps
        grid = []
        for lo, hi in zip(reversed(steps[1:]), reversed(steps[:-1])):
            if hi - lo < per:
                raise ConfigError(f"distill.grid_steps = {d.grid_steps} splits the student interval of timesteps "
                                  f"[{lo}, {hi}] into {per} parts: more than its {hi - lo} whole timesteps")
            grid += [lo + round((hi - lo) * j / per) for j in range(per)]
        grid.append(steps[0])
        sigmas = torch.tensor(steps, dtype=torch.float64).div(top).float()
        return scheduler, sigmas, torch.tensor(grid, dtype=torch.float64).div(top).float()

    @torch.no_grad()
    def sample_student(self, model_fn, noise, cond, sigmas):
        """The student's ``k``-step sample as ``CogVideoXPipeline`` + the exported scheduler compute it (guidance 1:
        one evaluation per step): ``scheduler.step`` on the fp32 prediction, the latents kept in the model's dtype
        between steps, as the pipeline keeps them. Returns float32."""
        steps = sigmas.numel() - 1
        scheduler = self.student_scheduler(steps)
        scheduler.set_timesteps(steps, device=noise.device)
        top = self.num_train_timesteps - 1
        x = noise.float() * float(scheduler.init_noise_sigma)
        batch = x.shape[0]
        for k in scheduler.timesteps:
            t = (k.double() / top).float().to(x.device).expand(batch)
            v = model_fn(x, t, cond)
            x = scheduler.step(v.float(), k, x, return_dict=False)[0].to(v.dtype)
        return x.float()


def release_process(kind: str, scheduler_config: Optional[dict] = None) -> DiffusionProcess:
    """The process a release of family ``kind`` is distilled on: Wan's rectified flow, CogVideoX's v-prediction
    DDPM from ``scheduler_config`` (the release's ``scheduler/scheduler_config.json``)."""
    if kind == "wan":
        return FlowProcess()
    if kind == "cogvideox":
        if scheduler_config is None:
            raise ValueError("a CogVideoX process needs the release's scheduler config")
        return VPredictionProcess(scheduler_config)
    raise ConfigError(f"model.kind={kind}: consistency distillation of a release supports 'wan' (rectified flow) "
                      "and 'cogvideox' (v-prediction DDPM)")
