"""The VLM labeller against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/helpers/vlm_server.py).

Clips are built so that the better video of a pair is visibly brighter in a segment; the server judges
by decoding the PNG images it receives, so a correct label proves that the right frames of the right
video reached the right side of the question. Timeouts are short (0.3 s) so the file runs in seconds.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from helpers.vlm_server import FakeVLM, Reply, brightness_verdict, judge_by_brightness
from vidpo.labeling import LabelingError, PairBatch, VLMConfig, VLMLabeler, build_labeler, parse_answer
from vidpo.labeling.vlm import pick_frames

FPS = 6.0
SEGMENT_SECONDS = 0.5          # 3 frames per segment
FRAMES, HEIGHT, WIDTH = 9, 6, 5  # odd sizes on purpose; S = 3
IMAGE_SIZE = 20
MODULE_BUDGET_S = 10.0


def make_segment_ids(frames: int = FRAMES) -> torch.Tensor:
    try:
        from vidpo.data.segments import segment_ids
    except ImportError:
        return torch.arange(frames) // int(FPS * SEGMENT_SECONDS)
    return segment_ids(frames, FPS, SEGMENT_SECONDS, 1)


def make_batch(targets: list[list[int]], captions=None, seed: int = 0) -> PairBatch:
    """Pairs whose segment s of the better video is brighter by 0.6 (in [-1, 1] units) when targets[b][s]
    is +1 (first better) or -1 (second better); a 0 leaves two equally bright random textures."""
    gen = torch.Generator().manual_seed(seed)
    seg = make_segment_ids()
    batch = len(targets)
    first = torch.rand(batch, 3, FRAMES, HEIGHT, WIDTH, generator=gen) * 0.5 - 0.5
    second = torch.rand(batch, 3, FRAMES, HEIGHT, WIDTH, generator=gen) * 0.5 - 0.5
    for b, row in enumerate(targets):
        for s, y in enumerate(row):
            frames = seg == s
            if y == 1:
                first[b, :, frames] += 0.6
            elif y == -1:
                second[b, :, frames] += 0.6
    captions = captions or [f"a red square moving right, pair {b}" for b in range(batch)]
    return PairBatch(first=first, second=second, captions=captions, pair_ids=[f"p{b}" for b in range(batch)],
                     segment_ids=seg, fps=FPS)


def make_labeler(server: FakeVLM, **options) -> VLMLabeler:
    settings = dict(base_url=server.base_url, model="fake-vlm", timeout_s=0.3, max_retries=1,
                    retry_backoff_s=0.01, concurrency=4, frames_per_segment=2, image_size=IMAGE_SIZE)
    settings.update(options)
    return VLMLabeler(VLMConfig(**settings))


@pytest.fixture(scope="module", autouse=True)
def module_budget():
    """The whole file must stay fast: timeouts and retries are short, requests run concurrently."""
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < MODULE_BUDGET_S, f"VLM labeller tests took {elapsed:.1f} s (budget {MODULE_BUDGET_S} s)"


@pytest.fixture
def server():
    fake = FakeVLM()
    yield fake
    fake.close()
    assert not fake.schema_errors, f"the labeller sent malformed requests: {fake.schema_errors[:3]}"


TARGETS = [[1, -1, 0], [1, 1, -1], [0, 0, 0], [-1, 0, 0]]
VIDEO_LABELS = [0, 1, 0, -1]


@pytest.mark.parametrize("wrap", ["{}", "Video {}", "The answer is **{}**.", "<think>hmm</think>\n{}"])
def test_correct_answers_give_segment_labels_and_majority_vote(server, wrap):
    lower = wrap == "{}"
    server.behaviour = (lambda r: Reply(text=brightness_verdict(r).lower())) if lower else judge_by_brightness(wrap)
    result = make_labeler(server).label(make_batch(TARGETS))
    assert result.labels.dtype == torch.int64
    assert result.labels.tolist() == TARGETS
    assert result.video_labels.tolist() == VIDEO_LABELS
    assert result.failed == 0 and result.messages == []
    # Every (pair, segment) is asked exactly twice: once per order.
    assert len(server.requests) == 2 * len(TARGETS) * 3


def test_requests_follow_the_chat_completions_schema(server):
    batch = make_batch([[1, -1, 0]], captions=["a blue circle moving up"])
    make_labeler(server, temperature=0.2, max_tokens=7, extra_body={"seed": 3}).label(batch)
    assert len(server.requests) == 6
    for request in server.requests:
        assert request.body["model"] == "fake-vlm"
        assert request.body["temperature"] == 0.2 and request.body["max_tokens"] == 7
        assert request.body["seed"] == 3
        assert "a blue circle moving up" in request.text and "Answer with exactly one of: A, B, TIE" in request.text
        assert "Authorization" not in request.headers
        # 2 frames per segment, upscaled so the longer side is IMAGE_SIZE (6x5 -> 20x17).
        assert len(request.images_a) == 2
        assert all(image.shape == (20, 17, 3) for image in request.images_a + request.images_b)
    middle = [r for r in server.requests if r.segment_number == 2]
    assert len(middle) == 2 and all("segment 2 of 3 (seconds 0.50 to 1.00)" in r.text for r in middle)


def _uint8_frames(clip: torch.Tensor, frames: list[int]) -> list[np.ndarray]:
    """Independent reference of what a frame looks like as an 8-bit RGB image (no resizing)."""
    pixels = ((clip[:, frames].double() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [pixels[:, i].permute(1, 2, 0).numpy() for i in range(len(frames))]


def test_each_question_shows_the_segments_frames_in_both_orders(server):
    batch = make_batch([[1, -1, 0]])
    make_labeler(server, image_size=0, frames_per_segment=2, concurrency=1).label(batch)
    picked = {1: [0, 2], 2: [3, 5], 3: [6, 8]}
    for segment_number, frames in picked.items():
        straight, swapped = [r for r in server.requests if r.segment_number == segment_number]
        first, second = _uint8_frames(batch.first[0], frames), _uint8_frames(batch.second[0], frames)
        assert all(np.array_equal(x, y) for x, y in zip(straight.images_a, first))
        assert all(np.array_equal(x, y) for x, y in zip(straight.images_b, second))
        assert all(np.array_equal(x, y) for x, y in zip(swapped.images_a, second))
        assert all(np.array_equal(x, y) for x, y in zip(swapped.images_b, first))


def test_images_show_the_segments_own_frames():
    seg = make_segment_ids()
    assert pick_frames(torch.nonzero(seg == 1).flatten(), 2) == [3, 5]
    assert pick_frames(torch.nonzero(seg == 2).flatten(), 3) == [6, 7, 8]
    assert pick_frames(torch.nonzero(seg == 0).flatten(), 10) == [0, 1, 2]
    assert pick_frames(torch.arange(10, 20), 4) == [10, 13, 16, 19]


@pytest.mark.parametrize("answer", ["A", "B"])
def test_position_bias_is_inconsistent_under_order_swap_and_gives_ties(server, answer):
    server.behaviour = lambda r: Reply(text=answer)
    result = make_labeler(server).label(make_batch(TARGETS))
    assert result.labels.tolist() == [[0, 0, 0]] * 4
    assert result.video_labels.tolist() == [0, 0, 0, 0]
    assert result.failed == 0  # disagreement is a tie, not a failure


def test_only_order_consistent_segments_keep_their_label(server):
    # Correct in segment 2; in segments 1 and 3 the second question (the swapped order) gets the opposite
    # answer, so the two verdicts disagree and the segment is a tie.
    opposite = {"A": "B", "B": "A", "TIE": "A"}
    server.behaviour = lambda r: Reply(text=brightness_verdict(r) if r.segment_number == 2 or r.times_asked == 1
                                       else opposite[brightness_verdict(r)])
    result = make_labeler(server).label(make_batch([[1, -1, 1], [-1, 1, 0]]))
    assert result.labels.tolist() == [[0, -1, 0], [0, 1, 0]]
    assert result.video_labels.tolist() == [-1, 1]
    assert result.failed == 0


def test_consistent_flips_are_kept_and_ties_mislabelled_once_become_ties(server):
    # A model that is wrong but order-consistent keeps its (wrong) label: the check tests consistency, not
    # truth. A model that says "TIE" in one order and "A" in the other gives a tie.
    server.behaviour = lambda r: Reply(text={"A": "B", "B": "A", "TIE": "A"}[brightness_verdict(r)])
    result = make_labeler(server).label(make_batch([[1, -1, 0]]))
    assert result.labels.tolist() == [[-1, 1, 0]]


def _malformed(request):
    caption = request.text
    if request.segment_number != 2:
        return Reply(text=brightness_verdict(request))
    if "pair maybe" in caption:
        return Reply(text="I think maybe")
    if "pair both" in caption:
        return Reply(text="Video A is worse than Video B")
    if "pair json" in caption:
        return Reply(raw_body=b'{"choices": [ this is not json')
    if "pair nochoices" in caption:
        return Reply(raw_body=json.dumps({"id": "x", "object": "chat.completion"}).encode())
    return Reply(text=brightness_verdict(request))


def test_malformed_replies_are_counted_failures_naming_pair_and_segment(server):
    server.behaviour = _malformed
    names = ["maybe", "both", "json", "nochoices", "fine"]
    targets = [[1, 1, 1]] * 4 + [[-1, -1, -1]]
    batch = make_batch(targets, captions=[f"a green square, pair {n}" for n in names])
    result = make_labeler(server).label(batch)
    assert result.labels.tolist() == [[1, 0, 1]] * 4 + [[-1, -1, -1]]
    assert result.video_labels.tolist() == [1, 1, 1, 1, -1]
    assert result.failed == 4 and len(result.messages) == 4
    reasons = ["no decidable answer", "no decidable answer", "not JSON", "no choices[0].message.content"]
    for b, (message, reason) in enumerate(zip(result.messages, reasons)):
        assert f"pair 'p{b}' segment 1 " in message and reason in message, message
    assert "'I think maybe'" in result.messages[0]
    # A malformed reply is not retried (it would not change), and the swapped order is then not asked.
    failing = [r for r in server.requests if r.segment_number == 2 and "pair fine" not in r.text]
    assert len(failing) == 4


def test_on_error_raise_stops_at_a_failure(server):
    server.behaviour = _malformed
    batch = make_batch([[1, 1, 1]], captions=["pair maybe"])
    with pytest.raises(LabelingError, match=r"pair 'p0' segment 1 .*no decidable answer"):
        make_labeler(server, on_error="raise").label(batch)


def test_http_500_then_success_is_retried(server):
    server.behaviour = lambda r: Reply(status=500) if r.attempt == 1 else Reply(text=brightness_verdict(r))
    result = make_labeler(server, max_retries=2).label(make_batch(TARGETS))
    assert result.labels.tolist() == TARGETS and result.failed == 0
    assert len(server.requests) == 2 * 2 * len(TARGETS) * 3  # every question failed once, then succeeded


def test_persistent_http_errors_exhaust_retries(server):
    server.behaviour = lambda r: Reply(status=503) if r.segment_number == 3 else Reply(text=brightness_verdict(r))
    result = make_labeler(server, max_retries=2).label(make_batch([[1, 1, 1]]))
    assert result.labels.tolist() == [[1, 1, 0]]
    assert result.failed == 1
    assert "pair 'p0' segment 2 " in result.messages[0]
    assert "HTTP 503" in result.messages[0] and "gave up after 3 attempts" in result.messages[0]
    assert sum(r.segment_number == 3 for r in server.requests) == 3


def test_client_errors_are_not_retried(server):
    server.behaviour = lambda r: Reply(status=401) if r.segment_number == 1 else Reply(text=brightness_verdict(r))
    result = make_labeler(server, max_retries=3).label(make_batch([[1, -1, 1]]))
    assert result.labels.tolist() == [[0, -1, 1]]
    assert result.failed == 1 and "HTTP 401" in result.messages[0] and "not retried" in result.messages[0]
    assert sum(r.segment_number == 1 for r in server.requests) == 1


def test_a_reply_slower_than_the_timeout_is_a_counted_failure(server):
    server.behaviour = lambda r: Reply(text=brightness_verdict(r), delay_s=1.0 if r.segment_number == 2 else 0.0)
    start = time.monotonic()
    result = make_labeler(server, timeout_s=0.3, max_retries=1).label(make_batch([[1, -1, 1], [-1, 1, -1]]))
    elapsed = time.monotonic() - start
    assert result.labels.tolist() == [[1, 0, 1], [-1, 0, -1]]
    assert result.video_labels.tolist() == [1, -1]
    assert result.failed == 2
    assert "pair 'p0' segment 1 " in result.messages[0] and "pair 'p1' segment 1 " in result.messages[1]
    assert all("timed out after 0.3 s" in m and "gave up after 2 attempts" in m for m in result.messages)
    assert elapsed < 2.0, f"two 0.3 s attempts per failing question took {elapsed:.2f} s"


def test_unreachable_server_is_a_failure_not_a_hang():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    labeler = VLMLabeler(VLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=0.3,
                                   max_retries=1, retry_backoff_s=0.01))
    result = labeler.label(make_batch([[1, 0, -1]]))
    assert result.labels.tolist() == [[0, 0, 0]] and result.failed == 3
    assert all("cannot reach" in m for m in result.messages)


def test_requests_run_concurrently_up_to_the_limit(server):
    server.behaviour = lambda r: Reply(text=brightness_verdict(r), delay_s=0.05)
    result = make_labeler(server, concurrency=3).label(make_batch(TARGETS))
    assert result.labels.tolist() == TARGETS
    assert 2 <= server.max_in_flight <= 3


def test_authorization_header_comes_from_the_named_environment_variable(server, monkeypatch):
    monkeypatch.setenv("VIDPO_TEST_VLM_KEY", "sk-test-123")
    make_labeler(server, api_key_env="VIDPO_TEST_VLM_KEY").label(make_batch([[1, 0, 0]]))
    assert server.requests and all(r.headers.get("Authorization") == "Bearer sk-test-123" for r in server.requests)
    monkeypatch.delenv("VIDPO_TEST_VLM_KEY")
    with pytest.raises(LabelingError, match=r"\$VIDPO_TEST_VLM_KEY.*not set"):
        make_labeler(server, api_key_env="VIDPO_TEST_VLM_KEY")


def test_the_test_server_rejects_requests_off_the_schema(server):
    """The schema check of the fake server can fail (so the fixture's 'no schema errors' means something)."""
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(server.base_url + "/chat/completions", data=bad,
                                     headers={"Content-Type": "application/json"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as caught:
        opener.open(request, timeout=2)
    assert caught.value.code == 400
    assert server.schema_errors == ["body must be an object with a non-empty string 'model'"]
    server.schema_errors.clear()


@pytest.mark.parametrize("reply, expected", [
    ("A", "A"), ("b", "B"), (" TIE\n", "TIE"), ("**B**", "B"), ("Video A.", "A"), ("(a)", "A"),
    ("Answer: b", "B"), ("The final answer is Video A", "A"), ("Video B looks sharper.", "B"),
    ("Both are equally good, so it is a tie.", "TIE"), ("<think>A has flicker, B does not</think>\nB", "B"),
    ("I think maybe", None), ("", None), ("Video A is worse than Video B", None), ("<think>A or B", None),
    ("C", None),
])
def test_parse_answer(reply, expected):
    assert parse_answer(reply) == expected


def test_config_is_validated_with_clear_messages():
    with pytest.raises(ValueError, match="model is required"):
        VLMConfig()
    with pytest.raises(ValueError, match=r"unknown placeholder \{video\}"):
        VLMConfig(model="m", prompt="which {video} is better?")
    with pytest.raises(ValueError, match="on_error must be one of"):
        VLMConfig(model="m", on_error="ignore")
    with pytest.raises(ValueError, match=r"unknown option 'modle' \(did you mean 'model'\?\)"):
        build_labeler("vlm", modle="m")
    labeler = build_labeler("vlm", model="m", concurrency=2)
    assert isinstance(labeler, VLMLabeler) and labeler.config.concurrency == 2
    with pytest.raises(NotImplementedError, match="cannot score a single video"):
        labeler.label_pointwise(torch.zeros(1, 3, FRAMES, HEIGHT, WIDTH), ["x"], make_segment_ids())
