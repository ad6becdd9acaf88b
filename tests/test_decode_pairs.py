"""Pairs to pixels: the mp4 writer / reader, ``decode_pairs`` (frames + videos, resumable), the frames reader and
the labelling page with its JSONL exporter (run under Node when Node is installed)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidpo.data.pairs import PairDataError, PairRecord, ShardReader, shard_name, write_manifest
from vidpo.data.segments import num_segments, segment_ids
from vidpo.data.video_io import (
    FramesWriter,
    PairFrames,
    display_scale,
    frames_name,
    from_uint8,
    read_mp4,
    tensor_shapes,
    to_uint8,
    video_name,
    write_mp4,
)
from vidpo.evaluation.pair_viewer import segment_spans, write_pair_viewer
from vidpo.labeling.human import HumanLabelFile
from vidpo.models.vae import IdentityVAE, VideoVAE
from vidpo.stages.decode import decode_pairs
from vidpo.utils import atomic

av = pytest.importorskip("av")

NASTY_CAPTION = 'a <b>red</b> square & "quotes" </script><script>alert(1)</script>'


def smooth_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A soft coloured blob moving over a gradient, (3, F, H, W) in [-1, 1]: what a codec should keep well."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(-1, 1, height).view(1, height, 1)
    x = torch.linspace(-1, 1, width).view(1, 1, width)
    colour = torch.rand(3, 1, 1, generator=g) * 1.6 - 0.8
    out = []
    for t in range(frames):
        cx, cy = -0.5 + t / max(1, frames - 1), 0.3 * (t % 3 - 1)
        blob = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.3)
        out.append((0.5 * x + 0.3 * y) * 0.5 + colour * blob)
    return torch.stack(out, 1).clamp(-1, 1)


class FakeVAE(VideoVAE):
    """Deterministic causal "VAE": k = 4 in time, 2 in space, 4 latent channels. Latent frame 0 gives pixel frame
    0, latent frame j > 0 pixel frames 4 (j - 1) + 1 .. 4 j, each pixel = tanh(first three channels) + 0.1 * the
    frame's offset inside its group; nearest-neighbour 2x upsampling."""

    latent_channels, temporal_compression, spatial_compression = 4, 4, 2

    def __init__(self):
        self.calls = 0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        base = torch.tanh(latents[:, :3].float())
        frames = [base[:, :, 0]]
        for j in range(1, latents.shape[2]):
            frames += [base[:, :, j] * 0.9 + 0.1 * (r / 4) for r in range(4)]
        pixels = torch.stack(frames, 2)
        return pixels.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4).clamp(-1, 1)


