"""Model-free statistics of video clips: flicker and motion from frame differences of the luma.

Clips are ``(B, 3, F, H, W)`` in ``[-1, 1]`` (F >= 2). Each frame's luma (BT.601,
``Y = 0.299 R + 0.587 G + 0.114 B`` of the colours mapped to ``[0, 1]``) gives the differences of
consecutive frames ``D_t = Y_{t+1} - Y_t`` for ``t = 0 .. F-2``; per clip, averaged over those ``F - 1``
differences (``mean_p`` / ``median_p``: over the ``H * W`` pixels of a frame):

``frame_diff``  ``mean_t mean_p |D_t(p)|``: the mean absolute luma change between consecutive frames,
                in [0, 1]. High means flicker *or* fast motion; it does not tell them apart.
``flicker``     ``mean_t |mean_p D_t(p)|``: the change of the frames' mean brightness, in [0, 1]. Global
                brightness flicker; an object moving over a still background barely changes it.
``motion``      ``mean_t share_p(|D_t(p) - median_p D_t| > motion_threshold)``: the fraction of pixels
                whose luma changes by more than ``motion_threshold`` (default 0.05, about 13 of 255 grey
                levels) once the frame's typical (median) change is removed, in [0, 1]. A uniform
                brightness change moves every pixel alike and counts as no motion; a moving object
                counts its leading and trailing edges (not an optical flow: it measures how much of the
                picture moves, not how far).

A static clip has all three 0; a square moving over a plain background has ``motion > 0`` and
``flicker`` 0; a clip alternating bright and dark frames has a high ``flicker`` (and ``frame_diff``)
and ``motion`` 0.

``paired_stats(policy, base)`` compares clips sampled from the same prompts and seeds: each statistic's
mean for both and the mean of the per-sample differences ``policy - base`` with its 95% CI
(``vidpo.evaluation.evaluate.mean_ci``: paired t-interval).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from vidpo.evaluation.evaluate import mean_ci

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""BT.601 luma weights of R, G, B."""
DEFAULT_MOTION_THRESHOLD = 0.05
"""Luma change (in [0, 1]) above which a pixel counts as moving."""
STAT_NAMES = ("flicker", "frame_diff", "motion")

Stats = dict[str, Tensor]


def luma(clips: Tensor) -> Tensor:
    """(B, F, H, W) float32 luma in [0, 1] of clips (B, 3, F, H, W) in [-1, 1]."""
    _check(clips)
    weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32, device=clips.device).view(1, 3, 1, 1, 1)
    pixels = clips.float().clamp(-1.0, 1.0).add(1.0).mul(0.5)
    return (pixels * weights).sum(dim=1)


def _check(clips: Tensor) -> None:
    if not isinstance(clips, Tensor) or clips.dim() != 5 or clips.shape[1] != 3:
        shape = tuple(clips.shape) if isinstance(clips, Tensor) else type(clips).__name__
        raise ValueError(f"video stats expect clips (B, 3, F, H, W) in [-1, 1], got {shape}")
    if clips.shape[2] < 2:
        raise ValueError(f"video stats need at least 2 frames per clip, got {clips.shape[2]} "
                         f"(clips of shape {tuple(clips.shape)})")


@torch.no_grad()
def clip_stats(clips: Tensor, *, motion_threshold: float = DEFAULT_MOTION_THRESHOLD) -> Stats:
    """``{name: (B,) float64}`` for each of ``STAT_NAMES`` (see the module docstring), one clip at a time."""
    _check(clips)
    if not motion_threshold >= 0:
        raise ValueError(f"motion_threshold must be >= 0, got {motion_threshold!r}")
    rows: dict[str, list[float]] = {name: [] for name in STAT_NAMES}
    for clip in clips:
        y = luma(clip.unsqueeze(0))[0]                      # (F, H, W)
        diff = (y[1:] - y[:-1]).flatten(1)                  # (F-1, H*W)
        rows["frame_diff"].append(diff.abs().double().mean().item())
        rows["flicker"].append(diff.double().mean(dim=1).abs().mean().item())
        typical = diff.median(dim=1, keepdim=True).values
        moving = (diff - typical).abs() > motion_threshold
        rows["motion"].append(moving.double().mean().item())
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in rows.items()}


def paired_stats(policy: Union[Tensor, Stats], base: Union[Tensor, Stats], *,
                 motion_threshold: float = DEFAULT_MOTION_THRESHOLD) -> dict[str, dict]:
    """Each statistic of ``policy`` and ``base`` clips of the same prompts and seeds, paired.

    ``policy`` / ``base``: clips (B, 3, F, H, W), or what ``clip_stats`` returned for them (so batches can
    be measured as they are decoded and concatenated). Returns ``{name: {"policy": mean, "base": mean,
    "delta": mean_ci(policy - base)}}`` with ``delta`` = ``{"mean", "ci95", "std", "n"}``.
    """
    policy_stats = policy if isinstance(policy, dict) else clip_stats(policy, motion_threshold=motion_threshold)
    base_stats = base if isinstance(base, dict) else clip_stats(base, motion_threshold=motion_threshold)
    out = {}
    for name in STAT_NAMES:
        if name not in policy_stats or name not in base_stats:
            raise ValueError(f"paired_stats: statistic {name!r} missing (have {sorted(policy_stats)} and "
                             f"{sorted(base_stats)})")
        p, b = policy_stats[name].double().flatten(), base_stats[name].double().flatten()
        if p.numel() != b.numel() or p.numel() == 0:
            raise ValueError(f"paired_stats: {p.numel()} policy and {b.numel()} base samples of {name!r}; "
                             "pairs need the same non-zero count")
        out[name] = {"policy": p.mean().item(), "base": b.mean().item(), "delta": mean_ci(p - b)}
    return out
