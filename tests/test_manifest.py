"""Clip and pair manifests in JSONL and Parquet: round trips, and errors that name the file and line."""
import json

import pytest

from vidpo.data.manifest import (ClipPairRecord, ClipRecord, ManifestError, read_clip_manifest,
                                 read_clip_pair_manifest, read_pair_manifest, write_clip_manifest,
                                 write_clip_pair_manifest, write_pair_manifest)
from vidpo.data.pairs import PairRecord, read_manifest, write_manifest

pytest.importorskip("pyarrow")


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_clip_manifest_round_trip(tmp_path, suffix):
    records = [ClipRecord("c1", str(tmp_path / "clips" / "a.webm"), "a cat", fps=30.0, start=1.5, end=4.0,
                          ground_truth=False, extra={"source": "web"}),
               ClipRecord("c2", str(tmp_path / "clips" / "b.mp4"), "", extra={"source": "studio"})]
    path = tmp_path / f"clips{suffix}"
    write_clip_manifest(path, records)
    back, problems = read_clip_manifest(path)
    assert problems == [] and back == records
    if suffix == ".jsonl":  # stored relative to the manifest, so the folder can move
        assert json.loads(path.read_text().splitlines()[0])["path"] == "clips/a.webm"


def test_clip_defaults_and_relative_paths(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"path": "v/x.mp4", "caption": "x"},
                                         {"path": "v/x.mp4", "caption": "y", "start": 2}])
    (first, second), _ = read_clip_manifest(path)
    assert first.clip_id == "v/x.mp4" and second.clip_id == "v/x.mp4@2"
    assert first.path == str(tmp_path / "v" / "x.mp4") and first.ground_truth is True and first.fps is None


BAD_CLIPS = [
    ('{"caption": "x"}', "missing key 'path'"),
    ('{"path": "a.mp4"}', "missing key 'caption'"),
    ('{"path": "a.mp4", "caption": 3}', "'caption' must be a string"),
    ('{"path": "a.mp4", "caption": "x", "fps": -2}', "'fps' must be > 0"),
    ('{"path": "a.mp4", "caption": "x", "fps": true}', "'fps' must be a number"),
    ('{"path": "a.mp4", "caption": "x", "start": 3, "end": 2}', "'end' (2.0) must be after 'start'"),
    ('{"path": "a.mp4", "caption": "x", "ground_truth": "yes"}', "'ground_truth' must be true/false"),
    ('{"path": "a.mp4", "caption": "x"', "not valid JSON"),
    ('[1, 2]', "expected an object"),
]


@pytest.mark.parametrize("line,message", BAD_CLIPS)
def test_clip_errors_name_file_and_line(tmp_path, line, message):
    path = _jsonl(tmp_path / "m.jsonl", [{"path": "ok.mp4", "caption": "fine"}, "", line])
    with pytest.raises(ManifestError) as err:
        read_clip_manifest(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_clip_skip_policy_counts_bad_lines(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"path": "a.mp4", "caption": "a"}, {"caption": "b"},
                                         {"path": "a.mp4", "caption": "dup"}, {"path": "c.mp4", "caption": "c"}])
    records, problems = read_clip_manifest(path, on_error="skip")
    assert [r.clip_id for r in records] == ["a.mp4", "c.mp4"]
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:2", f"{path}:3"]
    assert "duplicate id 'a.mp4'" in problems[1]


def test_missing_video_files_are_bad_entries_when_checked(tmp_path):
    (tmp_path / "here.mp4").write_bytes(b"x")
    path = _jsonl(tmp_path / "m.jsonl", [{"path": "here.mp4", "caption": "a"}, {"path": "gone.mp4", "caption": "b"}])
    records, problems = read_clip_manifest(path, on_error="skip", check_files=True)
    assert len(records) == 1 and "video file not found" in problems[0] and f"{path}:2" in problems[0]


def test_folder_of_clips_with_caption_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name, caption in [("a.mp4", "first"), ("b/c.webm", "second\n"), ("d.mkv", None)]:
        (tmp_path / name).write_bytes(b"video")
        if caption is not None:
            (tmp_path / name).with_suffix(".txt").write_text(caption)
    records, problems = read_clip_manifest(tmp_path, on_error="skip")
    assert [(r.clip_id, r.caption) for r in records] == [("a.mp4", "first"), ("b/c.webm", "second")]
    assert len(problems) == 1 and "d.mkv: no caption file d.txt" in problems[0]
    with pytest.raises(ManifestError, match="d.mkv: no caption file"):
        read_clip_manifest(tmp_path)


