"""A small OpenAI-compatible VLM server for the tests of ``vidpo.labeling.vlm``.

It is a real HTTP server (``http.server.ThreadingHTTPServer`` on 127.0.0.1, port chosen by the OS) that
the labeller talks to over a socket exactly as it would talk to vLLM: it parses every chat-completions
request, checks its schema (rejecting a bad one with HTTP 400 and recording why), decodes the images (PNG
or JPEG ``image_url`` parts) and videos (``video_url`` parts holding an mp4, decoded into their frames), and
answers through a *behaviour*, a function from the parsed request to a ``Reply``. The behaviour
``judge_by_brightness`` answers like a competent VLM for clips whose better video is the brighter one in
a segment: it compares the mean brightness of the "Video A" images with that of the "Video B" images.
Other behaviours (position bias, malformed replies, HTTP errors, slow replies) are built in the tests
from ``Reply``.
"""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

import numpy as np
from PIL import Image

IMAGE_PREFIXES = {"data:image/png;base64,": "PNG", "data:image/jpeg;base64,": "JPEG"}
MP4_PREFIX = "data:video/mp4;base64,"
_SEGMENT = re.compile(r"segment (\d+) of (\d+)")


class SchemaError(ValueError):
    """A request that an OpenAI-compatible server would reject."""


@dataclass
class SeenRequest:
    """One parsed chat-completions request."""

    headers: dict
    body: dict
    text: str                      # all text parts, joined by newlines
    images_a: list                 # (H, W, 3) uint8 arrays shown as Video A (a video part: its frames)
    images_b: list                 # (H, W, 3) uint8 arrays shown as Video B
    segment_number: Optional[int]  # 1-based, from "segment N of S" in the prompt
    attempt: int = 0               # 1 the first time this exact question arrives, 2 on its retry, ..
    times_asked: int = 0           # 1 the first time this prompt text arrives (either image order), ..
    videos: int = 0                # video_url parts in the request (their frames are in images_a / images_b)

    @property
    def key(self) -> tuple:
        """Identifies one question (same prompt, same images in the same order) across retries."""
        return (self.text, self.images_a[0].tobytes(), self.images_b[0].tobytes())

    def brightness(self) -> tuple[float, float]:
        return float(np.mean(self.images_a)), float(np.mean(self.images_b))


