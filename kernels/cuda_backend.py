"""CUDA backend of the fused paired-loss primitives: the kernels of csrc/segment_sums_cuda.cu.

Same primitives, formulas and custom-op rules as ``vidpo.kernels.cpp_backend`` (read its docstring),
registered as ``vidpo::segment_sq_err_sums_cuda`` and ``vidpo::segment_scaled_residual_cuda`` for
CUDA tensors:

    segment_sq_err_sums(v_theta, v_ref, target, x0, noise, segment_ids, num_segments) -> (K, N, S) fp32
    segment_scaled_residual(v_theta, target, x0, noise, coef, segment_ids) -> like v_theta

Values are float32 or bfloat16 (no float64 on the GPU); segment_ids may be on the GPU or the CPU.
The forward is deterministic: per-tile fp32 partials, then a fixed-order fp64 combine (no atomics).

The kernels exist only when vidpo._C was built by setup.py on a machine with a CUDA build of torch
and nvcc; ``available()`` also needs ``torch.cuda.is_available()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cpp_backend


def _status():
    """(available, reason)."""
    if not cpp_backend.available():
        return False, cpp_backend.unavailable_reason()
    ext = cpp_backend.extension()
    if not ext.built_with_cuda():
        return False, ("vidpo._C was built without CUDA (torch.version.cuda is None or nvcc was not found "
                       "when it was built): rebuild with pip install --no-build-isolation -e . on a CUDA machine")
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, ""


def available() -> bool:
    """True when vidpo._C has the CUDA kernels and a CUDA device is usable."""
    return _status()[0]


def unavailable_reason() -> str:
    """Why ``available()`` is False ('' when it is True), for error messages."""
    return _status()[1]


def is_available() -> bool:
    """Alias of ``available`` under the name ``vidpo.kernels.dispatch`` probes."""
    return available()


def _extension_with_cuda():
    ok, reason = _status()
    if not ok:
        raise RuntimeError(f"vidpo CUDA kernels unavailable: {reason}")
    return cpp_backend.extension()


def _sums_cuda(v_theta, v_ref, target, x0, noise, segment_ids, num_segments):
    return _extension_with_cuda().segment_sq_err_sums_cuda(
        v_theta, v_ref, target, x0, noise, segment_ids, num_segments)


def _residual_cuda(v_theta, target, x0, noise, coef, segment_ids):
    return _extension_with_cuda().segment_scaled_residual_cuda(v_theta, target, x0, noise, coef, segment_ids)


# Registered even without a GPU so graphs that name the ops can be traced with fake tensors anywhere.
segment_sq_err_sums_cuda, segment_scaled_residual_cuda = cpp_backend.register_segment_ops(
    "cuda", _sums_cuda, _residual_cuda, allow_double=False)


def segment_sq_err_sums(v_theta: torch.Tensor, v_ref: Optional[torch.Tensor], target: Optional[torch.Tensor],
                        x0: Optional[torch.Tensor], noise: Optional[torch.Tensor], segment_ids: torch.Tensor,
                        num_segments: int) -> torch.Tensor:
    """(K, N, S) fp32 sums of (v - u)^2 per sample and segment on CUDA tensors (cpp_backend docstring).

    Differentiable in v_theta (and v_ref) through the custom op's autograd rule.
    """
    _extension_with_cuda()
    return cpp_backend.eager_or_op(segment_sq_err_sums_cuda, _sums_cuda, v_theta, v_ref, target, x0, noise,
                                   segment_ids, int(num_segments))


def segment_scaled_residual(v_theta: torch.Tensor, target: Optional[torch.Tensor], x0: Optional[torch.Tensor],
                            noise: Optional[torch.Tensor], coef: torch.Tensor,
                            segment_ids: torch.Tensor) -> torch.Tensor:
    """coef[n, segment_ids[t]] * (v_theta - u), shaped like v_theta, on CUDA tensors; coef (N, S) fp32."""
    _extension_with_cuda()
    return cpp_backend.eager_or_op(segment_scaled_residual_cuda, _residual_cuda, v_theta, target, x0, noise, coef,
                                   segment_ids)
