"""Rectified flow: timestep sampling, interpolation, velocity target, Euler sampling with CFG, SDEdit.

Convention (DESIGN.md section 1): time ``t`` in [0, 1], ``t = 0`` is data and ``t = 1`` pure noise;
``x_t = (1 - t) * x0 + t * eps``; the model predicts the velocity ``v ~ u = eps - x0``; sampling integrates
``dx/dt = v`` from ``t = 1`` down to ``t = 0`` with Euler steps ``x <- x + (t_next - t) * v``.

Determinism: every function that draws noise takes the run seed and the *sample indices*; noise for sample
``i`` depends only on ``(seed, stream, i)`` (``vidpo.utils.seeding.randn_per_sample``), so sample ``i`` of a run is
reproducible on its own, whatever batch it falls into.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from vidpo.utils.seeding import randn_per_sample

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_timesteps(n: int, generator: torch.Generator, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                     t_min: float = 0.0, t_max: float = 1.0) -> torch.Tensor:
    """``(n,)`` timesteps: logit-normal (SD3's choice, weighting the middle of the path) rescaled into
    ``[t_min, t_max]`` so preference training can skip the nearly-clean end (DPO on shapes uses t >= 0.3)."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    z = torch.randn(n, generator=generator) * logit_std + logit_mean
    return t_min + (t_max - t_min) * torch.sigmoid(z)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` with ``t`` of shape ``(B,)`` broadcast over ``(B, C, T, H, W)``."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``u = eps - x0``: the constant velocity of the straight path from data to noise."""
    return noise - x0


def time_grid(steps: int, t_start: float = 1.0, *, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` decreasing times from ``t_start`` to 0. ``shift > 1`` spends more steps near the noise
    end (SD3 / Wan time shift ``t' = s t / (1 + (s - 1) t)``). The grid from ``t_start = 1`` is the plain
    sampling grid, and SDEdit from level ``eta`` uses the grid from ``t_start = eta`` with the same count."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _row_grids(steps, t_start, 1, shift, "cpu")[0]


def guided_velocity(model_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    null_cond: Optional[torch.Tensor], cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v = v_null + w (v_cond - v_null)``, both halves in one batched call."""
    if null_cond is None or cfg_scale == 1.0:
        return model_fn(x, t, cond)
    v = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond]))
    v_cond, v_null = v.chunk(2)
    return v_null + cfg_scale * (v_cond - v_null)


def _row_grids(steps: int, t_start, batch: int, shift: float, device) -> torch.Tensor:
    """``(batch, steps + 1)`` per-row time grids: row ``i`` runs from ``t_start[i]`` to 0 with the grid of
    ``time_grid(steps, t_start[i], shift)`` (so a float ``t_start`` gives every row the same grid)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if torch.is_tensor(t_start):
        start = t_start.detach().to(torch.float64).cpu().reshape(-1, 1)
    else:
        start = torch.full((batch, 1), float(t_start), dtype=torch.float64)
    t = start * s[None]
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t.float().to(device)


@torch.no_grad()
def euler_sample(model_fn: VelocityFn, x_start: torch.Tensor, cond: torch.Tensor, *,
                 null_cond: Optional[torch.Tensor] = None, cfg_scale: float = 1.0, steps: int = 20,
                 t_start: float | torch.Tensor = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Integrate ``dx/dt = v`` from ``t_start`` to 0 starting at ``x_start`` (noise for ``t_start = 1``).
    ``t_start`` may be a ``(B,)`` tensor: each row then follows its own grid (SDEdit at per-pair levels)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batch = x_start.shape[0]
    grids = _row_grids(steps, t_start, batch, shift, x_start.device)
    x = x_start
    bcast = (batch,) + (1,) * (x.dim() - 1)
    for k in range(steps):
        t_now, t_next = grids[:, k], grids[:, k + 1]
        v = guided_velocity(model_fn, x, t_now, cond, null_cond, cfg_scale)
        x = x + (t_next - t_now).view(bcast).to(x.dtype) * v.to(x.dtype)
    return x


def sample(model_fn: VelocityFn, shape: Sequence[int], cond: torch.Tensor, *, seed: int,
           indices: Sequence[int], null_cond: Optional[torch.Tensor] = None, cfg_scale: float = 1.0,
           steps: int = 20, shift: float = 1.0, stream: str = "sample", device="cpu") -> torch.Tensor:
    """Plain text(condition)-to-video sampling; row ``k`` uses the noise of sample ``indices[k]``."""
    noise = randn_per_sample(tuple(shape), seed, indices, stream, device=device)
    return euler_sample(model_fn, noise, cond, null_cond=null_cond, cfg_scale=cfg_scale, steps=steps, shift=shift)


def sdedit_start(x0: torch.Tensor, noise: torch.Tensor, eta: float | torch.Tensor) -> torch.Tensor:
    """SDEdit / StructuralDPO start point ``x_eta = (1 - eta) x0 + eta eps`` (a point of the training path)."""
    if not torch.is_tensor(eta):
        eta = torch.full((x0.shape[0],), float(eta), dtype=x0.dtype, device=x0.device)
    return interpolate(x0, noise, eta.to(device=x0.device, dtype=x0.dtype))


def sdedit(model_fn: VelocityFn, x0: torch.Tensor, cond: torch.Tensor, eta: float | torch.Tensor, *, seed: int,
           indices: Sequence[int], null_cond: Optional[torch.Tensor] = None, cfg_scale: float = 1.0,
           steps: int = 20, shift: float = 1.0, stream: str = "sample") -> torch.Tensor:
    """Guided re-generation of the clean latent ``x0`` from level ``eta`` (a float, or ``(B,)`` per row): noise
    it to ``x_eta`` and denoise from ``eta`` to 0 with ``steps`` Euler steps. ``eta = 0`` returns ``x0``
    unchanged; ``eta = 1`` is exactly plain sampling with the same noise (``x_1 = eps``, same time grid)."""
    eta_t = eta if torch.is_tensor(eta) else torch.tensor([float(eta)])
    if eta_t.min() < 0 or eta_t.max() > 1:
        raise ValueError(f"SDEdit level eta must be in [0, 1], got {eta}")
    if not torch.is_tensor(eta) and eta == 0.0:
        return x0.clone()
    noise = randn_per_sample(tuple(x0.shape), seed, indices, stream, device=x0.device, dtype=x0.dtype)
    start = sdedit_start(x0, noise, eta if torch.is_tensor(eta) else float(eta))
    if not torch.is_tensor(eta) and eta == 1.0:
        start = noise  # (1 - 1) * x0 + 1 * eps is eps up to the sign of zero; take it exactly
    return euler_sample(model_fn, start, cond, null_cond=null_cond, cfg_scale=cfg_scale, steps=steps,
                        t_start=eta, shift=shift)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution at ``t`` (for tests and plots of the timestep weighting)."""
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-0.5 * ((logit - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
