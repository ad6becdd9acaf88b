"""Communication primitives of the preference losses, as named autograd Functions with their duals.

The losses split a video's tokens over a sequence/context-parallel ``group``: every rank holds some
latent frames of the same videos, computes per-(row, segment) partial sums of squared errors, and the
sums are all-reduced before the (replicated) sigmoid epilogue. Megatron's ``mappings.py`` convention:
each collective is an autograd Function whose backward is the collective's dual.

``AllReduceSumReplicatedLoss``
    forward: ``y = sum_r x_r`` (all-reduce SUM over ``group``);
    backward: identity. The loss built from ``y`` is computed identically on every rank, so
    ``dL/dx_r = dL/dy`` on rank r; summing the incoming gradients again would count the replicated
    loss ``world_size`` times.

``all_reduce_sum_detached``: the same reduction for tensors that carry no gradient (token counts,
KTO's reference point statistics).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """World size of ``group`` (1 when ``group`` is None or torch.distributed is not initialised)."""
    if group is None:
        return 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "a process group was passed to a vidpo loss but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first or pass group=None"
        )
    return dist.get_world_size(group)


class AllReduceSumReplicatedLoss(torch.autograd.Function):
    """All-reduce SUM in forward, identity in backward (the consumer is replicated on every rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce SUM over ``group`` (no-op without a group or with one rank)."""
    if group_size(group) == 1:
        return x
    return AllReduceSumReplicatedLoss.apply(x, group)


def all_reduce_sum_detached(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce SUM of a tensor that carries no gradient; returns a new tensor."""
    out = x.detach().clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_mean_detached(total: torch.Tensor, count: torch.Tensor, group: Optional[object]) -> torch.Tensor:
    """Global mean ``sum_r total_r / sum_r count_r`` over ``group``, detached.

    Reducing the sum and the count (rather than averaging per-rank means) keeps the result equal to
    the global-batch mean when ranks hold different numbers of items.
    """
    stacked = torch.stack([total.detach().to(torch.float64), count.detach().to(torch.float64)])
    stacked = all_reduce_sum_detached(stacked, group)
    return (stacked[0] / stacked[1].clamp_min(1.0)).to(total.dtype)
