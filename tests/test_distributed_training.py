"""Parallel layouts against one process: one optimizer step on the same data gives the same loss and the same
updated parameters (fp32 tolerance), with 2 real gloo processes on CPU.

The parent makes a micro base policy and labelled pairs, then trains one step in this process per
objective (the references). Two workers (``torch.multiprocessing``, with the torchrun environment
variables set, so ``vidpo.training.distributed.init_distributed`` starts them as torchrun would) train the same
step under each layout: TP=2, TP=2 + SP, CP=2 (Ulysses), DP=2 sharded (FSDP2), DP=2 replicated,
KTO / the SFT regularizer under DP and CP, EMA under FSDP and TP + SP, and in-training evaluation under
FSDP, TP + SP and CP. Each run writes metrics.jsonl and a DCP checkpoint with
consolidated weights; the parent compares them with the references, then resumes the DP=2 and TP=2
checkpoints in one process to check that DCP checkpoints load at another world size. The same workers
then check the megatron-core CPU shim (RNG tracker, sequence-parallel linear layer).
"""
import json
import warnings

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from helpers.distributed import (WORLD, assert_all_ranks_ok, record, set_torchrun_env, spawn_workers, vidpo_shutdown,
                                 worker_results)
from helpers.micro import MICRO
from helpers.models import save_perturbed_base
from helpers.runs import train_rows
from helpers.tolerances import ADAMW_FIRST_STEP, assert_close
from vidpo.training import checkpoint as ckpt
from vidpo.training.metrics import read_metrics
from vidpo.stages.generate import generate_pairs
from vidpo.stages.label import label_pairs
from vidpo.stages.pipeline import train_preference
from vidpo.config import load_config

pytest.importorskip("megatron.core")

# name -> (objective overrides, parallel overrides)
LAYOUTS = {
    "tp2": ("dense", ["parallel.tp=2"]),
    "tp2_sp": ("dense", ["parallel.tp=2", "parallel.sp=true"]),
    "cp2": ("dense", ["parallel.cp=2"]),
    "dp2_fsdp": ("dense", ["parallel.dp_shard=-1"]),
    "dp2_replicated": ("dense", ["parallel.dp_shard=1"]),
    "kto_dp2_fsdp": ("kto", ["parallel.dp_shard=2"]),
    "sft_cp2_checkpointed": ("dense_sft", ["parallel.cp=2", "parallel.activation_checkpointing=full"]),
    "lora_dp2_fsdp": ("lora", ["parallel.dp_shard=2"]),
    "accum2_dp2_fsdp": ("dense_accum", ["parallel.dp_shard=2"]),
    "ema_dp2_fsdp": ("dense_ema", ["parallel.dp_shard=2"]),
    "ema_tp2_sp": ("dense_ema", ["parallel.tp=2", "parallel.sp=true"]),
    "eval_dp2_fsdp": ("dense_eval", ["parallel.dp_shard=2"]),
    "eval_tp2_sp": ("dense_eval", ["parallel.tp=2", "parallel.sp=true"]),
    "eval_cp2": ("dense_eval", ["parallel.cp=2"]),
}
OBJECTIVES = {
    "dense": ["train.objective=dense_dpo"],
    "kto": ["train.objective=kto"],
    "dense_sft": ["train.objective=dense_dpo", "pref.sft_weight=0.5", "pref.sft_source=both"],
    "lora": ["train.objective=dense_dpo", "lora.rank=2"],
    "dense_accum": ["train.objective=dense_dpo", "train.grad_accum=2"],
    # decay 0.5 warms up to 0.1 at the first update: model.safetensors = 0.1 base + 0.9 updated weights
    "dense_ema": ["train.objective=dense_dpo", "train.ema_decay=0.5"],
    # in-training evaluation (here at step 0 and at the end): every rank samples, rank 0 logs
    "dense_eval": ["train.objective=dense_dpo", "train.eval_every=1"],
}


