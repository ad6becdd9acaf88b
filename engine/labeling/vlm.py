"""Segment preference labels from a vision-language model served over the OpenAI chat-completions API.

DenseDPO (paper 003, section 3.3 and appendix A.6) shows that an off-the-shelf VLM judges short aligned
segments well where it fails on whole videos. For every pair ``b`` and segment ``s`` this labeller sends
a few frames of segment ``s`` of both videos, as PNG images, with the caption and a question asking which
video is better in that segment, and asks **twice with the order swapped** (the paper's self-consistency
check, about +10 % accuracy on short segments):

    ask(A = first,  B = second) -> v1 = +1 for "A", -1 for "B", 0 for "TIE"
    ask(A = second, B = first)  -> v2 = -1 for "A", +1 for "B", 0 for "TIE"
    labels[b, s] = v1 if v1 == v2 else 0            (a position-biased model yields ties, not noise)
    video_labels[b] = sign(sum_s labels[b, s])      (majority vote)

Any server speaking ``POST {base_url}/chat/completions`` works: vLLM, SGLang, TGI, hosted APIs. Only the
standard library is used (``urllib.request`` for HTTP, a thread pool of ``concurrency`` workers, one
worker per (pair, segment) at a time). A timeout, a connection error or an HTTP 408/429/5xx is retried
``max_retries`` times with exponential backoff; other 4xx answers (bad request, bad key) cannot improve
by retrying and fail at once. A reply with no decidable answer, a body that is not JSON, or a JSON body
without ``choices[0].message.content`` is a failed comparison: counted, reported with the pair id and
segment, and a tie (``on_error="tie"``) or a ``LabelingError`` (``on_error="raise"``).
"""
from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vidpo.config import VLMConfig
from vidpo.labeling.base import (
    Labeler,
    LabelingError,
    LabelResult,
    PairBatch,
    dataclass_from_options,
    register_labeler,
)

VIDEO_A_MARKER = "Video A:"
VIDEO_B_MARKER = "Video B:"
ANSWER_REMINDER = "Answer with exactly one of: A, B, TIE."

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_RETRYABLE_HTTP = {408, 429, 500, 502, 503, 504}


# --------------------------------------------------------------------------------------------- replies

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_BARE_ANSWERS = {"A": "A", "B": "B", "TIE": "TIE", "VIDEO A": "A", "VIDEO B": "B"}
_MARKED_ANSWER = re.compile(r"\b(?:final\s+answer|answer|verdict|choice)\b\s*(?:is|:|=|-)?\s*[\s*_\"'`(\[]*"
                            r"(?:video\s*)?\b(A|B|TIE)\b", re.IGNORECASE)
_VIDEO_MENTION = re.compile(r"\bvideo\s*([AB])\b", re.IGNORECASE)
_CAPITAL_LETTER = re.compile(r"\b([AB])\b")
_TIE_WORD = re.compile(r"\bties?\b|\btied\b", re.IGNORECASE)


def parse_answer(text: str) -> Optional[str]:
    """The verdict "A", "B" or "TIE" in a VLM reply, or None when the reply does not decide.

    Accepted, in order: a reply that is only the answer up to case, punctuation and markdown ("b",
    "**TIE**", "Video A."); the last explicitly marked answer ("Answer: B", "The final answer is Video
    A"); otherwise the one verdict mentioned anywhere ("Video B looks sharper") when it is the only one.
    A reply naming two verdicts without marking one ("Video A is worse than Video B") is undecidable.
    Reasoning in ``<think>..</think>`` is ignored; a reply cut off inside it is undecidable.
    """
    text = _THINK_BLOCK.sub(" ", text)
    if "<think>" in text.lower():
        return None
    core = " ".join(re.sub(r"[^A-Za-z]+", " ", text).split()).upper()
    if core in _BARE_ANSWERS:
        return _BARE_ANSWERS[core]
    marked = _MARKED_ANSWER.findall(text)
    if marked:
        return marked[-1].upper()
    verdicts = {m.upper() for m in _VIDEO_MENTION.findall(text)}
    verdicts |= set(_CAPITAL_LETTER.findall(text))
    if _TIE_WORD.search(text):
        verdicts.add("TIE")
    return verdicts.pop() if len(verdicts) == 1 else None


