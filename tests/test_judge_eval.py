"""``vidpo judge-eval``: a judge's agreement with human labels, with CIs over pairs, tie rates and position bias.

The judge is the VLM labeller against the stub server (``helpers.vlm_server``) on a hand-written pairs directory
whose better video is the brighter one (``helpers.pairs_dirs``): a competent judge (brightness) against human
labels with planted disagreements gives rates checked exactly, and a judge with a planted position bias (it
picks the video shown first 70% of the time, whatever the videos) must be recovered within the report's CI.
"""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from helpers.pairs_dirs import blank_recipe, vlm_overrides, write_pairs_dir
from helpers.vlm_server import Reply, judge_by_brightness
from vidpo.cli import main
from vidpo.evaluation.judge_eval import judge_agreement, markdown_report
from vidpo.labeling import save_label_file

PAIRS = 48


def biased_judge(first_rate: float):
    """Answers "A" (the video shown first) with probability ``first_rate``, else "B", ignoring the videos; the
    draw is a hash of the question (text and images), so it is repeatable."""
    def behaviour(request):
        digest = hashlib.sha256(request.text.encode() + request.images_a[0].tobytes()
                                + request.images_b[0].tobytes()).digest()
        return Reply(text="A" if int.from_bytes(digest[:8], "little") / 2 ** 64 < first_rate else "B")
    return behaviour


def targets(n: int = PAIRS, seed: int = 1) -> list[list[int]]:
    return torch.randint(-1, 2, (n, 2), generator=torch.Generator().manual_seed(seed)).tolist()


def run_cli(tmp_path, server, *args, extra=()):
    from helpers.micro import MICRO

    argv = ["judge-eval", str(blank_recipe(tmp_path / "recipe.yaml")), "--pairs", str(tmp_path / "pairs"),
            "--human", str(tmp_path / "human.jsonl"), "--out", str(tmp_path / "judge"), *args]
    argv += [f"--set={o}" for o in list(MICRO) + vlm_overrides(server.base_url, *extra)]
    return main(argv)


def test_planted_position_bias_is_recovered_within_its_ci(server, tmp_path, capsys):
    truth = targets()
    ids = write_pairs_dir(tmp_path / "pairs", truth)
    save_label_file(tmp_path / "human.jsonl", ids, torch.tensor(truth))
    server.behaviour = biased_judge(0.7)
    assert run_cli(tmp_path, server) == 0
    report = json.loads((tmp_path / "judge" / "judge_eval.json").read_text())
    bias = report["position_bias"]
    low, high = bias["first_shown_rate"]["ci95"]
    assert low <= 0.7 <= high and low > 0.5, bias     # the planted 70%, and clearly not an unbiased 50%
    assert high - low < 0.2
    assert bias["answers"] == 2 * 2 * PAIRS and bias["tie_answer_rate"]["mean"] == 0.0
    # Consistent only when the two draws happen to undo the swap ((A, B) or (B, A)): about 2 * 0.7 * 0.3.
    assert 0.25 < bias["order_consistency"]["mean"] < 0.6
    assert report["judge"] == "vlm" and report["pairs"] == PAIRS and report["failed_comparisons"] == 0
    assert "over pairs" in report["ci"]
    markdown = (tmp_path / "judge" / "judge_eval.md").read_text()
    assert "first-shown rate (unbiased: 0.5)" in markdown and "| agreement |" in markdown
    printed = json.loads(capsys.readouterr().out)
    assert printed["first_shown_rate"] == bias["first_shown_rate"]
    labels = [json.loads(line) for line in (tmp_path / "judge" / "judge_labels.jsonl").read_text().splitlines()]
    assert [row["pair_id"] for row in labels] == ids and all(len(row["orders"]) == 2 for row in labels)


def _expected_rates(judge: np.ndarray, human: np.ndarray) -> dict:
    """The agreement rates computed directly (the definitions of vidpo.evaluation.judge_eval)."""
    both = (judge != 0) & (human != 0)
    return {"agreement": (judge == human).mean(), "decisive_agreement": ((judge == human) & both).sum() / both.sum(),
            "coverage": both.sum() / (human != 0).sum(), "judge_tie_rate": (judge == 0).mean(),
            "human_tie_rate": (human == 0).mean()}


