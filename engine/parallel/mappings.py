"""Communication primitives of the parallel model, as named autograd Functions with their backward duals.

Megatron's ``mappings.py`` convention: every collective that sits inside the model is an autograd Function
whose backward is the collective's dual, so the gradient of a parallel model equals the gradient of the
single-device model. All take an explicit process ``group`` (tensor-parallel for TP/SP, context-parallel
for Ulysses) and a tensor dimension; each is the identity when the group has one rank.

  Function                 forward                          backward (dual)
  CopyToGroup              identity                         all-reduce SUM
  ReduceFromGroup          all-reduce SUM                   identity
  ScatterToGroup           keep own chunk along ``dim``     all-gather along ``dim``
  GatherFromGroup          all-gather along ``dim``         keep own chunk (consumer is replicated)
  ReduceScatterToGroup     reduce-scatter along ``dim``     all-gather along ``dim``
  AllGatherToGroup         all-gather along ``dim``         reduce-scatter (consumer is rank-partial)
  AllToAllGroup            split ``scatter_dim``, concat    the inverse all-to-all
                           ``gather_dim`` (Ulysses)

``reduce_from_group`` is also how a loss split over a sequence / context-parallel group sums its per-rank
partial sums: the sigmoid epilogue that consumes the sum runs identically on every rank, so the gradient of
each rank's part is the incoming gradient itself (summing it again would count the replicated loss once per
rank). Reductions of tensors that carry no gradient (token counts, reference statistics, metrics) use
``all_reduce_sum_detached`` / ``all_reduce_mean_detached``.

Which one a parameter or activation needs follows from who uses it: a tensor replicated on every rank
of the group but used by each rank on different data (its own tokens, its own heads) receives a partial
gradient on each rank, so it enters through ``CopyToGroup`` and the backward sums the partials. A
tensor built from partial sums leaves through ``ReduceFromGroup``. Chunks are equal (sizes must divide),
ordered by rank in the group, and contiguous along ``dim``.

This module depends on torch only (not on ``vidpo.kernels`` nor megatron-core), so the model's parallel
code and its tests can use it anywhere.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """Ranks in ``group``; 1 when there is no group or no initialised process group."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's index in ``group`` (0 without a group)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


