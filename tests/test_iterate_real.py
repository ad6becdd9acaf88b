"""`vidpo iterate` on a release directory and a prompt file (recipes/wan/ipo_tiny_cpu.yaml): a tiny random Wan 2.1
release (tests/helpers/pipelines.py), the prompt file of tests/test_real_loop.py, the VLM stub server judging by
brightness (seed labels, judged evaluation) and a VLM critic on a tiny random LLaVA (tests/helpers/llava_serve.py).

Seed pairs from the release, decoded and labelled by the VLM judge; critic 0 (the VLM critic) trained on them,
saved and reloaded; two rounds of DenseDPO, each labelled by the critic as `label.labeler: critic` and judged
against the initial policy; Dual-IPO refinement in round 2 (MC-dropout votes, PCE from the release's own process).
No oracle measurement appears; a rerun resumes without redoing anything; `vidpo label` with the saved critic gives
the labels the round trained on."""
import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("av")

from helpers.llava_serve import build_tiny_llava  # noqa: E402
from helpers.pipelines import PROMPTS_FOR_TESTS, make_wan_dir  # noqa: E402
from helpers.video import encode_clip, make_frames  # noqa: E402
from helpers.vlm_server import FakeVLM, Reply, brightness_verdict  # noqa: E402

from vidpo.cli import main as cli  # noqa: E402
from vidpo.config import ConfigError, load_config  # noqa: E402
from vidpo.data.pairs import MANIFEST_FILE, read_manifest  # noqa: E402
from vidpo.ipo.critic import critic_accuracy, load_preference_data  # noqa: E402
from vidpo.ipo.dual import read_pseudo_rows  # noqa: E402
from vidpo.ipo.layout import open_run  # noqa: E402
from vidpo.ipo.pool import read_video_pool  # noqa: E402
from vidpo.ipo.rounds import iterate  # noqa: E402
from vidpo.ipo.sweep import compare_iterations  # noqa: E402
from vidpo.labeling.critic import open_critic, score_clips  # noqa: E402
from vidpo.models.critic import VLMCritic  # noqa: E402

