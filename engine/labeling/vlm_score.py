"""Pointwise scores from a vision-language model served over the OpenAI chat-completions API: one clip and its
caption per question, answered on a declared integer scale ``[low, high]``.

The pairwise labeller (``vidpo.labeling.vlm``) compares two videos; a served *reward* judges one clip at a time
(``vidpo.objectives.rewards_served``). Everything but the question is the labeller's: ``VLMLabeler`` is the HTTP
client (reachability probe, retries with backoff on timeouts / 408 / 429 / 5xx, a 4xx fails at once, request
statistics), ``AnswerCache`` keeps every reply on disk (a rerun asks nothing already answered), and the media are
``vidpo.labeling.vlm_request``'s (frames as ``image_url`` parts, or one mp4 ``video_url`` part with
``format: video``). One question is::

    [question(caption, low, high, frames)]  [media of the clip]  [answer reminder]

* ``kind: video`` -- one question per clip showing ``frames_per_segment`` evenly spaced frames (images, or one mp4
  lasting the clip's duration); its score is the parsed answer.
* ``kind: image`` -- one question per picked frame (a single image each); the clip's score is the mean of the frames'
  answers (image-text judges see images).

**Answers** (``VLMConfig.answer_format``): ``text`` (an integer in words: "7", "Score: 7", "7/10", a JSON object
``{"score": 7}``; ``parse_score``), ``json_schema`` (``response_format`` with the schema ``{"score": integer in
[low, high]}``), ``guided_choice`` / ``structured_outputs`` (vLLM's choice among the strings "low" .. "high"). A
number outside the scale is no answer. Reasoning in ``<think>..</think>`` is ignored.

**Outcome of a clip** (``ItemScore.status``): ``ok`` when every question of the clip has a score; ``failed`` when
one got no reply (not cached: asked again by the next run); ``unparseable`` when a reply has no score on the scale
(cached: the same question gets the same answer). A clip that is not ``ok`` has no score (None) and a message that
names it; what that means for training is the caller's (a neutral weight there, never a score of 0).

The cache key of a question is (clip id, part = the frame's position for ``image`` / 0 for ``video``, order 0, a
hash of the request skeleton, the scale, the media settings and the clip's ``media_id``), so a changed question,
model, scale or clip asks again, and a rerun reads every answered question from disk.
"""
from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from vidpo.config import VLMConfig
from vidpo.labeling.answer_cache import AnswerCache
from vidpo.labeling.base import STATUS_FAILED, STATUS_OK, STATUS_UNPARSEABLE
from vidpo.labeling.vlm import RequestFailed, VLMLabeler
from vidpo.labeling.vlm_request import (
    Reply,
    finish_body,
    image_data_url,
    json_object,
    pick_frames,
    segment_media,
    snippet,
    strip_reasoning,
)

KINDS = ("image", "video")
QUESTION_FIELDS = ("caption", "low", "high", "frames")
"""Placeholders a score question may use."""
DEFAULT_QUESTIONS = {
    "video": ('A video was generated for the text prompt: "{caption}".\nBelow are {frames} frames of it, in order. '
              "Rate how well the video shows the prompt and how good it looks and moves, from {low} (worst) to "
              "{high} (best)."),
    "image": ('An image was generated for the text prompt: "{caption}".\nRate how well the image shows the prompt '
              "and how good it looks, from {low} (worst) to {high} (best)."),
}
"""The question of each kind when the reward entry gives none."""


def score_schema(low: int, high: int) -> dict:
    """The JSON schema of a structured answer (``answer_format: json_schema``): ``{"score": integer}``."""
    return {"type": "object", "properties": {"score": {"type": "integer", "minimum": low, "maximum": high}},
            "required": ["score"], "additionalProperties": False}


def score_reminder(cfg: VLMConfig, low: int, high: int) -> str:
    if cfg.answer_format == "json_schema":
        return f'Answer with a JSON object {{"score": N}}, N one integer from {low} to {high}.'
    return f"Answer with exactly one integer from {low} to {high}."


