"""Pixels of pairs on disk: H.264 mp4s for people, uint8 frame shards for labellers, and their reader.

Clips are float tensors ``(3, F, H, W)`` in [-1, 1] (vidpo's pixel convention); uint8 pixels are
``round((x + 1) * 127.5)`` and back ``u / 127.5 - 1`` (the convention of ``vidpo.evaluation.visualize``).

**mp4** (:func:`write_mp4`, :func:`read_mp4`, through PyAV): H.264 (libx264), yuv420p, BT.601 limited range
(tagged in the stream, so players convert back the same way), ``crf`` 18 by default, the index at the front of
the file (``movflags=+faststart``: a browser starts playing before the whole file arrived). H.264 4:2:0 codes
only even sizes, and x264's frame cropping (``crop-rect``) also works in 2x2 steps, so an odd height or width is
padded by repeating the last row / column; the true size is written into the container's ``comment`` tag
(``vidpo:size=WxH``) and :func:`read_mp4` crops it off again. Players show the padded picture (one extra row or
column). Tiny sizes (2x2, 16x16) encode as they are, but 4:2:0 keeps one colour per 2x2 block, so a tiny clip
loses its colour detail; ``scale`` enlarges it by nearest neighbour first (``decode_pairs`` does so up to about
128 pixels, :func:`display_scale`), which keeps every pixel's colour and its sharp edges in a browser.

**Decoded pairs** (``vidpo.stages.decode.decode_pairs`` writes them beside the latent shards)::

    shards/shard_00000.safetensors   first, second (S, C, T, H', W')       latents (vidpo generate)
    frames/shard_00000.safetensors   first, second (S, 3, F, H, W) uint8    pixels, F = 1 + k (T - 1)
    videos/<pair_id>_first.mp4       one H.264 mp4 per video
    decode.json                      what the decode did (shards decoded / skipped, sizes, the VAE)

A frames shard mirrors its latent shard row by row; its safetensors metadata (``format`` "vidpo-frames/1",
``source``, ``fps``, ``temporal_compression``, ``latent_frames``, ``vae``) says where it came from.
:class:`FramesWriter` streams one batch at a time into it (a real shard's pixels need not fit in memory).
:class:`PairFrames` reads a record's pixels from it, or, for a pixel-space model (the shapes world) whose pairs
were never decoded, from the latent shard itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from vidpo.data.pairs import PairDataError, PairRecord, ShardReader
from vidpo.utils import atomic

FRAMES_DIR = "frames"
VIDEOS_DIR = "videos"
DECODE_FILE = "decode.json"
FRAMES_FORMAT = "vidpo-frames/1"
SIZE_TAG = "vidpo:size="


# ----- pixel conventions ----------------------------------------------------------------------------------------
def to_uint8(clip: torch.Tensor) -> torch.Tensor:
    """Float pixels in [-1, 1] (any shape) -> uint8 ``round((x + 1) * 127.5)``; uint8 input is returned as is."""
    if clip.dtype == torch.uint8:
        return clip
    return ((clip.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


# ----- mp4 ------------------------------------------------------------------------------------------------------
def write_mp4(path: str | os.PathLike, clip: torch.Tensor, fps: float, *, crf: int = 18, preset: str = "medium",
              scale: int = 1) -> Path:
    """Write ``clip`` (3, F, H, W), float in [-1, 1] or uint8, as an H.264 mp4 at ``fps``, atomically.

    Odd sizes are padded to even ones (module docstring); ``crf`` 0..51 trades size for fidelity (0: lossless
    luma, chroma is still subsampled); ``scale`` > 1 enlarges each pixel to a ``scale`` x ``scale`` block first
    (nearest neighbour: a 16 x 16 clip stays crisp in a browser, and its colours survive 4:2:0 chroma)."""
    import av

    if clip.dim() != 4 or clip.shape[0] != 3 or min(clip.shape[1:]) < 1:
        raise ValueError(f"write_mp4: clip must be (3, F, H, W) with F, H, W >= 1, got {tuple(clip.shape)}")
    if not fps > 0:
        raise ValueError(f"write_mp4: fps must be > 0, got {fps}")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"write_mp4: scale must be an integer >= 1, got {scale}")
    pixels = to_uint8(clip.detach().cpu())
    if scale > 1:
        pixels = pixels.repeat_interleave(int(scale), dim=2).repeat_interleave(int(scale), dim=3)
    frames = pixels.permute(1, 2, 3, 0).contiguous().numpy()  # (F, H, W, 3)
    _, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            container.metadata["comment"] = f"{SIZE_TAG}{width}x{height}"
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                          options={"crf": str(int(crf)), "preset": preset})
            stream.width, stream.height, stream.pix_fmt = width + pad_w, height + pad_h, "yuv420p"
            context = stream.codec_context
            # BT.601 limited range: what swscale's rgb24 -> yuv420p produces; tagged so players convert it back.
            context.color_range, context.colorspace, context.color_primaries, context.color_trc = 1, 6, 6, 6
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def read_mp4(path: str | os.PathLike) -> torch.Tensor:
    """All frames of a video, ``(3, F, H, W)`` float32 in [-1, 1]; a vidpo mp4 is cropped to its true size."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        size = _tagged_size(container.metadata.get("comment", ""))
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]
    if not frames:
        raise ValueError(f"{path}: no frames")
    pixels = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)
    if size is not None:
        pixels = pixels[:, :, :size[1], :size[0]]
    return from_uint8(pixels.contiguous())


