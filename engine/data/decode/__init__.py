"""Video decoding for the data path: NVIDIA DALI (GPU "mixed" and CPU operators), PyAV, torchcodec.

``ClipDecoder`` (``loader``) is the entry point; ``base`` holds the sampling plan, the error type and the
resize / crop / normalize step shared by every backend.
"""
from vidpo.data.decode.base import (
                                    ERROR_KINDS,
                                    FramePlan,
                                    SamplingSpec,
                                    VideoDecodeError,
                                    VideoInfo,
                                    plan_frames,
                                    prepare_frames,
                                    probe,
)
from vidpo.data.decode.loader import (
                                    BACKENDS,
                                    ClipDecoder,
                                    DecodeFailure,
                                    auto_order,
                                    available_backends,
                                    backend_available,
                                    decode_clip,
                                    make_decoder,
)

__all__ = [
    "BACKENDS", "ERROR_KINDS", "ClipDecoder", "DecodeFailure", "FramePlan", "SamplingSpec", "VideoDecodeError",
    "VideoInfo", "auto_order", "available_backends", "backend_available", "decode_clip", "make_decoder",
    "plan_frames", "prepare_frames", "probe",
]
