"""Eager PyTorch reference of the preference losses (DESIGN.md section 1), written from the formulas.

This module is the oracle of every kernel test (run in float64) and the ``"torch"`` backend of
``vidpo.kernels`` (run in fp32 for fp32/bf16 inputs). It materialises the residual and the squared
error on purpose: readability over speed. The fused backends implement two primitives instead and
share the epilogue in ``vidpo.kernels.losses``; the two code paths are kept independent so that a
mistake in one is caught by the other.

Notation. ``v`` is a model velocity, ``u`` its target: ``u = target`` or ``u = noise - x0`` with
``noise[n % noise.shape[0]]`` (the two videos of a pair share their noise). Shapes are
``(N, C, T, H, W)`` with ``N = 2B`` for paired losses (rows ``[0, B)`` first videos, ``[B, 2B)``
second videos). ``segment_ids`` (T,) maps latent frames to segments ``0..S-1``.

    e(v, u)                  = (v - u)^2
    err(v)[n, s]             = sum_{c, t in s, h, w} e / (C * tokens_s),  tokens_s = |{t in s}| * H * W
    d[n, s]                  = err(v_theta)[n, s] - err(v_ref)[n, s]
    margin[b, s]             = -beta / 2 * y[b, s] * (d[b, s] - d[B + b, s])
    DenseDPO loss            = sum_{(b,s): y != 0} tokens_s * softplus(-margin[b, s])
                               / sum_{(b,s): y != 0} tokens_s               (0 when there is none)
    KTO (per video)          g = -(err_theta - err_ref),  z = max(0, mean_global_batch(g)) (detached)
                             loss = mean_n [ lambda_D (1 - sigmoid(beta (g - z)))   if desirable
                                             lambda_U (1 - sigmoid(beta (z - g)))   otherwise ]
    flow matching            loss = sum_n w_n mse_n / sum_n w_n,  mse_n = mean_{c,t,h,w} (v - u)^2

With a sequence-parallel ``group`` every rank holds some frames of the same videos; the per-segment
sums and token counts are all-reduced (sum) before the epilogue, which is then replicated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vidpo.parallel import mappings


@dataclass
class DPOLossOutput:
    """Result of a (Dense/Flow) DPO loss. All fields but ``loss`` are detached diagnostics.

    loss: scalar, token-weighted mean of ``softplus(-margin)`` over non-tie (pair, segment).
    margin, d_first, d_second: (B, S). accuracy: scalar, fraction of non-tie (b, s) with margin > 0.
    n_nontie: int64 scalar. err_theta, err_ref: (2B, S) per-segment mean squared errors.
    """

    loss: torch.Tensor
    margin: torch.Tensor
    accuracy: torch.Tensor
    n_nontie: torch.Tensor
    d_first: torch.Tensor
    d_second: torch.Tensor
    err_theta: torch.Tensor
    err_ref: torch.Tensor


@dataclass
class KTOLossOutput:
    """Result of the Diffusion-KTO loss: ``loss`` scalar, ``reward`` g (N,) and ``ref_point`` z (scalar),
    both detached; ``err_theta``/``err_ref`` (N,) per-video mean squared errors (detached)."""

    loss: torch.Tensor
    reward: torch.Tensor
    ref_point: torch.Tensor
    err_theta: torch.Tensor
    err_ref: torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (oracle), everything else is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def velocity_target(target, x0, noise, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """``target`` or ``noise[n % noise.shape[0]] - x0[n]`` for n < num_rows, in ``dtype``."""
    if target is not None:
        return target.to(dtype)
    rows = torch.arange(num_rows, device=x0.device) % noise.shape[0]
    return noise[rows].to(dtype) - x0.to(dtype)


def squared_error(v: torch.Tensor, target, x0, noise) -> torch.Tensor:
    """Per-element ``(v - u)^2`` in the accumulation dtype, shape (N, C, T, H, W)."""
    dtype = compute_dtype(v.dtype)
    u = velocity_target(target, x0, noise, v.shape[0], dtype)
    return (v.to(dtype) - u) ** 2


def per_segment_sums(error: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``sum over c, h, w and frames t with segment_ids[t] == s`` of ``error``: (N, S)."""
    per_frame = error.sum(dim=(1, 3, 4))  # (N, T)
    sums = per_frame.new_zeros(error.shape[0], num_segments)
    return sums.index_add(1, segment_ids.to(per_frame.device, torch.long), per_frame)


