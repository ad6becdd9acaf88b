"""The VLM labeller against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/helpers/vlm_server.py).

Clips are built so that the better video of a pair is visibly brighter in a segment; the server judges
by decoding the PNG images it receives, so a correct label proves that the right frames of the right
video reached the right side of the question. Timeouts are short (0.3 s) so the file runs in seconds.
"""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from helpers.pairs_dirs import vlm_overrides, write_pairs_dir
from helpers.vlm_server import FakeVLM, Reply, brightness_verdict, judge_by_brightness
from vidpo.config import load_config
from vidpo.data.pairs import MANIFEST_FILE, PairDataError, read_manifest
from vidpo.labeling import LabelingError, PairBatch, VLMConfig, VLMLabeler, build_labeler, parse_answer
from vidpo.labeling.answer_cache import AnswerCache
from vidpo.labeling.vlm import ServerUnreachable, pick_frames
from vidpo.stages.label import BatchReader, label_pairs

FPS = 6.0
SEGMENT_SECONDS = 0.5          # 3 frames per segment
FRAMES, HEIGHT, WIDTH = 9, 6, 5  # odd sizes on purpose; S = 3
IMAGE_SIZE = 20


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


def test_malformed_replies_are_unparseable_ties_or_failures_naming_pair_and_segment(server):
    server.behaviour = _malformed
    names = ["maybe", "both", "json", "nochoices", "fine"]
    targets = [[1, 1, 1]] * 4 + [[-1, -1, -1]]
    batch = make_batch(targets, captions=[f"a green square, pair {n}" for n in names])
    result = make_labeler(server).label(batch)
    assert result.labels.tolist() == [[1, 0, 1]] * 4 + [[-1, -1, -1]]
    assert result.video_labels.tolist() == [1, 1, 1, 1, -1]
    # An answer without a verdict is a tie counted apart; a body that is no chat completion is a failure.
    assert [row[1] for row in result.status] == ["unparseable", "unparseable", "failed", "failed", "ok"]
    assert result.unparseable == 2 and result.failed == 2 and len(result.messages) == 4
    reasons = ["unparseable: reply has no decidable answer", "unparseable: reply has no decidable answer",
               "failed: reply body is not JSON", "failed: reply JSON has no choices[0].message.content"]
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
    result = make_labeler(server, timeout_s=0.3, max_retries=1).label(make_batch([[1, -1, 1], [-1, 1, -1]]))
    assert result.labels.tolist() == [[1, 0, 1], [-1, 0, -1]]
    assert result.video_labels.tolist() == [1, -1]
    assert result.failed == 2
    assert "pair 'p0' segment 1 " in result.messages[0] and "pair 'p1' segment 1 " in result.messages[1]
    assert all("timed out after 0.3 s" in m and "gave up after 2 attempts" in m for m in result.messages)


def test_unreachable_server_is_one_error_before_any_question_not_a_hang():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    labeler = VLMLabeler(VLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=0.3,
                                   max_retries=1, retry_backoff_s=0.01))
    with pytest.raises(ServerUnreachable, match=rf"cannot reach the VLM server at http://127.0.0.1:{port}/v1 "
                                                rf"\(GET http://127.0.0.1:{port}/v1/models: .*2 attempts\)"):
        labeler.label(make_batch([[1, 0, -1]]))
    assert labeler.stats.summary()["requests"] == 0   # no question was sent


def test_the_probe_passes_on_any_http_answer(server):
    """A server without ``/models`` answers 404: something is there, so labelling goes on; one probe per labeller."""
    labeler = make_labeler(server, base_url=server.base_url.replace("/v1", "/v2"))
    labeler.probe()   # 404 from the test server
    labeler = make_labeler(server)
    assert labeler.label(make_batch([[1, -1, 0]])).labels.tolist() == [[1, -1, 0]]
    labeler.label(make_batch([[1, -1, 0]]))
    assert server.probes == 2 and len(server.requests) == 12


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


