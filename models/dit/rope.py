"""3-D rotary position embedding (RoPE) over the (t, h, w) patch grid, split as in Wan.

The head dim d is split into three even parts, one per axis:
    d_h = d_w = 2 * (d // 6),   d_t = d - d_h - d_w
Within the part of axis a (size d_a) the pair i = 0 .. d_a/2 - 1 rotates with frequency
    omega_{a,i} = theta ** (-2 i / d_a)
by the angle  pos_a * omega_{a,i}, where pos_a is the token's patch-grid index along a. Pairs are
adjacent elements (x[2j], x[2j+1]) of the head vector, the layout of Wan's complex-number RoPE:
    y[2j]   = x[2j] cos(phi_j) - x[2j+1] sin(phi_j)
    y[2j+1] = x[2j] sin(phi_j) + x[2j+1] cos(phi_j)
with phi = concat(angles_t, angles_h, angles_w) of length d/2. A rotation keeps the norm, and
<R(p) q, R(p') k> depends on p' - p only, so attention sees relative positions.

Positions are explicit ``(N, 3)`` integer tensors (``grid_positions``), so a context-parallel rank that
holds a slice of the token sequence passes that slice's positions and gets the same rotation.
The cos/sin tables are computed from float64 angles (small: n x d/2 values per forward) and the rotation
is applied in float32, whatever the activation dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch


def rope_split(head_dim: int) -> Tuple[int, int, int]:
    """(d_t, d_h, d_w) of Wan's split: d_h = d_w = 2*(d//6), d_t = d - 4*(d//6)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3-D RoPE needs an even head dim >= 6, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_frequencies(head_dim: int, theta: float = 10000.0,
                     dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis frequencies omega_{a,i} = theta**(-2i/d_a), shapes (d_t/2,), (d_h/2,), (d_w/2,)."""
    return tuple(
        1.0 / (theta ** (torch.arange(0, part, 2, dtype=torch.float64) / part)).to(dtype)
        for part in rope_split(head_dim)
    )


def grid_positions(grid: Tuple[int, int, int], device=None) -> torch.Tensor:
    """(N, 3) long tensor of (t, h, w) indices of a (T', H', W') patch grid in row-major token order
    (t slowest, w fastest), the order ``VideoDiT`` flattens patches in."""
    gt, gh, gw = grid
    t, h, w = torch.meshgrid(torch.arange(gt, device=device), torch.arange(gh, device=device),
                             torch.arange(gw, device=device), indexing="ij")
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=-1)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Angles phi of shape (N, head_dim/2) for ``positions`` (N, 3): concat over axes of pos_a * omega_a."""
    freqs = rope_frequencies(head_dim, theta, dtype)
    pos = positions.to(dtype)
    return torch.cat([pos[:, axis, None] * f.to(pos.device)[None, :] for axis, f in enumerate(freqs)], dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos(phi), sin(phi)), each (N, head_dim/2) in ``dtype``, from float64 angles."""
    angles = rope_angles(positions, head_dim, theta, torch.float64)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` (..., N, d) by the angles behind ``cos``/``sin`` (N, d/2).

    Computed in float32 at least (the rotation of a bf16 vector in bf16 would lose its norm), float64
    for float64 inputs, and returned in x's dtype.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = x.to(compute).unflatten(-1, (-1, 2))
    x_even, x_odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.device, compute), sin.to(x.device, compute)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