# ----- raw collectives along an arbitrary dimension ------------------------------------------------------
# torch 2.13 renamed the flat-tensor collectives (the old names still work, with a FutureWarning).
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _check_divisible(x: torch.Tensor, dim: int, world: int, what: str) -> None:
    if x.shape[dim] % world:
        raise ValueError(f"{what}: size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) is not divisible "
                         f"by the group size {world}")


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (a copy, so later in-place ops are safe)."""
    world = group_size(group)
    _check_divisible(x, dim, world, "split")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order: (.., s, ..) -> (.., world * s, ..)."""
    world = group_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((world * moved.shape[0],) + tuple(moved.shape[1:]))
    _all_gather_flat(out, moved, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``: (.., world * s, ..) -> (.., s, ..)."""
    world = group_size(group)
    _check_divisible(x, dim, world, "reduce-scatter")
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // world,) + tuple(moved.shape[1:]))
    _reduce_scatter_flat(out, moved, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, dim)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Send chunk j of ``x`` along ``scatter_dim`` to rank j; concatenate what arrives along ``gather_dim``.

    x (.., S, .., G, ..) -> (.., S / world, .., G * world, ..) with the received chunks in rank order.
    """
    world = group_size(group)
    _check_divisible(x, scatter_dim, world, "all-to-all")
    # (world, ...) with chunk j first, so one all_to_all_single moves every chunk at once.
    send = torch.stack(x.chunk(world, dim=scatter_dim), dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


# ----- the autograd Functions ----------------------------------------------------------------------------
class CopyToGroup(torch.autograd.Function):
    """Identity forward; all-reduce SUM backward. For a replicated tensor each rank uses on its own part
    of the data (sequence-parallel norms and modulation, per-head QK norms under tensor parallel)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class ReduceFromGroup(torch.autograd.Function):
    """All-reduce SUM forward; identity backward (the sum is consumed identically on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ScatterToGroup(torch.autograd.Function):
    """Keep this rank's chunk along ``dim`` forward; all-gather the chunk gradients backward."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class GatherFromGroup(torch.autograd.Function):
    """All-gather along ``dim`` forward; keep this rank's chunk of the gradient backward. Right when what
    consumes the gathered tensor runs identically on every rank (its gradient is already complete)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class ReduceScatterToGroup(torch.autograd.Function):
    """Reduce-scatter along ``dim`` forward (partial sums -> this rank's chunk of the total); all-gather
    backward. The sequence-parallel exit of a row-parallel layer."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class AllGatherToGroup(torch.autograd.Function):
    """All-gather along ``dim`` forward; reduce-scatter backward. The sequence-parallel entry of a
    column-parallel layer: each rank's consumer sees all tokens but only its columns, so each rank's
    gradient of the gathered tensor is partial."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class AllToAllGroup(torch.autograd.Function):
    """All-to-all forward (split ``scatter_dim``, concatenate ``gather_dim``); the inverse all-to-all
    (split ``gather_dim``, concatenate ``scatter_dim``) backward. Ulysses attention uses it to turn a
    sequence-sharded (B, heads, n/cp, d) into a head-sharded (B, heads/cp, n, d) and back."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.scatter_dim, ctx.gather_dim, ctx.group = scatter_dim, gather_dim, group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


# ----- functional API (identity for one rank) ------------------------------------------------------------
def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else ReduceFromGroup.apply(x, group)


def scatter_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x if group_size(group) == 1 else ScatterToGroup.apply(x, dim, group)


def gather_from_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x if group_size(group) == 1 else GatherFromGroup.apply(x, dim, group)


def reduce_scatter_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x if group_size(group) == 1 else ReduceScatterToGroup.apply(x, dim, group)


def all_gather_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x if group_size(group) == 1 else AllGatherToGroup.apply(x, dim, group)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    return x if group_size(group) == 1 else AllToAllGroup.apply(x, scatter_dim, gather_dim, group)


def sequence_to_heads(x: torch.Tensor, group, *, head_dim: int = 1, seq_dim: int = 2) -> torch.Tensor:
    """Ulysses entry: (B, heads, n_local, d) sequence-sharded -> (B, heads / cp, n, d) head-sharded."""
    return all_to_all(x, head_dim, seq_dim, group)


def heads_to_sequence(x: torch.Tensor, group, *, head_dim: int = 1, seq_dim: int = 2) -> torch.Tensor:
    """Ulysses exit: (B, heads / cp, n, d) head-sharded -> (B, heads, n_local, d) sequence-sharded."""
    return all_to_all(x, seq_dim, head_dim, group)


# ----- reductions without autograd (token counts, reference statistics, metrics) ------------------------------
def all_reduce_sum_detached(x: torch.Tensor, group) -> torch.Tensor:
    """``sum_r x_r`` over ``group`` of a tensor that carries no gradient; a new tensor (``x`` is untouched)."""
    out = x.detach().clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_mean_detached(total: torch.Tensor, count: torch.Tensor, group) -> torch.Tensor:
    """Global mean ``sum_r total_r / sum_r count_r`` over ``group``, detached, in ``total``'s dtype.

    Reducing the sum and the count (rather than averaging per-rank means) keeps the result equal to the
    global-batch mean when ranks hold different numbers of items; float64 keeps the counts exact.
    """
    stacked = torch.stack([total.detach().to(torch.float64), count.detach().to(torch.float64)])
    stacked = all_reduce_sum_detached(stacked, group)
    return (stacked[0] / stacked[1].clamp_min(1.0)).to(total.dtype)