# ----- the request forms of real servers -------------------------------------------------------------------------
def test_video_format_sends_one_mp4_per_video_and_its_frames_reach_the_server(server):
    result = make_labeler(server, format="video", frames_per_segment=3).label(make_batch(TARGETS))
    assert result.labels.tolist() == TARGETS and result.failed == 0
    assert len(server.requests) == 2 * len(TARGETS) * 3
    for request in server.requests:
        parts = request.body["messages"][0]["content"]
        videos = [p for p in parts if p["type"] == "video_url"]
        assert len(videos) == 2 and not any(p["type"] == "image_url" for p in parts)
        assert all(p["video_url"]["url"].startswith("data:video/mp4;base64,") for p in videos)
        # 3 frames per segment, each upscaled so the longer side is 20 (6x5 -> 20x17, padded to even 20x18).
        assert request.videos == 2 and len(request.images_a) == len(request.images_b) == 3
        assert all(frame.shape == (20, 18, 3) for frame in request.images_a + request.images_b)


def test_jpeg_images_reach_the_server(server):
    result = make_labeler(server, image_format="jpeg").label(make_batch(TARGETS))
    assert result.labels.tolist() == TARGETS and result.failed == 0
    urls = [p["image_url"]["url"] for r in server.requests for p in r.body["messages"][0]["content"]
            if p["type"] == "image_url"]
    assert urls and all(url.startswith("data:image/jpeg;base64,") for url in urls)


@pytest.mark.parametrize("answer_format, field, value", [
    ("json_schema", "response_format", None),
    ("guided_choice", "guided_choice", ["A", "B", "TIE"]),
    ("structured_outputs", "structured_outputs", {"choice": ["A", "B", "TIE"]}),
])
def test_structured_answers_are_requested_and_read(server, answer_format, field, value):
    server.behaviour = lambda r: Reply(text=json.dumps({"verdict": brightness_verdict(r)})
                                       if answer_format == "json_schema" else brightness_verdict(r))
    result = make_labeler(server, answer_format=answer_format).label(make_batch(TARGETS))
    assert result.labels.tolist() == TARGETS and result.failed == 0
    for request in server.requests:
        if value is not None:
            assert request.body[field] == value
        else:
            schema = request.body[field]["json_schema"]["schema"]
            assert request.body[field]["type"] == "json_schema"
            assert schema["properties"]["verdict"]["enum"] == ["A", "B", "TIE"]
            assert '{"verdict": V}' in request.text


def test_reasoning_model_fields_and_removed_fields(server):
    labeler = make_labeler(server, token_limit_field="max_completion_tokens", max_tokens=300, thinking_budget=200,
                           reasoning_effort="low", enable_thinking=True, drop_fields=["temperature"],
                           extra_body={"chat_template_kwargs": {"custom": 1}, "seed": 5})
    assert labeler.label(make_batch([[1, -1, 0]])).labels.tolist() == [[1, -1, 0]]
    for request in server.requests:
        body = request.body
        assert body["max_completion_tokens"] == 300 and "max_tokens" not in body and "temperature" not in body
        assert body["thinking_token_budget"] == 200 and body["reasoning_effort"] == "low" and body["seed"] == 5
        assert body["chat_template_kwargs"] == {"enable_thinking": True, "custom": 1}
    nested = make_labeler(server, enable_thinking=False, drop_fields=["chat_template_kwargs.enable_thinking"])
    assert nested.build_request("q", ["u"], ["v"])["chat_template_kwargs"] == {}


def _raw(content, finish_reason="stop", **message):
    return json.dumps({"choices": [{"index": 0, "finish_reason": finish_reason,
                                    "message": {"role": "assistant", "content": content, **message}}]}).encode()