def test_agreement_of_a_competent_judge_with_planted_human_disagreements(server, tmp_path, capsys):
    truth = targets(24, seed=3)
    ids = write_pairs_dir(tmp_path / "pairs", truth)
    human = torch.tensor(truth)
    human[0:4, 0] = -human[0:4, 0]          # people disagree here (a flip; a tie stays a tie)
    human[4:8, 1] = 0                       # and call these ties
    save_label_file(tmp_path / "human.jsonl", ids, human)
    server.behaviour = judge_by_brightness()
    assert run_cli(tmp_path, server) == 0
    report = json.loads((tmp_path / "judge" / "judge_eval.json").read_text())
    judge, people = np.array(truth), human.numpy()
    for level, (j, h) in {"segment": (judge, people),
                          "video": (np.sign(judge.sum(1, keepdims=True)), np.sign(people.sum(1, keepdims=True)))
                          }.items():
        for name, value in _expected_rates(j, h).items():
            stats = report[level][name]
            assert stats["mean"] == pytest.approx(float(value), abs=1e-12), (level, name)
            assert stats["ci95"][0] <= stats["mean"] <= stats["ci95"][1]
    confusion = report["segment"]["confusion"]
    assert sum(sum(row.values()) for row in confusion.values()) == 24 * 2
    assert confusion["human_first"]["judge_first"] == int(((judge == 1) & (people == 1)).sum())
    # A competent judge shows no position bias: it picks the first-shown video exactly as often as the second.
    assert report["position_bias"]["first_shown_rate"]["mean"] == 0.5
    assert report["position_bias"]["order_consistency"]["mean"] == 1.0
    capsys.readouterr()


def test_from_manifest_reuses_the_labels_and_answers_of_vidpo_label(server, tmp_path, capsys):
    truth = targets(16, seed=5)
    ids = write_pairs_dir(tmp_path / "pairs", truth)
    save_label_file(tmp_path / "human.jsonl", ids, torch.tensor(truth))
    server.behaviour = biased_judge(0.6)
    assert run_cli(tmp_path, server) == 0
    labelled = json.loads((tmp_path / "judge" / "judge_eval.json").read_text())
    from helpers.micro import MICRO

    label_argv = ["label", str(tmp_path / "recipe.yaml"), "--pairs", str(tmp_path / "pairs")]
    assert main(label_argv + [f"--set={o}" for o in list(MICRO) + vlm_overrides(server.base_url)]) == 0
    asked = len(server.requests)
    assert run_cli(tmp_path, server, "--from-manifest") == 0
    again = json.loads((tmp_path / "judge" / "judge_eval.json").read_text())
    assert len(server.requests) == asked   # the answer cache served `vidpo label`; --from-manifest asks nothing
    assert again["judge"] == "vlm" and again["position_bias"] == labelled["position_bias"]
    assert again["segment"] == labelled["segment"] and again["video"] == labelled["video"]
    capsys.readouterr()


def test_a_bad_human_labels_line_is_one_clear_error(server, tmp_path, capsys):
    ids = write_pairs_dir(tmp_path / "pairs", targets(4))
    lines = [json.dumps({"pair_id": ids[0], "labels": [1, 0]}), json.dumps({"pair_id": ids[1], "labels": [1, 2]})]
    (tmp_path / "human.jsonl").write_text("\n".join(lines) + "\n")
    assert run_cli(tmp_path, server) == 2
    error = capsys.readouterr().err
    assert f"human.jsonl:2: pair '{ids[1]}': 'labels'[1] = 2 is not one of -1, 0, 1" in error
    assert error.count("\n") == 1 and not server.requests
    (tmp_path / "human.jsonl").write_text(json.dumps({"pair_id": ids[0], "labels": [1, 0, 1]}) + "\n")
    assert run_cli(tmp_path, server) == 2
    assert "human.jsonl:1: pair 'p0000' has 3 segment labels but the batch's clips have 2" in capsys.readouterr().err


