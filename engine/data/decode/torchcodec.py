"""CPU decoding with torchcodec (PyTorch's FFmpeg-based decoder), used when its CPU build is importable.

torchcodec needs the system's FFmpeg shared libraries (``apt-get install ffmpeg``); ``available()`` checks
that the package imports *and* can load them, so a half-installed torchcodec is simply not offered.

In ``seek_mode="exact"`` torchcodec scans the file's packets first, so ``metadata.num_frames`` is the
number of frames actually present: a truncated file reports fewer frames than its header announces, which
``missing_frames_error`` turns into a 'truncated' error before any frame is decoded.
"""
from __future__ import annotations

import functools

import torch

from vidpo.data.decode.base import (
    FramePlan,
    VideoDecodeError,
    VideoDecoder,
    check_file,
    first_line,
    missing_frames_error,
)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        from torchcodec.decoders import VideoDecoder as _TorchCodecDecoder  # noqa: F401
    except Exception:  # ImportError, or RuntimeError/OSError when FFmpeg's libraries cannot be loaded
        return False
    return True


class TorchCodecDecoder(VideoDecoder):
    name = "torchcodec"
    codecs = None

    def __init__(self, device="cpu", threads: int = 1):
        super().__init__("cpu")
        if not available():
            raise ImportError("decoder 'torchcodec' needs torchcodec and FFmpeg's shared libraries "
                              "(pip install torchcodec; apt-get install ffmpeg)")
        from torchcodec.decoders import VideoDecoder as _TorchCodecDecoder

        self._cls = _TorchCodecDecoder
        self.threads = max(1, threads)

    def decode(self, path: str, plan: FramePlan) -> torch.Tensor:
        p = check_file(path)
        try:
            decoder = self._cls(str(p), dimension_order="NHWC", num_ffmpeg_threads=self.threads,
                                seek_mode="exact")
        except (RuntimeError, ValueError, OSError) as exc:
            raise VideoDecodeError(p, "unreadable", f"torchcodec: {first_line(exc)}") from None
        present = decoder.metadata.num_frames or 0
        if present < plan.decode_until:
            raise missing_frames_error(p, plan, present)
        wanted = list(plan.indices)
        if plan.lookahead:
            wanted.append(plan.decode_until - 1)
        try:
            frames = decoder.get_frames_at(wanted).data
        except (RuntimeError, ValueError, IndexError) as exc:
            raise VideoDecodeError(p, "corrupt", f"torchcodec: {first_line(exc)}") from None
        return frames[: len(plan.indices)].contiguous()
