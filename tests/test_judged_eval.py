"""Judged evaluation on pixels: vidpo.evaluation.judge, vidpo.evaluation.video_stats and the report's
side-by-side section.

Judges are deterministic fakes (one prefers the brighter video, one always says "first", flaky ones) and
the VLM labeller against the project's OpenAI-compatible stub server (tests/helpers/vlm_server.py) at
video level. The win rate's interval over prompts is checked against numbers computed by hand.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.vlm_server import FakeVLM, Reply, judge_by_brightness

from vidpo.evaluation.evaluate import mean_ci
from vidpo.evaluation.judge import (
    JudgedComparison,
    judge_videos,
    presentation_order,
    prompt_clustered_win_rate,
    video_path,
    video_stem,
)
from vidpo.evaluation.report import ReportWarning, render_judged, write_report
from vidpo.evaluation.video_stats import clip_stats, luma, paired_stats
from vidpo.evaluation.visualize import save_gif
from vidpo.labeling import Labeler, LabelResult, PairBatch, VLMConfig, VLMLabeler

FPS = 8.0
FRAMES, HEIGHT, WIDTH = 4, 8, 8

# Verdicts by prompt, for the hand computation below (+1 policy better, -1 base better, 0 tie).
HAND = {"A": [1, 1, 0, 1], "B": [-1, 0], "C": [1, -1, 1], "D": [1, 1], "E": [0, -1, 1, 1, 1]}
# By hand: y = wins + ties / 2 per prompt = 3.5, 0.5, 2, 2, 3.5 over n = 4, 2, 3, 2, 5 pairs; N = 16,
# win rate 11.5 / 16 = 0.71875; residuals y - 0.71875 n = 0.625, -0.9375, -0.15625, 0.5625, -0.09375,
# squares summing to 1.619140625; se^2 = 5/4 * 1.619140625 / 16^2; t_{0.975, 4} = 2.776.
HAND_RATE = 0.71875
HAND_CI = (0.71875 - 2.776 * math.sqrt(1.25 * 1.619140625 / 256), 0.71875 + 2.776 * math.sqrt(1.25 * 1.619140625 / 256))


def flat(table: dict) -> tuple[list[str], list[int]]:
    prompts = [p for p, verdicts in table.items() for _ in verdicts]
    return prompts, [v for verdicts in table.values() for v in verdicts]


def clips_for(verdicts: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and base clips (N, 3, F, H, W): the better one is brighter by 0.5; a tie is equally bright."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(len(verdicts), 3, FRAMES, HEIGHT, WIDTH, generator=gen) * 0.4 - 0.4
    policy = torch.rand(len(verdicts), 3, FRAMES, HEIGHT, WIDTH, generator=gen) * 0.4 - 0.4
    for i, verdict in enumerate(verdicts):
        if verdict == 1:
            policy[i] += 0.5
        elif verdict == -1:
            base[i] += 0.5
    return policy, base


# ------------------------------------------------------------------------------------------ fake judges
class BrighterJudge(Labeler):
    """Prefers the brighter video (mean over pixels); records every batch it saw."""

    name = "brighter"

    def __init__(self):
        self.batches: list[PairBatch] = []

    def label(self, batch: PairBatch) -> LabelResult:
        self.batches.append(batch)
        diff = batch.first.mean(dim=(1, 2, 3, 4)) - batch.second.mean(dim=(1, 2, 3, 4))
        verdict = (diff > 0.05).long() - (diff < -0.05).long()
        return LabelResult.from_labels(verdict.view(-1, 1).expand(-1, batch.num_segments))


class FirstJudge(Labeler):
    """Always prefers the video shown first (a maximally position-biased judge)."""

    name = "first"

    def label(self, batch: PairBatch) -> LabelResult:
        return LabelResult.from_labels(torch.ones(batch.batch_size, batch.num_segments, dtype=torch.int64))


class FlakyJudge(BrighterJudge):
    """Brighter, but the comparisons of ``broken`` pair ids fail (a tie with a message, like the VLM's)."""

    name = "flaky"

    def __init__(self, broken: set[str], name_pairs: bool = True):
        super().__init__()
        self.broken, self.name_pairs = broken, name_pairs

    def label(self, batch: PairBatch) -> LabelResult:
        labels = super().label(batch).labels.clone()
        messages = []
        for b, pair_id in enumerate(batch.pair_ids):
            if pair_id in self.broken:
                labels[b] = 0
                messages.append(f"flaky: pair {pair_id!r} segment 0: timed out" if self.name_pairs
                                else "flaky: a comparison timed out")
        return LabelResult.from_labels(labels, failed=len(messages), messages=messages)


# ---------------------------------------------------------------------------------------------- judge
def test_verdicts_map_back_to_the_policy_whatever_the_order_shown():
    prompts, expected = flat(HAND)
    policy, base = clips_for(expected)
    captions = [f"caption of {p}" for p in prompts]
    results = []
    for order_seed in (0, 1, 0):
        judge = BrighterJudge()
        result = judge_videos(judge, policy, base, captions, prompts, FPS, batch_size=5, order_seed=order_seed)
        results.append(result)
        assert result.verdicts.tolist() == expected
        assert int(result.policy_first.sum()) == len(expected) // 2
        assert result.num_failed == 0 and result.messages == []
        # Video level: one segment spanning the whole clip; the first video shown is the policy's exactly
        # where policy_first says so.
        shown = [b for batch in judge.batches for b in range(batch.batch_size)]
        assert len(shown) == len(expected) and [len(b.pair_ids) for b in judge.batches] == [5, 5, 5, 1]
        firsts = torch.cat([batch.first for batch in judge.batches])
        for batch in judge.batches:
            assert batch.segment_ids.tolist() == [0] * FRAMES and batch.fps == FPS
        for i in range(len(expected)):
            assert torch.equal(firsts[i], policy[i] if result.policy_first[i] else base[i])
        assert [c for batch in judge.batches for c in batch.captions] == captions
    assert torch.equal(results[0].policy_first, results[2].policy_first)      # reproducible
    assert not torch.equal(results[0].policy_first, results[1].policy_first)  # the seed matters
    # default seeds: the index of each pair among its prompt's pairs; pair ids are the video stems
    assert results[0].seeds == [0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    assert judge.batches[0].pair_ids[:2] == ["A_0", "A_1"]


@pytest.mark.parametrize("n", [40, 7])
def test_a_judge_that_always_says_first_gets_half_not_all(n):
    prompts = [f"p{i // 2}" for i in range(n)]
    policy, base = clips_for([1] * n)  # the policy is better everywhere; the judge does not look
    result = judge_videos(FirstJudge(), policy, base, ["c"] * n, prompts, FPS, batch_size=8)
    assert result.win_rate()["mean"] == pytest.approx((n // 2) / n)
    assert result.wins == n // 2 and result.losses == n - n // 2 and result.ties == 0
    assert result.first_shown_win_rate() == 1.0  # the bias is visible in the summary
    assert result.summary()["first_shown_win_rate"] == 1.0
    # An unbiased judge of the same pairs sees the policy win everything.
    fair = judge_videos(BrighterJudge(), policy, base, ["c"] * n, prompts, FPS, batch_size=8)
    assert fair.win_rate()["mean"] == 1.0 and fair.first_shown_win_rate() == pytest.approx((n // 2) / n)


def test_presentation_order_is_balanced_and_seeded():
    for n in (0, 1, 2, 9, 64):
        order = presentation_order(n, 3)
        assert order.dtype == torch.bool and int(order.sum()) == n // 2
        assert torch.equal(order, presentation_order(n, 3))


def test_win_rate_interval_over_prompts_against_a_hand_computation():
    prompts, verdicts = flat(HAND)
    stats = prompt_clustered_win_rate(torch.tensor(verdicts), prompts)
    assert stats["mean"] == pytest.approx(HAND_RATE, abs=1e-12)
    assert stats["ci95"] == pytest.approx(list(HAND_CI), abs=1e-12)
    assert stats["ci95"] == pytest.approx([0.471921, 0.965579], abs=1e-6)
    assert stats["n"] == 16 and stats["prompts"] == 5
    # through judge_videos, in any order of the pairs
    perm = torch.randperm(len(verdicts), generator=torch.Generator().manual_seed(0)).tolist()
    policy, base = clips_for([verdicts[i] for i in perm])
    result = judge_videos(BrighterJudge(), policy, base, ["c"] * 16, [prompts[i] for i in perm], FPS, batch_size=4)
    assert result.win_rate()["ci95"] == pytest.approx(list(HAND_CI), abs=1e-12)
    summary = result.summary()
    assert summary["win_rate"] == {"mean": 0.71875, "ci95": [round(v, 6) for v in HAND_CI]}
    assert (summary["wins"], summary["ties"], summary["losses"], summary["failed"]) == (10, 3, 3, 0)
    assert summary["pairs"] == 16 and summary["prompts"] == 5 and summary["ci_over_prompts"] == 5
    assert result.per_prompt()["B"] == {"pairs": 2, "wins": 0, "ties": 1, "losses": 1, "failed": 0, "score": 0.25}


def test_equal_pairs_per_prompt_give_mean_ci_of_the_per_prompt_scores():
    gen = torch.Generator().manual_seed(1)
    verdicts = torch.randint(-1, 2, (12 * 3,), generator=gen)
    prompts = [f"p{i // 3}" for i in range(36)]
    scores = ((verdicts.double() + 1) / 2).view(12, 3).mean(dim=1)
    reference = mean_ci(scores)
    stats = prompt_clustered_win_rate(verdicts, prompts)
    assert stats["mean"] == pytest.approx(reference["mean"], abs=1e-12)
    assert stats["ci95"] == pytest.approx([max(0, reference["ci95"][0]), min(1, reference["ci95"][1])], abs=1e-12)
    # Exact rational check of the point estimate: (wins + ties / 2) / n
    wins, ties = int((verdicts == 1).sum()), int((verdicts == 0).sum())
    assert Fraction(stats["mean"]).limit_denominator(1000) == Fraction(2 * wins + ties, 72)


def test_win_rate_edge_cases():
    one = prompt_clustered_win_rate(torch.tensor([1, 0, -1, 1]), ["p"] * 4)
    assert one["mean"] == 0.625 and one["ci95"] == [0.625, 0.625] and one["prompts"] == 1
    none = prompt_clustered_win_rate(torch.tensor([1, -1]), ["p", "q"], judged=torch.tensor([False, False]))
    assert math.isnan(none["mean"]) and none["n"] == 0
    wide = prompt_clustered_win_rate(torch.tensor([1, -1]), ["p", "q"])
    assert wide["ci95"] == [0.0, 1.0]  # clipped to [0, 1]


@pytest.mark.parametrize("name_pairs", [True, False])
def test_failed_comparisons_are_counted_apart(name_pairs):
    prompts, expected = flat(HAND)
    policy, base = clips_for(expected)
    broken = {"A_0", "C_1", "E_4"}  # verdicts +1, -1, +1
    judge = FlakyJudge(broken, name_pairs=name_pairs)
    result = judge_videos(judge, policy, base, ["c"] * 16, prompts, FPS, batch_size=6)
    failed_at = [video_stem(p, s) in broken for p, s in zip(result.prompt_ids, result.seeds)]
    assert result.failed.tolist() == failed_at and result.num_failed == 3
    assert result.verdicts.tolist() == [0 if f else v for v, f in zip(expected, failed_at)]
    assert (result.wins, result.ties, result.losses) == (8, 3, 2)
    assert result.wins + result.ties + result.losses + result.num_failed == 16
    kept = [v for v, f in zip(expected, failed_at) if not f]
    assert result.win_rate()["mean"] == pytest.approx((kept.count(1) + kept.count(0) / 2) / 13)
    assert result.win_rate() == prompt_clustered_win_rate(torch.tensor(expected), prompts, ~torch.tensor(failed_at))
    assert len(result.messages) == 3
    records = result.records()
    failed_records = [r for r in records if r["failed"]]
    assert [r["outcome"] for r in failed_records] == ["failed"] * 3
    if name_pairs:
        assert {r["message"] for r in failed_records} == {f"flaky: pair {p!r} segment 0: timed out" for p in broken}
    else:  # the messages did not say which pair failed: each pair of such a batch was asked alone
        assert len(judge.batches) > 3


def test_every_pair_failing_and_json_safety():
    policy, base = clips_for([1, -1, 0])
    result = judge_videos(FlakyJudge({"p_0", "p_1", "q_0"}), policy, base, ["c"] * 3, ["p", "p", "q"], FPS)
    assert result.num_failed == 3 and result.wins == result.ties == result.losses == 0
    summary = result.summary()
    assert summary["win_rate"] == {"mean": None, "ci95": [None, None]}
    json.dumps(summary, allow_nan=False)


def test_judged_json_round_trip(tmp_path):
    prompts, expected = flat(HAND)
    policy, base = clips_for(expected)
    result = judge_videos(FlakyJudge({"B_1"}), policy, base, [f"a {p}" for p in prompts], prompts, FPS,
                          seeds=[10 + i for i in range(16)], order_seed=5)
    path = result.save(tmp_path / "eval" / "judged.json")
    data = json.loads(path.read_text())
    assert data["summary"] == result.summary() and len(data["pairs"]) == 16
    assert data["pairs"][0]["videos"] == {"base": "videos/A_10_base.mp4", "policy": "videos/A_10_policy.mp4"}
    back = JudgedComparison.from_json(data)
    assert back.summary() == result.summary()
    assert torch.equal(back.verdicts, result.verdicts) and torch.equal(back.failed, result.failed)
    assert torch.equal(back.policy_first, result.policy_first) and back.seeds == result.seeds
    assert back.records() == result.records()


def test_layout_and_bad_input():
    assert video_stem("heldout-007", 3) == "heldout-007_3"
    digest = hashlib.sha1(b"cat on a mat!").hexdigest()[:8]
    assert video_stem("cat on a mat!", 3) == f"cat_on_a_mat_-{digest}_3"
    assert video_stem("p/1", 0) != video_stem("p_1", 0) != video_stem("p 1", 0)  # never the same file
    assert video_path("/r/eval", "p1", 0, "policy") == Path("/r/eval/videos/p1_0_policy.mp4")
    with pytest.raises(ValueError, match="role"):
        video_path("/r/eval", "p", 0, "final")
    policy, base = clips_for([1, 1])
    with pytest.raises(ValueError, match="name each pair once"):
        judge_videos(BrighterJudge(), policy, base, ["c", "c"], ["p", "p"], FPS, seeds=[1, 1])
    with pytest.raises(ValueError, match="one of each per pair"):
        judge_videos(BrighterJudge(), policy, base, ["c"], ["p", "p"], FPS)
    with pytest.raises(ValueError, match="differ in shape"):
        judge_videos(BrighterJudge(), [policy[0], policy[1]], [base[0], base[1, :, :2]], ["c"] * 2, ["p", "q"], FPS,
                     batch_size=1)
    # a list of clips works like a tensor
    listed = judge_videos(BrighterJudge(), list(policy), list(base), ["c"] * 2, ["p", "q"], FPS)
    assert listed.verdicts.tolist() == [1, 1]


# ------------------------------------------------------------------------------------- the VLM judge
def vlm_judge(server: FakeVLM) -> VLMLabeler:
    return VLMLabeler(VLMConfig(base_url=server.base_url, model="fake-vlm", timeout_s=30.0, max_retries=0,
                                retry_backoff_s=0.01, concurrency=4, frames_per_segment=2, image_size=16))


def test_vlm_judge_at_video_level(server):
    verdicts = [1, -1, 1, 0, 1, -1]
    prompts = ["cat", "cat", "dog", "dog", "fox", "fox"]
    policy, base = clips_for(verdicts)
    result = judge_videos(vlm_judge(server), policy, base, [f"a {p}" for p in prompts], prompts, FPS, batch_size=4)
    assert result.verdicts.tolist() == verdicts and result.num_failed == 0
    assert len(server.requests) == 2 * len(verdicts)  # both orders of each pair, one segment each
    for request in server.requests:
        assert "segment 1 of 1" in request.text and "seconds 0.00 to 0.50" in request.text
        assert len(request.images_a) == 2

    server.behaviour = lambda request: Reply(text="A")  # position bias: inconsistent under the swap -> ties
    biased = judge_videos(vlm_judge(server), policy, base, ["c"] * 6, prompts, FPS)
    assert biased.verdicts.tolist() == [0] * 6 and biased.num_failed == 0
    assert biased.win_rate()["mean"] == 0.5


def test_vlm_judge_failures_are_counted_with_their_pairs(server):
    judge_ok = judge_by_brightness()
    server.behaviour = lambda r: Reply(status=400) if "broken" in r.text else judge_ok(r)
    verdicts = [1, 1, -1, 1]
    prompts = ["cat", "cat", "dog", "dog"]
    captions = ["a cat", "a broken cat", "a dog", "a dog"]
    policy, base = clips_for(verdicts)
    result = judge_videos(vlm_judge(server), policy, base, captions, prompts, FPS)
    assert result.failed.tolist() == [False, True, False, False]
    assert result.verdicts.tolist() == [1, 0, -1, 1]
    assert (result.wins, result.ties, result.losses, result.num_failed) == (2, 0, 1, 1)
    assert len(result.messages) == 1 and "'cat_1'" in result.messages[0] and "HTTP 400" in result.messages[0]
    assert result.records()[1]["message"] == result.messages[0]


# --------------------------------------------------------------------------------------- video stats
def square_clip(frames: int = 6, size: int = 16, side: int = 4) -> torch.Tensor:
    """(1, 3, F, size, size): a white square moving one pixel right per frame over black."""
    clip = -torch.ones(1, 3, frames, size, size)
    for t in range(frames):
        clip[0, :, t, 5:5 + side, 2 + t:2 + t + side] = 1.0
    return clip


def test_stats_of_synthetic_clips():
    static = torch.rand(2, 3, 1, 12, 10).expand(-1, -1, 5, -1, -1)
    stats = clip_stats(static)
    assert set(stats) == {"flicker", "frame_diff", "motion"}
    assert all(v.tolist() == [0.0, 0.0] for v in stats.values())

    square = clip_stats(square_clip())
    # Each step changes the leading and trailing columns of the square: 2 * 4 pixels of 16 * 16, by 1.
    assert square["motion"].item() == pytest.approx(8 / 256, abs=1e-12)
    assert square["frame_diff"].item() == pytest.approx(8 / 256, abs=1e-6)
    assert square["flicker"].item() == pytest.approx(0.0, abs=1e-6)  # the mean brightness does not change

    alternating = torch.rand(1, 3, 1, 8, 8) * 0.2 - 0.1
    alternating = alternating + torch.tensor([-0.8, 0.8] * 3).view(1, 1, 6, 1, 1)  # dark, bright, dark, ..
    flick = clip_stats(alternating)
    assert flick["flicker"].item() == pytest.approx(0.8, abs=1e-6)  # luma jumps by 1.6 / 2
    assert flick["frame_diff"].item() == pytest.approx(0.8, abs=1e-6)
    assert flick["motion"].item() == 0.0  # a uniform change is no motion

    ramp = torch.zeros(1, 3, 4, 6, 6) + torch.tensor([-0.3, -0.1, 0.1, 0.3]).view(1, 1, 4, 1, 1)
    assert clip_stats(ramp)["flicker"].item() == pytest.approx(0.1, abs=1e-6)


def test_luma_weights_and_bad_clips():
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1, 1).expand(1, 3, 2, 1, 1)
    assert luma(red).flatten().tolist() == pytest.approx([0.299, 0.299])
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        clip_stats(torch.zeros(3, 4, 8, 8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        clip_stats(torch.zeros(1, 3, 1, 8, 8))


def test_paired_stats_are_paired_differences_with_mean_ci():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(6, 3, 5, 8, 8, generator=gen) * 2 - 1
    policy = (base + 0.3 * (torch.rand(6, 3, 5, 8, 8, generator=gen) - 0.5)).clamp(-1, 1)
    out = paired_stats(policy, base)
    ps, bs = clip_stats(policy), clip_stats(base)
    for name in ("flicker", "frame_diff", "motion"):
        assert out[name]["policy"] == pytest.approx(ps[name].mean().item())
        assert out[name]["base"] == pytest.approx(bs[name].mean().item())
        assert out[name]["delta"] == mean_ci(ps[name] - bs[name])
    # precomputed statistics of batches, concatenated, give the same answer
    halves = [clip_stats(policy[:3]), clip_stats(policy[3:])]
    joined = {k: torch.cat([h[k] for h in halves]) for k in halves[0]}
    assert paired_stats(joined, bs) == out
    with pytest.raises(ValueError, match="same non-zero count"):
        paired_stats(clip_stats(policy[:2]), bs)


# -------------------------------------------------------------------------------------------- report
def write_mp4(clip: torch.Tensor, path: Path, fps: int = 8) -> None:
    """(3, F, H, W) in [-1, 1] -> an H.264 mp4: the engine's writer, else PyAV directly."""
    av = pytest.importorskip("av")
    try:
        from vidpo.data.video_io import write_mp4 as engine_write_mp4
    except ImportError:
        engine_write_mp4 = None
    if engine_write_mp4 is not None:
        engine_write_mp4(path, clip, fps)
        return
    frames = ((clip.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class _Media(HTMLParser):
    def __init__(self):
        super().__init__()
        self.videos, self.images, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "video":
            self.videos.append(dict(attrs))
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Media:
    media = _Media()
    media.feed(path.read_text(encoding="utf-8"))
    return media


@pytest.fixture
def judged_run(tmp_path):
    run = tmp_path / "run 1"  # a space: references must be URL-quoted
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 0.5}) + "\n")
    prompts, verdicts = ["red cat", "red cat", "blue-dog", "blue-dog"], [1, -1, 0, 1]
    policy, base = clips_for(verdicts)
    policy = torch.nn.functional.interpolate(policy.flatten(1, 2), size=(16, 16)).view(4, 3, FRAMES, 16, 16)
    base = torch.nn.functional.interpolate(base.flatten(1, 2), size=(16, 16)).view(4, 3, FRAMES, 16, 16)
    result = judge_videos(FlakyJudge({"blue-dog_1"}), policy, base, [f"a {p}" for p in prompts], prompts, FPS)
    eval_dir = run / "eval"
    result.save(eval_dir / "judged.json")
    for i, (prompt, seed) in enumerate(zip(result.prompt_ids, result.seeds)):
        for role, clips in (("base", base), ("policy", policy)):
            if (i, role) != (2, "policy"):  # one video missing
                write_mp4(clips[i], video_path(eval_dir, prompt, seed, role))
    return run, result


def test_report_shows_the_pairs_side_by_side_with_verdicts(judged_run):
    run, result = judged_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportWarning)
        page = parse(write_report(run))
    sources = [v["src"] for v in page.videos]
    expected = [f"eval/videos/{video_stem(p, s)}_{role}.mp4" for p, s in zip(result.prompt_ids, result.seeds)
                for role in ("base", "policy")]
    expected.remove(f"eval/videos/{video_stem('blue-dog', 0)}_policy.mp4")  # not written
    assert expected[0] == "eval/videos/red_cat-" + hashlib.sha1(b"red cat").hexdigest()[:8] + "_0_base.mp4"
    assert sources == expected
    assert all((run / s).is_file() and (run / s).stat().st_size > 0 for s in expected)
    assert all("controls" in v for v in page.videos)
    text = " ".join(" ".join(page.text).split())
    summary = result.summary()
    assert "Win rate of the policy over the base: 0.5" in text  # (1 win + 1 tie / 2) / 3 judged pairs
    assert f"95% CI {summary['win_rate']['ci95'][0]:.4g} to {summary['win_rate']['ci95'][1]:.4g}" in text
    assert "1 wins, 1 ties, 1 losses, 1 failed of 4 pairs" in text and "judge: flaky" in text
    for outcome in ("policy better", "base better", "tie", "comparison failed"):
        assert outcome in text
    assert "flaky: pair 'blue-dog_1' segment 0: timed out" in text
    assert "a red cat" in text and "prompt blue-dog, seed 1" in text
    assert "missing: videos/blue-dog_0_policy.mp4" in text  # the placeholder and the note
    assert "policy video 'videos/blue-dog_0_policy.mp4' missing" in text


def test_report_without_judged_json_shows_video_pairs_and_gifs(judged_run):
    run, _ = judged_run
    (run / "eval" / "judged.json").write_text("{not json")
    save_gif(torch.zeros(1, 3, 2, 4, 4), run / "eval" / "videos" / "green_0_base.gif")
    save_gif(torch.ones(1, 3, 2, 4, 4), run / "eval" / "videos" / "green_0_policy.gif")
    with pytest.warns(ReportWarning, match="not a readable judged comparison"):
        html, notes = render_judged(run)
    assert "Win rate" not in html and len(notes) == 1
    page = _Media()
    page.feed(html)
    stems = [video_stem("blue-dog", 1), video_stem("red cat", 0), video_stem("red cat", 1)]  # blue-dog_0: no policy
    assert [v["src"] for v in page.videos] == [f"eval/videos/{s}_{r}.mp4" for s in stems for r in ("base", "policy")]
    assert [i["src"] for i in page.images] == ["eval/videos/green_0_base.gif", "eval/videos/green_0_policy.gif"]


def test_report_without_eval_dir_has_no_section(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 0.5}) + "\n")
    assert render_judged(tmp_path) == ("", [])
    assert "<video" not in write_report(tmp_path).read_text()


def test_decoding_is_dealt_to_the_ranks_by_decode_batch():
    from types import SimpleNamespace

    from vidpo.models.vae import IdentityVAE
    from vidpo.stages.judged_eval import decode_split

    class CountingVAE(IdentityVAE):
        def __init__(self):
            super().__init__()
            self.batches = []

        def decode(self, latents):
            self.batches.append(latents.shape[0])
            return super().decode(latents)

    latents = torch.rand(7, 3, 2, 4, 4) * 2 - 1
    one = dict(decode_split(IdentityVAE(), latents, 3, None))
    assert sorted(one) == list(range(7))
    seen = {}
    for rank in range(2):
        vae = CountingVAE()
        got = dict(decode_split(vae, latents, 3, SimpleNamespace(rank=rank, world_size=2)))
        assert vae.batches == ([3, 1] if rank == 0 else [3])     # batches [0, 3) and [6, 7) / [3, 6)
        assert not set(got) & set(seen)
        seen.update(got)
    assert sorted(seen) == list(range(7)) and all(torch.equal(seen[k], one[k]) for k in range(7))
