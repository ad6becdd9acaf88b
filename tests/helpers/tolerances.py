"""Per-dtype tolerances and the float64-reference comparison of the kernel, loss and model tests.

A tested computation runs in its own dtype (fp32, bf16, ...) and is compared with a float64 computation written
from the formula. Each table below maps the tested dtype to a ``Tolerance`` for one family of computations; a
test picks its table and calls ``assert_close_to_float64``, which casts both sides to float64 on the CPU, fails
on any non-finite value (a NaN-poisoned output element that a kernel forgot to write, see
``conftest.poison_outputs``), and applies ``rtol`` and ``atol * scale``.

``scale`` is the typical magnitude of the compared quantity, for quantities whose rounding error follows a
larger magnitude than their own (a gradient, a margin that is a difference of large sums): ``max_abs`` of the
reference is the usual choice. Tables whose ``atol`` is meant relative to that magnitude say so.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import torch


class Tolerance(NamedTuple):
    rtol: float
    atol: float


def same(tol: float) -> Tolerance:
    """rtol = atol = ``tol``."""
    return Tolerance(tol, tol)


# The preference losses of vidpo.kernels (every backend) against the float64 eager reference
# (tests/test_losses.py); atol in units of ``scale``.
LOSS_KERNELS: Mapping[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(rtol=1e-5, atol=1e-6),
    torch.bfloat16: Tolerance(rtol=1e-2, atol=1e-3),
}

# vidpo._C's primitives (C++ / CUDA) against the float64 formula (tests/test_csrc.py): atol relative to the
# reference's largest magnitude, ``scale=max(max_abs(reference), 1e-6)``.
CSRC_PRIMITIVES: Mapping[torch.dtype, Tolerance] = {
    torch.float64: same(1e-12),
    torch.float32: same(1e-5),
    torch.bfloat16: same(1e-2),
}

# The losses computed over 2 gloo ranks (sequence / data parallel) against the same fp32 loss in one process
# (tests/test_losses_distributed.py): two fp32 summation orders; atol in units of ``scale``.
SHARDED_LOSSES: Mapping[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(rtol=2e-5, atol=2e-6),
}

# Rotary position embedding (vidpo.models.dit.rope) against the pair-by-pair float64 rotation (tests/test_dit.py).
ROPE: Mapping[torch.dtype, Tolerance] = {
    torch.float64: same(1e-12),
    torch.float32: same(1e-5),
    torch.bfloat16: same(2e-2),
}

# The attention backends (vidpo.models.dit.attention) against float64 softmax attention (tests/test_dit.py).
ATTENTION: Mapping[torch.dtype, Tolerance] = {
    torch.float64: same(1e-10),
    torch.float32: same(1e-5),
}

# A float64 computation against the same computation arranged differently (collectives, the parallel DiT's
# sequence-first layout): rounding of a few float64 operations.
FLOAT64_REARRANGED = same(1e-12)

# The weights after one AdamW step of a parallel run against those of one process. AdamW's first step is
# lr * g / (|g| + eps): it checks the sign of every gradient element (the norm is checked separately), and an
# element whose gradient cancels down to ~eps turns fp32 summation-order differences into update differences of
# a small fraction of lr (1e-2): 3e-5 is 0.3 % of one step.
ADAMW_FIRST_STEP = Tolerance(rtol=1e-5, atol=3e-5)


def max_abs(t: torch.Tensor) -> float:
    """The largest magnitude of ``t`` (0.0 for an empty tensor): the usual ``scale``."""
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance, what: str = "", scale: float = 1.0):
    """``torch.testing.assert_close`` with ``tol`` (atol times ``scale``); ``what`` prefixes the message."""
    __tracebackhide__ = True
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol * scale,
                               msg=(lambda m: f"{what}: {m}") if what else None)


def assert_close_to_float64(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                            table: Mapping[torch.dtype, Tolerance], *, scale: float = 1.0, what: str = "") -> None:
    """``actual`` (computed in ``dtype``) equals the float64 ``reference`` within ``table[dtype]``.

    Both sides are compared as float64 on the CPU; ``actual`` must be finite everywhere (a NaN left by an
    unwritten, poisoned output element fails here with its own message, not as a value mismatch).
    """
    __tracebackhide__ = True
    if dtype not in table:
        raise KeyError(f"no tolerance for {dtype} in this table (it has {', '.join(map(str, table))})")
    actual = actual.detach().to(torch.float64).cpu()
    reference = reference.detach().to(torch.float64).cpu()
    assert torch.isfinite(actual).all(), (
        f"{what or 'output'}: non-finite values (an element left unwritten, i.e. still NaN-poisoned, or an "
        f"overflow): {actual}")
    assert_close(actual, reference, table[dtype], what, scale)
