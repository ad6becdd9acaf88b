"""What the VLM labeller sends and how it reads the reply: frames as images or as one video, the request body of
the OpenAI chat-completions API with the options of real servers, and the verdict in a reply.

**Media** (``VLMConfig.format``):

* ``images`` -- each frame is one ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,.."}}``
  part (PNG, or JPEG with ``image_format: jpeg``): the OpenAI vision form that every VLM server accepts.
* ``video`` -- the frames of one video's segment are one H.264 mp4, sent as one
  ``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,.."}}`` part. This is vLLM's documented
  video input for the OpenAI-compatible server (vLLM docs, "Multimodal Inputs", section "Online Serving" /
  "Video Inputs": "Instead of ``image_url``, you can pass a video file via ``video_url``"; the base64 form
  ``data:video/mp4;base64,<b64>`` is the one of vLLM's ``examples/online_serving/
  openai_chat_completion_client_for_multimodal.py``), which Qwen2-VL / Qwen2.5-VL models read with their video
  processor. Some vLLM versions also take a ``data:video/jpeg;base64,<frame>,<frame>,..`` list of JPEG frames;
  that form is undocumented and not used. The mp4 plays at the rate that makes it last as long as the segment.

**Answers** (``VLMConfig.answer_format``): free ``text`` (the question asks for A, B or TIE); ``json_schema``
(OpenAI's ``response_format`` with a JSON schema: the reply is ``{"verdict": "A" | "B" | "TIE"}``); vLLM's
structured outputs, ``guided_choice`` (the ``guided_choice`` request field of vLLM before its
``structured_outputs`` field) or ``structured_outputs`` (``{"structured_outputs": {"choice": [..]}}``).

**Reasoning models**: the reply limit goes in ``max_tokens`` or ``max_completion_tokens``
(``token_limit_field``; OpenAI's reasoning models reject ``max_tokens``); ``reasoning_effort``,
``thinking_budget`` (vLLM's ``thinking_token_budget``) and ``enable_thinking`` (the ``chat_template_kwargs``
switch of Qwen3-style chat templates, read by vLLM, SGLang and ``transformers serve``) are sent when set; a
``<think>..</think>`` block is dropped before the verdict is read, and a reply cut inside it says to raise the
limit. ``extra_body`` adds fields and ``drop_fields`` removes any (a reasoning model that rejects
``temperature``).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vidpo.config import VLMConfig

VIDEO_A_MARKER = "Video A:"
VIDEO_B_MARKER = "Video B:"
ANSWER_REMINDER = "Answer with exactly one of: A, B, TIE."
JSON_REMINDER = 'Answer with a JSON object {"verdict": V}, V exactly one of "A", "B", "TIE".'
VERDICTS = ("A", "B", "TIE")
VERDICT_SCHEMA = {"type": "object", "properties": {"verdict": {"type": "string", "enum": list(VERDICTS)}},
                  "required": ["verdict"], "additionalProperties": False}
"""The JSON schema of a structured answer (``answer_format: json_schema``)."""

_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
_MIME = {"png": "image/png", "jpeg": "image/jpeg"}


# --------------------------------------------------------------------------------------------- replies

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_BARE_ANSWERS = {"A": "A", "B": "B", "TIE": "TIE", "VIDEO A": "A", "VIDEO B": "B"}
_MARKED_ANSWER = re.compile(r"\b(?:final\s+answer|answer|verdict|choice)\b\s*(?:is|:|=|-)?\s*[\s*_\"'`(\[]*"
                            r"(?:video\s*)?\b(A|B|TIE)\b", re.IGNORECASE)
_VIDEO_MENTION = re.compile(r"\bvideo\s*([AB])\b", re.IGNORECASE)
_CAPITAL_LETTER = re.compile(r"\b([AB])\b")
_TIE_WORD = re.compile(r"\bties?\b|\btied\b", re.IGNORECASE)


def strip_reasoning(text: str) -> Optional[str]:
    """``text`` without its reasoning, or None when the reply ends inside a ``<think>`` block (cut off).

    Closed ``<think>..</think>`` blocks are removed; text before a lone ``</think>`` is reasoning too (chat
    templates that open the block in the prompt, so the reply only closes it)."""
    text = _THINK_BLOCK.sub(" ", text)
    lower = text.lower()
    if "<think>" in lower:
        return None
    close = lower.rfind("</think>")
    return text[close + len("</think>"):] if close >= 0 else text


def parse_answer(text: str) -> Optional[str]:
    """The verdict "A", "B" or "TIE" in a VLM reply, or None when the reply does not decide.

    Accepted, in order: a JSON object ``{"verdict": ..}`` (a structured answer; ``answer`` is also read); a
    reply that is only the answer up to case, punctuation and markdown ("b", "**TIE**", "Video A."); the last
    explicitly marked answer ("Answer: B", "The final answer is Video A"); otherwise the one verdict mentioned
    anywhere ("Video B looks sharper") when it is the only one. A reply naming two verdicts without marking one
    ("Video A is worse than Video B") is undecidable. Reasoning in ``<think>..</think>`` is ignored; a reply
    cut off inside it is undecidable.
    """
    text = strip_reasoning(text)
    if text is None:
        return None
    structured = _json_verdict(text)
    if structured is not None:
        return structured
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


def json_object(text: str) -> Optional[dict]:
    """The JSON object a structured reply holds (bare or in a fenced block), or None when it holds none."""
    stripped = text.strip()
    if stripped.startswith("```"):  # a fenced JSON block
        stripped = stripped.strip("`").removeprefix("json").strip()
    if not stripped.startswith("{"):
        return None
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _json_verdict(text: str) -> Optional[str]:
    obj = json_object(text)
    if obj is None:
        return None
    value = obj.get("verdict", obj.get("answer"))
    if isinstance(value, str) and value.strip().upper() in VERDICTS:
        return value.strip().upper()
    return None


@dataclass
class Reply:
    """The parts of a chat-completions reply the labeller reads."""

    content: str
    """``choices[0].message.content`` (content parts joined; "" when the server sent null)."""

    finish_reason: Optional[str] = None
    """Why generation stopped: "stop", "length" (cut at the token limit), ..; None when not given."""

    reasoning: bool = False
    """Whether the server returned reasoning separately (``reasoning_content`` / ``reasoning``)."""


def reply_from_body(body: bytes) -> Reply:
    """The ``Reply`` of a chat-completions reply body; ValueError says what is missing."""
    try:
        reply = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"reply body is not JSON ({err.__class__.__name__}): {snippet(body)}") from None
    try:
        choice = reply["choices"][0]
        message = choice["message"]
        content = message["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"reply JSON has no choices[0].message.content: {snippet(body)}") from None
    reasoning = bool(message.get("reasoning_content") or message.get("reasoning"))
    if content is None and reasoning:   # a reasoning model that used its whole budget thinking
        content = ""
    if isinstance(content, list):  # some servers return content parts, like the request's
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is not text: {snippet(body)}")
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return Reply(content=content, finish_reason=finish if isinstance(finish, str) else None, reasoning=reasoning)


def reply_text(body: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions reply body; ValueError says what is missing."""
    return reply_from_body(body).content


