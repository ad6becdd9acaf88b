"""The labeller interface, the registry, the human-labels file and the oracle labeller."""
from __future__ import annotations

import json

import pytest
import torch

from vidpo.labeling import (HumanLabeler, HumanLabelFile, LabelingError, LabelResult, Labeler, OracleLabeler,
                            PairBatch, build_labeler, majority_vote, register_labeler, registered_kinds,
                            save_label_file)
from vidpo.labeling import base as labeling_base

FRAMES, SEGMENT_IDS = 6, torch.tensor([0, 0, 1, 1, 2, 2])


def blank_batch(pair_ids=("p0", "p1", "p2"), frames: int = FRAMES, segment_ids=SEGMENT_IDS) -> PairBatch:
    n = len(pair_ids)
    clips = torch.zeros(n, 3, frames, 4, 4)
    return PairBatch(first=clips, second=clips.clone(), captions=[f"caption {p}" for p in pair_ids],
                     pair_ids=list(pair_ids), segment_ids=segment_ids, fps=4.0)


# ------------------------------------------------------------------------------------------ interface

def test_majority_vote_matches_a_reference_and_handles_draws():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 2, (37, 5), generator=gen)
    reference = [(1 if sum(row) > 0 else -1 if sum(row) < 0 else 0) for row in labels.tolist()]
    assert majority_vote(labels).tolist() == reference
    cases = torch.tensor([[1, -1, 0], [1, 1, -1], [0, 0, 0], [-1, 0, 0], [-1, 1, 1]])
    assert majority_vote(cases).tolist() == [0, 1, 0, -1, 1]
    assert majority_vote(cases).dtype == torch.int64
    assert majority_vote(torch.zeros(0, 4, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        majority_vote(torch.tensor([1, -1]))


def test_label_result_from_labels_votes_and_checks_values():
    result = LabelResult.from_labels(torch.tensor([[1, 1, 0], [0, -1, 0]]), failed=1, messages=["x"])
    assert result.video_labels.tolist() == [1, -1] and result.failed == 1 and result.messages == ["x"]
    assert result.tie_fraction == pytest.approx(3 / 6)
    assert result.status is None and result.statuses() == [["ok", "ok", "tie"], ["tie", "ok", "tie"]]
    with pytest.raises(ValueError, match="must be in"):
        LabelResult.from_labels(torch.tensor([[2, 0]]))
    # With statuses, failures and unparseable answers are counted from them; only "ok" labels are non-zero.
    status = [["ok", "failed", "unparseable"], ["tie", "ok", "failed"]]
    result = LabelResult.from_labels(torch.tensor([[1, 0, 0], [0, -1, 0]]), status=status)
    assert (result.failed, result.unparseable, result.video_labels.tolist()) == (2, 1, [1, -1])
    with pytest.raises(ValueError, match="only 'ok' labels are non-zero"):
        LabelResult.from_labels(torch.tensor([[1, 0]]), status=[["failed", "tie"]])
    with pytest.raises(ValueError, match="status must be one of"):
        LabelResult.from_labels(torch.tensor([[0]]), status=[["skipped"]])


@pytest.mark.parametrize("change, message", [
    (dict(second=torch.zeros(2, 3, FRAMES, 4, 5)), "one shape"),
    (dict(captions=["one"]), "2 pairs but 1 captions"),
    (dict(pair_ids=["a", "a"]), "repeated: \\['a'\\]"),
    (dict(segment_ids=torch.tensor([0, 0, 1, 1, 2])), "must be \\(6,\\)"),
    (dict(segment_ids=torch.tensor([0, 0, 2, 2, 3, 3])), "contiguous"),
    (dict(segment_ids=torch.tensor([1, 1, 2, 2, 3, 3])), "contiguous"),
    (dict(segment_ids=torch.tensor([0, 1, 0, 1, 2, 2])), "contiguous"),
    (dict(cond_ids=torch.zeros(3, 3, dtype=torch.long)), "3 rows for 2 pairs"),
])
def test_pair_batch_rejects_inconsistent_input(change, message):
    fields = dict(first=torch.zeros(2, 3, FRAMES, 4, 4), second=torch.zeros(2, 3, FRAMES, 4, 4),
                  captions=["a", "b"], pair_ids=["x", "y"], segment_ids=SEGMENT_IDS)
    fields.update(change)
    with pytest.raises(LabelingError, match=message):
        PairBatch(**fields)


def test_pair_batch_segment_geometry():
    batch = blank_batch()
    assert batch.num_segments == 3 and batch.batch_size == 3
    assert batch.segment_frames(1).tolist() == [2, 3]
    assert batch.segment_seconds(2) == (1.0, 1.5)


def test_registry_builds_kinds_and_the_critic_hook_registers_later(monkeypatch):
    import vidpo.labeling.base as base

    # The real critic (vidpo.ipo.critic) registers itself on import; another test in this process may have
    # imported it. Start from a registry without it, restored after the test.
    monkeypatch.setattr(base, "_REGISTRY", {k: v for k, v in base._REGISTRY.items() if k != "critic"})
    assert {"oracle", "human", "vlm"} <= set(registered_kinds())
    with pytest.raises(LabelingError, match=r"'critic' is not registered yet.*@register_labeler\('critic'\)"):
        build_labeler("critic")
    with pytest.raises(LabelingError, match=r"unknown labeller kind 'orcale' \(did you mean 'oracle'\?\)"):
        build_labeler("orcale")

    class BrightnessCritic(Labeler):
        """A stand-in critic that prefers the brighter video per segment (a real, if simple, labeller)."""

        name = "critic"

        def __init__(self, margin: float = 0.0):
            self.margin = margin

        def label(self, batch):
            per_frame = (batch.first - batch.second).mean(dim=(1, 3, 4))  # (B, T)
            seg = torch.zeros(batch.batch_size, batch.num_segments).index_add_(1, batch.segment_ids, per_frame)
            return LabelResult.from_labels((seg > self.margin).long() - (seg < -self.margin).long())

    try:
        register_labeler("critic")(BrightnessCritic)
        with pytest.raises(ValueError, match="already registered"):
            register_labeler("critic")(type("Other", (BrightnessCritic,), {}))
        critic = build_labeler("critic", margin=0.01)
        batch = blank_batch()
        batch.first[0, :, 2:4] += 0.5
        batch.second[1, :, 0:2] += 0.5
        result = critic.label(batch)
        assert result.labels.tolist() == [[0, 1, 0], [-1, 0, 0], [0, 0, 0]]
        assert result.video_labels.tolist() == [1, -1, 0]
        with pytest.raises(NotImplementedError, match="cannot score a single video"):
            critic.label_pointwise(batch.first, batch.captions, batch.segment_ids)
    finally:
        labeling_base._REGISTRY.pop("critic", None)


# --------------------------------------------------------------------------------- human labels file

def write_lines(path, *lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_human_file_per_segment_and_whole_video_labels(tmp_path):
    path = write_lines(tmp_path / "labels.jsonl",
                       '{"pair_id": "p0", "labels": [1, -1, 0], "annotator": "ana"}',
                       "",
                       '{"pair_id": "p1", "label": -1}',
                       '{"pair_id": "p2", "labels": [0, 0, 1]}',
                       '{"pair_id": "other-batch", "labels": [1]}')
    labeler = build_labeler("human", path=path)
    result = labeler.label(blank_batch())
    assert result.labels.tolist() == [[1, -1, 0], [-1, -1, -1], [0, 0, 1]]
    assert result.video_labels.tolist() == [0, -1, 1]
    assert result.failed == 0 and result.messages == []
    with pytest.raises(NotImplementedError, match="'human' labeller compares pairs"):
        labeler.label_pointwise(torch.zeros(1, 3, FRAMES, 4, 4), ["c"], SEGMENT_IDS)


BAD_LINES = [
    ('{"pair_id": "p1", "labels": [1, 0}', "bad JSON", False),
    ('[1, 0, -1]', "expected a JSON object", False),
    ('{"labels": [1, 0, -1]}', "missing key 'pair_id'", False),
    ('{"pair_id": 7, "labels": [1, 0, -1]}', "'pair_id' must be a non-empty string, got 7", False),
    ('{"pair_id": "p1", "lables": [1, 0, -1]}', "missing key 'labels' (one per segment) or 'label'", True),
    ('{"pair_id": "p1", "labels": [1, 0, -1], "label": 1}', "not both", True),
    ('{"pair_id": "p1", "labels": [1, 2, 0]}', "'labels'[1] = 2 is not one of -1, 0, 1", True),
    ('{"pair_id": "p1", "labels": [1, 0.5, 0]}', "'labels'[1] = 0.5 is not one of -1, 0, 1", True),
    ('{"pair_id": "p1", "label": true}', "'label' = true is not one of -1, 0, 1", True),
    ('{"pair_id": "p1", "labels": "1,0,-1"}', "'labels' must be a non-empty list", True),
    ('{"pair_id": "p1", "labels": []}', "'labels' must be a non-empty list", True),
    ('{"pair_id": "p0", "labels": [0, 0, 0]}', "pair 'p0' is labelled again (first on line 1)", True),
]


@pytest.mark.parametrize("line, problem, readable", BAD_LINES)
def test_human_file_errors_name_file_line_and_problem(tmp_path, line, problem, readable):
    # The bad line is line 3 (line 2 is blank and still counts).
    path = write_lines(tmp_path / "labels.jsonl", '{"pair_id": "p0", "labels": [1, 1, 1]}', "", line,
                       '{"pair_id": "p2", "label": 1}')
    with pytest.raises(LabelingError) as caught:
        HumanLabeler(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert problem in str(caught.value)

    # Policy "tie": the affected pair's segments are failed (label 0, not ties), counted, with the same message.
    result = HumanLabeler(path, on_error="tie", on_missing="tie").label(blank_batch())
    duplicate = "again" in problem  # then p0 is in doubt, and p1 has no line at all
    expected = [[0 if duplicate else 1] * 3, [0, 0, 0], [1, 1, 1]]
    assert result.labels.tolist() == expected
    assert result.failed == (6 if duplicate else 3)
    assert any(f"{path}:3: " in m and problem in m for m in result.messages), result.messages
    if not readable:  # the line's pair is unknown, so p1 is reported missing, pointing at the bad line
        assert any("pair 'p1' has no line" in m and f"{path}:3" in m for m in result.messages)
    else:
        assert any(f"pair '{'p0' if duplicate else 'p1'}'" in m and "segments 0-2 failed (no label)" in m
                   for m in result.messages)
    failed_pairs = {0, 1} if duplicate else {1}
    assert result.status == [["failed"] * 3 if b in failed_pairs else ["ok"] * 3 for b in range(3)]


def test_human_file_wrong_number_of_segments_is_found_at_label_time(tmp_path):
    path = write_lines(tmp_path / "labels.jsonl", '{"pair_id": "p0", "labels": [1, 1, 1]}',
                       '{"pair_id": "p1", "labels": [1, -1]}', '{"pair_id": "p2", "label": 0}')
    with pytest.raises(LabelingError, match=rf"^{path}:2: pair 'p1' has 2 segment labels but the batch's clips "
                                            "have 3 segments"):
        HumanLabeler(path).label(blank_batch())
    result = HumanLabeler(path, on_error="tie").label(blank_batch())
    assert result.labels.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]] and result.failed == 3
    assert result.messages == [f"human: {path}:2: pair 'p1' has 2 segment labels but the batch's clips have "
                               "3 segments; segments 0-2 failed (no label)"]
    assert result.status == [["ok"] * 3, ["failed"] * 3, ["tie"] * 3]


def test_human_file_missing_pairs_are_reported_by_id(tmp_path):
    path = write_lines(tmp_path / "labels.jsonl", '{"pair_id": "p0", "labels": [1, 1, 1]}')
    with pytest.raises(LabelingError, match=rf"pair 'p1' has no line in {path}$"):
        HumanLabeler(path).label(blank_batch())
    result = HumanLabeler(path, on_missing="tie").label(blank_batch())
    assert result.labels.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert result.failed == 6 and result.status == [["ok"] * 3] + [["failed"] * 3] * 2
    assert [m.split(" has no line")[0] for m in result.messages] == ["human: pair 'p1'", "human: pair 'p2'"]


def test_human_file_is_reread_when_annotators_add_lines(tmp_path):
    file = tmp_path / "labels.jsonl"
    write_lines(file, '{"pair_id": "p0", "label": 1}')
    labeler = HumanLabeler(file, on_missing="tie")
    assert labeler.label(blank_batch(("p0", "p1"))).failed == 3
    with open(file, "a", encoding="utf-8") as handle:
        handle.write('{"pair_id": "p1", "labels": [-1, 0, -1]}\n')
    result = labeler.label(blank_batch(("p0", "p1")))
    assert result.labels.tolist() == [[1, 1, 1], [-1, 0, -1]] and result.failed == 0


def test_save_label_file_round_trips(tmp_path):
    labels = torch.tensor([[1, -1, 0], [0, 0, 1]])
    path = tmp_path / "out.jsonl"
    save_label_file(path, ["a", "b"], labels)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"pair_id": "a", "labels": [1, -1, 0]}, {"pair_id": "b", "labels": [0, 0, 1]}]
    assert torch.equal(HumanLabeler(path).label(blank_batch(("a", "b"))).labels, labels)
    assert HumanLabelFile(path).errors() == []


