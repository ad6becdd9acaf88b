"""Dual-IPO's votes from the served judge (``iterate.vote_source: judge``, vidpo.ipo.dual.judge_votes): K sampled
judgements of the VLM, each a distinct request (its own seed, at the voting temperature) asked in both orders;
the pseudo-label is the mode over the passes; the answers are cached, so a rerun asks nothing.

The server is the HTTP stub of ``helpers.vlm_server`` on 127.0.0.1. Its judge here is noisy on purpose: it answers
the brightness verdict unless a hash of (seed, pair) says to flip it, so single passes disagree and the mode over
passes is what recovers the brightness order."""
from __future__ import annotations

import hashlib

import pytest
import torch

from helpers.vlm_server import Reply, brightness_verdict
from vidpo.config import ConfigError, load_config
from vidpo.data.video_rows import VideoRows
from vidpo.ipo.dual import judge_votes, vote_batch_pairs
from vidpo.labeling import VLMConfig
from vidpo.labeling.answer_cache import AnswerCache

FRAMES, SIZE, FPS = 8, 16, 8.0
SEGMENTS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def noisy_judge(flip_rate: float):
    """The brightness verdict, flipped (A <-> B) for a hash of (request seed, question) below ``flip_rate``."""
    def behaviour(request):
        verdict = brightness_verdict(request)
        digest = hashlib.sha256(f"{request.body.get('seed')}|{request.text}".encode()
                                + request.images_a[0].tobytes()).digest()
        if int.from_bytes(digest[:8], "little") / 2 ** 64 < flip_rate:
            verdict = {"A": "B", "B": "A", "TIE": "TIE"}[verdict]
        return Reply(text=verdict)
    return behaviour


def pool(n: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """2n uint8 videos of uniform brightness; pair i = (video i, video n + i); +1 where the first is brighter."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(20, 236, (2 * n,), generator=g)
    levels[n:] = torch.where(torch.rand(n, generator=g) < 0.5, levels[:n] - 60, levels[:n] + 60).clamp(0, 255)
    videos = levels.view(-1, 1, 1, 1, 1).expand(2 * n, 3, FRAMES, SIZE, SIZE).to(torch.uint8).contiguous()
    first, second = torch.arange(n), torch.arange(n, 2 * n)
    truth = torch.sign(levels[:n] - levels[n:]).to(torch.int64)
    return videos, [f"prompt {i % 3}" for i in range(2 * n)], first, second, truth


def config(server) -> VLMConfig:
    return VLMConfig(base_url=server.base_url, model="fake-vlm", timeout_s=5, max_retries=0, concurrency=4,
                     frames_per_segment=2, image_size=16)


def test_judge_votes_are_k_sampled_judgements_whose_mode_recovers_the_order(server, tmp_path):
    videos, captions, first, second, truth = pool(12)
    server.behaviour = noisy_judge(0.25)
    cache = AnswerCache(tmp_path / "vlm_votes.jsonl")
    votes = judge_votes(config(server), videos, captions, first, second, SEGMENTS, FPS, passes=5, seed=3,
                        temperature=0.7, granularity="segment", cache=cache)
    assert votes.passes.shape == (5, 12) and votes.labels.shape == (12, 2)
    # every pass asked every pair, segment and order once, at the voting temperature, with its own seed
    assert len(server.requests) <= 5 * 12 * 2 * 2
    seeds = {r.body["seed"] for r in server.requests}
    assert len(seeds) == 5 and {r.body["temperature"] for r in server.requests} == {0.7}
    # single passes disagree (order-inconsistent answers are that pass' ties); the mode is right
    single = (votes.passes == truth).double().mean(dim=1)
    majority = (votes.video_labels == truth).double().mean()
    assert single.min() < 1.0 and majority >= single.mean() and majority >= 0.9, (single, majority)
    assert ((votes.agreement >= 0) & (votes.agreement <= 1)).all() and votes.agreement.max() == 1.0
    # the answers are cached per pass: the same votes again without a request
    asked = len(server.requests)
    again = judge_votes(config(server), videos, captions, first, second, SEGMENTS, FPS, passes=5, seed=3,
                        temperature=0.7, granularity="segment", cache=AnswerCache(tmp_path / "vlm_votes.jsonl"),
                        batch_size=5)    # other batches: the same questions, the same votes
    assert len(server.requests) == asked and torch.equal(again.passes, votes.passes)


def test_judge_batches_hold_a_bounded_number_of_bytes():
    small = torch.zeros(4, 3, 8, 16, 16, dtype=torch.uint8)               # 6 KiB a video: the cap of 64 pairs
    assert vote_batch_pairs(small) == 64
    per_video = 3 * 8 * 16 * 16
    assert vote_batch_pairs(small, budget=10 * 2 * per_video) == 10 and vote_batch_pairs(small, budget=1) == 1
    rows = VideoRows.of_tensor(small)                                       # a pool read on demand: one video read
    assert vote_batch_pairs(rows, budget=3 * 2 * per_video) == 3


def test_judge_votes_need_a_positive_temperature_and_a_judge():
    with pytest.raises(ConfigError, match="vote_temperature"):
        load_config(None, ["iterate.vote_temperature=0"])
    cfg = load_config(None, ["iterate.vote_source=judge"])
    assert cfg.iterate.vote_source == "judge" and cfg.iterate.vote_temperature == 0.7