def segment_token_counts(segment_ids, num_segments: int, height: int, width: int, group, device, dtype):
    """Tokens per segment, ``frames_in_segment * H * W``, summed over the sequence-parallel group: (S,).

    Counted with a one-hot sum on the device (static shapes, no host sync, torch.compile-friendly).
    """
    segment_ids = segment_ids.to(device=device, dtype=torch.long)
    segments = torch.arange(num_segments, device=device)
    frames = (segment_ids.view(1, -1) == segments.view(-1, 1)).sum(dim=1)
    tokens = (frames * (height * width)).to(dtype)
    return mappings.all_reduce_sum_detached(tokens, group)


# ----------------------------------------------------------------------------------------- losses


def dense_dpo_loss_reference(
    v_theta, v_ref, target, labels, segment_ids, beta, *, group=None, x0=None, noise=None, label_smoothing=0.0
) -> DPOLossOutput:
    """DenseDPO (segment-level Flow-DPO), arXiv:2506.03517, eq. in the module docstring.

    v_theta, v_ref: (2B, C, T, H, W); target: same or None with x0 (2B, ...) and noise (B or 2B, ...);
    labels: (B, S) in {+1, -1, 0}; segment_ids: (T,); label_smoothing: cDPO's eps. Returns DPOLossOutput.
    """
    num_pairs, num_segments = labels.shape
    _, channels, _, height, width = v_theta.shape
    dtype = compute_dtype(v_theta.dtype)

    sums_theta = per_segment_sums(squared_error(v_theta, target, x0, noise), segment_ids, num_segments)
    with torch.no_grad():  # the reference model never receives a gradient
        sums_ref = per_segment_sums(squared_error(v_ref.detach(), target, x0, noise), segment_ids, num_segments)
    sums_theta = mappings.reduce_from_group(sums_theta, group)
    sums_ref = mappings.all_reduce_sum_detached(sums_ref, group)
    tokens = segment_token_counts(segment_ids, num_segments, height, width, group, v_theta.device, dtype)
    # Without a group the public API has already checked every segment is non-empty.
    if group is not None and bool((tokens == 0).any()):
        raise ValueError("dense_dpo_loss: a segment has no frame on any rank of the group")

    err_theta = sums_theta / (tokens * channels)  # (2B, S)
    err_ref = sums_ref / (tokens * channels)
    d = err_theta - err_ref
    d_first, d_second = d[:num_pairs], d[num_pairs:]
    y = labels.to(device=v_theta.device, dtype=dtype)
    margin = -0.5 * beta * y * (d_first - d_second)

    non_tie = labels.to(v_theta.device) != 0
    weight = torch.where(non_tie, tokens.expand(num_pairs, num_segments), torch.zeros_like(margin))
    # Dividing by max(total weight, 1) gives exactly 0 (and zero gradients) for an all-tie batch.
    # label smoothing (cDPO): each label counts as flipped with probability eps
    terms = F.softplus(-margin)
    if label_smoothing:
        terms = (1.0 - label_smoothing) * terms + label_smoothing * F.softplus(margin)
    loss = (weight * terms).sum() / weight.sum().clamp_min(1.0)
    n_nontie = non_tie.sum()
    correct = (non_tie & (margin > 0)).sum()
    accuracy = correct.to(dtype) / n_nontie.clamp_min(1).to(dtype)
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


def flow_dpo_loss_reference(v_theta, v_ref, target, beta, *, group=None, x0=None, noise=None) -> DPOLossOutput:
    """Flow-DPO (arXiv:2501.13918): DenseDPO with one segment and every pair labelled +1 (rows [0, B)
    are the winners)."""
    num_pairs = v_theta.shape[0] // 2
    labels = torch.ones(num_pairs, 1, dtype=torch.long, device=v_theta.device)
    segment_ids = torch.zeros(v_theta.shape[2], dtype=torch.long, device=v_theta.device)
    return dense_dpo_loss_reference(
        v_theta, v_ref, target, labels, segment_ids, beta, group=group, x0=x0, noise=noise
    )


