"""The distributed demo run: ``torchrun --nproc-per-node 2 -m vidpo train recipes/shapes/dpo_demo.yaml --set <parallel>``
on CPU (gloo) logs the single-process run's losses, and its world-size-2 checkpoint resumes in one process
on the same loss curve.

The demo recipe is shrunk to the micro world (helpers.micro.MICRO) and trained from a micro base on pairs made
here; the parallel layout is TP=2 + sequence parallel (the most communication-heavy one), so the resume
also reshards tensor-parallel shards back into single-device weights.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers.distributed import free_port
from helpers.micro import MICRO
from helpers.models import save_perturbed_base
from helpers.runs import train_losses as losses
from vidpo.training import checkpoint as ckpt
from vidpo.cli import main as cli
from vidpo.stages.generate import generate_pairs
from vidpo.stages.label import label_pairs
from vidpo.config import REPO_ROOT, load_config

pytest.importorskip("megatron.core")

RECIPE = str(REPO_ROOT / "recipes" / "shapes" / "dpo_demo.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A micro base policy, labelled pairs, and the ``--set`` list that points the demo recipe at them."""
    root = tmp_path_factory.mktemp("dist_cli")
    save_perturbed_base(load_config(RECIPE, MICRO), root / "base.safetensors")
    sets = list(MICRO) + [f"train.init_from={root / 'base.safetensors'}", f"pref.pairs={root / 'pairs'}",
                          "train.eval_every=0", "train.ckpt_every=2", "train.warmup_steps=0", "train.lr=1e-3"]
    cfg = load_config(RECIPE, sets)
    generate_pairs(cfg, root / "pairs")
    label_pairs(cfg, root / "pairs")
    return root, sets


def args(sets):
    return [a for s in sets for a in ("--set", s)]


def test_torchrun_matches_single_process_and_resumes_at_world_size_1(demo):
    root, sets = demo
    assert cli(["train", RECIPE, "--out", str(root / "single"), *args(sets + ["train.max_steps=4"])]) == 0
    single = losses(root / "single")
    assert [s for s, _ in single] == [1, 2, 3, 4]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "vidpo", "train", RECIPE,
               "--out", str(root / "dist"),
               *args(sets + ["train.max_steps=2", "parallel.tp=2", "parallel.sp=true"])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.count('"steps": 2') == 1, "rank 0 alone prints the result"
    distributed = losses(root / "dist")
    assert [s for s, _ in distributed] == [1, 2]
    for (_, got), (_, want) in zip(distributed, single):
        assert got == pytest.approx(want, rel=2e-5)
    latest = ckpt.latest_checkpoint(root / "dist")
    assert (latest / "dcp" / ".metadata").exists()

    # The same run directory, now one process: it resumes from the world-size-2 checkpoint of step 2.
    assert cli(["train", RECIPE, "--out", str(root / "dist"), *args(sets + ["train.max_steps=4"])]) == 0
    resumed = losses(root / "dist")
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    for (_, got), (_, want) in zip(resumed, single):
        assert got == pytest.approx(want, rel=5e-5)
    assert single[0][1] != pytest.approx(single[3][1], rel=1e-3), "a flat curve would not show a resume mistake"


def test_torchrun_generate_slices_the_shards_and_equals_one_process(demo):
    """``torchrun -m vidpo generate``: each rank samples its own shards (rank r: r, r + 2, ...), and the folder
    equals one process's, shard for shard and bit for bit."""
    root, sets = demo
    gen = args(sets + ["generate.num_pairs=12", "generate.shard_size=4", "generate.steps=2"])
    assert cli(["generate", RECIPE, "--out", str(root / "gen_single"), *gen]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "vidpo", "generate", RECIPE,
               "--out", str(root / "gen_torchrun"), *gen]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.count('"num_pairs"') <= 1, "rank 0 alone prints the summary"
    single, multi = root / "gen_single", root / "gen_torchrun"
    assert (single / "pairs.jsonl").read_text() == (multi / "pairs.jsonl").read_text()
    shards = sorted(p.name for p in (single / "shards").iterdir())
    assert len(shards) == 3 and shards == sorted(p.name for p in (multi / "shards").iterdir())
    # summed over the ranks: each shard was sampled once (every rank sampling every shard would count 6)
    assert json.loads((multi / "generate.json").read_text())["shards_written"] == 3
    for name in shards:
        a, b = load_file(str(single / "shards" / name)), load_file(str(multi / "shards" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
