"""Public API of the preference losses: DenseDPO, Flow-DPO, Diffusion-KTO and flow matching.

Each loss validates its inputs, resolves a backend (``vidpo.kernels.dispatch``) and then either runs
the eager reference (backend ``"torch"``) or a fused backend's primitive through the autograd Function
``SegmentSqErrSums``, followed by the epilogue below. The epilogue only touches (N, S) tensors, so the
fused path never materialises anything activation-sized besides the gradient of v_theta.

Formulas (DESIGN.md section 1; ``vidpo.kernels.reference`` repeats them in eager form):

    u = target, or noise[n % noise.shape[0]] - x0[n]          (rectified-flow velocity target)
    err[n, s] = sum_{c, t in s, h, w} (v - u)^2 / (C * tokens_s),   tokens_s = frames_in_s * H * W
    d = err_theta - err_ref,   margin[b, s] = -beta/2 * y[b, s] * (d[b, s] - d[B + b, s])
    DenseDPO = sum_{y != 0} tokens_s l(margin) / sum_{y != 0} tokens_s   (0 if no non-tie)
    l(m) = (1 - eps) softplus(-m) + eps softplus(m)   (eps = label_smoothing; 0: plain DPO, softplus(-m))
    KTO: g = -d (S = 1), z = max(0, mean over the dp_group's batch of g) detached,
         loss = mean_n lambda_D (1 - sigmoid(beta (g - z))) | lambda_U (1 - sigmoid(beta (z - g)))
    flow matching = mean (v - u)^2, or sum_n w_n mse_n / sum_n w_n with row weights

Papers: DenseDPO arXiv:2506.03517, Flow-DPO arXiv:2501.13918, Diffusion-KTO arXiv:2404.04465; the
label smoothing is conservative DPO (cDPO, Mitchell 2023): each label is read as flipped with probability
eps, so a pair's loss is minimal at sigmoid(margin) = 1 - eps instead of growing margins without bound.
With ``group`` (sequence/context parallel: each rank holds some latent frames of every video) the
(K, N, S) sums and the token counts are all-reduced before the epilogue; the gradient each rank gets
for its frames equals the single-process gradient of those frames.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from vidpo.parallel import mappings

from . import dispatch, reference
from .reference import DPOLossOutput, KTOLossOutput
from .segment_sums import segment_sq_err_sums_autograd

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


# ----------------------------------------------------------------------------------------- validation


def _check_tensors(fn, v_theta, v_ref, target, x0, noise, backend):
    """Shape/dtype/device/grad checks shared by every loss; returns contiguous tensors."""
    if v_theta.dim() != 5:
        raise ValueError(f"{fn}: v_theta must be (N, C, T, H, W), got shape {tuple(v_theta.shape)}")
    allowed = REFERENCE_DTYPES if backend == "torch" else KERNEL_DTYPES
    if v_theta.dtype not in allowed:
        raise TypeError(f"{fn}: backend {backend!r} takes {[str(d) for d in allowed]}, got v_theta {v_theta.dtype}")
    if (target is None) == (x0 is None and noise is None):
        raise ValueError(f"{fn}: pass either target or both x0 and noise (target = noise - x0), not both/neither")
    if target is None and (x0 is None or noise is None):
        raise ValueError(f"{fn}: x0 and noise must be given together")
    named = {"v_ref": v_ref, "target": target, "x0": x0}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != v_theta.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(tensor.shape)}, v_theta {tuple(v_theta.shape)}")
    if noise is not None:
        named["noise"] = noise
        if noise.shape[1:] != v_theta.shape[1:] or noise.shape[0] == 0 or v_theta.shape[0] % noise.shape[0]:
            raise ValueError(
                f"{fn}: noise must be (N', C, T, H, W) with N' dividing N={v_theta.shape[0]} "
                f"(shared by both videos of a pair: N' = N/2), got {tuple(noise.shape)}"
            )
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tensor.dtype != v_theta.dtype:
            raise TypeError(f"{fn}: {name} is {tensor.dtype} but v_theta is {v_theta.dtype}; use one dtype")
        if tensor.device != v_theta.device:
            raise ValueError(f"{fn}: {name} is on {tensor.device} but v_theta is on {v_theta.device}")
        if name != "v_ref" and tensor.requires_grad:
            raise ValueError(
                f"{fn}: {name} requires grad, but the loss differentiates v_theta only; pass {name}.detach()"
            )

    def contiguous(t):
        return None if t is None else t.contiguous()

    return contiguous(v_theta), contiguous(v_ref), contiguous(target), contiguous(x0), contiguous(noise)


def _check_segment_ids(fn, segment_ids, frames, num_segments, group, device):
    """segment_ids: (T,) integers, non-decreasing, in [0, S); every segment non-empty without a group
    (with one, a rank may hold no frame of a segment; the global count is checked after the all-reduce)."""
    if segment_ids.dim() != 1 or segment_ids.shape[0] != frames:
        raise ValueError(
            f"{fn}: segment_ids must be ({frames},) (one id per latent frame), got {tuple(segment_ids.shape)}"
        )
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise TypeError(f"{fn}: segment_ids must be an integer tensor, got {segment_ids.dtype}")
    ids = segment_ids.detach().cpu().to(torch.long)
    if frames and (int(ids.min()) < 0 or int(ids.max()) >= num_segments):
        raise ValueError(f"{fn}: segment_ids must lie in [0, {num_segments}), got {ids.tolist()}")
    if frames > 1 and bool((ids[1:] < ids[:-1]).any()):
        raise ValueError(f"{fn}: segment_ids must be non-decreasing (segments are runs of frames), got {ids.tolist()}")
    if group is None:
        counts = torch.bincount(ids, minlength=num_segments)
        if bool((counts == 0).any()):
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"{fn}: segments {empty} have no frame (segment_ids {ids.tolist()})")
    return segment_ids.to(device=device, dtype=torch.long).contiguous()


def _segment_sums(backend, v_theta, v_ref, target, x0, noise, segment_ids, num_segments, group):
    """(K, N, S) sums for a fused backend, differentiable in v_theta, all-reduced over ``group``.

    Only slice 0 (v_theta) carries a gradient, so the reference sums are reduced without autograd.
    """
    sums = segment_sq_err_sums_autograd(
        dispatch.primitives(backend), v_theta, v_ref, target, x0, noise, segment_ids, num_segments
    )
    if mappings.group_size(group) == 1:
        return sums
    return mappings.reduce_from_group(sums, group)


_SEGMENT_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_SEGMENT_CACHE_SIZE = 32


def _segments(fn, segment_ids, frames, num_segments, height, width, group, device):
    """``(segment ids on device, tokens per segment)``: checked and counted once per distinct CPU ids.

    A training run passes the same few segment layouts every step; their checks and counts are ~15 small ops (and,
    on a GPU, as many launches). Without a group and with ids on the CPU they are cached by value, so a changed or
    new layout is checked again; ids on a GPU, or a group (its counts are all-reduced), take the full path."""
    if group is not None or segment_ids.device.type != "cpu":
        ids = _check_segment_ids(fn, segment_ids, frames, num_segments, group, device)
        return ids, _token_counts(fn, ids, num_segments, height, width, group, device)
    key = (tuple(segment_ids.tolist()), segment_ids.dtype, frames, num_segments, height, width, str(device))
    hit = _SEGMENT_CACHE.get(key)
    if hit is not None:
        _SEGMENT_CACHE.move_to_end(key)
        return hit
    ids = _check_segment_ids(fn, segment_ids, frames, num_segments, group, device)
    value = (ids, _token_counts(fn, ids, num_segments, height, width, group, device))
    _SEGMENT_CACHE[key] = value
    if len(_SEGMENT_CACHE) > _SEGMENT_CACHE_SIZE:
        _SEGMENT_CACHE.popitem(last=False)
    return value


def _token_counts(fn, segment_ids, num_segments, height, width, group, device):
    tokens = reference.segment_token_counts(segment_ids, num_segments, height, width, group, device, torch.float32)
    if group is not None and bool((tokens == 0).any()):
        raise ValueError(f"{fn}: a segment has no frame on any rank of the group")
    return tokens


# ----------------------------------------------------------------------------------------- epilogues


def smoothed_dpo_terms(margin: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-(pair, segment) DPO loss ``(1 - eps) softplus(-margin) + eps softplus(margin)`` (module doc)."""
    if label_smoothing == 0.0:
        return F.softplus(-margin)
    return (1.0 - label_smoothing) * F.softplus(-margin) + label_smoothing * F.softplus(margin)