def undecided_reason(reply: Reply, cfg: VLMConfig) -> str:
    """Why ``reply`` gives no verdict, with what to change when it was cut at the token limit."""
    cut_in_thinking = strip_reasoning(reply.content) is None or (reply.reasoning and not reply.content.strip())
    if reply.finish_reason == "length":
        where = "inside its reasoning" if cut_in_thinking else "before it answered"
        return (f"reply was cut at the token limit ({cfg.token_limit_field} = {cfg.max_tokens}) {where}: raise "
                f"label.vlm.max_tokens or set label.vlm.thinking_budget: {snippet(reply.content)}")
    if cut_in_thinking:
        return f"reply ends inside a <think> block: {snippet(reply.content)}"
    return f"reply has no decidable answer (A, B or TIE): {snippet(reply.content)}"


def snippet(data, limit: int = 120) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---------------------------------------------------------------------------------------------- media

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


def resized(frame: np.ndarray, image_size: int, resample: str) -> Image.Image:
    """A (H, W, 3) uint8 frame resized so its longer side is ``image_size`` (0: as it is)."""
    image = Image.fromarray(np.ascontiguousarray(frame))
    if image_size:
        scale = image_size / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        if size != image.size:
            name = resample if resample != "auto" else ("nearest" if scale >= 1 else "bicubic")
            image = image.resize(size, _RESAMPLE[name])
    return image


def image_data_url(frame: np.ndarray, image_size: int, resample: str, image_format: str = "png") -> str:
    """A (H, W, 3) uint8 frame resized (``resized``), as a PNG or JPEG (quality 95) data URL."""
    buffer = io.BytesIO()
    image = resized(frame, image_size, resample)
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG")
    return f"data:{_MIME[image_format]};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_url(frame: np.ndarray, image_size: int, resample: str) -> str:
    """A (H, W, 3) uint8 frame resized (``resized``), as a PNG data URL."""
    return image_data_url(frame, image_size, resample, "png")


