"""`vidpo iterate` under torchrun: two gloo processes run the IPO / Dual-IPO rounds as one process does.

Two rounds on the micro world with Dual-IPO refinement in round 2 and the fixed-base reference (a frozen copy of
the initial policy split like the policy), once in one process and once under
``python -m torch.distributed.run --nproc-per-node 2 -m vidpo iterate``. Generation slices the shards over the
ranks, the critic labels its share of the batches, each round's policy trains data-parallel (FSDP), and rank 0
alone writes the oracle's labels, the critics, the pseudo-labels and the rows. What the ranks make equals one
process's: the seed pairs, labels and critic 0 bit for bit, round 1's pairs and labels too (sampled by the same
initial policy), policy 1 to float tolerance (the data-parallel gradient is summed in another order), round 2's
pairs, which policy 1 samples, to the same tolerance, and policy 2 to its losses and a small share of its update.

The same on a tiny Wan release with a prompt file (the VLM judge of the stub server, the VLM critic), and that run
stopped by SIGUSR1 to rank 1 alone, twice, and resumed: it ends equal bit for bit to the uninterrupted torchrun run,
with no question asked twice.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.distributed import free_port
from helpers.micro import MICRO
from helpers.models import save_perturbed_base
from safetensors.torch import load_file

from vidpo.cli import main
from vidpo.config import load_config
from vidpo.stages.label import partial_files
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
    # Dual-IPO in round 2: each rank computed the implicit rewards of every other video of the pool, gathered in
    # order; rank 0 voted and wrote. Against one process: the same pairs and votes, rewards to the round's tolerance.
    rows = [[json.loads(x) for x in (d / "round_2" / "pairs" / "pseudo.jsonl").read_text().splitlines()]
            for d in (one, two)]
    assert [(x["pair_id"], x["video_label"]) for x in rows[0]] == [(x["pair_id"], x["video_label"]) for x in rows[1]]
    for side in ("reward_first", "reward_second"):
        got, want = [x[side] for x in rows[1]], [x[side] for x in rows[0]]
        assert got == pytest.approx(want, abs=1e-3) and max(want) - min(want) > 0.1, side


# ----- a release and a prompt file: the VLM judge, the VLM critic, DenseDPO rounds -------------------------------
def _workers(agent: int) -> dict[int, int]:
    """The worker processes of the torchrun agent ``agent``, by rank (from /proc: their parent and RANK)."""
    workers = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [int(v[5:]) for v in environ if v.startswith(b"RANK=")]
        if parent == agent and ranks:
            workers[ranks[0]] = int(entry)
    return workers


def start_iterate(release, out: Path) -> subprocess.Popen:
    """``torchrun --nproc-per-node 2 -m vidpo iterate`` of the release run into ``out``, started."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", "iterate", release.recipe, "--out", str(out),
               *release.sets]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_iterate(agent: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """The run's stdout and stderr once it ends; a run still going after ``timeout`` seconds (a rank waiting for
    another that left) fails the test, and its workers (in sessions of their own) are killed with it."""
    try:
        return agent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _workers(agent.pid).values():
            os.kill(pid, signal.SIGKILL)
        agent.kill()
        out, err = agent.communicate()
        pytest.fail(f"torchrun iterate still running after {timeout} s:\n{out[-3000:]}\n{err[-6000:]}")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """recipes/wan/ipo_tiny_cpu.yaml (tests/test_iterate_real.py's parts: a tiny Wan release, a prompt file with
    clips, a tiny LLaVA as the VLM critic's backbone, the stub VLM judging by brightness) run once uninterrupted
    under torchrun into ``two``; ``asked``: the questions that run put to the judge."""
    pytest.importorskip("diffusers")
    pytest.importorskip("av")
    from helpers.llava_serve import build_tiny_llava
    from helpers.pipelines import PROMPTS_FOR_TESTS, make_wan_dir
    from helpers.video import encode_clip, make_frames
    from helpers.vlm_server import FakeVLM, Reply, brightness_verdict

    tmp_path = tmp_path_factory.mktemp("release")
    rows = []
    for i, text in enumerate(PROMPTS_FOR_TESTS):
        clip = encode_clip(tmp_path / "clips" / f"c{i}", make_frames(12, 40, 48), "h264", fps=8)
        rows.append({"id": f"p{i}", "prompt": text, "clip": f"clips/{clip.name}",
                     **({"split": "heldout"} if i >= len(PROMPTS_FOR_TESTS) - 2 else {})})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wan, backbone = make_wan_dir(tmp_path / "wan", prompts=PROMPTS_FOR_TESTS), build_tiny_llava(tmp_path / "llava")
    server = FakeVLM()
    server.behaviour = lambda request: Reply(text=brightness_verdict(request, margin=0.5))
    items = [f"model.path={wan}", f"prompts.path={tmp_path / 'prompts.jsonl'}", f"label.vlm.base_url={server.base_url}",
             f"critic.backbone={backbone}", "critic.steps=12", "critic.batch_size=4", "iterate.refine_steps=6",
             "train.num_threads=1", "label.batch_size=2"]
    run = SimpleNamespace(tmp=tmp_path, recipe="recipes/wan/ipo_tiny_cpu.yaml", server=server,
                          judge=server.behaviour, sets=[a for item in items for a in ("--set", item)],
                          two=tmp_path / "two")
    try:
        agent = start_iterate(run, run.two)
        out, err = finish_iterate(agent)
        assert agent.returncode == 0, out[-3000:] + err[-6000:]
        run.asked = len(server.requests)
        yield run
    finally:
        server.close()
    assert not server.schema_errors, server.schema_errors[:3]


def test_two_ranks_iterate_on_a_release_like_one_process(release):
    """recipes/wan/ipo_tiny_cpu.yaml under torchrun: the seed pairs are sampled and decoded on both ranks, the VLM
    judge's questions shared out, critic 0 (the VLM critic) trained on rank 0, each round's DenseDPO policy trained
    with FSDP over both ranks and judged against the initial policy."""
    server, one, two = release.server, release.tmp / "one", release.two
    server.requests.clear()
    assert main(["iterate", release.recipe, "--out", str(one), *release.sets]) == 0
    assert len(server.requests) == release.asked, "each question once over both ranks, as one process asks"
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


TIMINGS = ("timings", "throughput", "seconds")
"""Fields of the summary that time a run (wall clock): they differ between any two runs."""


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def stopped_ranks(agent: subprocess.Popen, out: str, err: str) -> None:
    """Both ranks stopped at the same safe point: each printed the CLI's stop line, and they exited with its status
    (75; torchrun itself exits with 1 and lists its workers' codes). torchrun sends SIGTERM to a rank still alive
    once another has exited, so a rank leaving after its stop line may read as killed by it (-15)."""
    assert agent.returncode != 0, out[-3000:] + err[-6000:]
    assert err.count("rerun the same command to resume") == 2, err[-6000:]
    codes = re.findall(r"exitcode\s+: (-?\d+) \(pid", err)
    assert len(codes) == 2 and "75" in codes and set(codes) <= {"75", "-15"}, err[-3000:]


def test_a_stop_signal_to_rank_1_of_iterate_resumes_as_if_it_had_not_stopped(release):
    """SIGUSR1 to rank 1 alone, twice: at the judge's first seed question (both ranks stop after the same round of
    label batches, before any round) and at its first question of round 1's judged evaluation (rank 1 is then
    waiting for rank 0's judging; both stop before round 2's first shard, with round 1 finished). Each stopped run
    exits with status 75 on both ranks and leaves round.json only for the rounds it finished; the third run ends
    the run, equal bit for bit to the uninterrupted torchrun run (same ranks, same settings: the same pairs,
    labels, critics and policies, the same rows but for their timings), and no question is asked twice."""
    server, two, out = release.server, release.two, release.tmp / "stopped"
    seed_questions = sum(len(p.read_text().splitlines()) for p in (two / "seed" / "pairs").glob("vlm_answers*"))
    stop_at = {1, seed_questions + 1}     # the first seed question; the first question of round 1's evaluation
    agent, asked, lock = None, [0], threading.Lock()

    def behaviour(request):
        with lock:
            asked[0] += 1
            stop = asked[0] in stop_at
        if stop:
            os.kill(_workers(agent.pid)[1], signal.SIGUSR1)
        return release.judge(request)
    server.behaviour = behaviour
    try:
        agent = start_iterate(release, out)
        stopped_ranks(agent, *finish_iterate(agent))
        assert not list(out.glob("round_*/round.json")) and not (out / "seed" / "pairs" / "manifest.jsonl").exists()
        labelled = [len(p.read_text().splitlines()) for p in partial_files(out / "seed" / "pairs")]
        assert len(labelled) == 2 and labelled[0] == labelled[1] and 0 < sum(labelled) < 8, labelled
        assert asked[0] < seed_questions

        agent = start_iterate(release, out)
        stopped_ranks(agent, *finish_iterate(agent))
        assert [p.parent.name for p in out.glob("round_*/round.json")] == ["round_1"]
        assert not list((out / "round_2" / "pairs").glob("shards/*"))
        assert asked[0] == seed_questions + 8   # round 1's evaluation: 4 videos x 2 orders, then the stop

        agent = start_iterate(release, out)
        stdout, err = finish_iterate(agent)
        assert agent.returncode == 0, stdout[-3000:] + err[-6000:]
    finally:
        server.behaviour = release.judge
    assert asked[0] == release.asked, "over the three runs each question once, as the uninterrupted run asks"

    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (two, out))
    assert without_timings(s2) == without_timings(s1)
    assert [r["round"] for r in s2["rounds"]] == [1, 2] and s2["rounds"][1]["refined"]
    for folder in ("seed/pairs", "round_1/pairs", "round_2/pairs"):
        assert (out / folder / "manifest.jsonl").read_text() == (two / folder / "manifest.jsonl").read_text(), folder
        a, b = shards(two / folder), shards(out / folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    for weights in ([d / "critic_0" / "critic.safetensors" for d in (two, out)],
                    [d / "round_2" / "critic" / "critic.safetensors" for d in (two, out)],
                    [ckpt.find_weights(d / "round_1" / "train") for d in (two, out)],
                    [ckpt.find_weights(d / "round_2" / "train") for d in (two, out)]):
        a, b = (load_file(str(w)) for w in weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights[1]
