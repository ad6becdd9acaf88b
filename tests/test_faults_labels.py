"""Labels that can be trusted: `vidpo label` against a VLM server that fails, heals, cannot
be reached or answers nonsense, and training on what it leaves.

The server is the real HTTP stub of ``helpers.vlm_server`` on 127.0.0.1, judging brightness (so a label is right
when the right frames reached it); it counts every request, so "asked again" is measured at the server. A
comparison that gets no reply is stored as *failed* (label 0, status ``failed``), never as a tie: the next run
asks exactly those again, the summary counts failures over every attempt, too many failures end the run with an
error, and training masks failed segments and refuses a manifest without a non-tie label.
"""
from __future__ import annotations

import json
import re
import socket
import time

import pytest

from helpers.micro import MICRO
from helpers.models import save_perturbed_base
from helpers.pairs_dirs import blank_recipe, vlm_overrides, write_pairs_dir
from helpers.vlm_server import Reply, brightness_verdict, judge_by_brightness
from vidpo.cli import main
from vidpo.config import load_config
from vidpo.data.pairs import MANIFEST_FILE, PairDataError, PairRecord, read_manifest, trainable_records
from vidpo.stages.generate import generate_pairs
from vidpo.stages.label import PARTIAL_FILE, SUMMARY_FILE, label_pairs
from vidpo.stages.pipeline import dense_pairs_only, train_preference

TARGETS = [[1, -1], [0, 1], [-1, -1], [1, 0], [0, 0], [-1, 1], [1, 1]]   # 7 pairs x 2 segments = 14 comparisons
_PAIR = re.compile(r"pair (\d+)")


def pair_of(request) -> int:
    return int(_PAIR.search(request.text).group(1))


def failing_for(pairs: set[int]):
    """HTTP 500 for every question about ``pairs``, the brightness verdict for the others."""
    return lambda r: Reply(status=500) if pair_of(r) in pairs else Reply(text=brightness_verdict(r))


def label_argv(tmp_path, base_url, pairs="pairs", *extra) -> list[str]:
    recipe = blank_recipe(tmp_path / "recipe.yaml")
    return ["label", str(recipe), "--pairs", str(tmp_path / pairs)] + [
        f"--set={o}" for o in list(MICRO) + vlm_overrides(base_url, *extra)]


def summary(root) -> dict:
    return json.loads((root / SUMMARY_FILE).read_text())


def asked_since(server, start: int) -> tuple[int, set[int]]:
    """Requests the server got since ``start`` and the pairs they were about."""
    new = server.requests[start:]
    return len(new), {pair_of(r) for r in new}


@pytest.fixture
def clean_manifest(tmp_path, server):
    """The manifest of one run against a healthy server (the labels every healed run must end with)."""
    write_pairs_dir(tmp_path / "clean", TARGETS)
    assert main(label_argv(tmp_path, server.base_url, "clean")) == 0
    text = (tmp_path / "clean" / MANIFEST_FILE).read_text()
    assert [r.labels for r in read_manifest(tmp_path / "clean" / MANIFEST_FILE)[0]] == TARGETS
    server.requests.clear()
    return text