def kto_loss_reference(
    v_theta, v_ref, target, desirable, beta, *, lambda_d=1.0, lambda_u=1.0, dp_group=None, group=None,
    x0=None, noise=None,
) -> KTOLossOutput:
    """Diffusion-KTO (arXiv:2404.04465) on rectified-flow errors; formula in the module docstring.

    v_theta, v_ref: (N, C, T, H, W); desirable: (N,) bool. ``group`` splits frames (sequence parallel),
    ``dp_group`` splits videos (data parallel; only the reference point z is reduced over it).
    """
    dtype = compute_dtype(v_theta.dtype)
    sums_theta = squared_error(v_theta, target, x0, noise).sum(dim=(1, 2, 3, 4))
    with torch.no_grad():
        sums_ref = squared_error(v_ref.detach(), target, x0, noise).sum(dim=(1, 2, 3, 4))
    sums_theta = mappings.reduce_from_group(sums_theta, group)
    sums_ref = mappings.all_reduce_sum_detached(sums_ref, group)
    elements = mappings.all_reduce_sum_detached(
        torch.tensor(float(v_theta[0].numel()), dtype=dtype, device=v_theta.device), group
    )
    return kto_epilogue(sums_theta / elements, sums_ref / elements, desirable, beta, lambda_d=lambda_d,
                        lambda_u=lambda_u, dp_group=dp_group)


def kto_epilogue(err_theta, err_ref, desirable, beta, *, lambda_d=1.0, lambda_u=1.0, dp_group=None) -> KTOLossOutput:
    """Diffusion-KTO from per-video errors (N,) of the policy and the reference, shared by every backend:
    ``g = err_ref - err_theta``, ``z = max(0, mean_dp_group g)`` (detached; the sum and the count are reduced,
    so z is the global-batch mean), and the per-video sigmoid terms of the module docstring, averaged."""
    reward = err_ref - err_theta
    batch_mean = mappings.all_reduce_mean_detached(
        reward.detach().sum(), torch.tensor(float(reward.shape[0]), dtype=reward.dtype, device=reward.device),
        dp_group,
    )
    ref_point = batch_mean.clamp_min(0.0)
    desirable = desirable.to(device=reward.device, dtype=torch.bool)
    per_video = torch.where(
        desirable,
        lambda_d * (1.0 - torch.sigmoid(beta * (reward - ref_point))),
        lambda_u * (1.0 - torch.sigmoid(beta * (ref_point - reward))),
    )
    return KTOLossOutput(
        loss=per_video.mean(),
        reward=reward.detach(),
        ref_point=ref_point.detach(),
        err_theta=err_theta.detach(),
        err_ref=err_ref.detach(),
    )


def flow_matching_loss_reference(v, target, *, group=None, row_weights=None, x0=None, noise=None):
    """Flow-matching / SFT loss: ``mean (v - u)^2``, or ``sum_n w_n mse_n / sum_n w_n`` with
    ``row_weights`` w (N,) (0 when every weight is 0). Returns a scalar."""
    dtype = compute_dtype(v.dtype)
    sums = mappings.reduce_from_group(squared_error(v, target, x0, noise).sum(dim=(1, 2, 3, 4)), group)
    elements = mappings.all_reduce_sum_detached(torch.tensor(float(v[0].numel()), dtype=dtype, device=v.device), group)
    mse = sums / elements  # (N,)
    if row_weights is None:
        return mse.mean()
    weights = row_weights.to(device=v.device, dtype=dtype)
    return (weights * mse).sum() / weights.sum().clamp_min(torch.finfo(dtype).tiny)


# ----------------------------------------------------------------------------------------- primitives


def segment_sq_err_sums_reference(v_theta, v_ref, target, x0, noise, segment_ids, num_segments) -> torch.Tensor:
    """Oracle of the fused backends' first primitive: (K, N, S), K = 2 with v_ref else 1."""
    sums = [per_segment_sums(squared_error(v_theta, target, x0, noise), segment_ids, num_segments)]
    if v_ref is not None:
        sums.append(per_segment_sums(squared_error(v_ref, target, x0, noise), segment_ids, num_segments))
    return torch.stack(sums)


def segment_scaled_residual_reference(v_theta, target, x0, noise, coef, segment_ids) -> torch.Tensor:
    """Oracle of the second primitive: ``coef[n, segment_ids[t]] * (v_theta - u)`` in v_theta.dtype."""
    dtype = compute_dtype(v_theta.dtype)
    residual = v_theta.to(dtype) - velocity_target(target, x0, noise, v_theta.shape[0], dtype)
    scale = coef.to(dtype)[:, segment_ids.to(coef.device, torch.long)]  # (N, T)
    return (scale[:, None, :, None, None] * residual).to(v_theta.dtype)