def reply_text(body: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions reply body; ValueError says what is missing."""
    try:
        reply = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"reply body is not JSON ({err.__class__.__name__}): {_snippet(body)}") from None
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"reply JSON has no choices[0].message.content: {_snippet(body)}") from None
    if isinstance(content, list):  # some servers return content parts, like the request's
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is not text: {_snippet(body)}")
    return content


def _snippet(data, limit: int = 120) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---------------------------------------------------------------------------------------------- images

def clips_to_uint8(clips: Tensor) -> np.ndarray:
    """(B, 3, T, H, W) clips in [-1, 1] -> (B, T, H, W, 3) uint8 frames, 0 <-> -1 and 255 <-> +1."""
    pixels = clips.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous().numpy()


def pick_frames(frame_indices: Tensor, count: int) -> list[int]:
    """``count`` frame indices evenly spaced over ``frame_indices`` (both ends included), no repeats."""
    n = frame_indices.numel()
    if n <= count:
        return frame_indices.tolist()
    positions = np.round(np.linspace(0, n - 1, count)).astype(int)
    return [int(frame_indices[p]) for p in sorted(set(positions.tolist()))]


def png_data_url(frame: np.ndarray, image_size: int, resample: str) -> str:
    """A (H, W, 3) uint8 frame resized so its longer side is ``image_size``, as a PNG data URL."""
    image = Image.fromarray(np.ascontiguousarray(frame))
    if image_size:
        scale = image_size / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        if size != image.size:
            name = resample if resample != "auto" else ("nearest" if scale >= 1 else "bicubic")
            image = image.resize(size, _RESAMPLE[name])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------- client

def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def _image_parts(urls: list[str]) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}} for url in urls]


def _error_body(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read() or b""
    except (OSError, AttributeError, http.client.HTTPException):  # no body, or the connection broke
        return b""


class _Failure(Exception):
    """One request that ended without a usable verdict; the message says why."""


@register_labeler("vlm")
class VLMLabeler(Labeler):
    """Per-segment labels from a VLM, each asked in both orders and kept only when both agree."""

    name = "vlm"

    def __init__(self, config: Optional[VLMConfig] = None, **options) -> None:
        if config is not None and options:
            raise ValueError(f"VLMLabeler: give either config= or options, not both (got {sorted(options)})")
        self.config = config if config is not None else dataclass_from_options(VLMConfig, options, "vlm labeller")
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

    # -- one request -------------------------------------------------------------------------------

    def build_request(self, text: str, images_a: list[str], images_b: list[str]) -> dict:
        """The chat-completions body for one question about images of Video A and Video B."""
        content = ([_text_part(text), _text_part(VIDEO_A_MARKER)] + _image_parts(images_a)
                   + [_text_part(VIDEO_B_MARKER)] + _image_parts(images_b) + [_text_part(ANSWER_REMINDER)])
        body = {"model": self.config.model, "messages": [{"role": "user", "content": content}],
                "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        body.update(self.config.extra_body)
        return body

    def ask(self, body: dict) -> str:
        """Send ``body`` and return the verdict "A", "B" or "TIE"; raise ``_Failure`` with the reason."""
        cfg = self.config
        data = json.dumps(body).encode("utf-8")
        problem = ""
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                time.sleep(cfg.retry_backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(cfg.url, data=data, headers=self._headers, method="POST")
            try:
                with self._opener.open(request, timeout=cfg.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code} {err.reason}: {_snippet(_error_body(err))}"
                if err.code not in _RETRYABLE_HTTP:
                    raise _Failure(problem + " (not retried)") from None
                continue
            except urllib.error.URLError as err:
                reason = err.reason
                timed_out = isinstance(reason, (socket.timeout, TimeoutError))
                problem = f"timed out after {cfg.timeout_s:g} s" if timed_out else f"cannot reach {cfg.url}: {reason}"
                continue
            except (socket.timeout, TimeoutError):
                problem = f"timed out after {cfg.timeout_s:g} s"
                continue
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                problem = f"connection failed: {err.__class__.__name__}: {err}"
                continue
            try:
                text = reply_text(raw)
            except ValueError as err:
                raise _Failure(str(err)) from None
            answer = parse_answer(text)
            if answer is None:
                raise _Failure(f"reply has no decidable answer (A, B or TIE): {_snippet(text)}")
            return answer
        raise _Failure(f"{problem}; gave up after {cfg.max_retries + 1} attempts")

    # -- one (pair, segment) -----------------------------------------------------------------------

    def _compare(self, batch: PairBatch, first: np.ndarray, second: np.ndarray, b: int, s: int
                 ) -> tuple[int, Optional[str]]:
        """(label, None) for pair ``b`` segment ``s``, or (0, message) when a request failed."""
        cfg = self.config
        frames = pick_frames(batch.segment_frames(s), cfg.frames_per_segment)
        start_s, end_s = batch.segment_seconds(s)
        text = cfg.prompt.format(caption=batch.captions[b], segment_number=s + 1, num_segments=batch.num_segments,
                                 start_s=start_s, end_s=end_s, frames=len(frames), fps=batch.fps)
        urls_first = [png_data_url(first[b, t], cfg.image_size, cfg.resample) for t in frames]
        urls_second = [png_data_url(second[b, t], cfg.image_size, cfg.resample) for t in frames]
        votes = []
        for order, (images_a, images_b, sign) in enumerate(((urls_first, urls_second, +1),
                                                            (urls_second, urls_first, -1))):
            try:
                answer = self.ask(self.build_request(text, images_a, images_b))
            except _Failure as failure:
                where = "A=first, B=second" if order == 0 else "A=second, B=first"
                return 0, (f"vlm: pair {batch.pair_ids[b]!r} segment {s} ({start_s:.2f}-{end_s:.2f} s), "
                           f"asked with {where}: {failure}")
            votes.append({"A": sign, "B": -sign, "TIE": 0}[answer])
        return (votes[0] if votes[0] == votes[1] else 0), None

    def label(self, batch: PairBatch) -> LabelResult:
        """Labels (B, S) from the VLM: order-swap-consistent verdicts, ties otherwise; failures counted."""
        first, second = clips_to_uint8(batch.first), clips_to_uint8(batch.second)
        jobs = [(b, s) for b in range(batch.batch_size) for s in range(batch.num_segments)]
        labels = torch.zeros(batch.batch_size, batch.num_segments, dtype=torch.int64)
        failures: dict[tuple[int, int], str] = {}
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="vidpo-vlm")
        try:
            futures = {pool.submit(self._compare, batch, first, second, b, s): (b, s) for b, s in jobs}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    b, s = futures[future]
                    labels[b, s], message = future.result()
                    if message is not None:
                        if self.config.on_error == "raise":
                            raise LabelingError(message)
                        failures[b, s] = message
        finally:
            # On a raise, queued comparisons are dropped; running ones end within their timeouts.
            pool.shutdown(wait=True, cancel_futures=True)
        # Completion order is arbitrary; report failures in (pair, segment) order.
        messages = [failures[key] for key in sorted(failures)]
        return LabelResult.from_labels(labels, failed=len(messages), messages=messages)
