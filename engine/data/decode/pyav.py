"""CPU decoding with PyAV (FFmpeg's libavcodec): every codec FFmpeg knows, the always-available fallback.

Frames are numbered in presentation order as the decoder emits them (frame ``n`` is the ``n``-th frame
out of the decoder), the same numbering DALI and torchcodec use. For a plan whose first frame lies deep in
the file (``SEEK_MIN_FRAMES`` or more) the decoder seeks to the preceding key frame and numbers frames from
their timestamps instead, so a 2-second window of a 10-minute video does not decode the 10 minutes.

Corruption is caught three ways: a frame FFmpeg flags as corrupt (it concealed damaged data, which
otherwise comes out as a plausible but wrong picture); FFmpeg's error messages, captured while decoding
(thread-locally, so parallel workers do not see each other's; the demuxer logs on the calling thread);
and the frame count, checked against the plan (see ``vidpo.data.decode.base``). Every frame up to the
plan's end is checked, also the ones not kept, because damage propagates to the frames that reference it.
"""
from __future__ import annotations

import math

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

SEEK_MIN_FRAMES = 64
"""Plans starting at or after this native frame seek instead of decoding from the beginning."""


def available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


class PyAVDecoder(VideoDecoder):
    name = "pyav"
    codecs = None

    def __init__(self, device="cpu", threads: int = 0):
        """``threads``: 0 lets FFmpeg slice-thread each clip; 1 decodes on the calling thread only (when
        parallel workers already keep the cores busy; it also keeps every codec message on the capturing
        thread)."""
        super().__init__("cpu")
        import av
        import av.logging
        from av.video.reformatter import VideoReformatter

        self._av = av
        self._reformatter = VideoReformatter
        # Without a log level FFmpeg's messages are dropped before Capture can see them; ERROR keeps the
        # chatter of healthy files (warnings) out and the evidence of damaged ones in.
        if av.logging.get_level() is None or av.logging.get_level() < av.logging.ERROR:
            av.logging.set_level(av.logging.ERROR)
        self.threads = threads

    def decode(self, path: str, plan: FramePlan) -> torch.Tensor:
        av = self._av
        p = check_file(path)
        wanted_set = set(plan.indices)
        wanted = sorted(wanted_set)
        got: dict[int, np.ndarray] = {}
        decoded = 0
        with av.logging.Capture(local=True) as logs:
            try:
                with av.open(str(p)) as container:
                    if not container.streams.video:
                        raise VideoDecodeError(p, "unreadable", "no video stream")
                    stream = container.streams.video[0]
                    # Never frame threading: with FFmpeg logging on (needed for the capture), a frame thread
                    # that logs while the container closes early deadlocks on the GIL. Slice threads finish
                    # inside each decode call.
                    if self.threads == 1:
                        stream.codec_context.thread_count = 1
                        stream.thread_type = "NONE"
                    else:
                        stream.thread_type = "SLICE"
                    numbering = self._seek(container, stream, wanted[0])
                    # One converter per clip: a frame's own to_ndarray() builds a new swscale context each
                    # time, which costs 5x the decoding itself on small frames.
                    to_rgb = self._reformatter()
                    for frame in container.decode(stream):
                        if frame.is_corrupt:
                            raise VideoDecodeError(p, "corrupt", f"frame {decoded} decoded with errors "
                                                                 "(FFmpeg concealed damaged data)")
                        index = numbering(frame, decoded)
                        decoded = index + 1
                        if index in wanted_set:
                            got[index] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
                        if decoded >= plan.decode_until:
                            break
            except VideoDecodeError:
                raise
            except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
                kind = "unreadable" if decoded == 0 and not got else "corrupt"
                raise VideoDecodeError(p, kind, f"FFmpeg: {first_line(exc)}") from None
        errors = [msg.strip() for level, _, msg in logs if level is not None and level <= av.logging.ERROR]
        detail = f"FFmpeg reported: {errors[0]}" if errors else ""
        if decoded < plan.decode_until or any(i not in got for i in wanted):
            raise missing_frames_error(p, plan, decoded, detail)
        if errors:
            raise VideoDecodeError(p, "corrupt", detail)
        return torch.from_numpy(np.stack([got[i] for i in plan.indices]))

    def _seek(self, container, stream, first: int):
        """Seek near ``first`` when it is far in; return ``numbering(frame, n_decoded) -> frame index``."""
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        base = stream.time_base
        if first < SEEK_MIN_FRAMES or not fps or base is None:
            return lambda frame, n: n
        origin = stream.start_time or 0
        # Aim one frame early so the wanted frame's own timestamp is not rounded past.
        target = origin + int(math.floor((first - 1) / fps / float(base)))
        container.seek(max(origin, target), stream=stream, backward=True, any_frame=False)

        def numbering(frame, n):
            if frame.pts is None:
                raise VideoDecodeError(container.name, "corrupt", "frame without timestamp after seeking")
            return int(round(float((frame.pts - origin) * base) * fps))

        return numbering