@dataclass
class Reply:
    """What the server sends back: a chat completion with ``text``, or ``raw_body`` verbatim, after
    ``delay_s`` seconds, with HTTP ``status``."""

    text: Optional[str] = None
    status: int = 200
    raw_body: Optional[bytes] = None
    delay_s: float = 0.0

    def body(self, model: str) -> bytes:
        if self.raw_body is not None:
            return self.raw_body
        if self.status != 200:
            return json.dumps({"error": {"message": f"scripted HTTP {self.status}", "code": self.status}}).encode()
        return json.dumps({
            "id": "chatcmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()


def brightness_verdict(request: SeenRequest, margin: float = 10.0) -> str:
    """"A" / "B" when that video's images are brighter by more than ``margin`` grey levels, else "TIE"."""
    a, b = request.brightness()
    return "A" if a > b + margin else "B" if b > a + margin else "TIE"


def judge_by_brightness(wrap: str = "{}") -> Callable[[SeenRequest], Reply]:
    """A behaviour answering the brightness verdict, formatted into ``wrap`` (e.g. "Answer: **{}**")."""
    return lambda request: Reply(text=wrap.format(brightness_verdict(request)))


def _decode_image(url: str) -> np.ndarray:
    prefix = next((p for p in IMAGE_PREFIXES if url.startswith(p)), None)
    if prefix is None:
        raise SchemaError(f"image_url.url must be a data:image/png or data:image/jpeg base64 URL, got {url[:40]!r}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):], validate=True)))
        image.load()
    except Exception as err:  # any decoding failure is the client's fault
        raise SchemaError(f"image is not a decodable {IMAGE_PREFIXES[prefix]}: {err}") from None
    if image.format != IMAGE_PREFIXES[prefix] or image.mode != "RGB":
        raise SchemaError(f"expected an RGB {IMAGE_PREFIXES[prefix]}, got {image.format} {image.mode}")
    return np.asarray(image)


def _decode_video(url: str) -> list:
    import av

    if not url.startswith(MP4_PREFIX):
        raise SchemaError(f"video_url.url must be a data:video/mp4;base64 URL, got {url[:40]!r}")
    try:
        with av.open(io.BytesIO(base64.b64decode(url[len(MP4_PREFIX):], validate=True))) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]
    except Exception as err:  # any decoding failure is the client's fault
        raise SchemaError(f"video is not a decodable mp4: {err}") from None
    if not frames:
        raise SchemaError("video has no frames")
    return frames


def parse_request(path: str, headers, raw: bytes) -> SeenRequest:
    """Check a request against the chat-completions schema and decode it; SchemaError says what is wrong."""
    if path != "/v1/chat/completions":
        raise SchemaError(f"unexpected path {path!r}")
    if not headers.get("Content-Type", "").startswith("application/json"):
        raise SchemaError(f"Content-Type must be application/json, got {headers.get('Content-Type')!r}")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SchemaError(f"body is not JSON: {err}") from None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise SchemaError("body must be an object with a non-empty string 'model'")
    if "temperature" in body and not isinstance(body["temperature"], (int, float)):
        raise SchemaError("'temperature' must be a number")
    limits = [key for key in ("max_tokens", "max_completion_tokens") if key in body]
    if len(limits) != 1 or not isinstance(body[limits[0]], int):
        raise SchemaError("one integer 'max_tokens' or 'max_completion_tokens' is required by this test server")
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) != 1 or messages[0].get("role") != "user":
        raise SchemaError("'messages' must be one user message")
    content = messages[0].get("content")
    if not isinstance(content, list) or not content:
        raise SchemaError("the user message's 'content' must be a non-empty list of parts")
    texts, images, current, videos = [], {"A": [], "B": []}, None, 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            if part["text"].strip() == "Video A:":
                current = "A"
            elif part["text"].strip() == "Video B:":
                current = "B"
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            if current is None:
                raise SchemaError("an image comes before the 'Video A:' marker")
            images[current].append(_decode_image(part["image_url"].get("url", "")))
        elif kind == "video_url" and isinstance(part.get("video_url"), dict):
            if current is None:
                raise SchemaError("a video comes before the 'Video A:' marker")
            images[current].extend(_decode_video(part["video_url"].get("url", "")))
            videos += 1
        else:
            raise SchemaError(f"bad content part {str(part)[:80]}")
    if not images["A"] or len(images["A"]) != len(images["B"]):
        raise SchemaError(f"expected the same number of images for both videos, got "
                          f"{len(images['A'])} and {len(images['B'])}")
    text = "\n".join(texts)
    match = _SEGMENT.search(text)
    return SeenRequest(headers=dict(headers.items()), body=body, text=text, images_a=images["A"],
                       images_b=images["B"], segment_number=int(match.group(1)) if match else None, videos=videos)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        fake: FakeVLM = self.server.fake
        # In flight = from arrival until just before the reply is written: a client cannot send its next
        # request before it has read this reply, so the count never exceeds the client's concurrency.
        fake._enter()
        status, payload = 500, b""
        try:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                request = parse_request(self.path, self.headers, raw)
            except SchemaError as err:
                fake._record_schema_error(str(err))
                status, payload = 400, json.dumps({"error": {"message": str(err)}}).encode()
            else:
                reply = fake._respond(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                status, payload = reply.status, reply.body(request.body["model"])
        finally:
            fake._leave()
        try:
            self._send(status, payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and closed the socket

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        """``GET /v1/models`` (the labeller's reachability probe, as vLLM and ``transformers serve`` answer it)."""
        fake: FakeVLM = self.server.fake
        with fake._lock:
            fake.probes += 1
        if self.path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-vlm", "object": "model"}]}).encode())
        else:
            self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass


@dataclass
class FakeVLM:
    """The server and what it saw. ``behaviour`` may be replaced between labelling calls."""

    behaviour: Callable[[SeenRequest], Reply] = field(default_factory=judge_by_brightness)
    requests: list = field(default_factory=list)
    schema_errors: list = field(default_factory=list)
    attempts: Counter = field(default_factory=Counter)
    texts: Counter = field(default_factory=Counter)
    max_in_flight: int = 0
    probes: int = 0                # GET requests (the labeller's reachability probe), not in ``requests``

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-vlm", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _record_schema_error(self, message: str) -> None:
        with self._lock:
            self.schema_errors.append(message)

    def _respond(self, request: SeenRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            self.attempts[request.key] += 1
            self.texts[request.text] += 1
            request.attempt, request.times_asked = self.attempts[request.key], self.texts[request.text]
        return self.behaviour(request)