def config(micro, base, pairs, objective, *extra):
    # An lr that moves every parameter visibly in one step, constant (so a 1-step run and a 2-step run share
    # their schedule), and a clip far below the micro model's gradient norm (~7-70): the global norm is
    # checked too, and the clipped gradients' fp32 rounding stays far below AdamW's eps.
    return load_config(None, list(micro) + [
        f"train.init_from={base}", f"pref.pairs={pairs}", "train.max_steps=1", "train.ckpt_every=1",
        "train.lr=1e-2", "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.grad_clip=0.05",
        "train.batch_size=4", "flow.t_min=0.3", "model.num_heads=2", *OBJECTIVES[objective], *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_train")
    # An untrained DiT outputs exactly 0: the base is perturbed so that every weight gets a gradient.
    base = save_perturbed_base(load_config(None, MICRO), root / "base.safetensors")
    pairs = root / "pairs"
    pcfg = config(MICRO, base, pairs, "dense")
    generate_pairs(pcfg, pairs)
    label_pairs(pcfg, pairs)
    references = {}
    for objective in OBJECTIVES:
        run = root / f"single_{objective}"
        train_preference(config(MICRO, base, pairs, objective), run)
        references[objective] = run
    # Two steps in one go: what a resumed run (at any world size) must reproduce.
    train_preference(config(MICRO, base, pairs, "dense", "train.max_steps=2"), root / "single_two_steps")
    train_preference(config(MICRO, base, pairs, "dense_ema", "train.max_steps=2"), root / "single_two_steps_ema")
    return {"root": root, "base": base, "pairs": pairs, "micro": list(MICRO), "references": references,
            "two_steps": {"dense": root / "single_two_steps", "dense_ema": root / "single_two_steps_ema"}}


# ----- the megatron-core CPU shim (checked in the same workers: they start megatron-core anyway) --------
def check_shim_rng_tracker(rank, group):
    """init_distributed seeded megatron's tracker through the shim: TP ranks get distinct model-parallel
    streams, the data-parallel stream is shared, fork() switches the stand-in generator and restores it,
    and neither touches torch's global CPU generator."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from vidpo.training import distributed

    generator = distributed.cpu_shim_generator()
    assert generator is not None, "the CPU shim is not installed"
    states = get_cuda_rng_tracker().get_states()
    mine = {name: state.clone() for name, state in states.items()}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, {k: v.tolist() for k, v in mine.items()})
    other = gathered[1 - rank]
    assert mine["model-parallel-rng"].tolist() != other["model-parallel-rng"], "TP ranks share a stream"
    assert mine["data-parallel-rng"].tolist() == other["data-parallel-rng"]
    cpu_before, outer = torch.get_rng_state(), generator.get_state()
    with get_cuda_rng_tracker().fork():
        assert torch.equal(generator.get_state(), mine["model-parallel-rng"])
        torch.randn(3, generator=generator)      # what a dropout under fork() would draw on
    assert torch.equal(generator.get_state(), outer), "fork() did not restore the stand-in state"
    assert not torch.equal(get_cuda_rng_tracker().get_states()["model-parallel-rng"], mine["model-parallel-rng"])
    assert torch.equal(torch.get_rng_state(), cpu_before), "the shim touched the global CPU generator"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()              # the real torch.cuda is unchanged outside megatron-core


def check_shim_sequence_parallel_linear(rank, group):
    """megatron-core's ColumnParallelLinear with sequence parallel (its all-gather buffer is allocated on
    'the current CUDA device') runs on CPU and equals the single-device linear."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(4, 2, 6, generator=g, dtype=torch.float64)        # (tokens, B, D)
    weight = torch.randn(8, 6, generator=g, dtype=torch.float64)
    config = ModelParallelConfig(tensor_model_parallel_size=WORLD, sequence_parallel=True,
                                 use_cpu_initialization=True, perform_initialization=False,
                                 params_dtype=torch.float64)
    layer = ColumnParallelLinear(6, 8, config=config, init_method=lambda w: w, bias=False, gather_output=False,
                                 tp_group=group)
    with torch.no_grad():
        layer.weight.copy_(weight[4 * rank:4 * rank + 4])
    out, _ = layer(x_full[2 * rank:2 * rank + 2].contiguous())   # this rank's 2 of 4 tokens
    torch.testing.assert_close(out.detach(), x_full @ weight[4 * rank:4 * rank + 4].T)  # all tokens, own columns


SHIM_CHECKS = {"shim_rng_tracker": check_shim_rng_tracker,
               "shim_sequence_parallel_linear": check_shim_sequence_parallel_linear}


# A single-process checkpoint of step 1 continued at world size 2 (TP=2 + SP): the other direction of
# resharding (full weights and index-keyed AdamW state -> TP shards).
# name -> (objective, parallel overrides)
RESUMED_AT_2 = {"tp2_sp_from_single": ("dense", ["parallel.tp=2", "parallel.sp=true", "train.max_steps=2"]),
                "ema_dp2_fsdp_from_single": ("dense_ema", ["parallel.dp_shard=2", "train.max_steps=2"])}


def train_layout(prepared, name, objective, *parallel):
    """One of the worker's training runs: the ``objective`` with ``parallel`` overrides, into ``<root>/<name>``."""
    cfg = config(prepared["micro"], prepared["base"], prepared["pairs"], objective, *parallel)
    train_preference(cfg, prepared["root"] / name)


def worker(rank, port, result_dir, prepared):
    set_torchrun_env(rank, port, OMP_NUM_THREADS="1")
    with worker_results(rank, result_dir, teardown=vidpo_shutdown) as results:
        for name, (objective, parallel) in LAYOUTS.items():
            record(results, name, train_layout, prepared, name, objective, *parallel)
        for name, (objective, parallel) in RESUMED_AT_2.items():
            record(results, name, train_layout, prepared, name, objective, *parallel)
        from vidpo.training import distributed
        from vidpo.config import ParallelConfig

        distributed.init_distributed(ParallelConfig(tp=2))
        group = distributed._import_megatron().get_tensor_model_parallel_group()
        for name, fn in SHIM_CHECKS.items():
            record(results, name, fn, rank, group)


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    import shutil

    for name, (objective, _) in RESUMED_AT_2.items():
        shutil.copytree(prepared["references"][objective], prepared["root"] / name)
    return spawn_workers(worker, str(tmp_path_factory.mktemp("results")), prepared)


@pytest.mark.parametrize("name", list(SHIM_CHECKS))
def test_megatron_cpu_shim(runs, name):
    assert_all_ranks_ok(runs, name)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_one_step_matches_single_process(prepared, runs, name):
    assert_all_ranks_ok(runs, name)
    objective = LAYOUTS[name][0]
    reference_dir, run_dir = prepared["references"][objective], prepared["root"] / name
    (expected,), (actual,) = train_rows(reference_dir), train_rows(run_dir)
    assert actual["step"] == 1
    for key, value in expected.items():
        # At step 1 the policy equals its frozen reference, so every margin is 0 up to rounding: the accuracy
        # (margin > 0) flips on rounding noise and the margins are compared on the scale of that noise. The
        # loss is log 2 there; the updated weights below, and the resumed second steps, carry the check.
        if key in ("time", "phase", "step", "accuracy"):
            continue
        assert actual[key] == pytest.approx(value, rel=2e-5, abs=1e-4 if key == "margin_mean" else 1e-6), key
    assert expected["grad_norm"] > 0.05  # the clip was active, so the global norm scaled the update too
    want = load_file(str(ckpt.find_weights(reference_dir)))
    got = load_file(str(ckpt.find_weights(run_dir)))
    assert set(got) == set(want)
    start = load_file(str(prepared["base"]))
    for key in want:
        if objective == "lora" and ".lora_" not in key:
            assert torch.equal(got[key], start[key]), f"{key} is frozen under LoRA"
            continue
        if key in start:
            assert not torch.equal(want[key], start[key]), f"{key} did not move: the comparison would be vacuous"
        # AdamW's first step: see helpers.tolerances.ADAMW_FIRST_STEP (3e-5 is 0.3 % of one step of lr 1e-2).
        assert_close(got[key], want[key], ADAMW_FIRST_STEP, key)


def test_in_training_evaluation_under_every_layout(prepared, runs):
    """FSDP, TP + SP and CP runs evaluate the trained policy like one process does: the same samples (CP gathers
    the frames at every sampling step), so the same oracle scores (the eval row, logged once, by rank 0)."""
    wanted = read_metrics(prepared["references"]["dense_eval"] / "metrics.jsonl", "eval")
    assert [r["step"] for r in wanted] == [0, 1]   # the initial policy, then the trained one
    assert wanted[0]["oracle/total"] != wanted[1]["oracle/total"]
    for layout in ("eval_dp2_fsdp", "eval_tp2_sp", "eval_cp2"):
        assert_all_ranks_ok(runs, layout)
        rows = read_metrics(prepared["root"] / layout / "metrics.jsonl", "eval")
        assert [r["step"] for r in rows] == [0, 1]
        for got, want in zip(rows, wanted):
            for key, value in want.items():
                if key.startswith(("oracle/", "mode/")):
                    assert got[key] == pytest.approx(value, abs=1e-4), f"{layout} step {want['step']} {key}"


def test_distributed_checkpoint_layout(prepared, runs):
    """The DCP checkpoint has every rank's shard files, the consolidated weights and rank 0's state."""
    latest = ckpt.latest_checkpoint(prepared["root"] / "tp2_sp")
    names = {p.name for p in latest.iterdir()}
    assert {"dcp", "model.safetensors", "trainer_state.pt", "config.yaml", "meta.json"} <= names
    assert json.loads((latest / "meta.json").read_text())["world_size"] == WORLD
    assert (latest / "dcp" / ".metadata").exists() and len(list((latest / "dcp").glob("*.distcp"))) == WORLD


def assert_continues(run_dir, reference_dir, what):
    """Steps 1-2 of ``run_dir`` (resumed after step 1) match the uninterrupted ``reference_dir``: the losses (step
    2's needs the restored online weights) and the weights of model.safetensors (with EMA, the restored and
    updated average)."""
    rows, want_rows = train_rows(run_dir), train_rows(reference_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in want_rows] == [1, 2]
    for got, want in zip(rows, want_rows):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-5), what
    got_weights = load_file(str(ckpt.find_weights(run_dir)))
    want_weights = load_file(str(ckpt.find_weights(reference_dir)))
    for key in want_weights:
        torch.testing.assert_close(got_weights[key], want_weights[key], rtol=1e-4, atol=5e-5,
                                   msg=lambda m: f"{what} {key}: {m}")


