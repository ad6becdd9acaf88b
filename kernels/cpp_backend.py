"""C++ (OpenMP) backend of the fused paired-loss primitives: vidpo._C wrapped as torch custom ops.

The two primitives every fused backend implements (``vidpo.kernels.dispatch``; DESIGN.md section 1):

    segment_sq_err_sums(v_theta, v_ref, target, x0, noise, segment_ids, num_segments) -> (K, N, S)
        out[0, n, s] = sum_{c, h, w, t : segment_ids[t] == s} (v_theta - u)^2[n, c, t, h, w]
        out[1, n, s] = the same for v_ref (K = 2 when v_ref is given, else K = 1)
        u = target, or u[n] = noise[n % M] - x0[n] with noise (M, C, T, H, W), M == N or N / 2
    segment_scaled_residual(v_theta, target, x0, noise, coef, segment_ids) -> like v_theta
        grad[n, c, t, h, w] = coef[n, segment_ids[t]] * (v_theta - u)[n, c, t, h, w]

Values are (N, C, T, H, W) float32 or bfloat16 (float64 too on the CPU, for gradcheck); the target
(or x0 and noise) may have its own dtype of the three. Compute is fp32 (fp64 for fp64 inputs); sums
are (K, N, S) float32 (float64 for float64 inputs); grad has v_theta's dtype. Frames whose segment id
lies outside [0, S) belong to no segment: they add nothing and get a zero gradient.

Both are ``torch.library.custom_op``s -- ``vidpo::segment_sq_err_sums_cpu`` and
``vidpo::segment_scaled_residual_cpu`` -- with fake (meta) implementations, so torch.compile and FSDP
see opaque ops with the right output metadata, and an autograd rule on the sums op:
    d out[k, n, s] / d v_k = 2 (v_k - u) on the elements of (n, s), hence
    grad_v_theta = segment_scaled_residual(v_theta, ..., coef = 2 * grad_out[0])
    grad_v_ref   = segment_scaled_residual(v_ref, ..., coef = 2 * grad_out[1])  (only if it requires grad)
The target, x0 and noise are constants of the loss: passing one that requires grad is an error.

``register_segment_ops`` builds the same pair of ops for another device (``cuda_backend`` uses it).
Set ``VIDPO_POISON_OUTPUTS=1`` to have the kernels NaN-fill their outputs before writing (tests).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

_BUILD_HINT = "vidpo._C not built: run pip install --no-build-isolation -e ."


def _load_extension():
    """(module, '') or (None, why): the compiled extension, imported once."""
    try:
        from vidpo import _C
    except ImportError as exc:
        return None, f"{_BUILD_HINT} (import failed: {exc})"
    except OSError as exc:  # a .so built against another torch / missing libraries
        return None, f"{_BUILD_HINT} (loading the shared library failed: {exc})"
    return _C, ""


_EXTENSION, _EXTENSION_ERROR = _load_extension()


def extension():
    """The vidpo._C module; RuntimeError with the build command when it is missing."""
    if _EXTENSION is None:
        raise RuntimeError(_EXTENSION_ERROR)
    return _EXTENSION


def available() -> bool:
    """True when vidpo._C imports (the CPU kernels are always compiled into it)."""
    return _EXTENSION is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ('' when it is True), for error messages."""
    return _EXTENSION_ERROR


def is_available() -> bool:
    """Alias of ``available`` under the name ``vidpo.kernels.dispatch`` probes."""
    return available()


# ------------------------------------------------------------------------------------------------
# Custom-op registration (shared with cuda_backend).

SumsImpl = Callable[..., torch.Tensor]


def _sums_output_dtype(v_theta: torch.Tensor, allow_double: bool) -> torch.dtype:
    return torch.float64 if allow_double and v_theta.dtype == torch.float64 else torch.float32


