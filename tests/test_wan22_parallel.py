"""Wan 2.2 A14B's two experts under the parallel layouts (``vidpo.models.wan.parallelize``), and FSDP2 CPU offload
(``parallel.cpu_offload``), with 2 real gloo processes on CPU against the single-process two-expert adapter.

The tiny adapter has two experts of the same architecture and ``boundary_ratio`` 0.6; the harness's inputs
(``helpers.parallel.make_inputs``) have t = 0.35 (low-noise expert, ``transformer_2``) and 0.8 (high-noise,
``transformer``). Under DP=2 FSDP rank 0 holds only the low-noise row and rank 1 only the high-noise one, so each
rank must still run (and gather, and reduce-scatter) the expert its own rows do not use: the outputs and every
gradient of both experts must equal one process's. Under TP=2 + SP both ranks run both experts. LoRA on both
experts under FSDP: the LoRA'd outputs, the adapters' gradients and the reference (adapters off) equal one
process's, and one DenseDPO step of ``vidpo train`` on a two-expert model directory (LoRA, reference = adapters
off, DP=2 FSDP) equals the same step in one process (loss, gradient norm, both experts' updated adapters).
``parallel.cpu_offload``: FSDP2's ``CPUOffloadPolicy`` reaches every FSDP unit of both experts and the layout still
gives the same outputs and gradients (on CPU the host-device copies are no-ops); the config rules refuse it without
FSDP. A GPU run of the offload is not part of this module: on CPU the same code path runs, minus pinned copies.
"""
import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("megatron.core")

from helpers.distributed import (assert_all_ranks_ok, record, set_torchrun_env, spawn_workers,  # noqa: E402
                                 vidpo_shutdown, worker_results)
from helpers.models import add_random_lora, perturb_seeded_, tiny_wan  # noqa: E402
from helpers.micro import MICRO  # noqa: E402
from helpers.models import TEXT_DIM  # noqa: E402
from helpers.parallel import (CASES, FORWARD, GRADIENT, assert_step_matches_one_process, check_layout,  # noqa: E402
                              make_inputs, resolve, train_config, train_layout)
from helpers.tolerances import assert_close  # noqa: E402

BOUNDARY = 0.6


def two_experts(architecture, channels):
    from vidpo.models.wan import WanAdapter

    high, low = (tiny_wan(in_channels=channels, num_layers=2, seed=seed).transformer for seed in (3, 4))
    return WanAdapter(high, transformer_2=low, boundary_ratio=BOUNDARY)


WAN22 = dataclasses.replace(
    CASES["wan"], build=two_experts, train_layouts={"train_lora_dp2_fsdp": ("lora", ["parallel.dp_shard=2"])},
    layouts={"dp2_fsdp": (None, dict(dp_shard=-1), {}),
             "tp2_sp": (None, dict(tp=2, sp=True), {}),
             "dp2_fsdp_cpu_offload": (None, dict(dp_shard=-1, cpu_offload=True), {})})
LORA = dict(rank=2, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"], seed=7)


def make_model(lora: bool = False):
    model = perturb_seeded_(two_experts(None, WAN22.channels), 0.1, seed=11)
    if not lora:
        return model
    with torch.random.fork_rng(devices=[]):   # the A factors are drawn from the global generator
        torch.manual_seed(LORA["seed"])
        return add_random_lora(model, **LORA)


# ----- checks run by the workers ----------------------------------------------------------------------------
def check_lora_fsdp():
    """LoRA on both experts under DP=2 FSDP: outputs, the adapters' gradients, and the reference (adapters off)."""
    from vidpo.config import ParallelConfig
    from vidpo.models.lora import lora_disabled
    from vidpo.training import distributed

    (parallelize,) = resolve(WAN22.parallelize)
    ctx = distributed.init_distributed(ParallelConfig(dp_shard=-1))
    x, t, cond, w = make_inputs(WAN22.channels)
    reference = make_model(lora=True)
    out_ref = reference(x, t, cond)
    (out_ref * w).sum().backward()
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert {n.split(".", 1)[0] for n in grads_ref} == {"transformer", "transformer_2"}
    with torch.no_grad(), lora_disabled(reference):
        off_ref = reference(x, t, cond)

    model = parallelize(make_model(lora=True), ctx)
    rows = ctx.dp_rows(x.shape[0])
    out = model(x[rows], t[rows], cond[rows])
    assert_close(out, out_ref[rows], FORWARD)
    (out * w[rows]).sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad.full_tensor(), grads_ref[n], GRADIENT, n)
            assert grads_ref[n].abs().max() > 0, f"{n} has no gradient: the check would be vacuous"
    with torch.no_grad(), lora_disabled(model):
        off = model(x[rows], t[rows], cond[rows])
    assert_close(off, off_ref[rows], FORWARD)
    assert (off - out).abs().max() > 1e-3, "adapters off must change the output (else the reference check is vacuous)"


