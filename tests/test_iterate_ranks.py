"""`vidpo iterate` under torchrun: two gloo processes run the IPO / Dual-IPO rounds as one process does.

Two rounds on the micro world with Dual-IPO refinement in round 2 and the fixed-base reference (a frozen copy of
the initial policy split like the policy), once in one process and once under
``python -m torch.distributed.run --nproc-per-node 2 -m vidpo iterate``. Generation slices the shards over the
ranks, the critic labels its share of the batches, each round's policy trains data-parallel (FSDP), and rank 0
alone writes the oracle's labels, the critics, the pseudo-labels and the rows. What the ranks make equals one
process's: the seed pairs, labels and critic 0 bit for bit, round 1's pairs and labels too (sampled by the same
initial policy), policy 1 to float tolerance (the data-parallel gradient is summed in another order), round 2's
pairs, which policy 1 samples, to the same tolerance, and policy 2 to its losses and a small share of its update.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.distributed import free_port
from helpers.micro import MICRO
from helpers.models import save_perturbed_base
from safetensors.torch import load_file

from vidpo.cli import main
from vidpo.config import load_config
from vidpo.training import checkpoint as ckpt

pytest.importorskip("megatron.core")
# One intra-op thread in this process as in the torchrun workers: float sums then add up in the same order.
pytestmark = pytest.mark.usefixtures("one_thread")

ROUNDS = ["train.objective=flow_dpo", "train.max_steps=2", "train.warmup_steps=0", "train.ckpt_every=1",
          "flow.t_min=0.3", "pref.sft_weight=0.5", "iterate.rounds=2", "iterate.seed_pairs=8", "iterate.eval_pairs=6",
          "iterate.votes=3", "iterate.pce_timesteps=1", "critic.width=16", "critic.num_heads=2", "critic.depth=1",
          "critic.steps=4", "critic.batch_size=4", "eval.num_samples=6", "iterate.vote_min_confidence=0.55",
          "iterate.reference=base", "iterate.seed_tie_margin=0", "generate.shard_size=4", "label.batch_size=4",
          "train.lr=1e-3"]


def losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(x).get("phase") == "train"]


def shards(directory):
    """Every tensor of a pairs folder's shards, by shard file and key."""
    return {(p.name, k): v for p in sorted((directory / "shards").iterdir()) for k, v in load_file(str(p)).items()}


def test_two_ranks_iterate_like_one_process(tmp_path):
    base = save_perturbed_base(load_config(None, MICRO), tmp_path / "base.safetensors")
    sets = [a for s in list(MICRO) + ROUNDS + [f"train.init_from={base}"] for a in ("--set", s)]
    one, two = tmp_path / "one", tmp_path / "two"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    assert main(["iterate", str(recipe), "--out", str(one), *sets]) == 0

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", "iterate", str(recipe), "--out", str(two), *sets]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.count('"rounds"') == 1, "rank 0 alone prints the summary"
    assert "rank 1 of 2" in done.stderr

    # The seed stage and round 1 come from the initial policy: equal bit for bit.
    for folder in ("seed/pairs", "round_1/pairs", "round_1/pairs_eval"):
        assert (one / folder / "pairs.jsonl").read_text() == (two / folder / "pairs.jsonl").read_text(), folder
        a, b = shards(one / folder), shards(two / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    for manifest in ("seed/pairs/manifest.jsonl", "round_1/pairs/manifest.jsonl"):
        assert (one / manifest).read_text() == (two / manifest).read_text(), manifest
    for critic in ("critic_0/critic.safetensors",):
        a, b = load_file(str(one / critic)), load_file(str(two / critic))
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Round 2 trained on the ranks' own generation, labels and refined critic: each shard sampled once.
    generated = json.loads((two / "round_2" / "pairs" / "generate.json").read_text())
    assert generated["shards_written"] == 2
    # Policy 1: data-parallel training equals one process's up to the order of the gradient sum.
    policy = {d: [load_file(str(ckpt.find_weights(d / f"round_{r}" / "train"))) for r in (1, 2)] for d in (one, two)}
    for k in policy[one][0]:
        torch.testing.assert_close(policy[two][0][k], policy[one][0][k], rtol=1e-4, atol=1e-5, msg=k)
    # Policy 2 trains on what policy 1 sampled (equal to ~1e-6): the same losses, and Adam's first steps (about
    # lr per coordinate wherever a gradient is not 0) amplify the difference only to a small share of the update.
    assert losses(two / "round_2" / "train") == pytest.approx(losses(one / "round_2" / "train"), rel=1e-4)
    start, a, b = policy[one][0], policy[one][1], policy[two][1]
    update = torch.sqrt(sum(((a[k] - start[k]) ** 2).sum() for k in a))
    assert update > 0.05, "the policy trained"
    assert torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)) < 0.01 * update
    a, b = shards(one / "round_2" / "pairs"), shards(two / "round_2" / "pairs")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=str(k))
    # The rounds' rows: the same critic accuracies and oracle scores (the evaluation samples policy r on every rank).
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s1["base"] == s2["base"] and len(s2["rounds"]) == 2 and s2["rounds"][1]["refined"]
    for r1, r2 in zip(s1["rounds"], s2["rounds"]):
        assert r2["critic_accuracy"] == r1["critic_accuracy"]
        assert r2["oracle"]["mean"] == pytest.approx(r1["oracle"]["mean"], abs=1e-3)
        assert r2["train"]["steps"] == r1["train"]["steps"] == 2
    assert (two / "report.html").exists()