def build_score_body(cfg: VLMConfig, text: str, media: list[str], low: int, high: int) -> dict:
    """The chat-completions body of one pointwise question: the question, the clip's media, the answer reminder."""
    parts = ([{"type": "video_url", "video_url": {"url": url}} for url in media] if cfg.format == "video"
             else [{"type": "image_url", "image_url": {"url": url}} for url in media])
    content = [{"type": "text", "text": text}] + parts + [{"type": "text", "text": score_reminder(cfg, low, high)}]
    body = {"model": cfg.model, "messages": [{"role": "user", "content": content}], "temperature": cfg.temperature,
            cfg.token_limit_field: cfg.max_tokens}
    choices = [str(v) for v in range(low, high + 1)]
    if cfg.answer_format == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "score", "strict": True,
                                                                          "schema": score_schema(low, high)}}
    elif cfg.answer_format == "guided_choice":
        body["guided_choice"] = choices
    elif cfg.answer_format == "structured_outputs":
        body["structured_outputs"] = {"choice": choices}
    return finish_body(cfg, body)


_INTEGER = r"[-+]?\d+(?:\.0+)?"
_MARKED = re.compile(r"\b(?:final\s+score|score|rating|answer)\b\s*(?:is|:|=|-)?\s*[\s*_\"'`(\[]*(" + _INTEGER + r")\b",
                     re.IGNORECASE)
_OUT_OF = re.compile(r"(" + _INTEGER + r")\s*(?:/|out\s+of)\s*(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(" + _INTEGER + r")(?![\w.])")


def parse_score(text: str, low: int, high: int) -> Optional[int]:
    """The integer score in ``[low, high]`` of a reply, or None when it gives none.

    Accepted, in order: a JSON object ``{"score": n}`` (``rating`` / ``answer`` too); a reply that is only the number
    (up to punctuation and markdown: "**7**."); the last marked number ("Score: 7", "My rating is 8"); a fraction whose
    denominator is ``high`` ("7/10", "7 out of 10"); otherwise the one integer the reply mentions. A number off the
    scale, two different unmarked numbers, or a reply cut inside ``<think>`` give None."""
    text = strip_reasoning(text)
    if text is None:
        return None
    value = _json_score(text)
    if value is None:
        core = text.strip().strip("*_`'\". \n")
        if re.fullmatch(_INTEGER, core):
            value = core
        elif _MARKED.findall(text):
            value = _MARKED.findall(text)[-1]
        else:
            fractions = [num for num, den in _OUT_OF.findall(text) if int(den) == high]
            numbers = {float(n) for n in _NUMBER.findall(text)}
            value = fractions[-1] if fractions else (numbers.pop() if len(numbers) == 1 else None)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not number.is_integer() or not low <= number <= high:
        return None
    return int(number)


def _json_score(text: str):
    obj = json_object(text)
    if obj is None:
        return None
    for name in ("score", "rating", "answer"):
        value = obj.get(name)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return value
    return None


def unscored_reason(reply: Reply, cfg: VLMConfig, low: int, high: int) -> str:
    """Why ``reply`` gives no score, with what to change when it was cut at the token limit."""
    if reply.finish_reason == "length":
        return (f"reply was cut at the token limit ({cfg.token_limit_field} = {cfg.max_tokens}): raise its "
                f"max_tokens: {snippet(reply.content)}")
    if strip_reasoning(reply.content) is None:
        return f"reply ends inside a <think> block: {snippet(reply.content)}"
    return f"reply has no score on the scale {low}..{high}: {snippet(reply.content)}"


@dataclass
class ScoreItem:
    """One clip to score: its id (the cache's item), caption, what identifies its pixels (``media_id``: a changed
    clip asks again) and, when some question is not answered yet, the frames shown (``ServedScorer.pick`` of the
    clip's frames, ``(n, H, W, 3)`` uint8) and the clip's duration in seconds (an mp4 plays that long)."""

    item_id: str
    caption: str
    media_id: str
    frames: Optional[np.ndarray] = None
    seconds: float = 1.0


@dataclass
class ItemScore:
    """The outcome of one clip (module doc): ``score`` None unless ``status`` is ok."""

    item_id: str
    score: Optional[float]
    status: str
    answers: list = field(default_factory=list)
    message: Optional[str] = None