class FailingVAE(IdentityVAE):
    """Dies on its ``fail_at``-th decode call (a kill mid-way through a shard)."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls = fail_at, 0

    def decode(self, latents):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return super().decode(latents)


def make_pairs(root: Path, *, shards: int = 2, rows: int = 3, channels: int = 3, latent_frames: int = 5,
               size: int = 8, labels: bool = False, captions=None, pair_ids=None) -> list[PairRecord]:
    """A tiny pairs directory as ``vidpo generate`` writes it (shards + pairs.jsonl); returns its records."""
    records = []
    for k in range(shards):
        g = torch.Generator().manual_seed(k)
        tensors = {key: torch.stack([smooth_clip(latent_frames, size, size, seed=100 * k + 10 * r + i)[:1].repeat(
            channels, 1, 1, 1) * (0.5 + 0.5 * torch.rand(channels, 1, 1, 1, generator=g)) for r in range(rows)])
                   for i, key in enumerate(("first", "second"))}
        tensors["cond_ids"] = torch.zeros(rows, 3, dtype=torch.long)
        atomic.save_safetensors(tensors, root / shard_name(k))
        for r in range(rows):
            i = k * rows + r
            rec = PairRecord(pair_id=pair_ids[i] if pair_ids else f"train-{i:06d}", shard=shard_name(k), row=r,
                             cond_ids=[0, 0, 0], caption=captions[i] if captions else f"pair {i}")
            records.append(rec)
    write_manifest(root / "pairs.jsonl", records)
    return records


def mtimes(root: Path, names) -> dict[str, int]:
    return {name: (root / name).stat().st_mtime_ns for name in names}


def outputs_of(records, shard: str) -> list[str]:
    return [frames_name(shard)] + [video_name(r.pair_id, key) for r in records if r.shard == shard
                                   for key in ("first", "second")]


# ----- mp4 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames,height,width", [(9, 16, 16), (5, 15, 17), (3, 2, 2), (4, 1, 3)])
def test_mp4_round_trip_keeps_frames_and_size(tmp_path, frames, height, width):
    clip = smooth_clip(frames, height, width)
    path = write_mp4(tmp_path / "clip.mp4", clip, fps=8)
    assert path == tmp_path / "clip.mp4" and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]
    back = read_mp4(path)
    assert back.shape == clip.shape and back.dtype == torch.float32
    err = (back - clip).abs()
    # codec error: yuv420p (chroma at half resolution) at crf 18 on a smooth clip; 1 / 127.5 is one grey level
    assert err.mean() < 0.05 and err.max() < 0.4, (err.mean(), err.max())
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (width + width % 2, height + height % 2)
        assert float(stream.average_rate) == 8.0


def test_mp4_accepts_uint8_and_rejects_bad_shapes(tmp_path):
    clip = smooth_clip(4, 8, 8)
    write_mp4(tmp_path / "a.mp4", to_uint8(clip), fps=16)
    assert (read_mp4(tmp_path / "a.mp4") - clip).abs().mean() < 0.05
    with pytest.raises(ValueError, match=r"\(3, F, H, W\)"):
        write_mp4(tmp_path / "b.mp4", torch.zeros(4, 2, 8, 8), fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(tmp_path / "b.mp4", clip, fps=0)
    assert not (tmp_path / "b.mp4").exists()


def test_mp4_scale_enlarges_pixels_and_keeps_their_colours(tmp_path):
    clip = smooth_clip(4, 8, 8)
    back = read_mp4(write_mp4(tmp_path / "big.mp4", clip, fps=8, scale=8))
    assert back.shape == (3, 4, 64, 64)
    plain = read_mp4(write_mp4(tmp_path / "small.mp4", clip, fps=8))
    shrunk = torch.nn.functional.avg_pool3d(back, (1, 8, 8))
    assert (shrunk - clip).abs().mean() < 0.5 * (plain - clip).abs().mean()
    assert display_scale(16, 16) == 8 and display_scale(480, 832) == 1 and display_scale(15, 17) == 9
    with pytest.raises(ValueError, match="scale"):
        write_mp4(tmp_path / "x.mp4", clip, fps=8, scale=0)


def test_uint8_convention_round_trips():
    x = torch.linspace(-1, 1, 1001)
    assert (from_uint8(to_uint8(x)) - x).abs().max() <= 0.5 / 127.5 + 1e-6
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 7.0])).tolist() == [0, 128, 255, 255]


def test_frames_writer_streams_a_valid_safetensors_file(tmp_path):
    a = torch.randint(0, 256, (5, 3, 2, 3, 4), dtype=torch.uint8)
    b = torch.randint(0, 256, (5, 3, 2, 3, 4), dtype=torch.uint8)
    with FramesWriter(tmp_path / "f.safetensors", {"first": a.shape, "second": b.shape}, {"fps": 8}) as w:
        for start in range(0, 5, 2):
            w.write("first", a[start:start + 2])
        w.write("second", b)
    loaded = load_file(str(tmp_path / "f.safetensors"))
    assert torch.equal(loaded["first"], a) and torch.equal(loaded["second"], b)
    assert tensor_shapes(tmp_path / "f.safetensors")[1] == {"fps": "8"}
    writer = FramesWriter(tmp_path / "g.safetensors", {"first": a.shape}, {})
    writer.write("first", a[:2])
    with pytest.raises(ValueError, match="incomplete"):
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_video_names_are_safe_and_distinct():
    assert video_name("train-000001", "first") == "videos/train-000001_first.mp4"
    odd = [video_name(pid, "first") for pid in ("a/b", "a_b", "a:b", "../x", "")]
    assert len(set(odd)) == 5 and all(re.fullmatch(r"videos/[A-Za-z0-9._-]+_first\.mp4", n) for n in odd)
    assert not any(n.startswith("videos/.") for n in odd)


# ----- decode_pairs ---------------------------------------------------------------------------------------------
def test_decode_pairs_identity_vae_writes_frames_videos_and_summary(tmp_path):
    records = make_pairs(tmp_path)
    info = decode_pairs(tmp_path, IdentityVAE(), fps=8, batch_size=2, progress=False)
    assert info["shards_decoded"] == 2 and info["shards_skipped"] == 0 and info["videos_written"] == 12
    assert (info["frames"], info["height"], info["width"]) == (5, 8, 8)
    assert json.loads((tmp_path / "decode.json").read_text())["videos_written"] == 12
    reader, frames = ShardReader(tmp_path), PairFrames(tmp_path)
    for k in range(2):
        shard = load_file(str(tmp_path / frames_name(shard_name(k))))
        latents = load_file(str(tmp_path / shard_name(k)))
        for key in ("first", "second"):
            assert shard[key].dtype == torch.uint8 and shard[key].shape == (3, 3, 5, 8, 8)
            assert torch.equal(shard[key], to_uint8(latents[key]))
    for rec in records:
        for key in ("first", "second"):
            assert (tmp_path / video_name(rec.pair_id, key)).is_file()
            got = frames.get(rec, key)
            assert got.shape == (3, 5, 8, 8) and (got - reader.get(rec, key)).abs().max() <= 0.5 / 127.5 + 1e-6
            assert torch.equal(frames.get_uint8(rec, key), to_uint8(reader.get(rec, key)))
        video = read_mp4(tmp_path / video_name(rec.pair_id, "second"))  # 8 x 8 frames enlarged 16x
        assert video.shape == (3, 5, 128, 128)
        video = torch.nn.functional.avg_pool3d(video, (1, 16, 16))
        assert (video - frames.get(rec, "second")).abs().mean() < 0.03
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_decode_pairs_temporal_compression_gives_1_plus_4_t_minus_1_frames(tmp_path):
    records = make_pairs(tmp_path, shards=1, rows=3, channels=4, latent_frames=3, size=4)
    vae = FakeVAE()
    info = decode_pairs(tmp_path, vae, fps=16, batch_size=2, progress=False)
    assert info["frames"] == 1 + 4 * (3 - 1) == vae.pixel_frames(3) and (info["height"], info["width"]) == (8, 8)
    assert vae.calls == 4  # 3 rows in batches of 2, for first and second
    shard = load_file(str(tmp_path / frames_name(records[0].shard)))
    latents = load_file(str(tmp_path / records[0].shard))
    assert shard["first"].shape == (3, 3, 9, 8, 8)
    assert torch.equal(shard["first"], to_uint8(FakeVAE().decode(latents["first"])))
    assert read_mp4(tmp_path / video_name(records[2].pair_id, "first")).shape == (3, 9, 128, 128)
    assert info["video_scale"] == 16
    # the batch size changes nothing
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "shards", other / "shards")
    shutil.copy(tmp_path / "pairs.jsonl", other / "pairs.jsonl")
    decode_pairs(other, FakeVAE(), fps=16, batch_size=1, write_videos=False, progress=False)
    assert torch.equal(load_file(str(other / frames_name(records[0].shard)))["second"], shard["second"])
    assert not (other / "videos").exists()


def test_decode_pairs_checks_the_vae_output_shape(tmp_path):
    make_pairs(tmp_path, shards=1, channels=4, latent_frames=3, size=4)

    class Liar(FakeVAE):
        temporal_compression = 2

    with pytest.raises(ValueError, match="pixel_frames"):
        decode_pairs(tmp_path, Liar(), fps=16, progress=False)
    assert not (tmp_path / "frames" / "shard_00000.safetensors").exists()


def test_decode_pairs_resumes_only_what_is_missing(tmp_path):
    records = make_pairs(tmp_path, shards=3, rows=2)
    decode_pairs(tmp_path, IdentityVAE(), fps=8, batch_size=2, progress=False)
    names = {k: outputs_of(records, shard_name(k)) for k in range(3)}
    before = mtimes(tmp_path, sum(names.values(), []))
    again = decode_pairs(tmp_path, IdentityVAE(), fps=8, progress=False)
    assert (again["shards_decoded"], again["shards_skipped"], again["videos_written"]) == (0, 3, 0)
    assert mtimes(tmp_path, before) == before
    for name in names[1]:  # one shard's whole output goes
        (tmp_path / name).unlink()
    (tmp_path / video_name(records[4].pair_id, "second")).unlink()  # and one video of another shard
    info = decode_pairs(tmp_path, IdentityVAE(), fps=8, batch_size=2, progress=False)
    assert (info["shards_decoded"], info["shards_skipped"], info["videos_written"]) == (1, 2, 5)
    after = mtimes(tmp_path, before)
    redone = set(names[1]) | {video_name(records[4].pair_id, "second")}
    assert {n for n in before if after[n] != before[n]} == redone
    assert torch.equal(PairFrames(tmp_path).get_uint8(records[4], "second"),
                       to_uint8(ShardReader(tmp_path).get(records[4], "second")))
    # other settings (fps) make the frames stale: everything is decoded again
    info = decode_pairs(tmp_path, IdentityVAE(), fps=16, progress=False)
    assert info["shards_decoded"] == 3


def test_decode_pairs_resumes_after_a_kill(tmp_path):
    records = make_pairs(tmp_path, shards=2, rows=3)
    with pytest.raises(KeyboardInterrupt):  # dies in shard 1, after shard 0 is complete
        decode_pairs(tmp_path, FailingVAE(fail_at=5), fps=8, batch_size=2, progress=False)
    assert (tmp_path / frames_name(shard_name(0))).is_file()
    assert not (tmp_path / frames_name(shard_name(1))).exists()
    kept = mtimes(tmp_path, outputs_of(records, shard_name(0)))
    info = decode_pairs(tmp_path, IdentityVAE(), fps=8, batch_size=2, progress=False)
    assert (info["shards_decoded"], info["shards_skipped"]) == (1, 1)
    assert mtimes(tmp_path, kept) == kept
    assert all((tmp_path / n).is_file() for n in outputs_of(records, shard_name(1)))
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_decode_pairs_missing_shard_raises_or_is_skipped(tmp_path):
    make_pairs(tmp_path, shards=2, rows=2)
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(PairDataError, match="shard_00001.safetensors: shard missing"):
        decode_pairs(tmp_path, IdentityVAE(), fps=8, progress=False)
    info = decode_pairs(tmp_path, IdentityVAE(), fps=8, on_error="skip", progress=False)
    assert info["shards_decoded"] + info["shards_skipped"] == 1 and info["skipped_shards"] == 1
    assert "shard_00001" in info["problems"][0]


# ----- the frames reader ----------------------------------------------------------------------------------------
def test_pair_frames_falls_back_to_pixel_space_latents_only(tmp_path):
    records = make_pairs(tmp_path, shards=1, rows=2)
    latent = ShardReader(tmp_path).get(records[1], "first")
    assert torch.equal(PairFrames(tmp_path).get(records[1], "first"), latent.clamp(-1, 1))
    assert torch.equal(PairFrames(tmp_path).get_uint8(records[1], "first"), to_uint8(latent))
    with pytest.raises(PairDataError, match="decode the pairs first"):
        PairFrames(tmp_path, pixel_space=False).get(records[1], "first")
    latent_dir = tmp_path / "latent"
    records = make_pairs(latent_dir, shards=1, rows=2, channels=4, latent_frames=2, size=4)
    with pytest.raises(PairDataError, match=r"frames/shard_00000.safetensors: missing.*latent, shape \(4, 2, 4, 4\)"):
        PairFrames(latent_dir).get(records[0], "second")
    decode_pairs(latent_dir, FakeVAE(), fps=16, write_videos=False, progress=False)
    assert PairFrames(latent_dir).get(records[0], "second").shape == (3, 5, 8, 8)


# ----- the viewer -----------------------------------------------------------------------------------------------
class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.videos, self.radios, self.sections, self.text, self.scripts = [], [], [], [], {}
        self._script = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "video":
            self.videos.append(attrs)
        elif tag == "input" and attrs.get("type") == "radio":
            self.radios.append(attrs)
        elif tag == "section":
            self.sections.append(attrs)
        elif tag == "script":
            self._script = attrs.get("id", "main")
            self.scripts[self._script] = ""

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def handle_data(self, data):
        if self._script is not None:
            self.scripts[self._script] += data
        else:
            self.text.append(data)


def viewer_dir(tmp_path, **kwargs) -> tuple[Path, list[PairRecord]]:
    ids = ["train-000000", "odd/id </script>", "train-000002", "train-000003"]
    captions = [NASTY_CAPTION, "a blue circle", "a green triangle", "a red square moving up"]
    records = make_pairs(tmp_path, shards=2, rows=2, captions=captions, pair_ids=ids, **kwargs)
    return tmp_path, records


def test_viewer_page_has_videos_choices_and_escaped_captions(tmp_path):
    root, records = viewer_dir(tmp_path, latent_frames=8)
    decode_pairs(root, IdentityVAE(), fps=8, progress=False)
    records[2].labels = [1, -1, 0, 1]
    records[3].labels = [1, -1]  # a count that does not match: not pre-filled
    out = write_pair_viewer(root, records, segment_seconds=0.25, fps=8, page_size=3)
    assert out == root / "index.html"
    page = out.read_text()
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert len(parser.videos) == 2 * len(records)
    for video in parser.videos:
        assert (root / video["src"]).is_file() and video["preload"] == "none"
        assert {"controls", "muted", "loop"} <= set(video)
    assert [v["src"] for v in parser.videos[:2]] == [video_name(records[0].pair_id, k) for k in ("first", "second")]
    # one A / B / tie group per (pair, segment): 8 frames at 8 fps in 0.25 s segments -> 4 segments
    groups = {}
    for radio in parser.radios:
        groups.setdefault(radio["name"], []).append(int(radio["value"]))
    assert groups == {f"p{i}s{s}": [1, -1, 0] for i in range(4) for s in range(4)}
    checked = {r["name"]: int(r["value"]) for r in parser.radios if "checked" in r}
    assert checked == {"p2s0": 1, "p2s1": -1, "p2s2": 0, "p2s3": 1}
    # captions: escaped in the source, intact as text
    assert "<script>alert(1)" not in page and "<b>red</b>" not in page
    assert NASTY_CAPTION in "".join(parser.text)
    assert set(parser.scripts) == {"vidpo-data", "main"}
    data = json.loads(parser.scripts["vidpo-data"])
    assert data["pairs"] == [{"id": r.pair_id, "segments": 4} for r in records] and data["pages"] == 2
    assert [s["data-pair"] for s in parser.sections] == [r.pair_id for r in records]
    assert ["hidden" in s for s in parser.sections] == [False, False, False, True]
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_viewer_segments_follow_the_labellers_segments(tmp_path):
    records = make_pairs(tmp_path, shards=1, rows=2, channels=4, latent_frames=6, size=4)
    decode_pairs(tmp_path, FakeVAE(), fps=16, progress=False)  # 21 pixel frames
    write_pair_viewer(tmp_path, None, segment_seconds=0.5, fps=16)
    data = json.loads(re.search(r'id="vidpo-data">(.*?)</script>', (tmp_path / "index.html").read_text()).group(1))
    expected = num_segments(segment_ids(6, 16, 0.5, 4))
    assert [p["segments"] for p in data["pairs"]] == [expected] * 2 and expected == 3
    assert [p["id"] for p in data["pairs"]] == [r.pair_id for r in records]
    spans = segment_spans(6, 16, 0.5, 4)
    assert spans[0][0] == 0 and spans[-1][1] == pytest.approx(21 / 16)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert segment_spans(21, 16, 1.0, 4)[:2] == [(0.0, 17 / 16), (17 / 16, 33 / 16)]


def test_viewer_needs_the_videos(tmp_path):
    make_pairs(tmp_path, shards=1, rows=2)
    with pytest.raises(PairDataError, match="missing .*decode_pairs"):
        write_pair_viewer(tmp_path, None, segment_seconds=0.25, fps=8)


def _exporter_source(page: str) -> str:
    match = re.search(r"// BEGIN buildLabelsJsonl\n(.*?)// END buildLabelsJsonl", page, re.S)
    assert match, "the page lost its buildLabelsJsonl markers"
    return match.group(1)


def test_viewer_embeds_the_exporter_in_plain_javascript(tmp_path):
    root, records = viewer_dir(tmp_path)
    decode_pairs(root, IdentityVAE(), fps=8, progress=False)
    page = write_pair_viewer(root, records, segment_seconds=0.25, fps=8).read_text()
    source = _exporter_source(page)
    assert "function buildLabelsJsonl(pairs, choices)" in source and "JSON.stringify" in source
    assert "new Blob(" in page and 'a.download = "labels.jsonl"' in page


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_exported_labels_are_what_the_human_labeler_reads(tmp_path):
    root, records = viewer_dir(tmp_path)
    decode_pairs(root, IdentityVAE(), fps=8, progress=False)
    page = write_pair_viewer(root, records, segment_seconds=0.25, fps=8).read_text()
    data = json.loads(re.search(r'id="vidpo-data">(.*?)</script>', page).group(1))
    segments = data["pairs"][0]["segments"]
    choices = [[1] * segments, [-1, 0] + [1] * (segments - 2), [None] * segments, [1] + [None] * (segments - 1)]
    script = (_exporter_source(page) + "\nconst input = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
              "process.stdout.write(JSON.stringify(buildLabelsJsonl(input.pairs, input.choices)));\n")
    (tmp_path / "export.js").write_text(script)
    done = subprocess.run(["node", str(tmp_path / "export.js")], input=json.dumps({"pairs": data["pairs"],
                          "choices": choices}), capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    assert result["exported"] == 2 and result["partial"] == [records[3].pair_id] and result["unlabelled"] == 1
    labels_file = tmp_path / "labels.jsonl"
    labels_file.write_text(result["text"])
    parsed = HumanLabelFile(labels_file)
    assert parsed.errors() == []
    assert {pid: rec.segment_labels(segments, "x") for pid, rec in parsed.records.items()} == {
        records[0].pair_id: choices[0], records[1].pair_id: choices[1]}
    assert [json.loads(line) for line in result["text"].splitlines()] == [
        {"pair_id": records[0].pair_id, "labels": choices[0]}, {"pair_id": records[1].pair_id, "labels": choices[1]}]


def test_layout_files_are_written_atomically(tmp_path):
    records = make_pairs(tmp_path, shards=1, rows=1)
    assert decode_pairs(tmp_path, IdentityVAE(), fps=8, video_scale=1, progress=False)["video_scale"] == 1
    assert read_mp4(tmp_path / video_name(records[0].pair_id, "first")).shape == (3, 5, 8, 8)
    write_pair_viewer(tmp_path, records, segment_seconds=0.25, fps=8)
    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["decode.json", "frames/shard_00000.safetensors", "index.html", "pairs.jsonl",
                     "shards/shard_00000.safetensors", f"videos/{records[0].pair_id}_first.mp4",
                     f"videos/{records[0].pair_id}_second.mp4"]
    assert os.path.getsize(tmp_path / "index.html") > 0