def _tagged_size(comment: str) -> Optional[tuple[int, int]]:
    match = re.fullmatch(re.escape(SIZE_TAG) + r"(\d+)x(\d+)", comment.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def display_scale(height: int, width: int, target: int = 128) -> int:
    """The integer enlargement that brings a clip's short side to at least ``target`` pixels (1 for real videos)."""
    return max(1, -(-target // max(1, min(height, width))))


# ----- the decoded-pairs layout ---------------------------------------------------------------------------------
def frames_name(shard: str) -> str:
    """The frames shard of a latent shard: ``shards/shard_00000.safetensors`` -> ``frames/shard_00000.safetensors``."""
    return f"{FRAMES_DIR}/{Path(shard).name}"


def video_name(pair_id: str, key: str) -> str:
    """``videos/<pair_id>_<key>.mp4``; characters outside ``[A-Za-z0-9._-]`` become ``_`` (plus a short hash of
    the id, so two ids never share a file)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", pair_id)
    if safe != pair_id or not safe or safe.startswith("."):
        safe = f"{'_' if safe.startswith('.') else ''}{safe}-{hashlib.sha1(pair_id.encode()).hexdigest()[:8]}"
    return f"{VIDEOS_DIR}/{safe}_{key}.mp4"


def tensor_shapes(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``({name: shape}, metadata)`` of a safetensors file, from its header only; PairDataError if unreadable."""
    try:
        with safe_open(str(path), "pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            return shapes, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise PairDataError(f"{path}: unreadable ({exc})") from None


class FramesWriter:
    """Writes a uint8 safetensors file one batch of rows at a time, atomically (a temporary name until
    :meth:`close` finds every row written). ``shapes`` fixes the tensors and their order; rows are written
    tensor after tensor, in order."""

    def __init__(self, path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f"{self.path.name}{atomic.TMP_MARK}{os.getpid()}")
        self._order = list(shapes)
        self._rows = {name: 0 for name in shapes}
        self._shapes = {name: tuple(int(v) for v in shape) for name, shape in shapes.items()}
        header, offset = {}, 0
        for name, shape in self._shapes.items():
            size = int(np.prod(shape))
            header[name] = {"dtype": "U8", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append ``rows`` (n, *shape[1:]) uint8 to tensor ``name`` (earlier tensors must be complete)."""
        position = self._order.index(name)
        for before in self._order[:position]:
            if self._rows[before] != self._shapes[before][0]:
                raise ValueError(f"{self.path}: '{name}' written before '{before}' is complete")
        shape = self._shapes[name]
        if rows.dtype != torch.uint8 or tuple(rows.shape[1:]) != shape[1:]:
            raise ValueError(f"{self.path}: '{name}' rows must be uint8 (n, {', '.join(map(str, shape[1:]))}), "
                             f"got {rows.dtype} {tuple(rows.shape)}")
        if self._rows[name] + rows.shape[0] > shape[0]:
            raise ValueError(f"{self.path}: more than {shape[0]} rows written to '{name}'")
        self._file.write(rows.contiguous().cpu().numpy().tobytes())
        self._rows[name] += rows.shape[0]

    def close(self) -> None:
        """Finish the file and rename it into place; ValueError (and no file) if a row is missing."""
        missing = [f"{name}: {self._rows[name]} of {shape[0]} rows" for name, shape in self._shapes.items()
                   if self._rows[name] != shape[0]]
        if missing:
            self.abort()
            raise ValueError(f"{self.path}: incomplete ({'; '.join(missing)})")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the temporary file (the target is left as it was)."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "FramesWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class PairFrames:
    """A record's pixels, ``(3, F, H, W)``: from ``frames/`` when its shard was decoded, else (pixel-space pairs,
    whose latents are pixels) from the latent shard.

    ``pixel_space``: None (auto) falls back to the latents when they have 3 channels (a pixel-space model; the
    latents of the Wan and CogVideoX VAEs have 16); True always falls back; False never does. ``rows_only``: read
    one row at a time instead of whole shards (``ShardReader``). Without frames and
    without the fallback, :meth:`get` is a PairDataError that says to decode the pairs first."""

    def __init__(self, root: str | os.PathLike, *, pixel_space: Optional[bool] = None, max_cached: int = 2,
                 rows_only: bool = False):
        self.root = Path(root)
        self.pixel_space = pixel_space
        self._frames = ShardReader(self.root, max_cached=max_cached, rows_only=rows_only)
        self._latents = ShardReader(self.root, max_cached=max_cached, rows_only=rows_only)

    def has_frames(self, record: PairRecord) -> bool:
        return (self.root / frames_name(record.shard)).is_file()

    def get_uint8(self, record: PairRecord, key: str) -> torch.Tensor:
        """The record's ``key`` video as uint8 ``(3, F, H, W)``."""
        if self.has_frames(record):
            return self._frames.get(replace(record, shard=frames_name(record.shard)), key)
        return to_uint8(self._fallback(record, key))

    def get(self, record: PairRecord, key: str) -> torch.Tensor:
        """The record's ``key`` video as float32 ``(3, F, H, W)`` in [-1, 1] (the latents themselves, clamped,
        for undecoded pixel-space pairs)."""
        if self.has_frames(record):
            return from_uint8(self.get_uint8(record, key))
        return self._fallback(record, key).float().clamp(-1.0, 1.0)

    def _fallback(self, record: PairRecord, key: str) -> torch.Tensor:
        latents = self._latents.get(record, key)
        if self.pixel_space is False or (self.pixel_space is None and latents.shape[0] != 3):
            raise PairDataError(f"{self.root / frames_name(record.shard)}: missing, and pair {record.pair_id}'s "
                                f"{key} is latent, shape {tuple(latents.shape)}, not pixels: decode the pairs first "
                                "(vidpo.stages.decode.decode_pairs)")
        return latents