def test_failed_comparisons_are_stored_as_failed_and_a_rerun_asks_exactly_those(tmp_path, server, clean_manifest,
                                                                                  capsys):
    write_pairs_dir(tmp_path / "pairs", TARGETS)
    argv = label_argv(tmp_path, server.base_url)
    manifest, partial = tmp_path / "pairs" / MANIFEST_FILE, tmp_path / "pairs" / PARTIAL_FILE

    # Attempt 1: pairs 1 and 4 get HTTP 500 (4 of 14 comparisons: under label.max_failed_fraction = 0.5).
    server.behaviour = failing_for({1, 4})
    assert main(argv) == 0
    records = {r.pair_id: r for r in read_manifest(manifest)[0]}
    for pid in ("p0001", "p0004"):
        assert records[pid].labels == [0, 0] and records[pid].label_status == ["failed", "failed"]
    assert records["p0000"].label_status == ["ok", "ok"] and records["p0003"].label_status == ["ok", "tie"]
    first = summary(tmp_path / "pairs")
    assert (first["failed_comparisons"], first["failed_comparisons_total"], first["failed_this_run"]) == (4, 4, 4)
    assert first["status_counts"] == {"ok": 9, "tie": 1, "unparseable": 0, "failed": 4}
    assert partial.exists()   # the next run's list of what to ask again
    # 5 good pairs x 2 segments x 2 orders, and the first order of each failing comparison, tried twice.
    assert len(server.requests) == 20 + 2 * 2 * 2

    # Attempt 2: pair 1 healed, pair 4 still failing: only the failed comparisons are asked.
    server.behaviour = failing_for({4})
    start = len(server.requests)
    assert main(argv) == 0
    assert asked_since(server, start) == (4 + 4, {1, 4})
    second = summary(tmp_path / "pairs")
    assert (second["failed_comparisons"], second["failed_comparisons_total"]) == (2, 6)
    assert (second["retried_comparisons"], second["failed_this_run"]) == (4, 2)

    # Attempt 3: healed. Pair 4's 2 segments x 2 orders, nothing else; the labels are those of a clean run.
    server.behaviour = judge_by_brightness()
    start = len(server.requests)
    assert main(argv) == 0
    assert asked_since(server, start) == (4, {4})
    third = summary(tmp_path / "pairs")
    assert (third["failed_comparisons"], third["failed_comparisons_total"], third["retried_comparisons"]) == (0, 6, 2)
    assert manifest.read_text() == clean_manifest and not partial.exists()

    # Nothing failed any more: a rerun asks nothing (the answer cache), keeps the labels and the failure history.
    start = len(server.requests)
    assert main(argv) == 0
    assert asked_since(server, start) == (0, set()) and manifest.read_text() == clean_manifest
    assert summary(tmp_path / "pairs")["failed_comparisons_total"] == 6
    capsys.readouterr()


def test_a_killed_run_keeps_its_failures_and_the_rerun_retries_them(tmp_path, server, micro_overrides):
    """The issue's case: killed while the server returned 500s, rerun against a healed server."""
    write_pairs_dir(tmp_path / "pairs", TARGETS)
    cfg = load_config(None, micro_overrides + vlm_overrides(server.base_url))
    server.behaviour = failing_for({0, 1})
    label_pairs(cfg, tmp_path / "pairs", batch_size=3)
    # A kill after the first batch leaves its rows (pairs 0-2) and no manifest or summary.
    partial = tmp_path / "pairs" / PARTIAL_FILE
    partial.write_text("".join(partial.read_text().splitlines(keepends=True)[:3]))
    (tmp_path / "pairs" / MANIFEST_FILE).unlink()
    (tmp_path / "pairs" / SUMMARY_FILE).unlink()
    rows = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [row["status"] for row in rows] == [["failed", "failed"]] * 2 + [["ok", "ok"]]

    server.behaviour = judge_by_brightness()
    start = len(server.requests)
    stats = label_pairs(cfg, tmp_path / "pairs", batch_size=3)
    # Pairs 0 and 1 in full (2 segments x 2 orders); pairs 3-6 were answered before the kill (the answer cache).
    assert asked_since(server, start) == (8, {0, 1})
    assert (stats["failed_comparisons"], stats["failed_comparisons_total"], stats["retried_comparisons"]) == (0, 4, 4)
    assert [r.labels for r in read_manifest(tmp_path / "pairs" / MANIFEST_FILE)[0]] == TARGETS


def test_too_many_failures_end_the_run_with_an_error_and_a_rerun_recovers(tmp_path, server, clean_manifest, capsys):
    write_pairs_dir(tmp_path / "pairs", TARGETS)
    argv = label_argv(tmp_path, server.base_url)
    server.behaviour = lambda r: Reply(status=500)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "14 of 14 comparisons failed (100%, more than label.max_failed_fraction = 0.5)" in err
    assert re.search(r"first: vlm: pair 'p0000' segment 0 .*: failed: HTTP 500", err), err
    assert not (tmp_path / "pairs" / MANIFEST_FILE).exists()   # nothing for training to take as labels
    failed = summary(tmp_path / "pairs")
    assert failed["error"] in err and failed["failed_comparisons"] == 14

    server.behaviour = judge_by_brightness()
    start = len(server.requests)
    assert main(argv) == 0
    assert asked_since(server, start)[0] == 28   # every question, once (nothing was answered before)
    healed = summary(tmp_path / "pairs")
    assert (healed["failed_comparisons"], healed["failed_comparisons_total"], healed["retried_comparisons"]) == (0, 14,
                                                                                                                14)
    assert (tmp_path / "pairs" / MANIFEST_FILE).read_text() == clean_manifest

    # The limit is a setting: 1.0 accepts a run where everything failed (stored as failed, not as ties).
    write_pairs_dir(tmp_path / "lenient", TARGETS[:2])
    server.behaviour = lambda r: Reply(status=503)
    assert main(label_argv(tmp_path, server.base_url, "lenient", "label.max_failed_fraction=1.0")) == 0
    records = read_manifest(tmp_path / "lenient" / MANIFEST_FILE)[0]
    assert all(r.label_status == ["failed", "failed"] for r in records)
    capsys.readouterr()