def register_segment_ops(device_type: str, sums_impl: SumsImpl, residual_impl: SumsImpl,
                         allow_double: bool) -> Tuple[object, object]:
    """Define ``vidpo::segment_sq_err_sums_<device_type>`` and ``vidpo::segment_scaled_residual_<...>``.

    sums_impl / residual_impl: the extension's functions with the primitives' signatures. The sums op
    gets a fake implementation and the autograd rule of the module docstring; the residual op gets a
    fake implementation (its outputs are gradients, so it needs no autograd rule of its own).
    Returns (sums_op, residual_op).
    """

    @torch.library.custom_op(f"vidpo::segment_sq_err_sums_{device_type}", mutates_args=(),
                             device_types=device_type)
    def sums_op(v_theta: torch.Tensor, v_ref: Optional[torch.Tensor], target: Optional[torch.Tensor],
                x0: Optional[torch.Tensor], noise: Optional[torch.Tensor], segment_ids: torch.Tensor,
                num_segments: int) -> torch.Tensor:
        return sums_impl(v_theta, v_ref, target, x0, noise, segment_ids, num_segments)

    @torch.library.custom_op(f"vidpo::segment_scaled_residual_{device_type}", mutates_args=(),
                             device_types=device_type)
    def residual_op(v_theta: torch.Tensor, target: Optional[torch.Tensor], x0: Optional[torch.Tensor],
                    noise: Optional[torch.Tensor], coef: torch.Tensor,
                    segment_ids: torch.Tensor) -> torch.Tensor:
        return residual_impl(v_theta, target, x0, noise, coef, segment_ids)

    @sums_op.register_fake
    def _sums_fake(v_theta, v_ref, target, x0, noise, segment_ids, num_segments):
        num_values = 1 if v_ref is None else 2
        return v_theta.new_empty((num_values, v_theta.shape[0], num_segments),
                                 dtype=_sums_output_dtype(v_theta, allow_double))

    @residual_op.register_fake
    def _residual_fake(v_theta, target, x0, noise, coef, segment_ids):
        # The kernels always write a contiguous gradient, whatever v_theta's strides.
        return v_theta.new_empty(v_theta.shape)

    def setup_context(ctx, inputs, output):
        v_theta, v_ref, target, x0, noise, segment_ids, _ = inputs
        for name, tensor in (("target", target), ("x0", x0), ("noise", noise)):
            if tensor is not None and tensor.requires_grad:
                raise RuntimeError(
                    f"vidpo::segment_sq_err_sums_{device_type}: {name} requires grad, but the velocity "
                    "target is a constant of the loss; pass it detached")
        ctx.save_for_backward(v_theta, v_ref, target, x0, noise, segment_ids)

    def backward(ctx, grad_out):
        v_theta, v_ref, target, x0, noise, segment_ids = ctx.saved_tensors
        coef_dtype = _sums_output_dtype(v_theta, allow_double)
        grad_theta = grad_ref = None
        if ctx.needs_input_grad[0]:
            coef = (2.0 * grad_out[0]).to(coef_dtype).contiguous()
            grad_theta = residual_op(v_theta, target, x0, noise, coef, segment_ids)
        if v_ref is not None and ctx.needs_input_grad[1]:
            coef = (2.0 * grad_out[1]).to(coef_dtype).contiguous()
            grad_ref = residual_op(v_ref, target, x0, noise, coef, segment_ids)
        return grad_theta, grad_ref, None, None, None, None, None

    sums_op.register_autograd(backward, setup_context=setup_context)
    return sums_op, residual_op


def _sums_cpu(v_theta, v_ref, target, x0, noise, segment_ids, num_segments):
    return extension().segment_sq_err_sums_cpu(v_theta, v_ref, target, x0, noise, segment_ids, num_segments)


def _residual_cpu(v_theta, target, x0, noise, coef, segment_ids):
    return extension().segment_scaled_residual_cpu(v_theta, target, x0, noise, coef, segment_ids)


segment_sq_err_sums_cpu, segment_scaled_residual_cpu = register_segment_ops(
    "cpu", _sums_cpu, _residual_cpu, allow_double=True)


def eager_or_op(op, impl, *args):
    """``impl(*args)``, the extension itself, where the custom op adds nothing: grad mode off (the losses'
    ``SegmentSqErrSums`` calls the primitives inside its own forward and backward) and no torch.compile tracing.
    Otherwise ``op(*args)``: its autograd rule, its fake implementation for tracing. The custom-op dispatch costs
    ~15 us a call in Python, a tenth of a small loss's host time and, on a GPU, longer than its kernels."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


# ------------------------------------------------------------------------------------------------
# The primitives (the functions ``vidpo.kernels.dispatch`` calls).

def segment_sq_err_sums(v_theta: torch.Tensor, v_ref: Optional[torch.Tensor], target: Optional[torch.Tensor],
                        x0: Optional[torch.Tensor], noise: Optional[torch.Tensor], segment_ids: torch.Tensor,
                        num_segments: int) -> torch.Tensor:
    """(K, N, S) sums of (v - u)^2 per sample and segment on CPU tensors (module docstring).

    Differentiable in v_theta (and v_ref) through the custom op's autograd rule.
    """
    extension()
    return eager_or_op(segment_sq_err_sums_cpu, _sums_cpu, v_theta, v_ref, target, x0, noise, segment_ids,
                       int(num_segments))


def segment_scaled_residual(v_theta: torch.Tensor, target: Optional[torch.Tensor], x0: Optional[torch.Tensor],
                            noise: Optional[torch.Tensor], coef: torch.Tensor,
                            segment_ids: torch.Tensor) -> torch.Tensor:
    """coef[n, segment_ids[t]] * (v_theta - u), shaped like v_theta, on CPU tensors; coef (N, S)."""
    extension()
    return eager_or_op(segment_scaled_residual_cpu, _residual_cpu, v_theta, target, x0, noise, coef, segment_ids)
