"""Latent-frame -> DenseDPO segment mapping (vidpo.data.segments)."""
import itertools
import math

import pytest
import torch

from vidpo.data.segments import (num_segments, segment_frame_counts, segment_ids, segment_mean, segment_one_hot,
                                 validate_segment_ids)


def majority_reference(num_latent_frames, frames_per_segment, k):
    """Brute force: enumerate each latent frame's pixel frames, take the majority pixel segment
    (ties to the earlier one), then merge a short trailing segment. Whole ``frames_per_segment`` only."""
    ids = []
    for j in range(num_latent_frames):
        pixels = [0] if j == 0 else list(range((j - 1) * k + 1, j * k + 1))
        votes = {}
        for p in pixels:
            votes[p // frames_per_segment] = votes.get(p // frames_per_segment, 0) + 1
        best = max(votes.values())
        ids.append(min(s for s, v in votes.items() if v == best))
    counts = [ids.count(s) for s in range(max(ids) + 1)]
    if len(counts) > 1 and counts[-1] < 0.5 * frames_per_segment / k:
        ids = [min(s, len(counts) - 2) for s in ids]
    return ids


def test_identity_compression_maps_pixel_frames_directly():
    assert segment_ids(8, fps=8, segment_seconds=0.25).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert segment_ids(8, fps=8, segment_seconds=0.5).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert segment_ids(8, fps=8, segment_seconds=1.0).tolist() == [0] * 8
    assert segment_ids(8, fps=8, segment_seconds=0.125).tolist() == list(range(8))
    assert segment_ids(8, fps=8, segment_seconds=0.25).dtype == torch.long


def test_wan_81_frames_16fps_k4():
    # 81 pixel frames = 1 + 20 * 4 -> 21 latent frames; 1 s = 16 pixel frames = 4 latent frames.
    ids = segment_ids(21, fps=16, segment_seconds=1.0, temporal_compression=4)
    assert ids.tolist() == [0] * 5 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert num_segments(ids) == 5
    assert segment_frame_counts(ids).tolist() == [5, 4, 4, 4, 4]
    # Half-second segments: 8 pixel frames = 2 latent frames each.
    half = segment_ids(21, fps=16, segment_seconds=0.5, temporal_compression=4)
    assert segment_frame_counts(half).tolist() == [3] + [2] * 9


def test_trailing_fragment_is_merged_only_when_short():
    # 7 frames in segments of 3: the last segment has 1 frame < 1.5 -> merged.
    assert segment_ids(7, fps=8, segment_seconds=3 / 8).tolist() == [0, 0, 0, 1, 1, 1, 1]
    # 8 frames in segments of 3: the last segment has 2 frames >= 1.5 -> kept.
    assert segment_ids(8, fps=8, segment_seconds=3 / 8).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    # A single short segment has nothing to merge into.
    assert segment_ids(2, fps=8, segment_seconds=1.0).tolist() == [0, 0]
    assert segment_ids(1, fps=8, segment_seconds=1.0).tolist() == [0]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_matches_brute_force_majority_rule(k):
    for frames_per_segment, num_latent in itertools.product(range(k, 3 * k + 5), range(1, 30)):
        got = segment_ids(num_latent, fps=frames_per_segment, segment_seconds=1.0, temporal_compression=k)
        assert got.tolist() == majority_reference(num_latent, frames_per_segment, k), (k, frames_per_segment, num_latent)


@pytest.mark.parametrize("fps,seconds,k", [(23.976, 1.0, 4), (24, 0.7, 4), (30, 1.3, 1), (12.5, 0.5, 2),
                                           (16, 1, 8)])
def test_result_is_contiguous_from_zero_without_empty_segments(fps, seconds, k):
    for num_latent in range(1, 60):
        ids = segment_ids(num_latent, fps, seconds, k)
        assert ids.numel() == num_latent and int(ids[0]) == 0
        steps = (ids[1:] - ids[:-1]).tolist()
        assert all(s in (0, 1) for s in steps)
        counts = segment_frame_counts(ids)
        assert bool((counts > 0).all()) and validate_segment_ids(ids, num_latent) == counts.numel()
        nominal = fps * seconds / k
        if counts.numel() > 1:
            assert counts[-1] >= 0.5 * nominal - 1e-9


def test_boundary_frames_are_not_lost_to_rounding():
    # 0.1 s * 30 fps = 3.0000000000000004 in floating point; frame 3 must start segment 1.
    assert segment_ids(6, fps=30, segment_seconds=0.1).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("args,match", [
    ((0, 8, 1.0, 1), "num_latent_frames"),
    ((8, 0, 1.0, 1), "fps"),
    ((8, 8, 0.0, 1), "segment_seconds"),
    ((8, 8, float("nan"), 1), "segment_seconds"),
    ((8, 8, 1.0, 0), "temporal_compression"),
    ((8, 16, 0.125, 4), "shorter than one latent frame"),
])
def test_bad_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        segment_ids(*args)


def test_counts_and_num_segments():
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    assert num_segments(ids) == 3
    assert segment_frame_counts(ids).tolist() == [2, 1, 3]
    assert segment_frame_counts(ids, 4).tolist() == [2, 1, 3, 0]
    assert num_segments(torch.zeros(0, dtype=torch.long)) == 0


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([1, 1, 2]), "start at 0"),
    (torch.tensor([0, 2, 2]), "contiguous"),
    (torch.tensor([0, 1, 0]), "contiguous"),
    (torch.tensor([0.0, 1.0]), "integer"),
    (torch.zeros(2, 2, dtype=torch.long), "1-D"),
])
def test_validate_rejects_bad_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        validate_segment_ids(ids)


def test_validate_checks_length():
    with pytest.raises(ValueError, match="3 entries for 4 frames"):
        validate_segment_ids(torch.tensor([0, 0, 1]), 4)


def test_segment_mean_matches_float64_loop():
    g = torch.Generator().manual_seed(0)
    ids = segment_ids(21, fps=16, segment_seconds=1.0, temporal_compression=4)
    values = torch.randn(3, 5, 21, generator=g, dtype=torch.float64, requires_grad=True)
    got = segment_mean(values, ids)
    expected = torch.stack([values[..., ids == s].mean(-1) for s in range(num_segments(ids))], -1)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    counts = segment_frame_counts(ids).double()
    torch.testing.assert_close(values.grad[0, 0], 1.0 / counts[ids])
    one_hot = segment_one_hot(ids)
    assert one_hot.shape == (21, 5) and bool((one_hot.sum(1) == 1).all())
    assert math.isclose(float(one_hot.sum()), 21.0)
