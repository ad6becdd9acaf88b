"""Clips of a manifest -> model-ready tensors: backend choice, batching, worker threads, bad-input policy.

``ClipDecoder(spec, backend)`` turns ``ClipRecord``s into ``float32 (3, F, H, W)`` tensors in ``[-1, 1]``
(``vidpo.data.decode.base`` has the sampling formula). ``backend`` is one of ``BACKENDS``; ``auto`` picks,
per clip codec, the first backend of ``auto_order(device)`` that is installed and decodes that codec:

* with a CUDA device and DALI: ``dali`` (NVDEC) for everything it decodes, frames staying on the GPU;
* on CPU: PyAV, then torchcodec, then DALI's CPU operator. ``benchmarks/bench_decode.py``
  (``benchmarks/results/decode.csv``) measures PyAV at or above torchcodec on most rows and 2-6x DALI's CPU
  operator at GOP >= 16; PyAV is also the only one that sees the frames FFmpeg had to conceal
  (``frame.is_corrupt``), so a damaged clip does not become a plausible wrong tensor.

Workers are threads: PyAV, torchcodec and DALI release the GIL while decoding, and a thread pool keeps the
output order deterministic without pickling frames between processes. DALI batches on its own (one
pipeline run per batch, ``threads`` decoding threads inside).

A clip that cannot be used (missing, unreadable, corrupt, truncated, shorter than asked, a codec the
backend cannot decode) is a ``VideoDecodeError``; ``on_error='skip'`` counts it and logs one warning naming
the file, ``'raise'`` stops with that error.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from vidpo.data.decode import dali as dali_backend
from vidpo.data.decode import pyav as pyav_backend
from vidpo.data.decode import torchcodec as torchcodec_backend
from vidpo.data.decode.base import (
    SamplingSpec,
    VideoDecodeError,
    VideoDecoder,
    VideoInfo,
    plan_frames,
    prepare_frames,
    probe,
)

log = logging.getLogger("vidpo")

BACKENDS = ("auto", "dali", "dali_cpu", "torchcodec", "pyav")
ON_ERROR = ("skip", "raise")
AUTO_ORDER_GPU = ("dali", "pyav", "torchcodec")
AUTO_ORDER_CPU = ("pyav", "torchcodec", "dali_cpu")


def backend_available(name: str) -> bool:
    """Whether backend ``name`` can run on this machine."""
    return {"dali": dali_backend.gpu_available, "dali_cpu": dali_backend.available,
            "torchcodec": torchcodec_backend.available, "pyav": pyav_backend.available}[name]()


def available_backends() -> List[str]:
    return [name for name in BACKENDS[1:] if backend_available(name)]


def auto_order(device: torch.device) -> Tuple[str, ...]:
    order = AUTO_ORDER_GPU if device.type == "cuda" else AUTO_ORDER_CPU
    return tuple(name for name in order if backend_available(name))


def make_decoder(name: str, *, device: torch.device | str = "cpu", threads: int = 1,
                 batch_size: int = 8) -> VideoDecoder:
    """One backend; a clear ImportError/RuntimeError naming the package when it cannot run here."""
    if name == "pyav":
        if not pyav_backend.available():
            raise ImportError("decoder 'pyav' needs PyAV (pip install av)")
        return pyav_backend.PyAVDecoder(threads=0 if threads <= 1 else 1)
    if name == "torchcodec":
        return torchcodec_backend.TorchCodecDecoder(threads=1)
    if name == "dali":
        dev = torch.device(device)
        return dali_backend.DaliDecoder(dev if dev.type == "cuda" else "cuda", threads=max(2, threads),
                                        batch_size=batch_size)
    if name == "dali_cpu":
        return dali_backend.DaliDecoder("cpu", threads=max(1, threads), batch_size=batch_size)
    raise ValueError(f"unknown decoder {name!r}; valid: {list(BACKENDS)}")


@dataclass
class DecodeFailure:
    clip_id: str
    path: str
    kind: str
    message: str

    def to_dict(self) -> dict:
        return {"clip_id": self.clip_id, "path": self.path, "kind": self.kind, "message": self.message}


class ClipDecoder:
    """Decode clips (objects with ``clip_id, path, fps, start, end``) to ``float32 (3, F, H, W)``.

    ``device``: where frames are resized and returned (the VAE's device); ``workers``: decoding threads.
    """

    def __init__(self, spec: SamplingSpec, backend: str = "auto", *, device: torch.device | str = "cpu",
                 workers: int = 2, batch_size: int = 8, on_error: str = "skip"):
        if backend not in BACKENDS:
            raise ValueError(f"decoder {backend!r} is not one of {list(BACKENDS)}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} is not one of {list(ON_ERROR)}")
        self.spec = spec
        self.device = torch.device(device)
        self.workers = max(1, workers)
        self.batch_size = max(1, batch_size)
        self.on_error = on_error
        self.failures: List[DecodeFailure] = []
        self.used: Dict[str, int] = {}
        self._decoders: Dict[str, VideoDecoder] = {}
        if backend == "auto":
            self.order = auto_order(self.device)
            if not self.order:
                raise ImportError("no video decoder is installed: pip install av (or nvidia-dali-cuda130, "
                                  "torchcodec)")
        else:
            make = self._decoder(backend)  # fail now, naming the package, not at the first clip
            self.order = (make.name,)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vidpo-decode") if self.workers > 1 else None

    def describe(self) -> str:
        return f"decoder={'/'.join(self.order)} workers={self.workers} device={self.device}"

    def _decoder(self, name: str) -> VideoDecoder:
        if name not in self._decoders:
            self._decoders[name] = make_decoder(name, device=self.device, threads=self.workers,
                                                batch_size=self.batch_size)
        return self._decoders[name]

    def _backend_for(self, path: str, info: VideoInfo) -> VideoDecoder:
        for name in self.order:
            decoder = self._decoder(name)
            if decoder.supports(info.codec):
                return decoder
        raise VideoDecodeError(path, "unsupported", f"codec '{info.codec}' is not decoded by "
                                                     f"{'/'.join(self.order)} on {self.device.type}")

    # ----- one batch ---------------------------------------------------------------------------------
    def _plan(self, clip):
        info = probe(clip.path)
        plan = plan_frames(clip.path, self.spec, native_fps=clip.fps or info.fps, num_frames=info.num_frames,
                           start=clip.start, end=clip.end)
        return self._backend_for(clip.path, info), plan

    def _map(self, fn, items):
        return list(self._pool.map(fn, items)) if self._pool is not None else [fn(x) for x in items]

    def decode_batch(self, clips: Sequence) -> List[object]:
        """``[tensor (3, F, H, W) | VideoDecodeError]`` in the order of ``clips`` (no policy applied)."""
        def plan_one(clip):
            try:
                return self._plan(clip)
            except VideoDecodeError as exc:
                return exc

        planned = self._map(plan_one, clips)
        results: List[object] = [p if isinstance(p, VideoDecodeError) else None for p in planned]
        groups: Dict[str, List[int]] = {}
        for i, p in enumerate(planned):
            if not isinstance(p, VideoDecodeError):
                groups.setdefault(p[0].name, []).append(i)
        for name, members in groups.items():
            decoder = self._decoders[name]
            self.used[name] = self.used.get(name, 0) + len(members)
            if isinstance(decoder, dali_backend.DaliDecoder):
                frames = decoder.decode_many([(clips[i].path, planned[i][1]) for i in members])
            else:
                frames = self._map(lambda i: _decode_one(decoder, clips[i].path, planned[i][1]), members)
            prepared = self._map(lambda f: f if isinstance(f, VideoDecodeError) else
                                 prepare_frames(f.to(self.device, non_blocking=True), self.spec), frames)
            for i, out in zip(members, prepared):
                results[i] = out
        return results

    def apply_policy(self, clips: Sequence, results: Sequence) -> List[Tuple[object, torch.Tensor]]:
        """Keep ``(clip, tensor)`` pairs; count and warn about failures, or raise the first (``on_error``)."""
        kept = []
        for clip, out in zip(clips, results):
            if isinstance(out, VideoDecodeError):
                if self.on_error == "raise":
                    raise out
                self.failures.append(DecodeFailure(clip.clip_id, clip.path, out.kind, str(out)))
                log.warning("skipping clip %s: %s", clip.clip_id, out)
                continue
            kept.append((clip, out))
        return kept

    def load(self, clips: Sequence) -> List[Tuple[object, torch.Tensor]]:
        """Decode ``clips`` (in batches) with the bad-input policy applied."""
        kept = []
        for start in range(0, len(clips), self.batch_size):
            chunk = clips[start:start + self.batch_size]
            kept.extend(self.apply_policy(chunk, self.decode_batch(chunk)))
        return kept

    def iter_batches(self, clips: Sequence, batch_size: Optional[int] = None
                     ) -> Iterator[List[Tuple[object, torch.Tensor]]]:
        """Policy-applied batches of ``batch_size`` clips, decoding batch ``k+1`` while the caller works on
        batch ``k`` (one batch of prefetch)."""
        size = batch_size or self.batch_size
        chunks = [clips[i:i + size] for i in range(0, len(clips), size)]
        if not chunks:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="vidpo-prefetch") as ahead:
            pending = ahead.submit(self.decode_batch, chunks[0])
            for k, chunk in enumerate(chunks):
                results = pending.result()
                if k + 1 < len(chunks):
                    pending = ahead.submit(self.decode_batch, chunks[k + 1])
                yield self.apply_policy(chunk, results)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for decoder in self._decoders.values():
            decoder.close()
        self._decoders.clear()


def _decode_one(decoder: VideoDecoder, path: str, plan) -> object:
    try:
        return decoder.decode(path, plan)
    except VideoDecodeError as exc:
        return exc


def decode_clip(path: str, spec: SamplingSpec, backend: str = "auto", *, start: Optional[float] = None,
                end: Optional[float] = None, fps: Optional[float] = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """One file -> ``float32 (3, F, H, W)`` in ``[-1, 1]``; raises VideoDecodeError."""

    @dataclass
    class _Clip:
        clip_id: str
        path: str
        fps: Optional[float]
        start: Optional[float]
        end: Optional[float]

    loader = ClipDecoder(spec, backend, device=device, workers=1, batch_size=1, on_error="raise")
    try:
        result = loader.decode_batch([_Clip(str(path), str(path), fps, start, end)])[0]
    finally:
        loader.close()
    if isinstance(result, VideoDecodeError):
        raise result
    return result

