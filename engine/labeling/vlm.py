"""Segment preference labels from a vision-language model served over the OpenAI chat-completions API.

DenseDPO (paper 003, section 3.3 and appendix A.6) shows that an off-the-shelf VLM judges short aligned
segments well where it fails on whole videos. For every pair ``b`` and segment ``s`` this labeller shows
a few frames of segment ``s`` of both videos (as images, or as one short video each:
``vidpo.labeling.vlm_request``) with the caption and a question asking which video is better in that
segment, and asks **twice with the order swapped** (the paper's self-consistency check, about +10 % accuracy
on short segments):

    ask(A = first,  B = second) -> v1 = +1 for "A", -1 for "B", 0 for "TIE"
    ask(A = second, B = first)  -> v2 = -1 for "A", +1 for "B", 0 for "TIE"
    labels[b, s] = v1 if v1 == v2 else 0            (a position-biased model yields ties, not noise)
    video_labels[b] = sign(sum_s labels[b, s])      (majority vote)

The raw answers of both orders are kept (``label_with_orders``): how often the model prefers whichever video
it saw first is its position bias (``vidpo judge-eval``).

Any server speaking ``POST {base_url}/chat/completions`` works: vLLM, SGLang, TGI, ``transformers serve``,
hosted APIs. Only the standard library is used (``urllib.request`` for HTTP, a thread pool of ``concurrency``
workers, one worker per (pair, segment) at a time). Before its first question the labeller checks once that
something answers at ``base_url`` (``GET {base_url}/models``; any HTTP answer will do, a server without that route
too): an endpoint that refuses connections is one ``ServerUnreachable`` error before any work, not a run of
failures. A timeout, a connection error or an HTTP 408/429/5xx is retried ``max_retries`` times with exponential
backoff; other 4xx answers (bad request, bad key, a request field the server does not know) cannot improve by
retrying and fail at once. What each (pair, segment) becomes (``vidpo.labeling.base``, status):

* ``failed`` -- a question got no reply: the retries ran out, a 4xx, a body that is not JSON or a JSON body
  without ``choices[0].message.content``. Label 0, not a tie: ``vidpo label`` asks it again on its next run.
* ``unparseable`` -- the model replied, but no verdict can be read (``parse_answer``): a counted tie, since the
  same question gets the same answer (it is kept in the answer cache).
* ``tie`` / ``ok`` -- both orders answered: the rule above.

Failed and unparseable comparisons are reported with the pair id and segment, or raise a ``LabelingError``
(``on_error="raise"``). With an ``AnswerCache`` every reply is kept on disk and no question is asked twice.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Optional

import numpy as np
import torch

from vidpo.config import VLMConfig
from vidpo.labeling.answer_cache import AnswerCache, CachedReply
from vidpo.labeling.base import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_TIE,
    STATUS_UNPARSEABLE,
    Labeler,
    LabelingError,
    LabelResult,
    PairBatch,
    dataclass_from_options,
    register_labeler,
)
from vidpo.labeling.vlm_request import (
    ANSWER_REMINDER,
    VIDEO_A_MARKER,
    VIDEO_B_MARKER,
    Reply,
    build_body,
    clips_to_uint8,
    parse_answer,
    pick_frames,
    png_data_url,
    reply_from_body,
    reply_text,
    request_key,
    segment_media,
    snippet,
    undecided_reason,
)

__all__ = ["ANSWER_REMINDER", "VIDEO_A_MARKER", "VIDEO_B_MARKER", "RequestFailed", "RequestStats", "ServerUnreachable",
           "VLMConfig", "VLMLabeler", "clips_to_uint8", "parse_answer", "pick_frames", "png_data_url", "reply_text"]

_RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}

Orders = list[list[list[Optional[str]]]]
"""Raw answers per pair, segment and order: ``orders[b][s] = [asked A=first, asked A=second]``, each "A", "B",
"TIE", or None when that question failed or was not asked."""


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error_body(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read() or b""
    except (OSError, AttributeError, http.client.HTTPException):  # no body, or the connection broke
        return b""


class RequestFailed(Exception):
    """One question that got no reply (status ``failed``); the message says why."""


_Failure = RequestFailed


class _Unparseable(Exception):
    """A reply without a decidable verdict (status ``unparseable``, a tie); the message says why."""


class ServerUnreachable(LabelingError):
    """Nothing answers at the VLM's ``base_url`` (connection refused, unknown host): said once, before any work."""


