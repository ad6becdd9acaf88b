"""Parallel layouts against one process: one optimizer step on the same data gives the same loss and the same
updated parameters (fp32 tolerance), with 2 real gloo processes on CPU.

The parent makes a micro base policy and labelled pairs, then trains one step in this process per
objective (the references). Two workers (``torch.multiprocessing``, with the torchrun environment
variables set, so ``vidpo.distributed.init_distributed`` starts them as torchrun would) train the same
step under each layout: TP=2, TP=2 + SP, CP=2 (Ulysses), DP=2 sharded (FSDP2), DP=2 replicated, and
KTO / the SFT regularizer under DP and CP. Each run writes metrics.jsonl and a DCP checkpoint with
consolidated weights; the parent compares them with the references, then resumes the DP=2 checkpoint in
one process to check that DCP checkpoints load at another world size.
"""
import json
import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from vidpo import atomic
from vidpo import checkpoint as ckpt
from vidpo.metrics import read_metrics
from vidpo.modeling import build_policy, build_world
from vidpo.pipeline import generate_pairs, label_pairs, train_preference
from vidpo.recipe import load_config

pytest.importorskip("megatron.core")

WORLD = 2
# name -> (objective overrides, parallel overrides)
LAYOUTS = {
    "tp2": ("dense", ["parallel.tp=2"]),
    "tp2_sp": ("dense", ["parallel.tp=2", "parallel.sp=true"]),
    "cp2": ("dense", ["parallel.cp=2"]),
    "dp2_fsdp": ("dense", ["parallel.dp_shard=-1"]),
    "dp2_replicated": ("dense", ["parallel.dp_shard=1"]),
    "kto_dp2_fsdp": ("kto", ["parallel.dp_shard=2"]),
    "sft_cp2_checkpointed": ("dense_sft", ["parallel.cp=2", "parallel.activation_checkpointing=full"]),
}
OBJECTIVES = {
    "dense": ["train.objective=dense_dpo"],
    "kto": ["train.objective=kto"],
    "dense_sft": ["train.objective=dense_dpo", "pref.sft_weight=0.5", "pref.sft_source=both"],
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(micro, base, pairs, objective, *extra):
    # lr large enough that one step moves every parameter visibly; no clipping hides a wrong gradient scale
    # (the clip is exercised too: grad_clip=0.05 is below the micro model's gradient norm).
    return load_config(None, list(micro) + [f"train.init_from={base}", f"pref.pairs={pairs}", "train.max_steps=1",
                                            "train.ckpt_every=1", "train.lr=1e-2", "train.warmup_steps=0",
                                            "train.grad_clip=0.05", "train.batch_size=4", "flow.t_min=0.3",
                                            "model.num_heads=2", *OBJECTIVES[objective], *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import MICRO

    root = tmp_path_factory.mktemp("dist_train")
    cfg = load_config(None, MICRO)
    model = build_policy(cfg, build_world(cfg))
    with torch.no_grad():  # an untrained DiT outputs exactly 0: perturb so every weight gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    base = root / "base.safetensors"
    atomic.save_safetensors(model.state_dict(), base)
    pairs = root / "pairs"
    pcfg = config(MICRO, base, pairs, "dense")
    generate_pairs(pcfg, pairs)
    label_pairs(pcfg, pairs)
    references = {}
    for objective in OBJECTIVES:
        run = root / f"single_{objective}"
        train_preference(config(MICRO, base, pairs, objective), run)
        references[objective] = run
    return {"root": root, "base": base, "pairs": pairs, "micro": list(MICRO), "references": references}


def worker(rank, port, prepared, result_dir):
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    results = {}
    try:
        for name, (objective, parallel) in LAYOUTS.items():
            try:
                cfg = config(prepared["micro"], prepared["base"], prepared["pairs"], objective, *parallel)
                train_preference(cfg, prepared["root"] / name)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        from vidpo.distributed import shutdown

        shutdown()


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    result_dir = str(tmp_path_factory.mktemp("results"))
    mp.spawn(worker, args=(free_port(), prepared, result_dir), nprocs=WORLD, join=True)
    per_rank = []
    for rank in range(WORLD):
        with open(os.path.join(result_dir, f"rank{rank}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


def train_rows(run_dir):
    return read_metrics(run_dir / "metrics.jsonl", "train")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_one_step_matches_single_process(prepared, runs, name):
    for rank, results in enumerate(runs):
        assert results[name] == "ok", f"rank {rank}, layout {name}:\n{results[name]}"
    objective = LAYOUTS[name][0]
    reference_dir, run_dir = prepared["references"][objective], prepared["root"] / name
    (expected,), (actual,) = train_rows(reference_dir), train_rows(run_dir)
    assert actual["step"] == 1
    for key, value in expected.items():
        if key in ("time", "phase", "step"):
            continue
        assert actual[key] == pytest.approx(value, rel=2e-5, abs=1e-6), key
    assert expected["grad_norm"] > 0.05  # the clip was active, so its global norm was checked too
    want = load_file(str(ckpt.find_weights(reference_dir)))
    got = load_file(str(ckpt.find_weights(run_dir)))
    assert set(got) == set(want)
    start = load_file(str(prepared["base"]))
    for key in want:
        assert not torch.equal(want[key], start[key]), f"{key} did not move: the comparison would be vacuous"
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=2e-6, msg=key)


def test_distributed_checkpoint_layout(prepared, runs):
    """The DCP checkpoint has every rank's shard files, the consolidated weights and rank 0's state."""
    latest = ckpt.latest_checkpoint(prepared["root"] / "tp2_sp")
    names = {p.name for p in latest.iterdir()}
    assert {"dcp", "model.safetensors", "trainer_state.pt", "config.yaml", "meta.json"} <= names
    assert json.loads((latest / "meta.json").read_text())["world_size"] == WORLD
    assert (latest / "dcp" / ".metadata").exists() and len(list((latest / "dcp").glob("*.distcp"))) == WORLD


def test_dcp_checkpoint_resumes_in_one_process(prepared, runs, tmp_path):
    """The DP=2 (FSDP) and TP=2 checkpoints of step 1 load in one process: continuing to step 2 gives the
    uninterrupted single-process run's loss and weights."""
    import shutil

    micro, base, pairs = prepared["micro"], prepared["base"], prepared["pairs"]
    uninterrupted = tmp_path / "uninterrupted"
    train_preference(config(micro, base, pairs, "dense", "train.max_steps=2"), uninterrupted)
    want_rows = train_rows(uninterrupted)
    want_weights = load_file(str(ckpt.find_weights(uninterrupted)))
    for layout in ("dp2_fsdp", "tp2"):
        resumed = tmp_path / layout
        shutil.copytree(prepared["root"] / layout, resumed)
        train_preference(config(micro, base, pairs, "dense", "train.max_steps=2"), resumed)
        rows = train_rows(resumed)
        assert [r["step"] for r in rows] == [1, 2]
        for got, want in zip(rows, want_rows):
            assert got["loss"] == pytest.approx(want["loss"], rel=2e-5), layout
        got_weights = load_file(str(ckpt.find_weights(resumed)))
        for key in want_weights:
            torch.testing.assert_close(got_weights[key], want_weights[key], rtol=1e-4, atol=1e-5, msg=key)
