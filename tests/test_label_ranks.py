"""`vidpo label` under torchrun: every rank labels its share of the batches and the folder ends as one process's.

Two real gloo processes (``python -m torch.distributed.run --nproc-per-node 2 -m vidpo label``) against the HTTP
stub VLM of ``helpers.vlm_server``, which counts every request: the manifest equals one process's byte for byte,
each question is asked once over both ranks, and a labelling cut short on two ranks (failed comparisons left in
both ranks' partial files) is finished by one process that asks only what failed, and the other way round.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers.distributed import free_port
from helpers.micro import MICRO
from helpers.pairs_dirs import blank_recipe, vlm_overrides, write_pairs_dir
from helpers.vlm_server import Reply, brightness_verdict, judge_by_brightness

from vidpo.cli import main
from vidpo.config import load_config
from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE, PairRecord, read_manifest, shard_name, write_manifest
from vidpo.labeling.answer_cache import answer_files
from vidpo.labeling.critic import build_critic
from vidpo.models.critic import save_critic
from vidpo.stages.label import SUMMARY_FILE, partial_files, read_partials
from vidpo.training.modeling import build_world
from vidpo.utils import atomic

pytest.importorskip("megatron.core")

_PAIR = re.compile(r"pair (\d+)")
TARGETS = [[1, -1], [0, 1], [-1, -1], [1, 0], [0, 0], [-1, 1], [1, 1]]   # 7 pairs x 2 segments x 2 orders
QUESTIONS = len(TARGETS) * 2 * 2


def label_args(tmp_path, base_url, pairs: str) -> list[str]:
    recipe = blank_recipe(tmp_path / "recipe.yaml")
    # batches of 2 pairs: 4 batches, so each of the 2 ranks labels two of them (the last one short)
    return ["label", str(recipe), "--pairs", str(tmp_path / pairs)] + [
        f"--set={o}" for o in list(MICRO) + vlm_overrides(base_url) + ["label.batch_size=2"]]


def torchrun_label(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def pair_of(request) -> int:
    return int(_PAIR.search(request.text).group(1))


def failing_for(pairs: set[int]):
    """HTTP 500 for every question about ``pairs``, the brightness verdict for the others."""
    return lambda r: Reply(status=500) if pair_of(r) in pairs else Reply(text=brightness_verdict(r))


def test_two_ranks_label_like_one_process_and_ask_each_question_once(tmp_path, server):
    write_pairs_dir(tmp_path / "one", TARGETS)
    write_pairs_dir(tmp_path / "two", TARGETS)
    server.behaviour = judge_by_brightness()
    assert main(label_args(tmp_path, server.base_url, "one")) == 0
    assert len(server.requests) == QUESTIONS
    server.requests.clear()

    done = torchrun_label(label_args(tmp_path, server.base_url, "two"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert len(server.requests) == QUESTIONS            # each (pair, segment, order) once over both ranks
    one, two = tmp_path / "one", tmp_path / "two"
    assert (two / MANIFEST_FILE).read_text() == (one / MANIFEST_FILE).read_text()
    assert [r.labels for r in read_manifest(two / MANIFEST_FILE)[0]] == TARGETS
    assert not partial_files(two)                       # merged into the manifest, then removed
    assert [p.name for p in answer_files(two)] == ["vlm_answers.r0.jsonl", "vlm_answers.r1.jsonl"]
    throughput = json.loads((two / SUMMARY_FILE).read_text())["throughput"]
    assert throughput["ranks"] == 2 and throughput["pairs"] == len(TARGETS)
    assert sorted(part["pairs"] for part in throughput["per_rank"]) == [3, 4]   # batches 0, 2 and 1, 3 (short)
    assert json.loads(done.stdout[done.stdout.index("{"):])["pairs"] == len(TARGETS)   # rank 0 prints, alone

    server.requests.clear()   # a rerun: the manifest is rewritten from the answers on disk, nothing asked
    again = torchrun_label(label_args(tmp_path, server.base_url, "two"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert not server.requests and (two / MANIFEST_FILE).read_text() == (one / MANIFEST_FILE).read_text()


def test_failures_left_by_two_ranks_are_finished_by_one_process_and_back(tmp_path, server):
    write_pairs_dir(tmp_path / "clean", TARGETS)
    server.behaviour = judge_by_brightness()
    assert main(label_args(tmp_path, server.base_url, "clean")) == 0
    clean = (tmp_path / "clean" / MANIFEST_FILE).read_text()

    # Two ranks against a server failing pairs 0 and 5 (batch 0 on rank 0, batch 2 on rank 1).
    write_pairs_dir(tmp_path / "pairs", TARGETS)
    pairs = tmp_path / "pairs"
    server.behaviour = failing_for({0, 5})
    done = torchrun_label(label_args(tmp_path, server.base_url, "pairs"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert [p.name for p in partial_files(pairs)] == ["labels.partial.r0.jsonl", "labels.partial.r1.jsonl"]
    rows = read_partials(pairs)
    assert {pid for pid, row in rows.items() if "failed" in row["status"]} == {"p0000", "p0005"}

    # One process finishes: it reads both ranks' rows and answers and asks only pairs 0 and 5.
    server.behaviour = judge_by_brightness()
    server.requests.clear()
    assert main(label_args(tmp_path, server.base_url, "pairs")) == 0
    asked = {pair_of(r) for r in server.requests}
    assert asked == {0, 5} and len(server.requests) == 2 * 2 * 2
    assert (pairs / MANIFEST_FILE).read_text() == clean
    summary = json.loads((pairs / SUMMARY_FILE).read_text())
    assert (summary["failed_comparisons"], summary["failed_comparisons_total"]) == (0, 4)
    assert not partial_files(pairs)

    # The other way round: one process leaves failures, two ranks finish them.
    write_pairs_dir(tmp_path / "back", TARGETS)
    server.behaviour = failing_for({2, 3})
    assert main(label_args(tmp_path, server.base_url, "back")) == 0
    assert [p.name for p in partial_files(tmp_path / "back")] == ["labels.partial.jsonl"]
    server.behaviour = judge_by_brightness()
    server.requests.clear()
    done = torchrun_label(label_args(tmp_path, server.base_url, "back"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert {pair_of(r) for r in server.requests} == {2, 3}
    assert (tmp_path / "back" / MANIFEST_FILE).read_text() == clean
    assert not partial_files(tmp_path / "back")


CRITIC = ["critic.width=16", "critic.num_heads=2", "critic.depth=1", "critic.patch_size=[2,4,4]"]


def test_a_critic_on_each_rank_labels_like_one_critic(tmp_path):
    """A critic (random weights: scores close to each other, so a float differing by batch would flip labels)
    labels 13 shapes-world pairs in batches of 3 on two ranks: the manifest equals one process's byte for byte."""
    cfg = load_config(None, list(MICRO) + CRITIC)
    world = build_world(cfg)
    torch_gen = torch.Generator().manual_seed(0)
    cond = world.condition(torch.randint(world.num_conditions, (13,), generator=torch_gen))
    first = world.render(cond, torch.Generator().manual_seed(1)).clips
    second = world.render(cond, torch.Generator().manual_seed(2)).clips
    captions = world.captions(cond)
    records = [PairRecord(pair_id=f"p{i:04d}", shard=shard_name(0), row=i, cond_ids=cond[i].tolist(),
                          caption=captions[i]) for i in range(13)]
    for name in ("one", "two"):
        atomic.save_safetensors({"first": first, "second": second, "cond_ids": cond}, tmp_path / name / shard_name(0))
        write_manifest(tmp_path / name / PAIRS_FILE, records)
    save_critic(build_critic(cfg, world).eval(), tmp_path / "critic" / "critic.safetensors")
    recipe = blank_recipe(tmp_path / "recipe.yaml")

    def args(name):
        return ["label", str(recipe), "--pairs", str(tmp_path / name)] + [
            f"--set={o}" for o in list(MICRO) + CRITIC + ["label.labeler=critic", "label.batch_size=3",
                                                          f"critic.checkpoint={tmp_path / 'critic'}"]]
    assert main(args("one")) == 0
    done = torchrun_label(args("two"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    one = (tmp_path / "one" / MANIFEST_FILE).read_text()
    assert (tmp_path / "two" / MANIFEST_FILE).read_text() == one
    labels = [r.labels for r in read_manifest(tmp_path / "one" / MANIFEST_FILE)[0]]
    assert any(v == 1 for row in labels for v in row) and any(v == -1 for row in labels for v in row)


def _worker_of_rank(agent: int, rank: int) -> int:
    """The pid of torchrun agent ``agent``'s worker process of ``rank`` (from /proc: its parent and RANK)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no worker of rank {rank} under pid {agent}")


def test_a_stop_signal_to_one_rank_stops_both_after_the_same_round(tmp_path, server):
    """SIGUSR1 to rank 1 alone: the ranks agree after each round of batches, so both stop after the same one
    (equal rows in their partial files, exit 75 each) instead of rank 0 waiting for rank 1 at the final barrier;
    the rerun finishes with the clean manifest and no question is asked twice over both runs."""
    targets = TARGETS * 3 + [[1, 1], [-1, 0], [0, -1]]     # 24 pairs: 12 batches of 2, 6 rounds
    write_pairs_dir(tmp_path / "clean", targets)
    write_pairs_dir(tmp_path / "pairs", targets)
    server.behaviour = lambda r: Reply(text=brightness_verdict(r), delay_s=0.15)   # about a second a batch
    assert main(label_args(tmp_path, server.base_url, "clean")) == 0
    clean = (tmp_path / "clean" / MANIFEST_FILE).read_text()
    server.requests.clear()

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", *label_args(tmp_path, server.base_url, "pairs")]
    agent = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pairs = tmp_path / "pairs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and agent.poll() is None:
        if sum(len(p.read_text().splitlines()) for p in partial_files(pairs)) >= 2:
            break
        time.sleep(0.05)
    os.kill(_worker_of_rank(agent.pid, 1), signal.SIGUSR1)
    out, _ = agent.communicate(timeout=120)
    assert agent.returncode != 0 and out.count("label stopped after") == 2, out[-4000:]
    lines = [len(p.read_text().splitlines()) for p in partial_files(pairs)]
    assert len(lines) == 2 and lines[0] == lines[1] and 0 < sum(lines) < len(targets), lines

    done = torchrun_label(label_args(tmp_path, server.base_url, "pairs"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert (pairs / MANIFEST_FILE).read_text() == clean
    assert len(server.requests) == len(targets) * 2 * 2     # over both runs: every question once


def test_rows_of_several_partial_files_merge_to_the_least_failed(tmp_path):
    """A pair retried by a run with another number of ranks sits in two files: the retry (fewer failed
    comparisons, more attempts counted) wins, whichever file is read last."""
    def row(pair_id, status, failures):
        return json.dumps({"pair_id": pair_id, "labels": [0, 1], "video_label": 1, "status": status,
                           "failures": failures}) + "\n"
    (tmp_path / "labels.partial.jsonl").write_text(row("p1", ["ok", "ok"], 2) + row("p2", ["failed", "ok"], 1))
    (tmp_path / "labels.partial.r0.jsonl").write_text(row("p1", ["failed", "failed"], 2) + row("p2", ["ok", "ok"], 1))
    (tmp_path / "labels.partial.r1.jsonl").write_text(row("p3", ["ok", "tie"], 0) + '{"pair_id": "p4", "lab')
    (tmp_path / "labels.partial.old.jsonl").write_text(row("p9", ["ok", "ok"], 0))   # not a rank file: ignored
    rows = read_partials(tmp_path)
    assert {k: v["status"] for k, v in rows.items()} == {"p1": ["ok", "ok"], "p2": ["ok", "ok"], "p3": ["ok", "tie"]}
    # another rank's torn last line is skipped, not cut: its writer may be appending to it
    assert (tmp_path / "labels.partial.r1.jsonl").read_text().endswith('"lab')
    read_partials(tmp_path, own=tmp_path / "labels.partial.r1.jsonl")
    assert (tmp_path / "labels.partial.r1.jsonl").read_text().endswith("\n")