def test_an_unreachable_endpoint_is_one_line_before_any_work(tmp_path, capsys):
    write_pairs_dir(tmp_path / "pairs", TARGETS)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]   # nothing listens there once closed
    url = f"http://127.0.0.1:{port}/v1"
    capsys.readouterr()
    start = time.perf_counter()
    assert main(label_argv(tmp_path, url)) == 2
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"vidpo label: error: cannot reach the VLM server at {url} (GET {url}/models: ")
    assert "label.vlm.base_url" in err and elapsed < 10
    partial = tmp_path / "pairs" / PARTIAL_FILE
    assert not (tmp_path / "pairs" / MANIFEST_FILE).exists() and (not partial.exists() or not partial.read_text())


def test_unparseable_answers_are_ties_counted_apart_and_not_asked_again(tmp_path, server, capsys):
    write_pairs_dir(tmp_path / "pairs", TARGETS)
    argv = label_argv(tmp_path, server.base_url)
    server.behaviour = lambda r: (Reply(text="I cannot tell from these frames") if pair_of(r) == 2 and
                                  r.segment_number == 2 else Reply(text=brightness_verdict(r)))
    assert main(argv) == 0
    records = {r.pair_id: r for r in read_manifest(tmp_path / "pairs" / MANIFEST_FILE)[0]}
    assert records["p0002"].labels == [-1, 0] and records["p0002"].label_status == ["ok", "unparseable"]
    stats = summary(tmp_path / "pairs")
    assert stats["unparseable_comparisons"] == 1 and stats["failed_comparisons"] == 0
    assert stats["status_counts"] == {"ok": 9, "tie": 4, "unparseable": 1, "failed": 0}
    assert any("pair 'p0002' segment 1" in p and "unparseable" in p for p in stats["problems"])
    assert not (tmp_path / "pairs" / PARTIAL_FILE).exists()
    start = len(server.requests)
    assert main(argv) == 0
    assert asked_since(server, start) == (0, set())   # the same question would get the same answer
    assert summary(tmp_path / "pairs")["unparseable_comparisons"] == 1
    capsys.readouterr()


def test_training_refuses_an_all_tie_manifest_saying_why(tmp_path, server, capsys):
    write_pairs_dir(tmp_path / "pairs", TARGETS)
    server.behaviour = lambda r: Reply(text="TIE")
    assert main(label_argv(tmp_path, server.base_url)) == 0
    argv = ["train", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")]
    argv += [f"--set={o}" for o in list(MICRO) + [f"pref.pairs={tmp_path / 'pairs'}", "train.objective=dense_dpo",
                                                  "train.max_steps=1"]]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'pairs' / MANIFEST_FILE}: nothing to train on: none of its 14 segment labels (7 pairs) " \
           "prefers a video: 14 ties, 0 unparseable answers (ties), 0 failed comparisons" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def _record(pair_id: str, labels: list[int], status: list[str]) -> PairRecord:
    return PairRecord(pair_id, "shards/shard_00000.safetensors", 0, labels=labels, label_status=status)


def test_failed_segments_are_masked_in_training_never_ties(tmp_path, micro_overrides):
    records = [_record("a", [0, 0], ["failed", "failed"]),        # nothing judged: does not train
               _record("b", [1, 0], ["ok", "failed"]),            # 1 of 1 judged segment is a non-tie
               _record("c", [1, 0], ["ok", "tie"]),               # 1 of 2
               _record("d", [0, 0], ["tie", "unparseable"])]      # judged: all ties
    kept, dropped = trainable_records(records, tmp_path)
    assert [r.pair_id for r in kept] == ["b", "c", "d"] and dropped == 1
    # DenseDPO's data rule counts non-ties among the judged segments: b (1/1) passes 0.6, c (1/2) does not.
    cfg = load_config(None, micro_overrides + ["train.objective=dense_dpo", "label.min_non_tie_fraction=0.6"])
    assert [r.pair_id for r in dense_pairs_only(cfg, kept)[0]] == ["b"]
    # Only failed comparisons and ties left: refused, pointing at a rerun of vidpo label.
    with pytest.raises(PairDataError, match=r"nothing to train on: none of its 4 segment labels \(2 pairs\) prefers "
                                            r"a video: 1 ties, 0 unparseable answers \(ties\), 3 failed comparisons; "
                                            r"rerun `vidpo label`"):
        trainable_records(records[:1] + [_record("e", [0, 0], ["failed", "tie"])], tmp_path)