def test_parquet_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"path": "a.mp4", "caption": "a", "fps": 24.0},
                                         {"path": "b.mp4", "caption": "b", "fps": -1.0}]), path)
    with pytest.raises(ManifestError, match=r"m\.parquet:row 1: 'fps' must be > 0"):
        read_clip_manifest(path)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ManifestError, match="broken.parquet: unreadable Parquet"):
        read_clip_manifest(tmp_path / "broken.parquet")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_clip_manifest(_jsonl(tmp_path / "m.csv", []))
    with pytest.raises(ManifestError, match="not found"):
        read_clip_manifest(tmp_path / "absent.jsonl")


# ----- pair manifests ------------------------------------------------------------------------------------
def _pairs():
    return [PairRecord("p0", "shards/shard_00000.safetensors", 0, [1, 2], caption="a red square", mode="structural",
                       eta=0.6, labels=[1, 0, -1], video_label=1, segment_seconds=0.5, label_source="oracle",
                       extra={"critic_score": 0.25}),
            PairRecord("p1", "shards/shard_00000.safetensors", 1, [3], labels=[0, 0, 1], segment_seconds=0.5,
                       label_source="vlm")]


def test_pair_manifest_parquet_matches_jsonl(tmp_path):
    write_pair_manifest(tmp_path / "m.parquet", _pairs())
    write_manifest(tmp_path / "m.jsonl", _pairs())
    from_parquet, _ = read_pair_manifest(tmp_path / "m.parquet")
    from_jsonl, _ = read_manifest(tmp_path / "m.jsonl")
    assert from_parquet == from_jsonl == _pairs()
    same, _ = read_pair_manifest(tmp_path / "m.jsonl")  # the JSONL form reads through the same function
    assert same == _pairs()


def test_pair_manifest_validation(tmp_path):
    rows = [json.loads(r.to_json()) for r in _pairs()]
    rows[1]["labels"] = [2]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match=r"bad\.parquet:row 1: pair p1: 'labels' must be"):
        read_pair_manifest(tmp_path / "bad.parquet")
    good, problems = read_pair_manifest(tmp_path / "bad.parquet", on_error="skip")
    assert [r.pair_id for r in good] == ["p0"] and len(problems) == 1
    write_pair_manifest(tmp_path / "ok.parquet", _pairs())
    with pytest.raises(ManifestError, match="3 labels, but the recipe's segments give 2"):
        read_pair_manifest(tmp_path / "ok.parquet", num_segments=2)
    unlabelled, _ = read_pair_manifest(_jsonl(tmp_path / "u.jsonl", [{"pair_id": "q", "shard": "s", "row": 0,
                                                                      "cond_ids": []}]), need_labels=False)
    assert unlabelled[0].labels is None


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_clip_pair_manifest_round_trip(tmp_path, suffix):
    records = [ClipPairRecord("q0", str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"), "a dog runs", labels=[1, -1],
                              segment_seconds=1.0, label_source="human", ground_truth=str(tmp_path / "gt.mp4")),
               ClipPairRecord("q1", str(tmp_path / "c.mp4"), str(tmp_path / "d.mp4"), "rain", labels=[0],
                              segment_seconds=1.0, label_source="vlm", extra={"note": "retake"})]
    write_clip_pair_manifest(tmp_path / f"m{suffix}", records)
    back, _ = read_clip_pair_manifest(tmp_path / f"m{suffix}")
    assert back == records


def test_clip_pair_errors(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"pair_id": "q", "first": "a.mp4", "caption": "x", "labels": [1]}])
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: missing key 'second'"):
        read_clip_pair_manifest(path)
    path = _jsonl(tmp_path / "n.jsonl", [{"pair_id": "q", "first": "a", "second": "b", "caption": "x",
                                          "labels": [1], "segment_seconds": 0}])
    with pytest.raises(ManifestError, match="'segment_seconds' must be > 0"):
        read_clip_pair_manifest(path)
