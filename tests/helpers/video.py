"""Test clips encoded on the fly with PyAV, and damaged copies of them (used by test_decode.py, test_cache.py).

The frames are smooth (so the codecs reproduce them within a few grey levels) and each frame has its own
brightness offset and moving stripe phase (so a decoder returning the wrong frame is far off).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CODECS = {
    # name: (FFmpeg encoder, container suffix, encoder options)
    "vp9": ("libvpx-vp9", ".webm", {"crf": "8", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    "vp8": ("libvpx", ".webm", {"crf": "4", "b": "2M", "deadline": "realtime", "cpu-used": "8"}),
    "h264": ("libx264", ".mp4", {"crf": "8", "preset": "ultrafast"}),
    "hevc": ("libx265", ".mp4", {"crf": "8", "preset": "ultrafast", "x265-params": "log-level=error"}),
}


def make_frames(n: int = 16, height: int = 64, width: int = 64) -> np.ndarray:
    """``uint8 (n, height, width, 3)``: a diagonal ramp, a sliding horizontal wave and a per-frame offset."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = []
    for i in range(n):
        r = 40 + 120 * (x + y) / (height + width) + 6 * i
        g = 128 + 60 * np.sin(2 * np.pi * (x / width + i / max(n, 1)))
        b = np.full_like(x, 30 + (i * 11) % 190)
        frames.append(np.stack([r, g, b], -1))
    return np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def encode_clip(path, frames: np.ndarray, codec: str = "vp9", fps: float = 8, gop: int = 8,
                suffix: str | None = None) -> Path:
    """Encode ``frames`` (uint8 (F, H, W, 3)) to ``path``; its suffix is replaced by ``suffix`` or the codec's
    usual container (.mkv holds every codec and, unlike .mp4, stays parseable when truncated)."""
    from fractions import Fraction

    import av

    encoder, default_suffix, options = CODECS[codec]
    path = Path(path).with_suffix(suffix or default_suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        stream.options = dict(options, g=str(gop), **({"keyint_min": str(gop)} if codec == "h264" else {}))
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def damaged_copies(path, out_dir) -> dict:
    """``{kind: path}`` of damaged versions of ``path``: 'truncated' (first 45% of the bytes), 'overwritten'
    (a run of bytes in the middle replaced by noise), 'garbage' (random bytes with the same suffix), 'empty',
    'header_only' (first 300 bytes), 'missing' (no file)."""
    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    middle = len(data) // 2
    noise = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
    variants = {
        "truncated": data[: int(len(data) * 0.45)],
        "overwritten": data[:middle] + noise + data[middle + len(noise):],
        "garbage": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
        "header_only": data[:300],
    }
    out = {}
    for kind, blob in variants.items():
        target = out_dir / f"{path.stem}_{kind}{path.suffix}"
        target.write_bytes(blob)
        out[kind] = target
    out["missing"] = out_dir / f"{path.stem}_missing{path.suffix}"
    return out


def frame_errors(decoded: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean absolute difference per frame (grey levels) between two uint8/float ``(F, H, W, 3)`` stacks."""
    return np.abs(decoded.astype(np.float64) - reference.astype(np.float64)).mean(axis=(1, 2, 3))