@pytest.mark.parametrize("status, problem", [
    (["ok", "maybe"], r"'label_status' must be a list of 2 of \('ok', 'tie', 'unparseable', 'failed'\)"),
    (["ok"], "'label_status' must be a list of 2"),
    (["failed", "ok"], "segment 0 has label 1 but status 'failed'"),
])
def test_a_bad_label_status_is_one_error_naming_file_and_line(tmp_path, status, problem):
    manifest = tmp_path / MANIFEST_FILE
    line = {"pair_id": "p0", "shard": "shards/shard_00000.safetensors", "row": 0, "labels": [1, 0],
            "label_status": status}
    manifest.write_text(json.dumps(line) + "\n")
    with pytest.raises(PairDataError, match=rf"^{manifest}:1: pair p0: {problem}"):
        read_manifest(manifest)


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_max_failed_fraction_is_validated(micro_overrides, value):
    with pytest.raises(ValueError, match=r"label\.max_failed_fraction must be in \[0, 1\]"):
        load_config(None, micro_overrides + [f"label.max_failed_fraction={value}"])


def test_a_manifest_with_failed_segments_trains_without_them(tmp_path, micro_overrides):
    base = save_perturbed_base(load_config(None, micro_overrides), tmp_path / "base.safetensors")
    cfg = load_config(None, micro_overrides + [f"pref.pairs={tmp_path / 'pairs'}", "train.objective=dense_dpo",
                                               f"train.init_from={base}", "train.max_steps=1",
                                               "label.min_non_tie_fraction=null"])
    generate_pairs(cfg, tmp_path / "pairs")
    label_pairs(cfg, tmp_path / "pairs")
    manifest = tmp_path / "pairs" / MANIFEST_FILE
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[0].update(labels=[0, 0], video_label=0, label_status=["failed", "failed"])   # nothing judged
    lines[1].update(labels=[lines[1]["labels"][0], 0], label_status=[lines[1]["label_status"][0], "failed"])
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = train_preference(cfg, tmp_path / "run")
    used = {r.pair_id for r in out["records"]}
    assert lines[0]["pair_id"] not in used and lines[1]["pair_id"] in used and len(used) == len(lines) - 1
    assert out["result"]["pairs"] == len(lines) - 1


def test_a_partial_labelling_resumes_only_with_the_same_label_settings(tmp_path, server, capsys):
    """Labels kept for a rerun (the partial file of failed comparisons) were made by one labeller and question: a
    rerun with another VLM model is refused naming it, before any question; how requests travel (concurrency,
    timeouts) may change; --overwrite labels from scratch."""
    write_pairs_dir(tmp_path / "pairs", TARGETS)
    server.behaviour = failing_for({4})
    assert main(label_argv(tmp_path, server.base_url)) == 0
    assert (tmp_path / "pairs" / PARTIAL_FILE).exists()
    capsys.readouterr()

    start = len(server.requests)
    assert main(label_argv(tmp_path, server.base_url, "pairs", "label.vlm.model=other-vlm")) == 2
    err = capsys.readouterr().err
    assert "labels made with other settings" in err and "vlm_model: \"fake-vlm\" -> \"other-vlm\"" in err, err
    assert "--overwrite" in err and len(server.requests) == start

    server.behaviour = judge_by_brightness()
    assert main(label_argv(tmp_path, server.base_url, "pairs", "label.vlm.concurrency=2")) == 0
    assert asked_since(server, start) == (4, {4})      # resumed: only the failed pair again

    start = len(server.requests)
    assert main(label_argv(tmp_path, server.base_url, "pairs", "label.vlm.model=other-vlm") + ["--overwrite"]) == 0
    assert asked_since(server, start)[0] == 2 * 2 * len(TARGETS)   # another model: every question asked anew
    assert json.loads((tmp_path / "pairs" / "label_settings.json").read_text())["vlm_model"] == "other-vlm"