def mp4_data_url(frames: np.ndarray, fps: float, image_size: int, resample: str) -> str:
    """(n, H, W, 3) uint8 frames, each resized (``resized``), as an H.264 mp4 (yuv420p, CRF 12) data URL at
    ``fps``; an odd size is padded by repeating the last row / column (4:2:0 codes even sizes only)."""
    import av

    images = np.stack([np.asarray(resized(frame, image_size, resample)) for frame in frames])
    pad_h, pad_w = images.shape[1] % 2, images.shape[2] % 2
    if pad_h or pad_w:
        images = np.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                      options={"crf": "12", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = images.shape[2], images.shape[1], "yuv420p"
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def segment_media(cfg: VLMConfig, frames: np.ndarray, picked: list[int], seconds: float) -> list[str]:
    """The data URLs that show frames ``picked`` of one video (T, H, W, 3): one image per frame, or one mp4
    lasting ``seconds``."""
    if cfg.format == "video":
        return [mp4_data_url(frames[picked], max(len(picked) / max(seconds, 1e-6), 1e-3), cfg.image_size,
                             cfg.resample)]
    return [image_data_url(frames[t], cfg.image_size, cfg.resample, cfg.image_format) for t in picked]


# ---------------------------------------------------------------------------------------------- request

def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def _media_parts(cfg: VLMConfig, urls: list[str]) -> list[dict]:
    if cfg.format == "video":
        return [{"type": "video_url", "video_url": {"url": url}} for url in urls]
    return [{"type": "image_url", "image_url": {"url": url}} for url in urls]


def build_body(cfg: VLMConfig, text: str, media_a: list[str], media_b: list[str]) -> dict:
    """The chat-completions body of one question about the media of Video A and Video B."""
    reminder = JSON_REMINDER if cfg.answer_format == "json_schema" else ANSWER_REMINDER
    content = ([_text_part(text), _text_part(VIDEO_A_MARKER)] + _media_parts(cfg, media_a)
               + [_text_part(VIDEO_B_MARKER)] + _media_parts(cfg, media_b) + [_text_part(reminder)])
    body = {"model": cfg.model, "messages": [{"role": "user", "content": content}], "temperature": cfg.temperature,
            cfg.token_limit_field: cfg.max_tokens}
    if cfg.answer_format == "json_schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}
    elif cfg.answer_format == "guided_choice":
        body["guided_choice"] = list(VERDICTS)
    elif cfg.answer_format == "structured_outputs":
        body["structured_outputs"] = {"choice": list(VERDICTS)}
    return finish_body(cfg, body)


def finish_body(cfg: VLMConfig, body: dict) -> dict:
    """The request fields every question shares, set on ``body`` (model, messages, the answer form already in):
    the reasoning switches, ``extra_body`` (merged into objects) and ``drop_fields`` (removed last)."""
    if cfg.reasoning_effort is not None:
        body["reasoning_effort"] = cfg.reasoning_effort
    if cfg.thinking_budget is not None:
        body["thinking_token_budget"] = cfg.thinking_budget
    if cfg.enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": bool(cfg.enable_thinking)}
    for key, value in cfg.extra_body.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    for path in cfg.drop_fields:
        drop_field(body, path)
    return body


def drop_field(body: dict, path: str) -> None:
    """Remove ``path`` ("temperature", or dotted into nested objects: "chat_template_kwargs.enable_thinking")."""
    *parents, last = path.split(".")
    node = body
    for name in parents:
        node = node.get(name)
        if not isinstance(node, dict):
            return
    node.pop(last, None)


def request_key(cfg: VLMConfig, text: str, frames: int) -> str:
    """What identifies one question apart from the pair, segment and order it is about: a hash of the request
    body with placeholders for the media (model, question, every request field, frame count) and of the media
    encoding settings. A change of any of them asks again; a pair's pixels are named by its pair id."""
    count = 1 if cfg.format == "video" else frames
    skeleton = build_body(cfg, text, [f"media:{i}" for i in range(count)], [f"media:{i}" for i in range(count)])
    media = {"format": cfg.format, "image_format": cfg.image_format, "image_size": cfg.image_size,
             "resample": cfg.resample, "frames": frames}
    blob = json.dumps({"body": skeleton, "media": media}, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