def test_reasoning_replies_think_blocks_and_cut_replies(server):
    replies = {1: Reply(raw_body=_raw("<think>A flickers; B is steady. So")),                       # cut: no end
               2: Reply(raw_body=_raw("<think>let me compare the frames", finish_reason="length")),
               3: Reply(raw_body=_raw(None, finish_reason="length", reasoning_content="A is ... B is ..."))}
    server.behaviour = lambda r: replies[r.segment_number]
    result = make_labeler(server, max_tokens=64).label(make_batch([[1, 1, 1]]))
    assert result.labels.tolist() == [[0, 0, 0]] and result.unparseable == 3 and result.failed == 0
    assert "ends inside a <think> block" in result.messages[0]
    for message in result.messages[1:]:
        assert "cut at the token limit (max_tokens = 64) inside its reasoning" in message
        assert "raise label.vlm.max_tokens" in message
    # A template that opens the block in the prompt leaves only its end in the reply; reasoning kept apart is fine.
    server.behaviour = lambda r: Reply(raw_body=_raw(f"I compared them.</think>\n{brightness_verdict(r)}")
                                       if r.segment_number == 1 else
                                       _raw(brightness_verdict(r), reasoning_content="thinking..."))
    assert make_labeler(server).label(make_batch([[1, -1, 0]])).labels.tolist() == [[1, -1, 0]]


def test_new_config_fields_are_validated():
    with pytest.raises(ValueError, match=r"thinking_budget must be an integer in \[0, max_tokens = 100\)"):
        VLMConfig(model="m", max_tokens=100, thinking_budget=100)
    with pytest.raises(ValueError, match="drop_fields.*other than 'model' and 'messages'"):
        VLMConfig(model="m", drop_fields=["messages"])
    with pytest.raises(ValueError, match="reasoning_effort must be one of"):
        VLMConfig(model="m", reasoning_effort="extreme")
    with pytest.raises(ValueError, match="format must be one of"):
        VLMConfig(model="m", format="gif")
    assert VLMConfig(model="m").max_tokens >= 1024  # room for a reasoning model's thinking by default


# ----- the answer cache ------------------------------------------------------------------------------------------
def test_answer_cache_asks_nothing_twice_and_survives_a_torn_line(server, tmp_path):
    path = tmp_path / "vlm_answers.jsonl"
    batch = make_batch(TARGETS)
    first = VLMLabeler(make_labeler(server).config, cache=AnswerCache(path)).label_with_orders(batch)
    assert len(server.requests) == 24 and first[0].labels.tolist() == TARGETS
    again = VLMLabeler(make_labeler(server).config, cache=AnswerCache(path))
    result, orders = again.label_with_orders(batch)
    assert torch.equal(result.labels, first[0].labels) and orders == first[1]
    assert len(server.requests) == 24 and again.stats.summary()["requests"] == 0
    assert again.stats.summary()["cached_answers"] > 0
    # A kill mid-write leaves a torn last line: it is cut off (that question is asked again), the rest is kept.
    with open(path, "ab") as handle:
        handle.write(b'{"pair_id": "p0", "segm')
    cache = AnswerCache(path)
    assert len(cache) == 24 and path.read_bytes().endswith(b"\n")
    # A changed question is a new key: asked again.
    changed = VLMLabeler(make_labeler(server, prompt="Which is better in segment {segment_number}? {caption}").config,
                         cache=cache)
    changed.label(batch)
    assert len(server.requests) == 48


def test_unreadable_replies_are_cached_transport_failures_are_not(server, tmp_path):
    server.behaviour = lambda r: (Reply(text="no idea") if r.segment_number == 1 else
                                  Reply(status=503) if r.segment_number == 2 else Reply(text=brightness_verdict(r)))
    cache = AnswerCache(tmp_path / "answers.jsonl")
    labeler = VLMLabeler(make_labeler(server, max_retries=0).config, cache=cache)
    result = labeler.label(make_batch([[1, -1, 1]]))
    assert result.labels.tolist() == [[0, 0, 1]] and result.status == [["unparseable", "failed", "ok"]]
    stats = labeler.stats.summary()
    assert stats["requests"] == 4 and stats["outcomes"] == {"200": 3, "503": 1}
    asked = len(server.requests)
    server.behaviour = judge_by_brightness()
    rerun = VLMLabeler(labeler.config, cache=AnswerCache(tmp_path / "answers.jsonl"))
    assert rerun.label(make_batch([[1, -1, 1]])).labels.tolist() == [[0, -1, 1]]
    assert len(server.requests) - asked == 2  # only segment 2 (the 503) is asked again, in both orders


