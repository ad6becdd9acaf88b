"""Video decoding backends (PyAV, torchcodec, DALI CPU / GPU) against the frames that were encoded.

Clips are encoded in the test with PyAV; a decoder passes when every frame is within codec tolerance of
the frame it should be (mean absolute error in grey levels) *and* closer to that frame than to any other
(so an off-by-one frame index fails). Damaged copies of the clips must raise VideoDecodeError naming the
file, for every backend.
"""
import logging

import numpy as np
import pytest
import torch

from helpers.video import damaged_copies, encode_clip, frame_errors, make_frames
from vidpo.data.decode import (ClipDecoder, SamplingSpec, VideoDecodeError, backend_available, decode_clip,
                               make_decoder, plan_frames, prepare_frames, probe)
from vidpo.data.decode.dali import read_request
from vidpo.data.manifest import ClipRecord

CPU_BACKENDS = ["pyav", "torchcodec", "dali_cpu"]
CODEC_TOLERANCE = 4.0  # mean |decoded - encoded| per frame, grey levels (CRF 8 gives ~1-2)
FRAMES, H, W, FPS = 16, 48, 64, 8


def _need(backend):
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed on this machine")


def _supports(backend, codec):
    return not (backend == "dali_cpu" and codec not in ("vp8", "vp9"))


@pytest.fixture(scope="module")
def reference():
    return make_frames(FRAMES, H, W)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, reference):
    root = tmp_path_factory.mktemp("clips")
    return {
        "vp9": encode_clip(root / "a", reference, "vp9", fps=FPS, gop=4),
        "h264": encode_clip(root / "b", reference, "h264", fps=FPS, gop=4),
        "h264_mkv": encode_clip(root / "c", reference, "h264", fps=FPS, gop=4, suffix=".mkv"),
    }


