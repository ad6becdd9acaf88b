"""Temporal segments of a latent video (DenseDPO, DESIGN.md section 1).

DenseDPO labels a pair of videos per temporal segment of ``segment_seconds`` of video (1 s by default)
and computes the DPO loss per segment. The labels live on pixel time (seconds), the model on latent
frames, so this module maps one onto the other.

The mapping, for ``k = temporal_compression`` (a causal video VAE: Wan, CogVideoX, HunyuanVideo):

* pixel frame ``p`` belongs to pixel segment ``floor(p / F)`` with ``F = fps * segment_seconds``
  pixel frames per segment;
* latent frame ``0`` encodes pixel frame ``0`` alone; latent frame ``j > 0`` encodes pixel frames
  ``(j - 1) * k + 1 .. j * k``;
* **rule**: a latent frame belongs to the segment of the *centre* of the pixel frames it covers,
  ``centre(0) = 0`` and ``centre(j) = j * k - (k - 1) / 2``, i.e. ``floor(centre(j) / F)``. This is
  the majority rule (a latent frame goes where most of its pixel frames are); when ``F`` is a whole
  number an exact half/half split goes to the earlier segment (the centre then lies half a frame
  before the later segment's first pixel frame). For ``k = 1`` it is the identity (latent frame =
  pixel frame);
* a trailing segment holding fewer than half the nominal ``F / k`` latent frames is merged into the
  previous segment (a 5.06 s Wan clip is five 1 s segments, not five and a sliver).

Example (Wan 2.1: 81 pixel frames at 16 fps, k = 4, 21 latent frames, 1 s segments):
latent frames ``0..4 | 5..8 | 9..12 | 13..16 | 17..20``, i.e. counts ``5, 4, 4, 4, 4``.

The result is a LongTensor ``(T,)`` of segment ids that starts at 0, never decreases, and increases
by at most 1 per frame, so every segment ``0 .. S-1`` is a non-empty contiguous run of frames.
"""
from __future__ import annotations

import math

import torch

# Frames per segment are computed in floating point (fps * seconds, e.g. 23.976 * 1.0); a pixel frame
# sitting exactly on a boundary must not fall into the previous segment through rounding.
_BOUNDARY_EPS = 1e-9


def segment_ids(num_latent_frames: int, fps: float, segment_seconds: float,
                temporal_compression: int = 1) -> torch.Tensor:
    """Segment id of every latent frame, LongTensor ``(num_latent_frames,)`` (rule in the module doc).

    ``num_latent_frames`` T >= 1; ``fps`` > 0 frames per second of the *pixel* video;
    ``segment_seconds`` > 0; ``temporal_compression`` k >= 1. A segment shorter than one latent frame
    (``fps * segment_seconds < k``) cannot be represented and raises ``ValueError``.
    """
    num_latent_frames = int(num_latent_frames)
    k = int(temporal_compression)
    if num_latent_frames < 1:
        raise ValueError(f"segment_ids: num_latent_frames must be >= 1, got {num_latent_frames}")
    if k < 1 or k != temporal_compression:
        raise ValueError(f"segment_ids: temporal_compression must be an integer >= 1, got {temporal_compression}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"segment_ids: fps must be a positive number, got {fps}")
    if not (segment_seconds > 0 and math.isfinite(segment_seconds)):
        raise ValueError(f"segment_ids: segment_seconds must be a positive number, got {segment_seconds}")
    frames_per_segment = float(fps) * float(segment_seconds)
    if frames_per_segment < k - _BOUNDARY_EPS:
        raise ValueError(
            f"segment_ids: a segment of {segment_seconds} s at {fps} fps is {frames_per_segment:g} pixel "
            f"frames, shorter than one latent frame ({k} pixel frames); use longer segments")

    j = torch.arange(num_latent_frames, dtype=torch.float64)
    centre = torch.where(j == 0, torch.zeros_like(j), j * k - (k - 1) / 2.0)
    ids = torch.floor(centre / frames_per_segment + _BOUNDARY_EPS).long()

    # With F >= k consecutive centres are k apart <= F, so ids step by 0 or 1 and no segment is empty.
    counts = torch.bincount(ids)
    nominal_latent_frames = frames_per_segment / k
    if counts.numel() > 1 and counts[-1].item() < 0.5 * nominal_latent_frames:
        ids[ids == counts.numel() - 1] = counts.numel() - 2
    return ids


def num_segments(ids: torch.Tensor) -> int:
    """Number of segments S of a segment-id vector (``max + 1``; 0 for an empty vector)."""
    return int(ids.max().item()) + 1 if ids.numel() else 0


_num_segments = num_segments  # for functions whose ``num_segments`` argument shadows the name


def segment_frame_counts(ids: torch.Tensor, num_segments: int | None = None) -> torch.Tensor:
    """Frames per segment, LongTensor ``(S,)``; ``S`` defaults to ``num_segments(ids)``."""
    if num_segments is None:
        num_segments = _num_segments(ids)
    return torch.bincount(ids.long().reshape(-1), minlength=int(num_segments))[: int(num_segments)]


def validate_segment_ids(ids: torch.Tensor, num_frames: int | None = None) -> int:
    """Check that ``ids`` is a valid segment-id vector and return S.

    Valid: 1-D integer tensor, length ``num_frames`` when given, starts at 0, and each step is 0 or
    +1 (contiguous, non-empty segments). Raises ``ValueError`` naming the problem.
    """
    if ids.dim() != 1 or ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"segment ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
    if num_frames is not None and ids.numel() != num_frames:
        raise ValueError(f"segment ids have {ids.numel()} entries for {num_frames} frames")
    if ids.numel() == 0:
        raise ValueError("segment ids are empty")
    if int(ids[0]) != 0:
        raise ValueError(f"segment ids must start at 0, got {int(ids[0])}")
    steps = ids[1:] - ids[:-1]
    if bool(((steps != 0) & (steps != 1)).any()):
        raise ValueError(f"segment ids must be contiguous (steps of 0 or 1), got {ids.tolist()}")
    return num_segments(ids)


def segment_one_hot(ids: torch.Tensor, num_segments: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Membership matrix ``M (T, S)`` with ``M[t, s] = 1`` iff frame t is in segment s."""
    if num_segments is None:
        num_segments = _num_segments(ids)
    return torch.nn.functional.one_hot(ids.long(), int(num_segments)).to(dtype)


def segment_mean(values: torch.Tensor, ids: torch.Tensor, num_segments: int | None = None) -> torch.Tensor:
    """Mean of per-frame ``values (..., T)`` over each segment: ``(..., S)``.

    ``out[..., s] = sum_{t: ids[t] = s} values[..., t] / |{t: ids[t] = s}|`` (differentiable).
    """
    one_hot = segment_one_hot(ids.to(values.device), num_segments, dtype=values.dtype)
    counts = one_hot.sum(0).clamp_min(1.0)
    return (values @ one_hot) / counts