def test_raw_answers_of_both_orders_are_kept(server):
    server.behaviour = lambda r: Reply(text="A" if r.times_asked == 1 else brightness_verdict(r))
    result, orders = make_labeler(server, concurrency=1).label_with_orders(make_batch([[1, -1, 0]]))
    assert orders == [[["A", "B"], ["A", "A"], ["A", "TIE"]]]
    assert result.labels.tolist() == [[1, 0, 0]]


# ----- the labelling stage: producer / consumer, resumption, throughput ------------------------------------------
def _label_cfg(micro_overrides, server, *extra):
    return load_config(None, micro_overrides + vlm_overrides(server.base_url, *extra))


STAGE_TARGETS = [[1, -1], [0, 1], [-1, -1], [1, 0], [0, 0], [-1, 1], [1, 1]]


def test_label_stage_writes_throughput_answers_and_reruns_asking_nothing(server, tmp_path, micro_overrides):
    write_pairs_dir(tmp_path / "pairs", STAGE_TARGETS)
    cfg = _label_cfg(micro_overrides, server)
    stats = label_pairs(cfg, tmp_path / "pairs", batch_size=3)
    assert stats["failed_comparisons"] == 0 and stats["pairs"] == 7
    records, _ = read_manifest(tmp_path / "pairs" / MANIFEST_FILE)
    assert [r.labels for r in records] == STAGE_TARGETS
    assert all(len(r.extra["vlm_answers"]) == 2 for r in records)
    throughput = json.loads((tmp_path / "pairs" / "label.json").read_text())["throughput"]
    assert throughput["comparisons"] == 14 and throughput["requests"] == 28 and throughput["outcomes"] == {"200": 28}
    assert throughput["comparisons_per_s"] > 0 and throughput["latency_p95_s"] >= throughput["latency_p50_s"] > 0
    assert 1 <= throughput["max_in_flight"] <= 4 and throughput["mean_in_flight"] > 0
    assert len(server.requests) == 28
    again = label_pairs(cfg, tmp_path / "pairs", batch_size=3)
    assert len(server.requests) == 28 and again["throughput"]["requests"] == 0
    assert again["throughput"]["cached_answers"] == 28


def test_label_stage_resumes_from_the_partial_file_after_a_kill(server, tmp_path, micro_overrides):
    write_pairs_dir(tmp_path / "pairs", STAGE_TARGETS)
    cfg = _label_cfg(micro_overrides, server, "label.vlm.cache_answers=false")
    partial = tmp_path / "pairs" / "labels.partial.jsonl"
    rows = [{"pair_id": "p0000", "labels": [1, -1], "video_label": 0}, {"pair_id": "p0001", "labels": [0, 1],
                                                                         "video_label": 1}]
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"pair_id": "p0002", "lab')  # torn by a kill
    label_pairs(cfg, tmp_path / "pairs", batch_size=2)
    asked = {r.text.split("pair ")[1].split('"')[0] for r in server.requests}
    assert asked == {"2", "3", "4", "5", "6"}
    records, _ = read_manifest(tmp_path / "pairs" / MANIFEST_FILE)
    assert [r.labels for r in records] == STAGE_TARGETS and not partial.exists()


def test_batch_reader_reads_ahead_boundedly_and_hands_errors_to_the_consumer():
    made, pause = [], threading.Event()

    def make(recs):
        made.append(recs[0])
        if recs[0] == 5:
            raise PairDataError("shard 5 is unreadable")
        return recs

    reader = BatchReader(list(range(8)), 1, make, prefetch=2)
    batches = iter(reader)
    assert next(batches) == ([0], [0])
    pause.wait(0.3)  # the consumer "works": the reader goes ahead, but no further than the queue allows
    assert made[0] == 0 and set(made) <= {0, 1, 2, 3}   # 2 batches queued + 1 waiting to be put
    assert [next(batches)[0] for _ in range(4)] == [[1], [2], [3], [4]]
    with pytest.raises(PairDataError, match="shard 5"):
        next(batches)
    reader.close()
    assert 6 not in made