# ----- a release and a prompt file: the VLM judge, the VLM critic, DenseDPO rounds -------------------------------
def test_two_ranks_iterate_on_a_release_like_one_process(tmp_path):
    """recipes/wan/ipo_tiny_cpu.yaml (tests/test_iterate_real.py's parts) under torchrun: the seed pairs are sampled
    and decoded on both ranks, the VLM judge's questions shared out, critic 0 (the VLM critic) trained on rank 0,
    each round's DenseDPO policy trained with FSDP over both ranks and judged against the initial policy."""
    pytest.importorskip("diffusers")
    pytest.importorskip("av")
    from helpers.llava_serve import build_tiny_llava
    from helpers.pipelines import PROMPTS_FOR_TESTS, make_wan_dir
    from helpers.video import encode_clip, make_frames
    from helpers.vlm_server import FakeVLM, Reply, brightness_verdict

    rows = []
    for i, text in enumerate(PROMPTS_FOR_TESTS):
        clip = encode_clip(tmp_path / "clips" / f"c{i}", make_frames(12, 40, 48), "h264", fps=8)
        rows.append({"id": f"p{i}", "prompt": text, "clip": f"clips/{clip.name}",
                     **({"split": "heldout"} if i >= len(PROMPTS_FOR_TESTS) - 2 else {})})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wan, backbone = make_wan_dir(tmp_path / "wan", prompts=PROMPTS_FOR_TESTS), build_tiny_llava(tmp_path / "llava")
    server = FakeVLM()
    server.behaviour = lambda request: Reply(text=brightness_verdict(request, margin=0.5))
    recipe = "recipes/wan/ipo_tiny_cpu.yaml"
    items = [f"model.path={wan}", f"prompts.path={tmp_path / 'prompts.jsonl'}", f"label.vlm.base_url={server.base_url}",
             f"critic.backbone={backbone}", "critic.steps=12", "critic.batch_size=4", "iterate.refine_steps=6",
             "train.num_threads=1", "label.batch_size=2"]
    sets = [a for item in items for a in ("--set", item)]
    one, two = tmp_path / "one", tmp_path / "two"
    try:
        assert main(["iterate", recipe, "--out", str(one), *sets]) == 0
        asked_by_one = len(server.requests)
        server.requests.clear()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port()), "-m", "vidpo", "iterate", recipe, "--out", str(two),
                   *sets]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        assert len(server.requests) == asked_by_one, "each question once over both ranks, as one process asks"
    finally:
        server.close()
    for folder in ("seed/pairs", "round_1/pairs"):
        a, b = shards(one / folder), shards(two / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
        assert sorted(p.name for p in (one / folder / "frames").iterdir()) == \
            sorted(p.name for p in (two / folder / "frames").iterdir())
    for manifest in ("seed/pairs/manifest.jsonl", "round_1/pairs/manifest.jsonl"):
        assert (one / manifest).read_text() == (two / manifest).read_text(), manifest
    a, b = (load_file(str(d / "critic_0" / "critic.safetensors")) for d in (one, two))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(ckpt.find_weights(d / "round_1" / "train"))) for d in (one, two))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert [r["round"] for r in s2["rounds"]] == [1, 2] and s2["rounds"][1]["refined"]
    assert s2["rounds"][0]["judged"]["videos"] == s1["rounds"][0]["judged"]["videos"] == 4
    assert s2["rounds"][0]["judged"]["wins"] == s1["rounds"][0]["judged"]["wins"]
    assert (two / "round_2" / "train" / "transformer").is_dir()
