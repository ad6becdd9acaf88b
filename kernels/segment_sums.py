"""Fused Triton kernels of the preference losses' two primitives, and their autograd Function.

Every backend (triton here, cpp/cuda in csrc/) implements the same two primitives; the loss epilogue
(sigmoid, tie masks, token-weighted means, all-reduce) is shared torch code on (N, S) tensors in
``vidpo.kernels.losses``.

    segment_sq_err_sums(v_theta, v_ref, target, x0, noise, segment_ids, num_segments) -> (K, N, S) fp32
        [0, n, s] = sum_{c, h, w, t: segment_ids[t] == s} (v_theta - u)^2,  [1, n, s] the same for v_ref
        K = 2 when v_ref is given else 1;  u = target, or noise[n % noise.shape[0]] - x0[n]
    segment_scaled_residual(v_theta, target, x0, noise, coef, segment_ids) -> like v_theta
        grad[n, c, t, h, w] = coef[n, segment_ids[t]] * (v_theta - u)[n, c, t, h, w]
        computed in fp32, stored in v_theta.dtype

Layout: contiguous (N, C, T, H, W), so every (n, c, t) "plane" of H*W elements is contiguous. One
program reduces (or writes) one chunk of a few consecutive planes (one plane of a Wan latent, many
small ones): the forward reads v_theta, v_ref and the target (or x0 and noise) exactly once and
produces both sums in the same pass; the backward reads v_theta and the target and writes the
gradient once. Nothing activation-sized is allocated besides the gradient. The forward writes one
fp32 partial per (plane, chunk) and finishes the reduction in torch, which keeps it deterministic
(no float atomics) and tiny (N*C*T*chunks floats).

Triton is imported lazily and the kernels are defined on first use, so ``TRITON_INTERPRET=1`` set by
a test or by the user any time before the first call runs them on CPU tensors.

Setting ``VIDPO_POISON_OUTPUTS=1`` fills every buffer the kernels write with NaN before they run, so
a test detects an element a kernel failed to write (the cpp/cuda backends honour the same variable).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

# Elements one program handles per loop iteration per plane, and the cap on iterations per program.
# 1024 elements over 4 warps gives every thread 16-byte vector loads for fp32 and bf16 alike; a Wan
# latent plane (60 x 104 = 6240 elements) then takes one program of 7 iterations.
MAX_BLOCK = 1024
MAX_ITERS = 8
# Elements of one (planes x BLOCK) tile. Small planes are stacked so a program still moves ~1024
# elements per iteration on a GPU; the interpreter pays per program and per op, not per element, so
# it gets far larger tiles (keeping the CPU test-suite fast) while BLOCK and ITERS, and hence the
# multi-chunk code path, stay the same as on a GPU.
GPU_TILE = 1024
INTERPRETER_TILE = 16384


def poison_requested() -> bool:
    """True when outputs must be NaN-filled before a kernel writes them (tests only)."""
    return os.environ.get("VIDPO_POISON_OUTPUTS", "0") == "1"


def allocate_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled buffer under ``VIDPO_POISON_OUTPUTS=1``."""
    if poison_requested():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def triton_status(device_type: str) -> Tuple[bool, str]:
    """(available, reason) of the Triton backend on ``device_type`` ('cuda' or 'cpu')."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a hard dependency of the package
        return False, f"triton is not importable ({exc}); pip install triton"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "triton needs a CUDA device and torch.cuda.is_available() is False"
        return True, ""
    if device_type == "cpu":
        if _interpreting():
            return True, ""
        return False, "triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1"
    return False, f"triton does not support device type {device_type!r}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plane_alignment(plane_size: int) -> int:
    """The largest power of two up to 16 that divides ``plane_size``: every plane then starts on a multiple of it.

    The kernels take the plane size as ``plane_units * ALIGN`` with ALIGN a constexpr, so the compiler knows it: with
    8 or 16 a plane's loads and stores become 16-byte vectors for bf16 and fp32. Triton's own specialisation of an
    integer argument only knows "divisible by 16" (Wan's 60 x 104 = 6240), not CogVideoX's 60 x 90 = 5400 (divisible
    by 8), whose loads were 2-byte scalars without the hint (``python -m vidpo.kernels.aot --unaligned``)."""
    align = 1
    while align < 16 and plane_size % (2 * align) == 0:
        align *= 2
    return align


@dataclass(frozen=True)
class LaunchConfig:
    """Program tiling: each program covers ``planes`` consecutive planes x one chunk of
    ``block * iters`` elements of each; ``chunks`` chunks cover a plane; ``programs`` in total. ``align``:
    ``plane_alignment`` of the plane size (a constexpr of the kernels)."""

    block: int
    iters: int
    chunks: int
    planes: int
    programs: int
    num_warps: int
    align: int = 1


def launch_config(plane_size: int, num_planes: int, interpreter: Optional[bool] = None) -> LaunchConfig:
    """Tiling for ``num_planes`` planes of ``plane_size`` elements (no autotuning: the interpreter runs it);
    ``interpreter`` None reads ``TRITON_INTERPRET`` (``vidpo.kernels.aot`` asks for the GPU's tiling)."""
    block = min(MAX_BLOCK, max(16, _next_pow2(plane_size)))
    iters = min(MAX_ITERS, -(-plane_size // block))
    chunks = -(-plane_size // (block * iters))
    tile = INTERPRETER_TILE if (_interpreting() if interpreter is None else interpreter) else GPU_TILE
    planes = max(1, min(tile // block, _next_pow2(num_planes)))
    programs = -(-num_planes // planes) * chunks
    num_warps = max(1, min(8, block * planes // 256))
    return LaunchConfig(block, iters, chunks, planes, programs, num_warps, plane_alignment(plane_size))


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """Define the @triton.jit kernels (once, on first use; reads TRITON_INTERPRET at that time).

    The kernels call no helper @triton.jit function: helpers would have to be module globals, which
    would import triton (and fix the interpreter choice) at import time.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _segment_sq_err_sums_fwd_kernel(
        v_theta_ptr, v_ref_ptr, target_ptr, x0_ptr, noise_ptr, partial_theta_ptr, partial_ref_ptr,
        plane_units, num_planes, planes_per_row, noise_rows, chunks_per_plane,
        HAS_REF: tl.constexpr, TARGET_FROM_NOISE: tl.constexpr,
        BLOCK: tl.constexpr, ITERS: tl.constexpr, PLANES: tl.constexpr, ALIGN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        chunk = pid % chunks_per_plane
        # The plane size comes as plane_units * ALIGN (plane_alignment): the compiler then knows that planes start,
        # and the bounds mask changes, on multiples of ALIGN, and loads 16-byte vectors.
        plane_size = plane_units * ALIGN
        # Planes (n * C + c) * T + t of this program; a plane's noise is noise row n % noise_rows.
        planes = (pid // chunks_per_plane) * PLANES + tl.arange(0, PLANES)
        valid = planes < num_planes
        base = planes.to(tl.int64) * plane_size
        if TARGET_FROM_NOISE:
            noise_planes = ((planes // planes_per_row) % noise_rows) * planes_per_row + planes % planes_per_row
            noise_base = noise_planes.to(tl.int64) * plane_size
        acc_theta = tl.zeros([PLANES, BLOCK], dtype=tl.float32)
        acc_ref = tl.zeros([PLANES, BLOCK], dtype=tl.float32)
        start = base[:, None] + chunk * (BLOCK * ITERS)   # each plane's first element of this chunk
        for i in range(ITERS):
            offs = (i * BLOCK + tl.arange(0, BLOCK))[None, :]
            mask = valid[:, None] & (chunk * (BLOCK * ITERS) + offs < plane_size)
            if TARGET_FROM_NOISE:
                noise_start = noise_base[:, None] + chunk * (BLOCK * ITERS)
                noise = tl.load(noise_ptr + noise_start + offs, mask=mask, other=0.0).to(tl.float32)
                u = noise - tl.load(x0_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                u = tl.load(target_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
            diff = tl.load(v_theta_ptr + start + offs, mask=mask, other=0.0).to(tl.float32) - u
            acc_theta += diff * diff
            if HAS_REF:
                diff_ref = tl.load(v_ref_ptr + start + offs, mask=mask, other=0.0).to(tl.float32) - u
                acc_ref += diff_ref * diff_ref
        # One partial per (plane, chunk), laid out (num_planes, chunks_per_plane).
        slot = planes.to(tl.int64) * chunks_per_plane + chunk
        tl.store(partial_theta_ptr + slot, tl.sum(acc_theta, axis=1), mask=valid)
        if HAS_REF:
            tl.store(partial_ref_ptr + slot, tl.sum(acc_ref, axis=1), mask=valid)

    @triton.jit
    def _segment_scaled_residual_bwd_kernel(
        v_theta_ptr, target_ptr, x0_ptr, noise_ptr, coef_ptr, segment_ids_ptr, grad_ptr,
        plane_units, num_planes, frames, planes_per_row, noise_rows, num_segments, chunks_per_plane,
        TARGET_FROM_NOISE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, PLANES: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        chunk = pid % chunks_per_plane
        plane_size = plane_units * ALIGN   # as in the forward kernel
        # Planes (n * C + c) * T + t of this program; a plane's noise is noise row n % noise_rows.
        planes = (pid // chunks_per_plane) * PLANES + tl.arange(0, PLANES)
        valid = planes < num_planes
        base = planes.to(tl.int64) * plane_size
        if TARGET_FROM_NOISE:
            noise_planes = ((planes // planes_per_row) % noise_rows) * planes_per_row + planes % planes_per_row
            noise_base = noise_planes.to(tl.int64) * plane_size
        segment = tl.load(segment_ids_ptr + planes % frames, mask=valid, other=0)
        coef = tl.load(coef_ptr + (planes // planes_per_row) * num_segments + segment, mask=valid, other=0.0)
        for i in range(ITERS):
            offs = (chunk * (BLOCK * ITERS) + i * BLOCK + tl.arange(0, BLOCK))[None, :]
            mask = valid[:, None] & (offs < plane_size)
            if TARGET_FROM_NOISE:
                noise = tl.load(noise_ptr + noise_base[:, None] + offs, mask=mask, other=0.0).to(tl.float32)
                u = noise - tl.load(x0_ptr + base[:, None] + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                u = tl.load(target_ptr + base[:, None] + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_theta_ptr + base[:, None] + offs, mask=mask, other=0.0).to(tl.float32)
            grad = coef[:, None] * (v - u)
            tl.store(grad_ptr + base[:, None] + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(fwd=_segment_sq_err_sums_fwd_kernel, bwd=_segment_scaled_residual_bwd_kernel)


def _device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device), a no-op on CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _target_args(v_theta, target, x0, noise):
    """(target_ptr, x0_ptr, noise_ptr, noise_rows, from_noise); absent tensors are replaced by
    v_theta, which the kernel never reads under the matching constexpr flag."""
    if target is not None:
        return target, v_theta, v_theta, 1, False
    return v_theta, x0, noise, noise.shape[0], True


def segment_sq_err_sums(
    v_theta: torch.Tensor,
    v_ref: Optional[torch.Tensor],
    target: Optional[torch.Tensor],
    x0: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    segment_ids: torch.Tensor,
    num_segments: int,
) -> torch.Tensor:
    """First primitive (module docstring): (K, N, S) fp32 per-(row, segment) sums of squared errors.

    All tensors contiguous (N, C, T, H, W) (noise (N', C, T, H, W) with N % N' == 0) on one device;
    segment_ids (T,) integer on the same device.
    """
    rows, channels, frames, height, width = v_theta.shape
    num_planes = rows * channels * frames
    cfg = launch_config(height * width, num_planes)
    num_sums = 2 if v_ref is not None else 1
    partial = allocate_output((num_sums, num_planes * cfg.chunks), torch.float32, v_theta.device)
    if cfg.programs > 0:
        target_ptr, x0_ptr, noise_ptr, noise_rows, from_noise = _target_args(v_theta, target, x0, noise)
        with _device_guard(v_theta):
            _kernels().fwd[(cfg.programs,)](
                v_theta, v_ref if v_ref is not None else v_theta, target_ptr, x0_ptr, noise_ptr,
                partial[0], partial[num_sums - 1],
                height * width // cfg.align, num_planes, channels * frames, noise_rows, cfg.chunks,
                HAS_REF=v_ref is not None, TARGET_FROM_NOISE=from_noise,
                BLOCK=cfg.block, ITERS=cfg.iters, PLANES=cfg.planes, ALIGN=cfg.align, num_warps=cfg.num_warps,
            )
    per_frame = partial.view(num_sums, rows, channels, frames, cfg.chunks).sum(dim=(2, 4))  # (K, N, T)
    segments = torch.arange(num_segments, device=v_theta.device)
    # A 0/1 mask and a sum rather than index_add: deterministic on CUDA (no atomics) and exact.
    in_segment = (segment_ids.to(torch.long).view(1, frames) == segments.view(num_segments, 1)).float()
    return (per_frame.unsqueeze(2) * in_segment).sum(dim=-1)  # (K, N, S)


def segment_scaled_residual(
    v_theta: torch.Tensor,
    target: Optional[torch.Tensor],
    x0: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    coef: torch.Tensor,
    segment_ids: torch.Tensor,
) -> torch.Tensor:
    """Second primitive (module docstring): ``coef[n, segment_ids[t]] * (v_theta - u)`` in v_theta.dtype.

    coef: (N, S) fp32 contiguous on v_theta's device.
    """
    rows, channels, frames, height, width = v_theta.shape
    num_planes = rows * channels * frames
    cfg = launch_config(height * width, num_planes)
    grad = allocate_output(v_theta.shape, v_theta.dtype, v_theta.device)
    if cfg.programs > 0:
        target_ptr, x0_ptr, noise_ptr, noise_rows, from_noise = _target_args(v_theta, target, x0, noise)
        coef = coef.to(device=v_theta.device, dtype=torch.float32).contiguous()
        with _device_guard(v_theta):
            _kernels().bwd[(cfg.programs,)](
                v_theta, target_ptr, x0_ptr, noise_ptr, coef, segment_ids.contiguous(), grad,
                height * width // cfg.align, num_planes, frames, channels * frames, noise_rows, coef.shape[1],
                cfg.chunks,
                TARGET_FROM_NOISE=from_noise, BLOCK=cfg.block, ITERS=cfg.iters, PLANES=cfg.planes,
                ALIGN=cfg.align, num_warps=cfg.num_warps,
            )
    return grad


class SegmentSqErrSums(torch.autograd.Function):
    """Autograd wrapper of the first primitive for any backend (``primitives`` has both functions).

    forward: sums = primitives.segment_sq_err_sums(...)  (K, N, S)
    backward: d sums[0, n, s] / d v_theta = 2 (v_theta - u) on the elements of (n, segment s), so
              grad_v_theta = segment_scaled_residual(..., coef = 2 * grad_sums[0]). v_ref, the target,
              x0 and noise never receive a gradient (the callers reject targets that require one).
    """

    @staticmethod
    def forward(ctx, primitives, v_theta, v_ref, target, x0, noise, segment_ids, num_segments):
        ctx.primitives = primitives
        ctx.save_for_backward(v_theta, target, x0, noise, segment_ids)
        return primitives.segment_sq_err_sums(v_theta, v_ref, target, x0, noise, segment_ids, num_segments)

    @staticmethod
    def backward(ctx, grad_sums):
        v_theta, target, x0, noise, segment_ids = ctx.saved_tensors
        grad_v_theta = None
        if ctx.needs_input_grad[1]:
            coef = (2.0 * grad_sums[0]).to(torch.float32).contiguous()
            grad_v_theta = ctx.primitives.segment_scaled_residual(v_theta, target, x0, noise, coef, segment_ids)
        return None, grad_v_theta, None, None, None, None, None, None


def segment_sq_err_sums_autograd(primitives, v_theta, v_ref, target, x0, noise, segment_ids, num_segments):
    """Differentiable (w.r.t. v_theta only) per-segment sums through ``primitives``: (K, N, S) fp32."""
    if v_ref is not None:
        v_ref = v_ref.detach()
    return SegmentSqErrSums.apply(primitives, v_theta, v_ref, target, x0, noise, segment_ids, num_segments)


# The module itself is the Triton backend's primitive set (dispatch hands it to SegmentSqErrSums).
is_available = triton_status