def _to_uint8_frames(x: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) in [0, 255]."""
    return ((x.permute(1, 2, 3, 0).double() + 1) * 127.5).numpy()


def _assert_frames(decoded: np.ndarray, reference: np.ndarray, expected_index):
    errors = frame_errors(decoded, reference[list(expected_index)])
    assert errors.max() < CODEC_TOLERANCE, errors
    for k, i in enumerate(expected_index):
        own = frame_errors(decoded[k:k + 1], reference[i:i + 1])[0]
        others = [frame_errors(decoded[k:k + 1], reference[j:j + 1])[0] for j in range(len(reference)) if j != i]
        assert own < min(others), (k, i, own, min(others))


# ----- frames against what was encoded --------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_decoders_return_the_encoded_frames(backend, codec, clips, reference):
    _need(backend)
    if not _supports(backend, codec):
        pytest.skip("DALI's CPU operator decodes VP8/VP9 only")
    x = decode_clip(clips[codec], SamplingSpec(fps=FPS, frames=FRAMES, height=H, width=W), backend)
    assert x.shape == (3, FRAMES, H, W) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    _assert_frames(_to_uint8_frames(x), reference, range(FRAMES))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frame_sampling_at_a_target_fps(backend, clips, reference):
    """4 fps from 0.25 s of an 8 fps clip = native frames 2, 4, 6, 8 (a strided read in DALI); 6 fps =
    frames floor(k * 8/6) = 0, 1, 2, 4, 5, 6 (a contiguous read gathered afterwards)."""
    _need(backend)
    x = decode_clip(clips["vp9"], SamplingSpec(fps=4, frames=4, height=H, width=W), backend, start=0.25)
    _assert_frames(_to_uint8_frames(x), reference, [2, 4, 6, 8])
    x = decode_clip(clips["vp9"], SamplingSpec(fps=6, frames=6, height=H, width=W), backend)
    _assert_frames(_to_uint8_frames(x), reference, [0, 1, 2, 4, 5, 6])


def test_backends_agree(clips):
    spec = SamplingSpec(fps=FPS, frames=8, height=32, width=32)
    outs = {b: decode_clip(clips["vp9"], spec, b) for b in CPU_BACKENDS if backend_available(b)}
    base = outs.pop("pyav")
    for name, x in outs.items():
        # Backends differ only in YUV->RGB rounding/chroma upsampling: a few grey levels at most.
        assert (x - base).abs().mean() * 127.5 < 3.0, name


@pytest.mark.skipif(not backend_available("dali"), reason="DALI GPU decoding needs a CUDA device and DALI")
@pytest.mark.parametrize("codec", ["h264", "vp9"])
def test_dali_gpu_decodes_on_the_gpu(codec, clips, reference):
    x = decode_clip(clips[codec], SamplingSpec(fps=FPS, frames=FRAMES, height=H, width=W), "dali", device="cuda")
    assert x.is_cuda
    _assert_frames(_to_uint8_frames(x.cpu()), reference, range(FRAMES))


# ----- the sampling plan and the resize / crop / normalize step ------------------------------------
def test_plan_frames_formula():
    spec = SamplingSpec(fps=6, frames=5, height=8, width=8)
    plan = plan_frames("x", spec, native_fps=8, num_frames=16)
    assert plan.indices == tuple(int(np.floor(k * 8 / 6 + 1e-6)) for k in range(5)) == (0, 1, 2, 4, 5)
    assert plan.decode_until == 7  # one look-ahead frame: the header promises >= 2 more
    assert plan_frames("x", spec, native_fps=8, num_frames=7).decode_until == 6  # no look-ahead near the end
    assert plan_frames("x", spec, native_fps=8, num_frames=None).decode_until == 6
    # Target faster than native repeats frames; start offsets the window.
    assert plan_frames("x", SamplingSpec(fps=16, frames=4, height=8, width=8), native_fps=8, num_frames=None,
                       start=1.0).indices == (8, 8, 9, 9)
    with pytest.raises(VideoDecodeError) as err:
        plan_frames("clip.mp4", SamplingSpec(fps=8, frames=9, height=8, width=8), native_fps=8, num_frames=16,
                     start=0.5, end=1.5)
    assert err.value.kind == "too_short" and "clip.mp4" in str(err.value)


def test_dali_read_request():
    stride = plan_frames("x", SamplingSpec(fps=4, frames=3, height=8, width=8), native_fps=8, num_frames=16)
    assert read_request(stride) == (0, 2, 4, [0, 1, 2])  # frames 0, 2, 4 plus look-ahead frame 6
    gather = plan_frames("x", SamplingSpec(fps=6, frames=5, height=8, width=8), native_fps=8, num_frames=16)
    assert read_request(gather) == (0, 1, 7, [0, 1, 2, 4, 5])


def test_prepare_frames_crop_and_normalize():
    frames = torch.zeros(2, 32, 48, 3, dtype=torch.uint8)
    frames[..., 0] = torch.arange(48, dtype=torch.uint8)  # red = column index
    frames[1, ..., 1] = 255
    out = prepare_frames(frames, SamplingSpec(fps=1, frames=2, height=32, width=32))
    assert out.shape == (3, 2, 32, 32)
    expected_red = torch.arange(8, 40, dtype=torch.float64) / 127.5 - 1  # the centre 32 of 48 columns
    torch.testing.assert_close(out[0, 0, 5].double(), expected_red, rtol=0, atol=1e-6)
    assert torch.all(out[1, 0] == -1) and torch.all(out[1, 1] == 1)


def test_prepare_frames_resize_of_a_ramp():
    """Bilinear resizing maps a linear ramp to the ramp sampled at the new pixel centres (float64 check)."""
    w_in, w_out = 64, 32
    ramp = torch.linspace(0, 252, w_in, dtype=torch.float64)
    frames = ramp.round().to(torch.uint8).view(1, 1, w_in, 1).expand(1, 16, w_in, 3).contiguous()
    out = prepare_frames(frames, SamplingSpec(fps=1, frames=1, height=8, width=w_out, resize="stretch"))
    centres = (torch.arange(w_out, dtype=torch.float64) + 0.5) * (w_in / w_out) - 0.5
    expected = torch.from_numpy(np.interp(centres.numpy(), np.arange(w_in), ramp.round().numpy())) / 127.5 - 1
    torch.testing.assert_close(out[0, 0, 3, 1:-1].double(), expected[1:-1], rtol=0, atol=2e-2)


def test_probe_reads_the_header(clips):
    info = probe(clips["vp9"])
    assert (info.codec, info.fps, info.num_frames, info.width, info.height) == ("vp9", FPS, FRAMES, W, H)


# ----- bad input --------------------------------------------------------------------------------------
DAMAGE_KINDS = {"missing": {"missing"}, "empty": {"unreadable"}, "garbage": {"unreadable"},
                "header_only": {"unreadable"}, "truncated": {"truncated", "corrupt", "unreadable"},
                "overwritten": {"truncated", "corrupt"}}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, clips):
    root = tmp_path_factory.mktemp("damaged")
    return {codec: damaged_copies(clips[codec], root / codec) for codec in ("vp9", "h264_mkv")}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", sorted(DAMAGE_KINDS))
def test_damaged_files_raise_naming_the_file(backend, kind, damaged):
    """Through the full path (header probe + plan + decode) every damage is an error naming the file."""
    _need(backend)
    path = damaged["vp9"][kind]
    with pytest.raises(VideoDecodeError) as err:
        decode_clip(path, SamplingSpec(fps=FPS, frames=FRAMES, height=H, width=W), backend)
    assert str(path) in str(err.value)
    assert err.value.kind in DAMAGE_KINDS[kind], err.value


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("codec", ["vp9", "h264_mkv"])
def test_each_decoder_detects_truncation_itself(backend, codec, clips, damaged):
    """The backend, given the healthy file's plan (its header promised 16 frames), must notice the damage
    itself: a truncated file never yields frames for the missing part. PyAV must also refuse the file with
    noise written over its middle (FFmpeg flags the frame it concealed); torchcodec and DALI cannot see
    concealed damage, which is why ``auto`` prefers PyAV on CPU."""
    _need(backend)
    if not _supports(backend, codec.split("_")[0]):
        pytest.skip("DALI's CPU operator decodes VP8/VP9 only")
    decoder = make_decoder(backend)
    plan = plan_frames(clips[codec], SamplingSpec(fps=FPS, frames=FRAMES, height=H, width=W), native_fps=FPS,
                       num_frames=FRAMES)
    for kind in ("truncated", "overwritten") if backend == "pyav" else ("truncated",):
        with pytest.raises(VideoDecodeError) as err:
            decoder.decode(str(damaged[codec][kind]), plan)
        assert err.value.kind in ("truncated", "corrupt") and str(damaged[codec][kind]) in str(err.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_shorter_than_asked(backend, clips):
    _need(backend)
    with pytest.raises(VideoDecodeError) as err:
        decode_clip(clips["vp9"], SamplingSpec(fps=FPS, frames=FRAMES + 1, height=H, width=W), backend)
    assert err.value.kind == "too_short"
    with pytest.raises(VideoDecodeError) as err:  # a window of the manifest that is too short
        decode_clip(clips["vp9"], SamplingSpec(fps=FPS, frames=8, height=H, width=W), backend, start=0.5, end=1.25)
    assert err.value.kind == "too_short"


def test_dali_cpu_refuses_h264(clips):
    _need("dali_cpu")
    with pytest.raises(VideoDecodeError) as err:
        decode_clip(clips["h264"], SamplingSpec(fps=FPS, frames=4, height=H, width=W), "dali_cpu")
    assert err.value.kind == "unsupported" and "h264" in str(err.value)


def test_dali_batch_isolates_the_bad_clip(clips, damaged):
    """A DALI pipeline dies on a bad sample; the batch is retried one clip at a time so the others decode."""
    _need("dali_cpu")
    decoder = make_decoder("dali_cpu", batch_size=4)
    plan = plan_frames(clips["vp9"], SamplingSpec(fps=FPS, frames=4, height=H, width=W), native_fps=FPS,
                       num_frames=FRAMES)
    bad = str(damaged["vp9"]["garbage"])
    out = decoder.decode_many([(str(clips["vp9"]), plan), (bad, plan), (str(clips["vp9"]), plan)])
    assert isinstance(out[1], VideoDecodeError) and bad in str(out[1])
    assert out[0].shape == out[2].shape == (4, H, W, 3)
    again = decoder.decode_many([(str(clips["vp9"]), plan)])  # the rebuilt pipeline keeps working
    assert torch.equal(again[0], out[0])


def test_skip_policy_counts_and_names_bad_clips(clips, damaged, caplog):
    spec = SamplingSpec(fps=FPS, frames=8, height=32, width=32)
    records = [ClipRecord("good1", str(clips["vp9"]), "a"), ClipRecord("bad", str(damaged["vp9"]["truncated"]), "b"),
               ClipRecord("gone", str(damaged["vp9"]["missing"]), "c"), ClipRecord("good2", str(clips["h264"]), "d")]
    loader = ClipDecoder(spec, "auto", workers=2, batch_size=3, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="vidpo"):
        kept = [clip.clip_id for batch in loader.iter_batches(records) for clip, _ in batch]
    assert kept == ["good1", "good2"]
    assert [(f.clip_id, f.kind) for f in loader.failures] == [("bad", "truncated"), ("gone", "missing")]
    assert str(damaged["vp9"]["truncated"]) in caplog.text and str(damaged["vp9"]["missing"]) in caplog.text
    strict = ClipDecoder(spec, "pyav", workers=1, on_error="raise")
    with pytest.raises(VideoDecodeError, match="missing"):
        strict.load(records[2:3])


def test_workers_keep_the_order(clips):
    spec = SamplingSpec(fps=FPS, frames=4, height=32, width=32)
    records = [ClipRecord(str(i), str(clips["vp9" if i % 2 else "h264"]), "") for i in range(6)]
    one = ClipDecoder(spec, "pyav", workers=1).load(records)
    two = ClipDecoder(spec, "pyav", workers=2, batch_size=4).load(records)
    assert [c.clip_id for c, _ in one] == [c.clip_id for c, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert torch.equal(a, b)


def test_missing_backend_is_a_clear_error(monkeypatch):
    from vidpo.data.decode import torchcodec as tc

    monkeypatch.setattr(tc, "available", lambda: False)
    with pytest.raises(ImportError, match="torchcodec"):
        ClipDecoder(SamplingSpec(fps=1, frames=1, height=8, width=8), "torchcodec")
