"""Decoding with NVIDIA DALI's video decoder (``fn.decoders.video``), batched, on the GPU or the CPU.

Two backends share this pipeline:

* ``dali`` — the "mixed" decoder: NVDEC on the GPU for H.264, HEVC, AV1, VP8, VP9, MPEG-4 and MJPEG;
  frames land in GPU memory and are resized there.
* ``dali_cpu`` — the CPU operator, which decodes VP8, VP9 and MJPEG only (the reason CI tests DALI on a
  VP9 clip). Asking it for another codec is an 'unsupported' error, not a silent fallback.

The pipeline takes whole encoded files as bytes (``fn.external_source``) plus, per sample, a first frame,
a stride and a frame count. A plan whose frames form an arithmetic progression (integer ratio of native to
target fps) decodes exactly those frames; any other plan decodes the contiguous range and is gathered
afterwards. ``pad_mode="none"`` makes DALI return *fewer* frames for a short or truncated file (its default
pads with black frames, a silently wrong tensor), and the count is checked against the plan.

A DALI pipeline that raises is dead ("no longer valid"), so after an error the pipeline is rebuilt and the
batch retried one sample at a time: the good clips of a batch still decode and each bad one gets its own
error naming its file.
"""
from __future__ import annotations

import functools
import logging
from typing import List, Optional

import numpy as np
import torch

from vidpo.data.decode.base import (
    FramePlan,
    VideoDecodeError,
    VideoDecoder,
    check_file,
    first_line,
    missing_frames_error,
)

log = logging.getLogger("vidpo")

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
GPU_CODECS = frozenset({"h264", "hevc", "av1", "vp8", "vp9", "mpeg4", "mjpeg"})


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def gpu_available() -> bool:
    return available() and torch.cuda.is_available()


def _progression(indices) -> Optional[int]:
    """The common step of ``indices`` if they are strictly increasing with one step, else None."""
    if len(indices) == 1:
        return 1
    step = indices[1] - indices[0]
    if step < 1 or any(b - a != step for a, b in zip(indices, indices[1:])):
        return None
    return step


def read_request(plan: FramePlan):
    """``(start, stride, count, gather)``: DALI decodes frames ``start + k * stride`` for ``k < count`` and
    ``gather`` picks the plan's frames out of them (the rest are the look-ahead frame)."""
    first = plan.indices[0]
    step = _progression(plan.indices)
    if step is not None:
        count = len(plan.indices)
        # The look-ahead frame on the same stride, when it lies inside the announced frame count.
        if plan.lookahead and plan.expected_total is not None and plan.indices[-1] + step + 1 < plan.expected_total:
            count += 1
        return first, step, count, list(range(len(plan.indices)))
    return first, 1, plan.decode_until - first, [i - first for i in plan.indices]


class DaliDecoder(VideoDecoder):
    """``device='cpu'`` is the ``dali_cpu`` backend, ``device='cuda'`` the ``dali`` (mixed/NVDEC) one."""

    def __init__(self, device="cpu", threads: int = 2, batch_size: int = 8):
        if not available():
            raise ImportError("decoder 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130, or "
                              "nvidia-dali-cuda120 for CUDA 12)")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("decoder 'dali' (GPU) needs a CUDA device; use 'dali_cpu' for VP8/VP9 on CPU")
        super().__init__(device)
        if device.type == "cuda" and device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = "dali" if device.type == "cuda" else "dali_cpu"
        self.codecs = GPU_CODECS if device.type == "cuda" else CPU_CODECS
        self.threads = max(1, threads)
        self.batch_size = max(1, batch_size)
        self._pipe = None

    # ----- the pipeline ------------------------------------------------------------------------------
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=self.device.index if gpu else None, prefetch_queue_depth=1)
        def video_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.INT32, ndim=0)
            stride = fn.external_source(name="stride", dtype=types.INT32, ndim=0)
            count = fn.external_source(name="count", dtype=types.INT32, ndim=0)
            return fn.decoders.video(encoded, device="mixed" if gpu else "cpu", start_frame=start,
                                     stride=stride, sequence_length=count, pad_mode="none")

        pipe = video_pipeline()
        pipe.build()
        return pipe

    def _run(self, blobs: List[np.ndarray], requests: list) -> list:
        if self._pipe is None:
            self._pipe = self._build()
        outputs, = self._pipe.run(
            encoded=blobs,
            start=[np.int32(r[0]) for r in requests],
            stride=[np.int32(r[1]) for r in requests],
            count=[np.int32(r[2]) for r in requests])
        return [self._to_torch(outputs[i]) for i in range(len(blobs))]

    def _to_torch(self, tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(tuple(tensor.shape()), dtype=torch.uint8, device=self.device)
            feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(np.array(tensor))

    # ----- decoding ------------------------------------------------------------------------------------
    def _load(self, path: str, plan: FramePlan):
        p = check_file(path)
        try:
            blob = np.fromfile(str(p), dtype=np.uint8)
        except OSError as exc:
            raise VideoDecodeError(p, "unreadable", str(exc)) from None
        return p, blob, read_request(plan)

    def _finish(self, p, plan: FramePlan, request, frames: torch.Tensor) -> torch.Tensor:
        start, stride, count, gather = request
        if frames.shape[0] < count:
            # Frames arrive in order, so the last one that did bounds what the file holds.
            n = frames.shape[0]
            raise missing_frames_error(p, plan, start + (n - 1) * stride + 1 if n else start)
        return frames[gather]

    def decode(self, path: str, plan: FramePlan) -> torch.Tensor:
        result = self.decode_many([(path, plan)])[0]
        if isinstance(result, VideoDecodeError):
            raise result
        return result

    def decode_many(self, items: List[tuple]) -> List[object]:
        results: List[object] = [None] * len(items)
        loaded = []
        for i, (path, plan) in enumerate(items):
            try:
                loaded.append((i, *self._load(path, plan), plan))
            except VideoDecodeError as exc:
                results[i] = exc
        for chunk_start in range(0, len(loaded), self.batch_size):
            chunk = loaded[chunk_start:chunk_start + self.batch_size]
            try:
                frames = self._run([c[2] for c in chunk], [c[3] for c in chunk])
            except RuntimeError as exc:
                # The pipeline is dead; rebuild and isolate the bad clip(s) one at a time.
                log.debug("DALI batch failed (%s); retrying its %d clips one by one", first_line(exc), len(chunk))
                self._pipe = None
                frames = []
                for c in chunk:
                    try:
                        frames.append(self._run([c[2]], [c[3]])[0])
                    except RuntimeError as single:
                        self._pipe = None
                        frames.append(self._error(c[1], single))
            for (i, p, _, request, plan), out in zip(chunk, frames):
                if isinstance(out, VideoDecodeError):
                    results[i] = out
                    continue
                try:
                    results[i] = self._finish(p, plan, request, out)
                except VideoDecodeError as exc:
                    results[i] = exc
        return results

    def _error(self, path, exc: RuntimeError) -> VideoDecodeError:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        # DALI's message is a traceback-like block; keep the assertion that says what failed.
        detail = next((line.strip() for line in str(exc).splitlines() if "failed" in line or "Error" in line),
                      first_line(exc))
        kind = "corrupt" if "decoder" in text or "frame" in text.lower() else "unreadable"
        return VideoDecodeError(path, kind, f"DALI: {detail}")

    def close(self) -> None:
        self._pipe = None