def dpo_epilogue(sums: torch.Tensor, tokens: torch.Tensor, channels: int, labels: torch.Tensor, beta: float,
                 label_smoothing: float = 0.0):
    """DenseDPO from the (2, 2B, S) fp32 sums and the (S,) global token counts -> DPOLossOutput."""
    num_pairs = labels.shape[0]
    err = sums / (tokens * channels)  # (2, 2B, S)
    err_theta, err_ref = err[0], err[1]
    d = err_theta - err_ref
    d_first, d_second = d[:num_pairs], d[num_pairs:]
    y = labels.to(device=sums.device, dtype=torch.float32)
    margin = (-0.5 * beta) * y * (d_first - d_second)
    non_tie = y != 0
    weight = tokens.expand_as(margin) * non_tie
    # max(total weight, 1): an all-tie batch gives exactly 0 and all-zero gradients, never 0/0.
    loss = (weight * smoothed_dpo_terms(margin, label_smoothing)).sum() / weight.sum().clamp_min(1.0)
    n_nontie = non_tie.sum()
    accuracy = (non_tie & (margin > 0)).sum().float() / n_nontie.clamp_min(1).float()
    return DPOLossOutput(
        loss=loss,
        margin=margin.detach(),
        accuracy=accuracy.detach(),
        n_nontie=n_nontie,
        d_first=d_first.detach(),
        d_second=d_second.detach(),
        err_theta=err_theta.detach(),
        err_ref=err_ref.detach(),
    )


