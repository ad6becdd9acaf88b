"""The VLM labeller against a real server: ``transformers serve`` on 127.0.0.1 over a tiny random LLaVA built here
(``helpers.llava_serve``), offline.

The model's answers are random text, so these tests check what a real server does with the labeller's requests:
every request of the formats it accepts gets HTTP 200, its image processor turns every image into image tokens,
an unusable answer becomes a counted unparseable tie (never a crash), forced answers (``logit_bias``) are read, a
refused form is a counted failure naming the HTTP error, and a rerun with the answer cache sends nothing (counted by the
labeller and in the server's own access log). What ``transformers serve`` 5.23 accepts and refuses is pinned in
``test_request_fields_the_server_accepts_and_refuses``. The server is started once per module by a fixture
(random free port, ready when ``/health`` answers, killed on teardown) and the module is skipped without the
``transformers[serving]`` extra.
"""
from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.llava_serve import IMAGE_TOKENS, TransformersServer, build_tiny_llava, serve_unavailable, token_id
from helpers.pairs_dirs import FRAMES, SEGMENTS, blank_recipe, brightness_clips, vlm_overrides, write_pairs_dir
from vidpo.cli import main
from vidpo.labeling import PairBatch, VLMConfig, VLMLabeler
from vidpo.labeling.answer_cache import AnswerCache

FPS = 4.0
UNUSABLE = re.compile(r"no decidable answer|cut at the token limit")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    reason = serve_unavailable()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("tiny_llava")
    server = TransformersServer(build_tiny_llava(root / "model"), root / "serve.log")
    yield server
    server.close()


