"""Motion guidance for a full-3-D-attention video DiT: MotionClone's primary temporal-attention (PTA)
energy, its gradient as a guidance term of the ODE solver, and ODE inversion of a reference clip.

Source: T2V-Turbo-v2 (arXiv 2410.05677) section 2 / eq. 6-8, after MotionClone (Ling et al., 2024).

**Temporal attention of a full-attention DiT.** A UNet video model has separate temporal-attention layers;
a DiT attends over all ``n = T' H' W'`` tokens at once. Its temporal attention at block ``l`` is the slice
of that block's query/key interaction between tokens at the *same* spatial position, renormalised over
frames (the brief's definition)::

    q, k            (B, heads, n, d)  post-RoPE queries/keys of block l, tokens ordered (t, h, w)
    q_s, k_s        (B, heads, S, T', d)   regrouped by spatial position s (S = H' W')
    A[b,h,s,i,j] = softmax_j( <q_s[i], k_s[j]> / sqrt(d) )        A: (B, heads, S, T', T')

**PTA energy** (eq. 6-7). With ``A_ref`` the temporal attention of the reference latent ``x_ref_t`` at the same
time ``t`` and ``M`` the primary mask -- 1 at the highest activation of each query row, 0 elsewhere::

    M[b,h,s,i,j] = 1[j == argmax_j' A_ref[b,h,s,i,j']]
    g(x_t)_b     = sum_{h,s,i,j} ( M * (A_ref - A(x_t)) )^2           (B,)

Only ``A(x_t)`` depends on ``x_t``; ``A_ref`` and ``M`` are constants (computed under ``no_grad``).

**Guided velocity** (eq. 8, written for rectified flow). For an eps-prediction model MotionClone adds
``+eta * grad g`` to the predicted noise; the rectified-flow step ``x' = x + (t' - t) v`` with ``t' < t`` moves
against ``v`` exactly as DDIM moves against eps, so the same sign goes on the velocity::

    v~ = v_null + w (v_cond - v_null) + eta * grad_x g(x)            (B, C, T, H, W)

It lowers ``g`` for small steps. DDIM on the rectified-flow path is the Euler step (``x0^ = x - t v``,
``eps^ = x + (1 - t) v``, ``(1 - t') x0^ + t' eps^ = x + (t' - t) v``), so one solver serves both views.

**Inversion** (DDIM inversion): Euler integration of ``dx/dt = v_cond`` *upwards* from the clean reference at
``t = 0`` through the solver's grid, ``x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)``; one pass yields the
reference latent at every guidance time.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _StopForward(Exception):
    """Raised by the probe once it has what it needs, so blocks after the probed one never run."""


class TemporalAttentionProbe:
    """Context manager that captures the post-RoPE ``q, k`` of ``model.blocks[block].attn``.

    With ``stop=True`` the forward pass is cut short right after the probed block's q/k are captured
    (``run`` catches the interruption): the energy needs nothing downstream, and on a 30-block model the
    guidance forward then costs a fraction of a full one.
    """

    def __init__(self, model: torch.nn.Module, block: int, *, stop: bool = False):
        blocks = model.blocks
        if not -len(blocks) <= block < len(blocks):
            raise ValueError(f"motion guidance block {block} out of range for a model with {len(blocks)} blocks")
        self.attn = blocks[block].attn
        if not hasattr(self.attn, "qk_observer"):
            raise TypeError(f"{type(self.attn).__name__} has no qk_observer hook; motion guidance needs the "
                            "single-device VideoDiT (vidpo.models.dit.model.SelfAttention)")
        self.model = model
        self.stop = stop
        self.q: Optional[torch.Tensor] = None
        self.k: Optional[torch.Tensor] = None

    def _observe(self, q: torch.Tensor, k: torch.Tensor) -> None:
        self.q, self.k = q, k
        if self.stop:
            raise _StopForward

    def __enter__(self) -> "TemporalAttentionProbe":
        if self.attn.qk_observer is not None:
            raise RuntimeError("another probe is already attached to this attention block")
        self.attn.qk_observer = self._observe
        return self

    def __exit__(self, *exc) -> None:
        self.attn.qk_observer = None

    def grid(self, x: torch.Tensor) -> Tuple[int, int, int]:
        """The (T', H', W') token grid of ``x`` (B, C, T, H, W)."""
        return token_grid(self.model, x)

    def run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Forward ``model(x, t, cond)`` up to the probed block; return its ``(q, k)``."""
        try:
            self.model(x, t, cond)
        except _StopForward:
            pass
        if self.q is None:
            raise RuntimeError("the probed attention block did not run")
        return self.q, self.k


def temporal_attention(q: torch.Tensor, k: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
    """``A = softmax_j(<q_s[i], k_s[j]> / sqrt(d))``: ``(B, heads, n, d) x 2 -> (B, heads, S, T', T')``.

    ``grid = (T', H', W')`` is the token grid (tokens in (t, h, w) row-major order, ``n = T' H' W'``). The
    softmax runs in float32 at least (float64 for float64 inputs).
    """
    b, heads, n, d = q.shape
    frames, height, width = grid
    if n != frames * height * width:
        raise ValueError(f"{n} tokens do not match the grid {grid}")
    spatial = height * width
    qs = q.reshape(b, heads, frames, spatial, d).transpose(2, 3)      # (B, heads, S, T', d)
    ks = k.reshape(b, heads, frames, spatial, d).transpose(2, 3)
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(qs.to(compute), ks.to(compute).transpose(-1, -2)) / math.sqrt(d)
    return torch.softmax(scores, dim=-1)


def primary_mask(reference_attention: torch.Tensor) -> torch.Tensor:
    """``M``: one-hot of the arg-max over the key (last) axis of each query row, same shape and dtype."""
    top = reference_attention.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(reference_attention).scatter_(-1, top, 1.0)


def motion_energy(attention: torch.Tensor, reference_attention: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PTA energy per sample, ``g_b = sum (M * (A_ref - A))^2`` over ``(heads, S, T', T')``: ``(B,)``."""
    if mask is None:
        mask = primary_mask(reference_attention)
    diff = mask * (reference_attention.to(attention.dtype) - attention)
    return diff.pow(2).flatten(1).sum(1)


def token_grid(model: torch.nn.Module, x: torch.Tensor) -> Tuple[int, int, int]:
    """The (T', H', W') patch grid ``model`` uses for a video ``x (B, C, T, H, W)``."""
    return model.config.patch_grid(*x.shape[2:])


ProbeFactory = Callable[..., "TemporalAttentionProbe"]
"""``probe(model, block, stop=...)``: a context manager with ``run(x, t, cond) -> (q, k)`` (B, heads, n, d) and
``grid(x) -> (T', H', W')``. The DiT's is ``TemporalAttentionProbe``; a release's family brings its own (Wan:
``vidpo.models.wan.motion.WanAttentionProbe``)."""


@torch.no_grad()
def reference_attention(model: torch.nn.Module, x_ref: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                        block: int, *, probe: ProbeFactory = TemporalAttentionProbe) -> torch.Tensor:
    """``A_ref`` of the reference latents ``x_ref`` (B, C, T, H, W) at times ``t`` (B,): ``(B, heads, S, T', T')``."""
    with probe(model, block, stop=True) as p:
        q, k = p.run(x_ref, t, cond)
        grid = p.grid(x_ref)
    return temporal_attention(q, k, grid)


def motion_guidance_gradient(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                             ref_attention: torch.Tensor, block: int, *, probe: ProbeFactory = TemporalAttentionProbe,
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x g(x), g(x))`` for the current latents ``x`` (B, C, T, H, W), conditional branch.

    Rows are independent (``g`` of row b depends on ``x_b`` only), so the gradient of the batch sum is the
    per-row gradient. The model's parameters receive no gradient (only ``x`` is differentiated).
    """
    mask = primary_mask(ref_attention)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        with probe(model, block, stop=True) as p:
            q, k = p.run(x, t, cond)
            grid = p.grid(x)
        energy = motion_energy(temporal_attention(q, k, grid), ref_attention, mask)
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return grad.detach(), energy.detach()


def guided_velocity(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    null_cond: torch.Tensor, cfg_scale: float, *, motion_scale: float = 0.0,
                    ref_attention: Optional[torch.Tensor] = None, motion_rows: Optional[torch.Tensor] = None,
                    block: int = 0, probe: ProbeFactory = TemporalAttentionProbe) -> Tuple[torch.Tensor, dict]:
    """``v~ = v_null + w (v_cond - v_null) + eta * m_b * grad g`` (module doc), in ``x``'s dtype.

    ``motion_rows`` (B,) bool selects the rows that get motion guidance (``m_b``; the first fraction of the
    solver's steps, and clips whose motion is trusted); ``ref_attention`` holds ``A_ref`` for those rows
    (shape ``(R, heads, S, T', T')`` with R = number of selected rows). Returns the velocity and stats
    ``{"energy": (R,), "guidance_rms": (R,), "velocity_rms": (R,)}`` (rms of ``eta grad g`` and of the CFG velocity).
    """
    with torch.no_grad():
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond]))
        v_cond, v_null = v.chunk(2)
        v = v_null + cfg_scale * (v_cond - v_null)
    stats: dict = {}
    if motion_scale == 0.0 or motion_rows is None or not bool(motion_rows.any()):
        return v, stats
    if ref_attention is None:
        raise ValueError("motion guidance needs the reference attention of the guided rows")
    rows = motion_rows.nonzero().flatten()
    grad, energy = motion_guidance_gradient(model, x[rows], t[rows], cond[rows], ref_attention, block, probe=probe)
    term = motion_scale * grad.to(v.dtype)
    stats = {"energy": energy, "guidance_rms": term.pow(2).flatten(1).mean(1).sqrt(),
             "velocity_rms": v[rows].pow(2).flatten(1).mean(1).sqrt()}
    v = v.index_add(0, rows, term)
    return v, stats


@torch.no_grad()
def invert(model_fn: VelocityFn, x0: torch.Tensor, cond: torch.Tensor, times: Sequence[float] | torch.Tensor,
           ) -> torch.Tensor:
    """ODE (DDIM) inversion of clean latents ``x0`` (B, C, T, H, W) through increasing ``times`` (K + 1,)
    starting at ``times[0]`` (normally 0): returns ``(K + 1, B, C, T, H, W)``, entry ``i`` at ``times[i]``."""
    times = torch.as_tensor(times).to(x0.dtype if x0.is_floating_point() else torch.float32)
    if times.dim() != 1 or bool((times[1:] <= times[:-1]).any()):
        raise ValueError("inversion times must be a strictly increasing 1-D sequence")
    batch = x0.shape[0]
    out = [x0]
    x = x0
    for i in range(times.numel() - 1):
        t_now = times[i].expand(batch).to(x0.device)
        x = x + float(times[i + 1] - times[i]) * model_fn(x, t_now, cond).to(x.dtype)
        out.append(x)
    return torch.stack(out)