def test_dcp_checkpoint_resumes_in_one_process(prepared, runs, tmp_path):
    """The DP=2 (FSDP) and TP=2 checkpoints of step 1 load in one process: continuing to step 2 gives the
    uninterrupted single-process run's loss and weights."""
    import shutil

    for layout in ("dp2_fsdp", "tp2", "ema_dp2_fsdp", "ema_tp2_sp"):
        objective = LAYOUTS[layout][0]
        resumed = tmp_path / layout
        shutil.copytree(prepared["root"] / layout, resumed)
        train_preference(config(prepared["micro"], prepared["base"], prepared["pairs"], objective,
                                "train.max_steps=2"), resumed)
        assert_continues(resumed, prepared["two_steps"][objective], layout)


def test_ema_checkpoints_keep_the_average(prepared, runs, tmp_path):
    """With EMA, a DCP checkpoint's model.safetensors is the consolidated average (not the online weights,
    which stay in dcp/), and a run that changes train.ema_decay on resume is refused, naming the checkpoint."""
    from vidpo.config import ConfigError

    latest = ckpt.latest_checkpoint(prepared["root"] / "ema_tp2_sp")
    averaged = load_file(str(latest / "model.safetensors"))
    plain = load_file(str(ckpt.find_weights(prepared["root"] / "tp2_sp")))   # the same step without EMA
    start = load_file(str(prepared["base"]))
    for key in start:   # first update: decay min(0.5, 1/10) -> 0.1 * start + 0.9 * updated
        assert_close(averaged[key], 0.1 * start[key] + 0.9 * plain[key], ADAMW_FIRST_STEP, key)
    import shutil

    for layout, flip in (("ema_dp2_fsdp", "train.ema_decay=0"), ("dp2_fsdp", "train.ema_decay=0.5")):
        run = tmp_path / layout
        shutil.copytree(prepared["root"] / layout, run)
        with pytest.raises(ConfigError, match="ema_decay") as err:
            train_preference(config(prepared["micro"], prepared["base"], prepared["pairs"], LAYOUTS[layout][0],
                                    "train.max_steps=2", flip), run)
        assert "step_0000001" in str(err.value)


@pytest.mark.parametrize("name", list(RESUMED_AT_2))
def test_single_process_checkpoint_resumes_at_world_size_2(prepared, runs, name):
    assert_all_ranks_ok(runs, name)
    assert_continues(prepared["root"] / name, prepared["two_steps"][RESUMED_AT_2[name][0]], name)