RECIPE = "recipes/wan/ipo_tiny_cpu.yaml"
ORACLE_KEYS = ("oracle", "delta_vs_base", "critic_accuracy", "critic_accuracy_before_refine", "critic_accuracy_pool",
               "critic_eval_pairs", "components")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The prompt file (every prompt with a real clip, two held out), the release, the VLM backbone, the judge."""
    root = tmp_path_factory.mktemp("iterate_real")
    rows = []
    for i, text in enumerate(PROMPTS_FOR_TESTS):
        clip = encode_clip(root / "clips" / f"c{i}", make_frames(12, 40, 48), "h264", fps=8)
        row = {"id": f"p{i}", "prompt": text, "clip": f"clips/{clip.name}"}
        if i >= len(PROMPTS_FOR_TESTS) - 2:
            row["split"] = "heldout"
        rows.append(row)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wan, vlm_dir = make_wan_dir(root / "wan", prompts=PROMPTS_FOR_TESTS), build_tiny_llava(root / "tiny-llava")
    server = FakeVLM()
    server.behaviour = lambda request: Reply(text=brightness_verdict(request, margin=0.5))
    yield {"root": root, "wan": wan, "backbone": vlm_dir, "vlm": server}
    server.close()
    assert not server.schema_errors, server.schema_errors[:3]


def sets(world, *extra):
    items = [f"model.path={world['wan']}", f"prompts.path={world['root'] / 'prompts.jsonl'}",
             f"label.vlm.base_url={world['vlm'].base_url}", f"critic.backbone={world['backbone']}",
             "critic.steps=12", "critic.batch_size=4", "iterate.refine_steps=6", "train.num_threads=2", *extra]
    return [a for item in items for a in ("--set", item)]


def overrides(args):
    return [args[i + 1] for i in range(0, len(args), 2)]


def test_two_rounds_on_a_release_with_the_vlm_critic(world, tmp_path, capsys):
    out = tmp_path / "ipo"
    args = sets(world)
    assert cli(["iterate", RECIPE, "--out", str(out), *args]) == 0
    brief = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert brief["seed_labels"] == {"pairs": 8, "labeler": "vlm"} and [r["round"] for r in brief["rounds"]] == [1, 2]
    assert summary["domain"] == "prompts" and "base" not in summary
    assert summary["seed_labels"]["critic_0"]["kind"] == "vlm" and summary["seed_labels"]["critic_0"]["steps"] == 12

    # seed pairs: sampled by the release, decoded, labelled by the VLM judge
    seed, _ = read_manifest(out / "seed" / "pairs" / MANIFEST_FILE)
    assert len(seed) == 8 and {r.label_source for r in seed} == {"vlm"} and all(r.prompt_id for r in seed)
    assert (out / "seed" / "pairs" / "frames").is_dir() and (out / "seed" / "pairs" / "index.html").is_file()
    assert (out / "base" / "model.safetensors").is_file()          # policy 0: the release's own weights

    # critic 0: the VLM critic, saved and reloaded
    critic = open_critic(out / "critic_0")
    assert isinstance(critic, VLMCritic) and critic.settings.backbone == str(world["backbone"].resolve())
    run = open_run(out)
    seed_data = load_preference_data(out / "seed" / "pairs", run.num_segments)
    assert seed_data.first.dtype == torch.uint8 and seed_data.first.shape[1:] == (3, 9, 32, 32)
    assert critic_accuracy(critic, seed_data, None, run.segment_ids)["n"] >= 1

    for r, row in enumerate(summary["rounds"], start=1):
        rd = out / f"round_{r}"
        assert not set(ORACLE_KEYS) & set(row), row.keys()                # nothing the oracle would measure
        judged = row["judged"]
        assert judged["judge"] == "vlm" and judged["videos"] == 4 and judged["failed"] == 0
        lo, hi = judged["win_rate"]["ci95"]
        assert lo <= judged["win_rate"]["mean"] <= hi and judged["wins"] + judged["ties"] + judged["losses"] == 4
        assert (rd / "eval" / "judged.json").is_file()
        labelled, _ = read_manifest(rd / "pairs" / MANIFEST_FILE)
        assert {x.label_source for x in labelled} == {"critic"} and row["labels"]["labeler"] == "critic"
        assert row["train"]["pairs"] == 8 and (rd / "train" / "transformer").is_dir()
        trained = load_config(rd / "train" / "config.yaml")
        assert trained.train.init_from == str(run.policy_path(r - 1))   # policy r starts from policy r-1
    r1, r2 = summary["rounds"]
    assert not r1["refined"] and r2["refined"] and r2["pseudo"]["pairs"] == 8

    # Dual-IPO in round 2: votes of critic 0 over the round's decoded videos, PCE from policy 1 and its reference
    rows = read_pseudo_rows(out / "round_2" / "pairs")
    pool = read_video_pool(out / "round_2" / "pairs", run.domain)
    assert len(rows) == 8 and all(x["kept"] == (x["pce"] > 0.5 and x["video_label"] != 0) for x in rows)
    assert all(x["prompt_id"] == pool.prompt_ids[x["first_video"]] == pool.prompt_ids[x["second_video"]]
               for x in rows)
    assert pool.pixels.dtype == torch.uint8 and pool.latents.shape[1] == 16    # frames scored, latents rewarded
    info = json.loads((out / "round_2" / "critic" / "critic.json").read_text())
    assert info["kind"] == "vlm" and info["steps"] == 6 and info["pairs"] == 8 + r2["pseudo_labels_kept"]
    assert run.critic_dir(2) == out / "round_2" / "critic"
    assert "Rounds" in (out / "report.html").read_text() and (out / "report" / "ipo_rounds.png").is_file()

    # `vidpo label` with the saved critic 0 gives round 1's labels (it labelled round 1)
    copy = tmp_path / "again"
    shutil.copytree(out / "round_1" / "pairs", copy)
    (copy / MANIFEST_FILE).unlink()
    assert cli(["label", RECIPE, "--pairs", str(copy), *args, "--set", "label.labeler=critic",
                "--set", f"critic.checkpoint={out / 'critic_0'}"]) == 0
    again, _ = read_manifest(copy / MANIFEST_FILE)
    assert [(x.pair_id, x.labels) for x in again] == [(x.pair_id, x.labels) for x in
                                                      read_manifest(out / "round_1" / "pairs" / MANIFEST_FILE)[0]]
    scores = score_clips(critic, seed_data.first, seed_data.captions, run.segment_ids)
    assert scores.segments.shape == (8, 2)

    # a rerun resumes: nothing is redone
    stamps = {p: p.stat().st_mtime_ns for p in [out / "critic_0" / "critic.safetensors",
                                                out / "round_2" / "critic" / "critic.safetensors",
                                                out / "round_2" / "round.json", out / "seed" / "pairs" / MANIFEST_FILE]
              + sorted((out / "round_1" / "pairs" / "frames").iterdir())}
    assert iterate(load_config(RECIPE, overrides(args)), out)["rounds"] == summary["rounds"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "resuming redid finished work"


def test_a_prompt_file_run_refuses_what_it_cannot_run(world, tmp_path):
    base = overrides(sets(world))
    for extra, match in ((["critic.backbone=null"], "critic.backbone"),
                         (["iterate.seed_labeler=oracle"], "seed_labeler"),
                         (["label.labeler=critic"], "seed_labeler"),
                         (["iterate.round_labeler=oracle"], "oracle"),
                         (["lora.rank=4"], "lora")):
        with pytest.raises(ConfigError, match=match):
            iterate(load_config(RECIPE, base + extra), tmp_path / "x")
        assert not (tmp_path / "x" / "prompt_embeddings").exists()     # refused before any model work
    with pytest.raises(ConfigError, match="prompt-file"):
        compare_iterations([RECIPE], [0, 1], tmp_path / "cmp", base)