def test_human_labeler_options_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        HumanLabeler(tmp_path / "nope.jsonl")
    path = write_lines(tmp_path / "labels.jsonl", '{"pair_id": "p0", "label": 1}')
    with pytest.raises(ValueError, match="on_missing must be one of"):
        HumanLabeler(path, on_missing="skip")


# ------------------------------------------------------------------------------------------ oracle

@pytest.fixture(scope="module")
def shapes():
    """A shapes world of 12-frame clips, its oracle, and 2-frame segments (S = 6)."""
    oracle_module = pytest.importorskip("vidpo.data.oracle", reason="vidpo.data.oracle (ShapesOracle) not built yet")
    from vidpo.config import WorldConfig
    from vidpo.data.shapes import ShapesWorld
    from vidpo.data.segments import segment_ids

    world = ShapesWorld(WorldConfig(frames=12, fps=8.0))
    rendered, cond_ids = world.sample_batch(4, torch.Generator().manual_seed(3), corrupt=False)
    return world, oracle_module.ShapesOracle(world), rendered.clips, cond_ids, segment_ids(12, 8.0, 0.25)


def oracle_batch(shapes, dropout_frames=(4, 5)) -> PairBatch:
    """Clean first clips; the second clips lose their object in segment 2 (frames 4, 5), pairs 0 and 2 swapped."""
    world, _, clips, cond_ids, seg = shapes
    damaged = clips.clone()
    damaged[:, :, list(dropout_frames)] = -1.0
    swap = torch.tensor([True, False, True, False])
    first = torch.where(swap[:, None, None, None, None], damaged, clips)
    second = torch.where(swap[:, None, None, None, None], clips, damaged)
    return PairBatch(first=first, second=second, captions=world.captions(cond_ids),
                     pair_ids=[f"o{i}" for i in range(4)], segment_ids=seg, cond_ids=cond_ids, fps=8.0)