def check_offload_policy():
    """``parallel.cpu_offload`` reaches ``fully_shard`` on every FSDP unit of both experts; without it, none."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    from vidpo.config import ParallelConfig
    from vidpo.training import distributed

    (parallelize,) = resolve(WAN22.parallelize)
    for offload in (True, False):
        ctx = distributed.init_distributed(ParallelConfig(dp_shard=-1, cpu_offload=offload))
        model = parallelize(make_model(), ctx)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 2 * (1 + 2), "each expert: its 2 blocks and its root"
        policies = {isinstance(u._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy) for u in units}
        assert policies == {offload}


def worker(rank, port, result_dir, prepared):
    set_torchrun_env(rank, port, OMP_NUM_THREADS="1", VIDPO_DEVICE="cpu")
    with worker_results(rank, result_dir, teardown=vidpo_shutdown) as results:
        for name in WAN22.layouts:
            record(results, name, check_layout, WAN22, name)
        record(results, "lora_dp2_fsdp", check_lora_fsdp)
        record(results, "offload_policy", check_offload_policy)
        for name in WAN22.train_layouts:
            record(results, name, train_layout, WAN22, prepared, name)


# ----- the parent's side ------------------------------------------------------------------------------------
def prepare(root) -> dict:
    """A two-expert model directory with a text conditioner for the micro world, labelled pairs, and the
    single-process LoRA step (``<root>/single_lora``): ``helpers.parallel.prepare`` for two experts, one variant."""
    from vidpo.config import load_config
    from vidpo.models.adapters import TextConditioner
    from vidpo.stages.generate import generate_pairs
    from vidpo.stages.label import label_pairs
    from vidpo.stages.pipeline import train_preference
    from vidpo.training.modeling import build_world

    world = build_world(load_config(None, list(MICRO)))
    model = make_model()
    type(model)(model.transformer, TextConditioner.random(world.vocab_size, TEXT_DIM, seed=2),
                transformer_2=model.transformer_2, boundary_ratio=BOUNDARY).save_pretrained(root / "wan22")
    prepared = {"micro": list(MICRO), "model_dir": str(root / "wan22"), "pairs": str(root / "pairs"), "root": root}
    cfg = train_config(WAN22, prepared, "full")
    generate_pairs(cfg, root / "pairs")
    label_pairs(cfg, root / "pairs")
    train_preference(train_config(WAN22, prepared, "lora"), root / "single_lora")
    return prepared


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    prepared = prepare(tmp_path_factory.mktemp("wan22_train"))
    return prepared, spawn_workers(worker, str(tmp_path_factory.mktemp("wan22_parallel")), prepared)


@pytest.fixture(scope="module")
def verdicts(run):
    return run[1]


@pytest.mark.parametrize("name", [*WAN22.layouts, "lora_dp2_fsdp", "offload_policy"])
def test_two_experts_match_one_process(verdicts, name):
    assert_all_ranks_ok(verdicts, name)


def test_training_step_matches_one_process(run):
    from safetensors.torch import load_file

    from vidpo.training import checkpoint as ckpt

    prepared, verdicts = run
    assert_all_ranks_ok(verdicts, "train_lora_dp2_fsdp")
    root = prepared["root"]
    assert_step_matches_one_process(root / "single_lora", root / "train_lora_dp2_fsdp", make_model().state_dict(),
                                    lora=True, what="train_lora_dp2_fsdp")
    # Both experts took rows (LoRA's B factors start at zero: an expert without rows keeps them there).
    weights = load_file(str(ckpt.find_weights(root / "single_lora")))
    for expert in ("transformer.", "transformer_2."):
        assert any(k.startswith(expert) and "lora_B" in k and v.abs().max() > 0 for k, v in weights.items()), expert


def test_both_experts_are_exercised():
    """The inputs straddle the boundary, so the layout checks cover both experts and the DP ranks disagree."""
    _, t, _, _ = make_inputs(WAN22.channels)
    assert make_model().high_noise(t).tolist() == [False, True]


def test_cpu_offload_needs_fsdp():
    from vidpo.config import ParallelConfig
    from vidpo.training.distributed import DistributedSetupError, init_distributed

    assert not ParallelConfig(cpu_offload=True).rules()
    assert [p.keys for p in ParallelConfig(cpu_offload=True, dp_shard=1).rules()] == [("cpu_offload",)]
    # tp * cp = world leaves one data-parallel rank: nothing sharded.
    problems = ParallelConfig(tp=2, cpu_offload=True).layout_problems(2)
    assert len(problems) == 1 and "cpu_offload needs FSDP" in str(problems[0])
    assert not ParallelConfig(cpu_offload=True).layout_problems(2)
    with pytest.raises(DistributedSetupError, match="cpu_offload"):
        init_distributed(ParallelConfig(cpu_offload=True))     # one process (no torchrun environment)