def test_a_judge_that_asks_once_has_no_position_bias_and_unmatched_pairs_are_counted(server, tmp_path, capsys):
    truth = targets(6)
    ids = write_pairs_dir(tmp_path / "pairs", truth)
    save_label_file(tmp_path / "human.jsonl", ids[:4] + ["elsewhere"], torch.tensor(truth[:4] + [[0, 0]]))
    save_label_file(tmp_path / "other_people.jsonl", ids, torch.tensor(truth))
    assert run_cli(tmp_path, server, extra=["label.labeler=human",
                                            f"label.human_file={tmp_path / 'other_people.jsonl'}"]) == 0
    report = json.loads((tmp_path / "judge" / "judge_eval.json").read_text())
    assert report["judge"] == "human" and report["position_bias"] is None and report["pairs"] == 4
    assert report["segment"]["agreement"]["mean"] == 1.0
    assert report["pairs_without_human_labels"] == 2 and report["human_labels_without_pairs_first"] == ["elsewhere"]
    assert "n/a (this judge does not ask in both orders)" in (tmp_path / "judge" / "judge_eval.md").read_text()
    capsys.readouterr()


def test_judge_agreement_rates_and_bootstrap_cis_over_pairs():
    judge = torch.tensor([[1, 1], [0, -1], [1, 0]])
    human = torch.tensor([[1, -1], [0, -1], [0, 0]])
    orders = [[["A", "B"], ["A", "A"]], [["TIE", "TIE"], ["B", "A"]], [["A", "B"], [None, None]]]
    report = judge_agreement(judge, human, orders, resamples=500, seed=7)
    assert report["segment"]["agreement"]["mean"] == pytest.approx(4 / 6)
    assert report["segment"]["decisive_agreement"]["mean"] == pytest.approx(2 / 3)
    assert report["segment"]["coverage"]["mean"] == 1.0
    assert report["video"]["agreement"]["mean"] == pytest.approx(1 / 3)   # judge (1, -1, 1), people (0, -1, 0)
    bias = report["position_bias"]
    assert bias["first_shown_rate"]["mean"] == pytest.approx(5 / 8) and bias["answers"] == 10
    assert bias["tie_answer_rate"]["mean"] == pytest.approx(2 / 10)
    assert bias["order_consistency"]["mean"] == pytest.approx(4 / 5)   # all but (A, A)
    for stats in (report["segment"]["agreement"], bias["first_shown_rate"]):
        low, high = stats["ci95"]
        assert 0.0 <= low <= stats["mean"] <= high <= 1.0
    assert judge_agreement(judge, human, orders, resamples=500, seed=7) == report     # a seeded stream
    # No segment both call: the rate is undefined, not zero.
    empty = judge_agreement(torch.zeros(2, 2), torch.zeros(2, 2), resamples=10)
    assert empty["segment"]["decisive_agreement"]["mean"] is None and empty["segment"]["agreement"]["mean"] == 1.0
    assert "n/a" in markdown_report(empty)
    with pytest.raises(ValueError, match="one shape"):
        judge_agreement(torch.zeros(2, 2), torch.zeros(2, 3))


def test_failed_comparisons_are_left_out_of_the_agreement_and_asked_again(server, tmp_path, capsys):
    truth = targets(8, seed=3)
    ids = write_pairs_dir(tmp_path / "pairs", truth)
    save_label_file(tmp_path / "human.jsonl", ids, torch.tensor(truth))
    server.behaviour = lambda r: (Reply(status=500) if re.search(r"pair (\d+)", r.text).group(1) in ("2", "5")
                                  else judge_by_brightness()(r))
    assert run_cli(tmp_path, server) == 0
    report = json.loads((tmp_path / "judge" / "judge_eval.json").read_text())
    # A failed comparison is no judgement: not a judge tie that would lower the agreement of a perfect judge.
    assert (report["pairs"], report["pairs_with_failed_comparisons"], report["failed_comparisons"]) == (6, 2, 4)
    assert report["segment"]["agreement"]["mean"] == 1.0
    assert "left out of the rates" in (tmp_path / "judge" / "judge_eval.md").read_text()
    server.behaviour = judge_by_brightness()
    asked = len(server.requests)
    assert run_cli(tmp_path, server) == 0
    healed = json.loads((tmp_path / "judge" / "judge_eval.json").read_text())
    assert len(server.requests) - asked == 2 * 2 * 2   # the failed pairs' 2 segments x 2 orders, nothing else
    assert (healed["pairs"], healed["failed_comparisons"], healed["failed_comparisons_total"]) == (8, 0, 4)
    assert healed["segment"]["agreement"]["mean"] == 1.0
    capsys.readouterr()