class RequestStats:
    """What the labeller's HTTP requests did: counts by outcome, latencies, requests in flight. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.outcomes: Counter = Counter()   # "200", "500", "timeout", "connection", ..
            self.latencies: list[float] = []     # seconds of each attempt that got an HTTP answer
            self.cached = 0                      # questions answered from the cache
            self.in_flight = 0
            self.max_in_flight = 0
            self.busy_s = 0.0                    # summed duration of all attempts (mean in flight = busy / wall)

    def started(self) -> float:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return time.perf_counter()

    def finished(self, start: float, outcome: str, answered: bool) -> None:
        elapsed = time.perf_counter() - start
        with self._lock:
            self.in_flight -= 1
            self.busy_s += elapsed
            self.outcomes[outcome] += 1
            if answered:
                self.latencies.append(elapsed)

    def hit(self) -> None:
        with self._lock:
            self.cached += 1

    def summary(self, wall_s: Optional[float] = None) -> dict:
        """Requests sent, their outcomes, latency p50 / p95 (s), requests in flight (max; mean over ``wall_s``)."""
        with self._lock:
            latencies = np.asarray(self.latencies, dtype=np.float64)
            out = {"requests": int(sum(self.outcomes.values())), "outcomes": dict(sorted(self.outcomes.items())),
                   "cached_answers": self.cached,
                   "latency_p50_s": float(np.percentile(latencies, 50)) if latencies.size else None,
                   "latency_p95_s": float(np.percentile(latencies, 95)) if latencies.size else None,
                   "max_in_flight": self.max_in_flight}
            if wall_s:
                out["mean_in_flight"] = self.busy_s / wall_s
        return out


@register_labeler("vlm")
class VLMLabeler(Labeler):
    """Per-segment labels from a VLM, each asked in both orders and kept only when both agree."""

    name = "vlm"

    def __init__(self, config: Optional[VLMConfig] = None, *, cache: Optional[AnswerCache] = None,
                 **options) -> None:
        if config is not None and options:
            raise ValueError(f"VLMLabeler: give either config= or options, not both (got {sorted(options)})")
        self.config = config if config is not None else dataclass_from_options(VLMConfig, options, "vlm labeller")
        self.cache = cache
        self.stats = RequestStats()
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env, "")
            if not key:
                raise LabelingError(f"VLMConfig.api_key_env names ${self.config.api_key_env}, "
                                    "but that environment variable is not set or empty")
            self._headers["Authorization"] = f"Bearer {key}"
        # Proxies from the environment are for the outside world; a local server must not go through one.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.config.url) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._probe_lock = threading.Lock()
        self._unreachable: Optional[str] = None   # the probe's verdict: None not probed yet, "" reachable

    # -- is anything there? ------------------------------------------------------------------------

    def probe(self) -> None:
        """Raise ``ServerUnreachable`` unless something answers HTTP at ``base_url``: one ``GET {base_url}/models``
        (retried like a question). Any HTTP status counts as an answer (a server without that route says 404);
        a timeout too (the server took the connection but is busy: the questions' own timeouts decide)."""
        cfg = self.config
        url = cfg.base_url.rstrip("/") + "/models"
        problem = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                time.sleep(cfg.retry_backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(url, headers=self._headers, method="GET")
            try:
                with self._opener.open(request, timeout=cfg.timeout_s) as response:
                    response.read()
                return
            except urllib.error.HTTPError:
                return
            except urllib.error.URLError as err:
                if isinstance(err.reason, (socket.timeout, TimeoutError)):
                    return
                problem = str(err.reason)
            except (socket.timeout, TimeoutError):
                return
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                problem = f"{err.__class__.__name__}: {err}"
        raise ServerUnreachable(f"cannot reach the VLM server at {cfg.base_url} (GET {url}: {problem}; "
                                f"{cfg.max_retries + 1} attempts): is it running, and is label.vlm.base_url right?")

    def _check_reachable(self) -> None:
        """``probe`` once per labeller, before its first question (threads wait for the one probe)."""
        with self._probe_lock:
            if self._unreachable is None:
                try:
                    self.probe()
                    self._unreachable = ""
                except ServerUnreachable as err:
                    self._unreachable = str(err)
        if self._unreachable:
            raise ServerUnreachable(self._unreachable)

    # -- one request -------------------------------------------------------------------------------

    def build_request(self, text: str, media_a: list[str], media_b: list[str]) -> dict:
        """The chat-completions body for one question about the media (data URLs) of Video A and Video B."""
        return build_body(self.config, text, media_a, media_b)

    def post(self, body: dict) -> Reply:
        """Send ``body`` and return the server's reply; raise ``_Failure`` with the reason when there is none
        (``ServerUnreachable`` when nothing answers at ``base_url`` at all)."""
        self._check_reachable()
        cfg = self.config
        data = json.dumps(body).encode("utf-8")
        problem = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                time.sleep(cfg.retry_backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(cfg.url, data=data, headers=self._headers, method="POST")
            start = self.stats.started()
            outcome, answered = "connection", False
            try:
                with self._opener.open(request, timeout=cfg.timeout_s) as response:
                    raw = response.read()
                outcome, answered = str(response.status), True
            except urllib.error.HTTPError as err:
                outcome, answered = str(err.code), True
                problem = f"HTTP {err.code} {err.reason}: {snippet(_error_body(err))}"
                if err.code not in _RETRYABLE_HTTP:
                    raise _Failure(problem + " (not retried)") from None
                continue
            except urllib.error.URLError as err:
                reason = err.reason
                timed_out = isinstance(reason, (socket.timeout, TimeoutError))
                outcome = "timeout" if timed_out else "connection"
                problem = f"timed out after {cfg.timeout_s:g} s" if timed_out else f"cannot reach {cfg.url}: {reason}"
                continue
            except (socket.timeout, TimeoutError):
                outcome, problem = "timeout", f"timed out after {cfg.timeout_s:g} s"
                continue
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                problem = f"connection failed: {err.__class__.__name__}: {err}"
                continue
            finally:
                self.stats.finished(start, outcome, answered)
            try:
                return reply_from_body(raw)
            except ValueError as err:
                raise _Failure(str(err)) from None
        raise _Failure(f"{problem}; gave up after {cfg.max_retries + 1} attempts")

    def ask(self, body: dict) -> str:
        """Send ``body`` and return the verdict "A", "B" or "TIE"; raise ``_Failure`` (no reply) or
        ``_Unparseable`` (no verdict in the reply) with the reason."""
        reply = self.post(body)
        answer = parse_answer(reply.content)
        if answer is None:
            raise _Unparseable(undecided_reason(reply, self.config))
        return answer

    def reply(self, pair_id: str, segment: int, order: int, key: str, body: Callable[[], dict]) -> Reply:
        """The reply to one question about item ``pair_id`` (a pair; a scored clip: ``vidpo.labeling.vlm_score``):
        from the cache, else from the server, then kept in the cache; ``body()`` is built only when it is sent.
        Raises ``RequestFailed`` (no reply) or ``ServerUnreachable``."""
        return self._reply(pair_id, segment, order, key, body)

    def _reply(self, pair_id: str, segment: int, order: int, key: str, body: Callable[[], dict]) -> Reply:
        """The reply to one question: from the cache, else from the server (and then kept in the cache)."""
        if self.cache is not None:
            cached = self.cache.get(pair_id, segment, order, key)
            if cached is not None:
                self.stats.hit()
                return Reply(cached.content, cached.finish_reason, cached.reasoning)
        reply = self.post(body())
        if self.cache is not None:
            self.cache.put(pair_id, segment, order, key, CachedReply(reply.content, reply.finish_reason,
                                                                     reply.reasoning))
        return reply

    # -- one (pair, segment) -----------------------------------------------------------------------

    def _compare(self, batch: PairBatch, first: np.ndarray, second: np.ndarray, b: int, s: int
                 ) -> tuple[int, str, Optional[str], list[Optional[str]]]:
        """(label, status, message, answers) for pair ``b`` segment ``s``: ``message`` is None unless the status
        is ``failed`` or ``unparseable`` (label 0); ``answers`` are the raw answers of both orders."""
        cfg = self.config
        frames = pick_frames(batch.segment_frames(s), cfg.frames_per_segment)
        start_s, end_s = batch.segment_seconds(s)
        text = cfg.prompt.format(caption=batch.captions[b], segment_number=s + 1, num_segments=batch.num_segments,
                                 start_s=start_s, end_s=end_s, frames=len(frames), fps=batch.fps)
        key = request_key(cfg, text, len(frames))
        clips, media = (first[b], second[b]), {}

        def media_of(which: int) -> list[str]:   # encoded only when a question is sent, once per video
            if which not in media:
                media[which] = segment_media(cfg, clips[which], frames, end_s - start_s)
            return media[which]

        answers: list[Optional[str]] = [None, None]
        for order, (shown_a, shown_b) in enumerate(((0, 1), (1, 0))):
            try:
                reply = self._reply(batch.pair_ids[b], s, order, key,
                                    lambda: build_body(cfg, text, media_of(shown_a), media_of(shown_b)))
                answer = parse_answer(reply.content)
                if answer is None:
                    raise _Unparseable(undecided_reason(reply, cfg))
            except (_Failure, _Unparseable) as problem:
                # The other order is not asked: an unparseable answer makes the segment a tie whatever it says,
                # and a failed question is asked again (with its partner, from the cache) on the next run.
                status = STATUS_FAILED if isinstance(problem, _Failure) else STATUS_UNPARSEABLE
                where = "A=first, B=second" if order == 0 else "A=second, B=first"
                return 0, status, (f"vlm: pair {batch.pair_ids[b]!r} segment {s} ({start_s:.2f}-{end_s:.2f} s), "
                                   f"asked with {where}: {status}: {problem}"), answers
            answers[order] = answer
        votes = [{"A": sign, "B": -sign, "TIE": 0}[answer] for answer, sign in zip(answers, (+1, -1))]
        label = votes[0] if votes[0] == votes[1] else 0
        return label, (STATUS_OK if label else STATUS_TIE), None, answers

    def label_with_orders(self, batch: PairBatch) -> tuple[LabelResult, Orders]:
        """``label(batch)`` and the raw answers of both orders of every (pair, segment) (``Orders``)."""
        first, second = clips_to_uint8(batch.first), clips_to_uint8(batch.second)
        jobs = [(b, s) for b in range(batch.batch_size) for s in range(batch.num_segments)]
        labels = torch.zeros(batch.batch_size, batch.num_segments, dtype=torch.int64)
        status = [[STATUS_TIE] * batch.num_segments for _ in range(batch.batch_size)]
        orders: Orders = [[[None, None] for _ in range(batch.num_segments)] for _ in range(batch.batch_size)]
        problems: dict[tuple[int, int], str] = {}
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="vidpo-vlm")
        try:
            futures = {pool.submit(self._compare, batch, first, second, b, s): (b, s) for b, s in jobs}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    b, s = futures[future]
                    labels[b, s], status[b][s], message, orders[b][s] = future.result()
                    if message is not None:
                        if self.config.on_error == "raise":
                            raise LabelingError(message)
                        problems[b, s] = message
        finally:
            # On a raise, queued comparisons are dropped; running ones end within their timeouts.
            pool.shutdown(wait=True, cancel_futures=True)
        # Completion order is arbitrary; report problems in (pair, segment) order.
        messages = [problems[key] for key in sorted(problems)]
        return LabelResult.from_labels(labels, messages=messages, status=status), orders

    def label(self, batch: PairBatch) -> LabelResult:
        """Labels (B, S) from the VLM: order-swap-consistent verdicts, ties otherwise; failures and unparseable
        answers counted, with their status."""
        return self.label_with_orders(batch)[0]