# ----------------------------------------------------------------------------------------- public API


def dense_dpo_loss(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor,
    target: Optional[torch.Tensor],
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    beta: float,
    *,
    group=None,
    backend: str = "auto",
    x0: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """DenseDPO loss (segment-level Flow-DPO; formula in the module docstring).

    v_theta, v_ref: (2B, C, T, H, W) fp32 or bf16, rows [0, B) the first videos of the B pairs, [B, 2B)
    the second ones. target: same shape, or None with x0 (2B, ...) and noise (B or 2B, ...).
    labels: (B, S) int in {+1: first better, -1: second better, 0: tie}. segment_ids: (T,) int,
    non-decreasing runs 0..S-1. group: sequence-parallel process group over which frames are split.
    label_smoothing: eps in [0, 0.5), the probability each label is taken to be flipped (cDPO).
    Returns DPOLossOutput; the gradient reaches v_theta only, in v_theta's dtype.
    """
    fn = "dense_dpo_loss"
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    name = dispatch.resolve_backend(backend, v_theta.device)
    v_theta, v_ref, target, x0, noise = _check_tensors(fn, v_theta, v_ref, target, x0, noise, name)
    if v_ref is None:
        raise ValueError(f"{fn}: v_ref (the reference model's velocity) is required")
    if labels.dim() != 2 or 2 * labels.shape[0] != v_theta.shape[0]:
        raise ValueError(f"{fn}: labels must be (B, S) with 2B = {v_theta.shape[0]} rows, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or bool((labels.detach().abs() > 1).any()):
        raise ValueError(f"{fn}: labels must be integers in {{+1, -1, 0}}")
    num_segments = labels.shape[1]
    _, channels, frames, height, width = v_theta.shape
    if name == "torch":
        segment_ids = _check_segment_ids(fn, segment_ids, frames, num_segments, group, v_theta.device)
        return reference.dense_dpo_loss_reference(
            v_theta, v_ref, target, labels, segment_ids, beta, group=group, x0=x0, noise=noise,
            label_smoothing=label_smoothing,
        )
    segment_ids, tokens = _segments(fn, segment_ids, frames, num_segments, height, width, group, v_theta.device)
    sums = _segment_sums(name, v_theta, v_ref, target, x0, noise, segment_ids, num_segments, group)
    return dpo_epilogue(sums, tokens, channels, labels, beta, label_smoothing)


def flow_dpo_loss(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor,
    target: Optional[torch.Tensor],
    beta: float,
    *,
    group=None,
    backend: str = "auto",
    x0: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> DPOLossOutput:
    """Flow-DPO: ``-log sigmoid(-beta/2 (d_w - d_l))`` averaged over pairs; rows [0, B) are the winners.

    Same tensors as dense_dpo_loss; it is DenseDPO with one segment and every label +1.
    """
    num_pairs = v_theta.shape[0] // 2
    labels = torch.ones(num_pairs, 1, dtype=torch.long, device=v_theta.device)
    segment_ids = torch.zeros(v_theta.shape[2], dtype=torch.long, device=v_theta.device)
    return dense_dpo_loss(
        v_theta, v_ref, target, labels, segment_ids, beta, group=group, backend=backend, x0=x0, noise=noise
    )


def kto_loss(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor,
    target: Optional[torch.Tensor],
    desirable: torch.Tensor,
    beta: float,
    *,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    dp_group=None,
    group=None,
    backend: str = "auto",
    x0: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> KTOLossOutput:
    """Diffusion-KTO (formula in the module docstring). v_theta, v_ref: (N, C, T, H, W); desirable:
    (N,) bool. dp_group: data-parallel group over which the reference point z is averaged (global
    batch mean, detached); group: sequence-parallel group over which frames are split."""
    fn = "kto_loss"
    name = dispatch.resolve_backend(backend, v_theta.device)
    v_theta, v_ref, target, x0, noise = _check_tensors(fn, v_theta, v_ref, target, x0, noise, name)
    if v_ref is None:
        raise ValueError(f"{fn}: v_ref (the reference model's velocity) is required")
    if desirable.shape != (v_theta.shape[0],):
        raise ValueError(f"{fn}: desirable must be ({v_theta.shape[0]},) bool, got {tuple(desirable.shape)}")
    if name == "torch":
        return reference.kto_loss_reference(
            v_theta, v_ref, target, desirable, beta, lambda_d=lambda_d, lambda_u=lambda_u,
            dp_group=dp_group, group=group, x0=x0, noise=noise,
        )
    one_segment = torch.zeros(v_theta.shape[2], dtype=torch.long, device=v_theta.device)
    sums = _segment_sums(name, v_theta, v_ref, target, x0, noise, one_segment, 1, group)[:, :, 0]  # (2, N)
    elements = mappings.all_reduce_sum_detached(
        torch.tensor(float(v_theta[0].numel()), dtype=torch.float32, device=v_theta.device), group
    )
    return reference.kto_epilogue(sums[0] / elements, sums[1] / elements, desirable, beta, lambda_d=lambda_d,
                                  lambda_u=lambda_u, dp_group=dp_group)


def flow_matching_loss(
    v: torch.Tensor,
    target: Optional[torch.Tensor],
    *,
    group=None,
    backend: str = "auto",
    row_weights: Optional[torch.Tensor] = None,
    x0: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Flow-matching / SFT loss: ``mean (v - u)^2`` over all elements; with row_weights w (N,),
    ``sum_n w_n mse_n / sum_n w_n`` (exactly 0 when every weight is 0). Returns an fp32 scalar."""
    fn = "flow_matching_loss"
    name = dispatch.resolve_backend(backend, v.device)
    v, _, target, x0, noise = _check_tensors(fn, v, None, target, x0, noise, name)
    if row_weights is not None and row_weights.shape != (v.shape[0],):
        raise ValueError(f"{fn}: row_weights must be ({v.shape[0]},), got {tuple(row_weights.shape)}")
    if name == "torch":
        return reference.flow_matching_loss_reference(
            v, target, group=group, row_weights=row_weights, x0=x0, noise=noise
        )
    one_segment = torch.zeros(v.shape[2], dtype=torch.long, device=v.device)
    sums = _segment_sums(name, v, None, target, x0, noise, one_segment, 1, group)[0, :, 0]  # (N,)
    elements = mappings.all_reduce_sum_detached(torch.tensor(float(v[0].numel()), device=v.device), group)
    mse = sums / elements
    if row_weights is None:
        return mse.mean()
    weights = row_weights.to(device=v.device, dtype=torch.float32)
    return (weights * mse).sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
