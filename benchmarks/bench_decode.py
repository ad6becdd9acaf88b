"""Video decode throughput (frames/s) of vidpo's decoding backends on clips encoded here.

For every codec x resolution x GOP length of the sweep, one clip of ``--frames`` frames is encoded with
PyAV (a panned random texture plus noise, CRF 23: content that compresses like real footage, unlike a
flat test pattern), then each provider decodes all of its frames to uint8 RGB through vidpo's backend
(``VideoDecoder.decode`` with a full-clip plan, so the integrity checks are part of the cost):

    pyav        PyAV / libavcodec on the CPU (FFmpeg picks its thread count)
    torchcodec  torchcodec's CPU decoder (when importable with FFmpeg's libraries)
    dali_cpu    DALI's CPU video operator (VP8 / VP9 only)
    dali        DALI's mixed (NVDEC) decoder, frames in GPU memory (needs a GPU)

Rows (frames/s: median, 20th and 80th percentile over repeated decodes) are appended to
benchmarks/results/decode.csv with the columns of benchmarks/common.py; ``x`` names the clip as
``<codec>-<W>x<H>-gop<G>-f<F>``.

Examples:
    python benchmarks/bench_decode.py --quick                     # 2 codecs x 2 sizes x 2 GOPs, CPU
    python benchmarks/bench_decode.py --quick --sizes 128,256,512 --gops 1,16,64   # the committed CPU sweep
    python benchmarks/bench_decode.py --sizes 256,512,1280x720 --gops 1,16,128 --frames 128
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from fractions import Fraction
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from vidpo.data.decode import backend_available, make_decoder, plan_frames, probe  # noqa: E402
from vidpo.data.decode.base import SamplingSpec  # noqa: E402

KERNEL = "decode"
PROVIDERS = ("pyav", "torchcodec", "dali_cpu", "dali")
ENCODERS = {"vp9": ("libvpx-vp9", ".webm", {"crf": "23", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
            "h264": ("libx264", ".mp4", {"crf": "23", "preset": "veryfast"}),
            "hevc": ("libx265", ".mp4", {"crf": "23", "preset": "ultrafast", "x265-params": "log-level=error"}),
            "vp8": ("libvpx", ".webm", {"crf": "10", "b": "1M", "deadline": "realtime", "cpu-used": "8"})}
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode.csv")


def synthetic_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``uint8 (n, H, W, 3)``: a smoothed random texture panned 2 px/frame, plus mild per-frame noise."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (height + 2 * n + 8, width + 2 * n + 8, 3)).astype(np.float32)
    kernel = np.ones(5, np.float32) / 5  # separable box blur: texture with some spatial correlation
    big = np.apply_along_axis(lambda r: np.convolve(r, kernel, "same"), 0, big)
    big = np.apply_along_axis(lambda r: np.convolve(r, kernel, "same"), 1, big)
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        crop = big[2 * i:2 * i + height, i:i + width]
        frames[i] = np.clip(crop + rng.normal(0, 3, crop.shape), 0, 255).astype(np.uint8)
    return frames


def encode(path: str, frames: np.ndarray, codec: str, gop: int, fps: int = 24) -> str:
    import av

    encoder, suffix, options = ENCODERS[codec]
    path = path + suffix
    with av.open(path, "w") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        stream.options = dict(options, g=str(gop))
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def parse_size(text: str):
    if "x" in text:
        w, h = text.lower().split("x")
        return int(w), int(h)
    return int(text), int(text)


def measure(provider: str, path: str, frames: int, quick: bool):
    """frames/s (median, 20th, 80th percentile) of decoding the whole clip with ``provider``."""
    device = torch.device("cuda") if provider == "dali" else torch.device("cpu")
    decoder = make_decoder(provider, device=device, threads=1, batch_size=1)
    info = probe(path)
    plan = plan_frames(path, SamplingSpec(fps=0, frames=frames, height=info.height, width=info.width),
                       native_fps=info.fps, num_frames=info.num_frames)

    def run():
        out = decoder.decode(path, plan)
        if out.shape[0] != frames:
            raise RuntimeError(f"{provider} decoded {out.shape[0]} of {frames} frames of {path}")
        return out

    y50, y20, y80 = common.bench(run, device, quick=quick) if device.type == "cpu" else _bench_gpu(run, quick)
    decoder.close()
    per_second = lambda ms: frames / (ms / 1e3)  # noqa: E731
    return per_second(y50), per_second(y80), per_second(y20)  # a slow (80th) time is a low (20th) rate


def _bench_gpu(fn, quick: bool):
    # do_bench's L2 flush and CUDA-event timing do not cover DALI's own streams: time wall clock, synced.
    for _ in range(2):
        fn()
    samples: List[float] = []
    budget, start = (0.5 if quick else 3.0), time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < budget and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return common.quantiles(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codecs", default="vp9,h264")
    parser.add_argument("--sizes", help="W or WxH, comma separated (default 128,256,512; quick 128,256)")
    parser.add_argument("--gops", help="GOP lengths (default 1,16,64; quick 1,32)")
    parser.add_argument("--frames", type=int, help="frames per clip (default 64; quick 32)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--quick", action="store_true", help="smaller default sweep, 0.5 s of timing per row")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    defaults = ("128,256", "1,32", 32) if args.quick else ("128,256,512", "1,16,64", 64)
    args.sizes = args.sizes or defaults[0]
    args.gops = args.gops or defaults[1]
    args.frames = args.frames or defaults[2]
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = [p for p in args.providers.split(",") if p]
    missing = [p for p in providers if not backend_available(p)]
    for p in missing:
        print(f"skipping provider {p}: not available on this machine", file=sys.stderr)
    providers = [p for p in providers if p not in missing]
    stamp, version, command = common.timestamp(), _versions(), common.command_line()
    cpu_desc = common.device_description(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="vidpo-bench-decode-") as tmp:
        for codec in args.codecs.split(","):
            for size in args.sizes.split(","):
                width, height = parse_size(size)
                frames = synthetic_frames(args.frames, height, width)
                for gop in (int(g) for g in args.gops.split(",")):
                    path = encode(os.path.join(tmp, f"{codec}_{width}x{height}_g{gop}"), frames, codec, gop)
                    x = f"{codec}-{width}x{height}-gop{gop}-f{args.frames}"
                    for provider in providers:
                        if provider == "dali_cpu" and codec not in ("vp8", "vp9"):
                            continue  # DALI's CPU operator decodes VP8/VP9/MJPEG only
                        values = measure(provider, path, args.frames, args.quick)
                        desc = torch.cuda.get_device_name() if provider == "dali" else cpu_desc
                        rows.append(common.make_row(KERNEL, provider, codec, "throughput", "frames/s", x, values,
                                                    desc, stamp, version, command))
                        print(f"{x:28s} {provider:10s} {values[0]:10.1f} frames/s", flush=True)
    common.append_rows(args.out, rows)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


def _versions() -> str:
    parts = [common.versions()]
    for name, module in (("av", "av"), ("dali", "nvidia.dali"), ("torchcodec", "torchcodec")):
        try:
            parts.append(f"{name} {__import__(module, fromlist=['__version__']).__version__}")
        except Exception:
            pass
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