def make_batch(pairs: int, seed: int = 0) -> PairBatch:
    first, second = brightness_clips([[1, -1]] * pairs, seed)
    return PairBatch(first=first, second=second, captions=[f"a square, pair {b}" for b in range(pairs)],
                     pair_ids=[f"p{b}" for b in range(pairs)],
                     segment_ids=torch.arange(FRAMES) // (FRAMES // SEGMENTS), fps=FPS)


def make_labeler(served, cache=None, **options) -> VLMLabeler:
    settings = dict(base_url=served.base_url, model=served.model, timeout_s=60, max_retries=0, concurrency=2,
                    frames_per_segment=2, image_size=16, max_tokens=8)
    settings.update(options)
    return VLMLabeler(VLMConfig(**settings), cache=cache)


def accepted_posts(served) -> int:
    """POSTs the server answered with 200, from its own access log."""
    return served.log_tail(10 ** 9).count('"POST /v1/chat/completions HTTP/1.1" 200')


def post(served, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(served.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {}


def assert_usable_or_counted(result, labeler, comparisons: int) -> None:
    """Every comparison is answered (200) and gives a label, or an unparseable answer (a counted tie) whose message
    says the answer was unusable; nothing failed."""
    stats = labeler.stats.summary()
    assert stats["outcomes"] == {"200": stats["requests"]}, stats["outcomes"]
    assert comparisons <= stats["requests"] <= 2 * comparisons
    assert result.failed == 0 and result.unparseable == len(result.messages)
    assert all(UNUSABLE.search(message) for message in result.messages), result.messages[:3]
    for message in result.messages:
        pair, segment = re.search(r"pair 'p(\d+)' segment (\d+)", message).groups()
        assert result.labels[int(pair), int(segment)] == 0


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_every_comparison_is_accepted_in_each_image_format(served, image_format):
    labeler = make_labeler(served, image_format=image_format)
    result = labeler.label(make_batch(3))
    assert_usable_or_counted(result, labeler, comparisons=3 * SEGMENTS)


def test_the_servers_image_processor_turns_every_image_into_tokens(served):
    labeler = make_labeler(served)
    frame = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with_images = labeler.build_request("Which video is better?", [url, url], [url, url])
    without = labeler.build_request("Which video is better?", [], [])
    status_with, reply_with = post(served, with_images)
    status_without, reply_without = post(served, without)
    assert status_with == status_without == 200
    added = reply_with["usage"]["prompt_tokens"] - reply_without["usage"]["prompt_tokens"]
    assert added == 4 * IMAGE_TOKENS
    # An image it cannot decode is the server's error, not a silent pass.
    broken = labeler.build_request("Which?", ["data:image/png;base64,AAAA"], ["data:image/png;base64,AAAA"])
    assert post(served, broken)[0] == 500


def test_forced_answers_are_read_and_unusable_ones_are_counted_ties(served):
    model_dir = served.model
    always_b = make_labeler(served, max_tokens=1, extra_body={"logit_bias": {str(token_id(model_dir, "B")): 100.0}})
    result, orders = always_b.label_with_orders(make_batch(2))
    # "B" in both orders: the second video once, then the first: inconsistent, so ties, but no failure.
    assert result.failed == 0 and result.labels.tolist() == [[0, 0], [0, 0]]
    assert orders == [[["B", "B"]] * SEGMENTS] * 2
    unusable = make_labeler(served, max_tokens=2, extra_body={"logit_bias": {str(token_id(model_dir, "x")): 100.0}})
    result = unusable.label(make_batch(2))
    assert result.unparseable == 2 * SEGMENTS and result.failed == 0 and result.labels.abs().sum() == 0
    assert all("cut at the token limit (max_tokens = 2) before it answered: raise" in m and "'xx'" in m
               for m in result.messages)
    assert_usable_or_counted(result, unusable, comparisons=2 * SEGMENTS)


def test_video_url_is_refused_by_transformers_serve_and_counted(served):
    """transformers serve 5.23 answers a ``video_url`` part with HTTP 500: for a multimodal model it loads the
    video's audio track (which needs torchcodec) and LLaVA's processor has no video processor (which would need
    torchvision). The labeller counts each such comparison as failed (not a tie), naming the error; no crash."""
    labeler = make_labeler(served, format="video")
    result = labeler.label(make_batch(2))
    stats = labeler.stats.summary()
    assert stats["outcomes"] == {"500": 2 * SEGMENTS}  # one question per comparison: the second is not asked
    assert result.failed == 2 * SEGMENTS and result.labels.abs().sum() == 0
    assert result.status == [["failed"] * SEGMENTS] * 2
    assert all("HTTP 500" in m and "gave up after 1 attempts" in m for m in result.messages)


@pytest.mark.parametrize("options, status", [
    ({"token_limit_field": "max_completion_tokens"}, "200"),
    ({"answer_format": "json_schema"}, "200"),            # accepted and ignored (the server logs a warning)
    ({"enable_thinking": False}, "200"),                  # chat_template_kwargs, passed to the chat template
    ({"reasoning_effort": "low"}, "200"),                 # accepted and ignored
    ({"drop_fields": ["temperature"]}, "200"),
    ({"answer_format": "guided_choice"}, "422"),          # unknown request field: refused
    ({"answer_format": "structured_outputs"}, "422"),
    ({"thinking_budget": 4}, "422"),                      # vLLM's thinking_token_budget: unknown here
])
def test_request_fields_the_server_accepts_and_refuses(served, options, status):
    labeler = make_labeler(served, **options)
    result = labeler.label(make_batch(1))
    outcomes = labeler.stats.summary()["outcomes"]
    assert set(outcomes) == {status}, outcomes
    if status == "200":
        assert_usable_or_counted(result, labeler, comparisons=SEGMENTS)
    else:
        assert result.failed == SEGMENTS and all(f"HTTP {status}" in m and "not retried" in m
                                                 for m in result.messages)


def test_a_rerun_asks_nothing_already_answered(served, tmp_path):
    path = tmp_path / "vlm_answers.jsonl"
    batch = make_batch(3)
    before = accepted_posts(served)
    first = make_labeler(served, cache=AnswerCache(path))
    result, orders = first.label_with_orders(batch)
    sent = first.stats.summary()["requests"]
    assert sent >= 3 * SEGMENTS and accepted_posts(served) - before == sent
    rerun = make_labeler(served, cache=AnswerCache(path))
    again, again_orders = rerun.label_with_orders(batch)
    assert rerun.stats.summary()["requests"] == 0 and accepted_posts(served) - before == sent
    assert torch.equal(again.labels, result.labels) and again_orders == orders and again.failed == result.failed


def test_vidpo_label_against_the_server_and_its_rerun(served, tmp_path, micro_overrides, capsys):
    write_pairs_dir(tmp_path / "pairs", [[1, -1], [0, 1], [-1, 0], [1, 1], [0, 0]])
    overrides = vlm_overrides(served.base_url, f"label.vlm.model={served.model}", "label.vlm.max_tokens=4",
                              "label.vlm.timeout_s=60", "label.vlm.max_retries=0")
    argv = ["label", str(blank_recipe(tmp_path / "recipe.yaml")), "--pairs", str(tmp_path / "pairs")]
    argv += [f"--set={o}" for o in micro_overrides + overrides]
    before = accepted_posts(served)
    assert main(argv) == 0
    summary = json.loads((tmp_path / "pairs" / "label.json").read_text())
    throughput = summary["throughput"]
    assert summary["pairs"] == 5 and throughput["comparisons"] == 5 * SEGMENTS
    assert throughput["outcomes"] == {"200": throughput["requests"]} and throughput["comparisons_per_s"] > 0
    assert accepted_posts(served) - before == throughput["requests"]
    assert main(argv) == 0
    rerun = json.loads((tmp_path / "pairs" / "label.json").read_text())
    assert rerun["throughput"]["requests"] == 0 and accepted_posts(served) - before == throughput["requests"]
    assert rerun["failed_comparisons"] == summary["failed_comparisons"]
    capsys.readouterr()
