"""What every video decoding backend shares: errors, header probing, frame plans, resize / crop / normalize.

A clip becomes a model input in three steps that do not depend on the backend:

1. ``probe(path)`` reads the container header (codec, native fps, frame count, size) without decoding.
2. ``plan_frames(...)`` maps the sampling request to native frame indices. Target frame ``k`` (of
   ``frames``) sits at time ``t_k = start + k / fps_target``; the native frame shown at that time is
   ``i_k = floor(t_k * fps_native + 1e-6)`` (frame ``i`` covers ``[i / fps_native, (i + 1) / fps_native)``).
   A clip whose window ``[start, end)`` (or whole length) ends before ``i_{frames-1}`` is *too short*.
3. A backend decodes exactly those frames to ``uint8 (F, H, W, 3)`` and ``prepare_frames`` resizes the
   shorter side to cover the target size (bilinear, antialiased), center-crops and maps ``[0, 255]`` to
   ``[-1, 1]``, giving ``float32 (3, F, h, w)`` (the VAE's input layout without the batch dim).

Damaged input is never returned as frames: every backend checks that it decoded every frame the plan
needs, plus one *look-ahead* frame after the last one when the header says the file has at least two more
(a decoder that hits corruption usually still emits the frame it was in the middle of, partially decoded;
failing to reach the next frame exposes it). Failures raise ``VideoDecodeError`` whose ``kind`` says what
went wrong and whose message starts with the file name.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

ERROR_KINDS = ("missing", "unreadable", "unsupported", "corrupt", "truncated", "too_short")
RESIZE_MODES = ("crop", "stretch")
_EPS = 1e-6


class VideoDecodeError(RuntimeError):
    """A video that cannot give the frames asked for. ``kind`` is one of ``ERROR_KINDS``."""

    def __init__(self, path: str | os.PathLike, kind: str, detail: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown decode error kind {kind!r}")
        self.path, self.kind, self.detail = str(path), kind, detail
        super().__init__(f"{path}: {kind}: {detail}")


@dataclass(frozen=True)
class VideoInfo:
    """Header facts of a video file (nothing decoded)."""

    codec: str
    fps: Optional[float]
    num_frames: Optional[int]
    """Frames the header announces (frame count, else duration * fps), None when it says neither."""
    width: int
    height: int
    duration: Optional[float]


@dataclass(frozen=True)
class SamplingSpec:
    """How a clip is sampled and shaped into a model input."""

    fps: float
    """Target frame rate; frames are taken at ``start + k / fps``. 0 keeps the native rate."""
    frames: int
    """Frames per sample (the VAE wants ``1 + 4k`` for Wan / CogVideoX)."""
    height: int
    width: int
    resize: str = "crop"
    """'crop': scale the shorter side to cover (height, width), then center-crop; 'stretch': resize to
    exactly (height, width) ignoring the aspect ratio."""

    def __post_init__(self):
        if self.frames < 1 or self.height < 1 or self.width < 1 or self.fps < 0:
            raise ValueError(f"bad sampling spec {self}: frames, height, width must be >= 1 and fps >= 0")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r} is not one of {list(RESIZE_MODES)}")


@dataclass(frozen=True)
class FramePlan:
    """Native frames to decode for one clip."""

    indices: tuple
    """Native frame index of every output frame (non-decreasing; repeats when the target fps exceeds the
    native one)."""
    decode_until: int
    """Exclusive end of the frames that must decode: ``indices[-1] + 1``, plus the look-ahead frame."""
    expected_total: Optional[int]
    """Frames the header announces (None when unknown)."""

    @property
    def lookahead(self) -> bool:
        return self.decode_until > self.indices[-1] + 1


def check_file(path: str | os.PathLike) -> Path:
    """The path, or VideoDecodeError('missing' / 'unreadable') before any decoder touches it."""
    p = Path(path)
    if not p.exists():
        raise VideoDecodeError(p, "missing", "file not found")
    if not p.is_file():
        raise VideoDecodeError(p, "unreadable", "not a regular file")
    if p.stat().st_size == 0:
        raise VideoDecodeError(p, "unreadable", "empty file")
    return p


def probe(path: str | os.PathLike) -> VideoInfo:
    """Read the header with PyAV (torchcodec when PyAV is absent); VideoDecodeError if it cannot be parsed."""
    p = check_file(path)
    try:
        import av  # noqa: F401
    except ImportError:
        return _probe_torchcodec(p)
    import av
    import av.logging

    try:
        # Capture FFmpeg's complaints about a damaged header: the error raised below says it in one line.
        with av.logging.Capture(local=True), av.open(str(p)) as container:
            if not container.streams.video:
                raise VideoDecodeError(p, "unreadable", "no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else (
                float(stream.guessed_rate) if stream.guessed_rate else None)
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1e6  # microseconds (AV_TIME_BASE)
            count = int(stream.frames) if stream.frames else None
            if count is None and duration is not None and fps:
                count = int(round(duration * fps))
            return VideoInfo(codec=stream.codec_context.name, fps=fps, num_frames=count,
                             width=stream.codec_context.width, height=stream.codec_context.height,
                             duration=duration)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoDecodeError(p, "unreadable", f"cannot parse the container ({first_line(exc)})") from None


def _probe_torchcodec(p: Path) -> VideoInfo:
    try:
        from torchcodec.decoders import VideoDecoder
    except ImportError:
        raise ImportError("reading video headers needs PyAV (pip install av) or torchcodec") from None
    try:
        meta = VideoDecoder(str(p), seek_mode="approximate").metadata
    except (RuntimeError, ValueError) as exc:
        raise VideoDecodeError(p, "unreadable", f"cannot parse the container ({first_line(exc)})") from None
    return VideoInfo(codec=meta.codec or "?", fps=meta.average_fps, num_frames=meta.num_frames,
                     width=meta.width, height=meta.height, duration=meta.duration_seconds)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (what a one-line error names), else its type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def plan_frames(path: str | os.PathLike, spec: SamplingSpec, *, native_fps: Optional[float],
                num_frames: Optional[int], start: Optional[float] = None, end: Optional[float] = None) -> FramePlan:
    """Native frame indices for ``spec`` (formula in the module docstring); 'too_short' when the clip (or its
    ``[start, end)`` window) cannot hold them according to the header."""
    if not native_fps or native_fps <= 0:
        raise VideoDecodeError(path, "unreadable", "unknown frame rate (give 'fps' in the manifest)")
    target = spec.fps or native_fps
    start = start or 0.0
    indices = tuple(int(math.floor((start + k / target) * native_fps + _EPS)) for k in range(spec.frames))
    stop = num_frames
    if end is not None:
        window_stop = int(math.ceil(end * native_fps - _EPS))
        stop = window_stop if stop is None else min(stop, window_stop)
    if stop is not None and indices[-1] >= stop:
        span = f"[{start:g}s, {end:g}s)" if end is not None else f"from {start:g}s"
        raise VideoDecodeError(path, "too_short",
                               f"{spec.frames} frames at {target:g} fps {span} need native frame {indices[-1]}, "
                               f"but only frames below {stop} are available ({native_fps:g} fps)")
    until = indices[-1] + 1
    # Look ahead only when the header promises at least two more frames, so a header that over-counts by
    # one (rounding of duration * fps) never makes a healthy file look truncated.
    if num_frames is not None and indices[-1] + 2 < num_frames:
        until += 1
    return FramePlan(indices=indices, decode_until=until, expected_total=num_frames)


def missing_frames_error(path, plan: FramePlan, decoded: int, detail: str = "") -> VideoDecodeError:
    """The error for a decoder that produced only ``decoded`` of the ``plan.decode_until`` frames."""
    extra = f" ({detail})" if detail else ""
    if plan.expected_total is not None and decoded < plan.expected_total:
        return VideoDecodeError(path, "truncated", f"decoded {decoded} of the {plan.expected_total} frames its "
                                                   f"header announces; frame {decoded} is damaged or missing{extra}")
    return VideoDecodeError(path, "too_short", f"has {decoded} frames, needs {plan.decode_until}{extra}")


def prepare_frames(frames: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """``uint8 (F, H, W, 3)`` -> ``float32 (3, F, height, width)`` in ``[-1, 1]`` (resize, center-crop).

    Resizing is bilinear with antialiasing on the frames' own device (GPU frames stay on the GPU).
    """
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {tuple(frames.shape)}")
    x = frames.permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    h, w = x.shape[-2:]
    if spec.resize == "stretch":
        size = (spec.height, spec.width)
    else:
        scale = max(spec.height / h, spec.width / w)
        size = (max(spec.height, int(round(h * scale))), max(spec.width, int(round(w * scale))))
    if tuple(size) != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - spec.height) // 2, (x.shape[-1] - spec.width) // 2
    x = x[..., top:top + spec.height, left:left + spec.width]
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


class VideoDecoder:
    """Backend interface. ``decode`` returns ``uint8 (len(plan.indices), H, W, 3)`` on ``self.device``."""

    name = "base"
    codecs: Optional[frozenset] = None
    """Codec names (FFmpeg's) this backend decodes; None means any FFmpeg can."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def supports(self, codec: str) -> bool:
        return self.codecs is None or codec in self.codecs

    def decode(self, path: str, plan: FramePlan) -> torch.Tensor:
        raise NotImplementedError

    def decode_many(self, items: List[tuple]) -> List[object]:
        """``[(path, plan)] -> [frames | VideoDecodeError]`` (batched backends override this)."""
        out = []
        for path, plan in items:
            try:
                out.append(self.decode(path, plan))
            except VideoDecodeError as exc:
                out.append(exc)
        return out

    def close(self) -> None:
        pass