def test_oracle_segment_labels_find_the_damaged_segment(shapes):
    _, oracle, *_ = shapes
    batch = oracle_batch(shapes)
    labeler = build_labeler("oracle", oracle=oracle, tie_margin=0.05)
    result = labeler.label(batch)
    expected = torch.zeros(4, 6, dtype=torch.long)
    expected[:, 2] = torch.tensor([-1, 1, -1, 1])
    assert torch.equal(result.labels, expected)
    assert result.video_labels.tolist() == [-1, 1, -1, 1] and result.failed == 0
    assert torch.equal(result.labels, oracle.prefer(batch.first, batch.second, batch.cond_ids, batch.segment_ids, 0.05))


def test_oracle_video_mode_broadcasts_the_total_score_verdict(shapes):
    world, oracle, *_ = shapes
    batch = oracle_batch(shapes)
    totals = [oracle.score(c, batch.cond_ids, batch.segment_ids).total.double() for c in (batch.first, batch.second)]
    difference = totals[0] - totals[1]
    assert bool((difference.abs() > 0.1).all())  # one damaged segment of six costs about 1/6 of the total
    result = OracleLabeler(world, mode="video", tie_margin=0.05).label(batch)
    assert result.labels.tolist() == [[int(torch.sign(d))] * 6 for d in difference]
    assert result.video_labels.tolist() == [-1, 1, -1, 1]
    # A margin above every difference turns every pair into a tie.
    wide = OracleLabeler(oracle=oracle, mode="video", tie_margin=float(difference.abs().max()) + 1e-3).label(batch)
    assert not bool(wide.labels.any())


def test_oracle_pointwise_scores_and_errors(shapes):
    _, oracle, clips, cond_ids, seg = shapes
    labeler = OracleLabeler(oracle=oracle)
    scores = labeler.label_pointwise(clips, [""] * 4, seg, cond_ids)
    assert torch.equal(scores, oracle.score(clips, cond_ids, seg).segments)
    whole = OracleLabeler(oracle=oracle, mode="video").label_pointwise(clips, [""] * 4, seg, cond_ids)
    assert whole.shape == (4, 6) and torch.equal(whole[:, 0], oracle.score(clips, cond_ids, seg).total)
    with pytest.raises(LabelingError, match="needs cond_ids"):
        labeler.label_pointwise(clips, [""] * 4, seg)
    batch = oracle_batch(shapes)
    batch.cond_ids = None
    with pytest.raises(LabelingError, match="needs cond_ids"):
        labeler.label(batch)
    with pytest.raises(ValueError, match="mode must be one of"):
        OracleLabeler(oracle=oracle, mode="frames")
    with pytest.raises(ValueError, match="exactly one of"):
        OracleLabeler()