class ServedScorer:
    """Pointwise scores of clips from a served VLM (module doc), ``concurrency`` clips in flight."""

    def __init__(self, config: VLMConfig, kind: str, low: int, high: int, *, question: Optional[str] = None,
                 cache: Optional[AnswerCache] = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not low < high:
            raise ValueError(f"the scale must have low < high, got [{low}, {high}]")
        self.config, self.kind, self.low, self.high = config, kind, int(low), int(high)
        self.question = question or DEFAULT_QUESTIONS[kind]
        self.cache = cache
        self.client = VLMLabeler(config, cache=cache)

    def pick(self, frames: int) -> list[int]:
        """The frames of a ``frames``-frame clip that are shown: ``frames_per_segment`` evenly spaced."""
        return pick_frames(torch.arange(frames), self.config.frames_per_segment)

    def parts(self, frames: int) -> int:
        """Questions per clip: one per picked frame (image), one (video)."""
        return len(self.pick(frames)) if self.kind == "image" else 1

    def text(self, caption: str, shown: int) -> str:
        return self.question.format(caption=caption, low=self.low, high=self.high, frames=shown)

    def key(self, item: ScoreItem, shown: int) -> str:
        """The request hash of ``item``'s questions (module doc)."""
        cfg = self.config
        count = 1 if (cfg.format == "video" or self.kind == "image") else shown
        skeleton = build_score_body(cfg, self.text(item.caption, shown), [f"media:{i}" for i in range(count)],
                                    self.low, self.high)
        media = {"kind": self.kind, "format": cfg.format, "image_format": cfg.image_format,
                 "image_size": cfg.image_size, "resample": cfg.resample, "frames": shown, "clip": item.media_id}
        blob = json.dumps({"body": skeleton, "media": media}, sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def answered(self, item: ScoreItem, frames: int) -> bool:
        """Whether every question of ``item`` (a clip of ``frames`` frames) has a reply in the cache."""
        if self.cache is None:
            return False
        picked = self.pick(frames)
        key = self.key(item, len(picked))
        return all(self.cache.get(item.item_id, part, 0, key) is not None for part in range(self.parts(frames)))

    def _media(self, item: ScoreItem, part: int) -> list[str]:
        cfg = self.config
        if item.frames is None:
            raise RequestFailed(f"clip {item.item_id!r} has no frames to send and no cached answer")
        if self.kind == "image":
            return [image_data_url(item.frames[part], cfg.image_size, cfg.resample, cfg.image_format)]
        return segment_media(cfg, item.frames, list(range(len(item.frames))), item.seconds)

    def score_one(self, item: ScoreItem, frames: int) -> ItemScore:
        """Ask (or read from the cache) every question of ``item`` and combine the answers (module doc)."""
        cfg = self.config
        picked = self.pick(frames)
        text, key = self.text(item.caption, len(picked)), self.key(item, len(picked))
        answers: list[Optional[int]] = []
        for part in range(self.parts(frames)):
            where = f"frame {picked[part]}" if self.kind == "image" else f"{len(picked)} frames"
            try:
                reply = self.client.reply(item.item_id, part, 0, key, lambda: build_score_body(
                    cfg, text, self._media(item, part), self.low, self.high))
            except RequestFailed as problem:
                return ItemScore(item.item_id, None, STATUS_FAILED, answers,
                                 f"served score: clip {item.item_id!r} ({where}): failed: {problem}")
            value = parse_score(reply.content, self.low, self.high)
            if value is None:
                return ItemScore(item.item_id, None, STATUS_UNPARSEABLE, answers,
                                 f"served score: clip {item.item_id!r} ({where}): unparseable: "
                                 f"{unscored_reason(reply, cfg, self.low, self.high)}")
            answers.append(value)
        return ItemScore(item.item_id, float(np.mean(answers)), STATUS_OK, answers)

    def score(self, items: Sequence[ScoreItem], frames: int) -> list[ItemScore]:
        """``ItemScore`` of every item, in order; ``frames`` frames per clip. ``ServerUnreachable`` is raised once
        (before any question) when nothing answers at ``base_url`` and some question is not cached."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="vidpo-score") as pool:
            return list(pool.map(lambda item: self.score_one(item, frames), items))
