"""``parallel.init: rank0`` (``vidpo.training.sharded_init``) against ``parallel.init: full``, with 2 real gloo
processes on CPU: rank 0 alone loads the initial policy (into host memory), rank 1 builds it on the meta device,
and both end with the shards, buffers, flags and random-generator states that every rank loading the whole model
gives.

The workers (``torch.multiprocessing`` with the torchrun environment, as ``helpers.distributed`` describes) build the
policy of each case both ways through ``prepare_parallel_policy`` / ``prepare_sampling_policy`` under DP=2 FSDP (also
with CPU offload), TP=2 (+ SP) and CP=2, for the toy DiT, a tiny Wan model directory, a tiny Wan 2.2 two-expert
release and a tiny CogVideoX directory, with LoRA (reference = adapters off, or a frozen copy of the LoRA'd policy)
and with a frozen reference copy (holding other weights, ``reference_weights``, where given). Every rank compares
each local shard (``DTensor.to_local``), every buffer (the non-persistent rotary / position tables included), the
parameters' attributes, requires_grad and train / eval flags, and its global generator's state, bit for bit; and
counts, through wrappers around the loaders, that rank 1 never loads anything (rank 0 exactly once). A load that
fails on rank 0 raises on both ranks.

Training: ``vidpo train`` under torchrun with ``parallel.init=rank0`` ends with the consolidated weights of the same
run with ``parallel.init=full`` (trained in the workers), for the DiT under FSDP with LoRA and for Wan under TP=2 +
SP with a frozen reference copy; its log has one "init rank0" line per rank.
"""
import inspect
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")
pytest.importorskip("megatron.core")

from helpers.distributed import (  # noqa: E402
    assert_all_ranks_ok,
    free_port,
    record,
    set_torchrun_env,
    spawn_workers,
    vidpo_shutdown,
    worker_results,
)
from helpers.micro import MICRO  # noqa: E402
from helpers.models import TEXT_DIM, perturb_seeded_, save_perturbed_base, tiny_cogvideox, tiny_wan  # noqa: E402
from helpers.pairs_dirs import blank_recipe  # noqa: E402
from helpers.pipelines import make_wan_dir  # noqa: E402
from helpers.runs import train_rows  # noqa: E402

LAYOUTS = {"dp2_fsdp": ["parallel.dp_shard=-1"], "tp2_sp": ["parallel.tp=2", "parallel.sp=true"],
           "tp2": ["parallel.tp=2"], "cp2": ["parallel.cp=2"],
           "dp2_fsdp_offload": ["parallel.dp_shard=-1", "parallel.cpu_offload=true"]}
WAN_LORA = ['lora.target_modules=["to_q","to_k","to_v","to_out.0"]']
VARIANTS = {"lora": ["lora.rank=2", "lora.alpha=2.0", "pref.reference=lora_disabled"],
            "lora_frozen": ["lora.rank=2", "lora.alpha=2.0", "pref.reference=frozen_copy"],
            "frozen": ["pref.reference=frozen_copy"]}
# name -> (model, variant, layout, reference weights given). LoRA is not tensor-parallel (the config refuses it).
INITS = {
    "dit_lora_dp2_fsdp": ("dit", "lora", "dp2_fsdp", False),
    "dit_lora_frozen_dp2_fsdp": ("dit", "lora_frozen", "dp2_fsdp", False),
    "dit_frozen_weights_dp2_fsdp": ("dit", "frozen", "dp2_fsdp", True),
    "dit_frozen_weights_tp2_sp": ("dit", "frozen", "tp2_sp", True),
    "dit_lora_cp2": ("dit", "lora", "cp2", False),
    "wan_lora_dp2_fsdp": ("wan", "lora", "dp2_fsdp", False),
    "wan_frozen_weights_dp2_fsdp": ("wan", "frozen", "dp2_fsdp", True),
    "wan_frozen_tp2_sp": ("wan", "frozen", "tp2_sp", False),
    "wan_frozen_cp2": ("wan", "frozen", "cp2", False),
    "wan22_release_lora_dp2_fsdp": ("wan22", "lora", "dp2_fsdp", False),
    "wan_lora_dp2_fsdp_offload": ("wan", "lora", "dp2_fsdp_offload", False),
    "cogvideox_frozen_tp2": ("cogvideox", "frozen", "tp2", False),
}
SAMPLING = {"dit_sampling_tp2_sp": ("dit", "tp2_sp"), "wan_sampling_cp2": ("wan", "cp2")}
# name -> (model, variant, layout): trained in the workers with parallel.init=full, by `vidpo train` with rank0.
TRAININGS = {"dit_lora_dp2_fsdp": ("dit", "lora", "dp2_fsdp"), "wan_frozen_tp2_sp": ("wan", "frozen", "tp2_sp")}


def overrides(prepared: dict, model: str, variant: str, layout: str) -> list:
    where = {"dit": [f"train.init_from={prepared['dit_base']}"],
             "wan": ["model.kind=wan", f"model.path={prepared['wan']}"],
             "wan22": ["model.kind=wan", f"model.path={prepared['wan22']}"],
             "cogvideox": ["model.kind=cogvideox", f"model.path={prepared['cogvideox']}"]}[model]
    lora = WAN_LORA if model != "dit" and variant.startswith("lora") else []
    return [*MICRO, *where, *VARIANTS[variant], *lora, *LAYOUTS[layout], f"pref.pairs={prepared['pairs']}",
            "train.objective=dense_dpo", "train.max_steps=2", "train.ckpt_every=2", "train.eval_every=0",
            "train.lr=1e-2", "train.warmup_steps=0", "train.grad_clip=1e6", "flow.t_min=0.3"]


def config(prepared: dict, model: str, variant: str, layout: str, init: str):
    from vidpo.config import load_config

    return load_config(None, overrides(prepared, model, variant, layout) + [f"parallel.init={init}"])


# ----- the workers' side ------------------------------------------------------------------------------------------
CALLS = {"load_initial_policy": 0, "from_pretrained": 0, "read_weights": 0}


def count_loads() -> None:
    """Wrap every way weights are read (the engine's loader, diffusers' from_pretrained, the checkpoint reader), so
    a check can count what this rank loaded."""
    from diffusers import ModelMixin

    from vidpo.training import checkpoint, policy

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            CALLS[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    policy.load_initial_policy = counted("load_initial_policy", policy.load_initial_policy)
    checkpoint.read_weights = counted("read_weights", checkpoint.read_weights)
    loader = ModelMixin.from_pretrained.__func__
    ModelMixin.from_pretrained = classmethod(counted("from_pretrained", loader))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def assert_same_model(got, want, what: str) -> dict:
    """Every parameter and buffer (local shard), its kind, placements and requires_grad, and every module's train /
    eval flag equal, bit for bit. Returns what was compared (the caller checks the comparison was not vacuous)."""
    seen = {"dtensors": 0, "buffers": 0, "params": 0}
    got_p, want_p = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_p.keys() == want_p.keys(), f"{what}: parameter names differ"
    for name, p in want_p.items():
        q = got_p[name]
        assert type(q) is type(p) and type(q.data) is type(p.data), f"{what} {name}: kind"
        if hasattr(p, "placements"):
            assert q.placements == p.placements and q.device_mesh == p.device_mesh, f"{what} {name}: placements"
            seen["dtensors"] += 1
        assert q.requires_grad == p.requires_grad, f"{what} {name}: requires_grad"
        assert q.dtype == p.dtype and q.device == p.device, f"{what} {name}: dtype / device"
        assert torch.equal(_local(q), _local(p)), f"{what} {name}: values"
        assert set(vars(p)) <= set(vars(q)), f"{what} {name}: attributes {set(vars(p)) - set(vars(q))}"
        seen["params"] += 1
    got_b, want_b = dict(got.named_buffers()), dict(want.named_buffers())
    assert got_b.keys() == want_b.keys(), f"{what}: buffer names differ"
    for name, b in want_b.items():
        assert got_b[name].dtype == b.dtype and torch.equal(got_b[name], b), f"{what} buffer {name}"
        seen["buffers"] += 1
    flags = {n: m.training for n, m in got.named_modules()}
    assert flags == {n: m.training for n, m in want.named_modules()}, f"{what}: train / eval flags"
    return seen


def frozen_of(reference):
    """The frozen parallel model behind a frozen-copy reference forward (None for adapters switched off)."""
    return inspect.getclosurevars(reference).nonlocals.get("frozen_parallel")


def build_both(prepared, model, variant, layout, build):
    """``build(cfg, world, parallel)`` with parallel.init=full, then rank0, from the same generator state: the two
    results, the generator states after each, and the loads counted during the rank0 build."""
    from vidpo.training.modeling import build_world
    from vidpo.training.policy import start_distributed

    built, states = {}, {}
    for init in ("full", "rank0"):
        cfg = config(prepared, model, variant, layout, init)
        world = build_world(cfg)
        parallel = start_distributed(cfg, world)
        for name in CALLS:
            CALLS[name] = 0
        torch.manual_seed(1234)
        built[init] = build(cfg, world, parallel)
        states[init] = torch.get_rng_state()
    assert torch.equal(states["rank0"], states["full"]), "the global generator's state differs from parallel.init=full"
    return built, dict(CALLS), parallel


def assert_loaded_on_rank0_only(calls: dict, rank: int, model: str, reference_weights: bool) -> None:
    if rank != 0:
        assert calls == {name: 0 for name in calls}, f"rank {rank} loaded weights: {calls}"
        return
    assert calls["load_initial_policy"] == 1, calls
    if model == "dit":   # the initial policy's file, and the reference's
        assert calls["read_weights"] == 1 + reference_weights and calls["from_pretrained"] == 0, calls
    else:                # one transformer per expert
        assert calls["from_pretrained"] == (2 if model == "wan22" else 1), calls
        assert calls["read_weights"] == reference_weights, calls


def check_init(prepared, name, rank):
    from vidpo.training.policy import prepare_parallel_policy

    model, variant, layout, with_weights = INITS[name]
    weights = prepared[f"{model}_reference"] if with_weights else None
    built, calls, parallel = build_both(prepared, model, variant, layout,
                                        lambda cfg, world, par: prepare_parallel_policy(cfg, world, par, weights))
    (policy_r, reference_r, mode_r, _), (policy_f, reference_f, mode_f, _) = built["rank0"], built["full"]
    assert mode_r == mode_f
    seen = assert_same_model(policy_r, policy_f, "policy")
    frozen_r, frozen_f = frozen_of(reference_r), frozen_of(reference_f)
    assert (frozen_f is None) == (variant == "lora") and (frozen_r is None) == (frozen_f is None)
    if frozen_f is not None:
        assert_same_model(frozen_r, frozen_f, "frozen reference")
        if with_weights:   # the reference holds other weights than the policy
            assert any(not torch.equal(_local(a), _local(b)) for a, b in zip(frozen_r.parameters(),
                                                                                 policy_r.parameters()))
    # What makes the comparison meaningful: FSDP shards, TP shards, Wan's non-persistent rotary tables, adapters.
    assert seen["dtensors"] > 0 if layout.startswith("dp2_fsdp") else seen["dtensors"] == 0
    if layout.startswith("tp2"):
        assert len(policy_r.tp_plan) > 0 and parallel.tp == 2
    if model != "dit":
        assert seen["buffers"] >= 2, seen
    if variant.startswith("lora"):
        assert any(".lora_A." in n and p.requires_grad for n, p in policy_r.named_parameters())
    assert_loaded_on_rank0_only(calls, rank, model, with_weights)


def check_sampling(prepared, name, rank):
    from vidpo.training.policy import prepare_sampling_policy

    model, layout = SAMPLING[name]
    built, calls, _ = build_both(prepared, model, "frozen", layout, prepare_sampling_policy)
    assert built["full"] is not None
    assert_same_model(built["rank0"], built["full"], "sampling policy")
    assert_loaded_on_rank0_only(calls, rank, model, False)


def check_failed_load(prepared, rank):
    """Rank 0 failing to load (a missing init_from) raises on every rank, instead of leaving rank 1 waiting."""
    from vidpo.training.modeling import build_world
    from vidpo.training.policy import prepare_parallel_policy, start_distributed

    cfg = config(prepared, "dit", "frozen", "dp2_fsdp", "rank0")
    cfg.train.init_from = str(prepared["root"] / "missing.safetensors")
    world = build_world(cfg)
    with pytest.raises(Exception) as raised:
        prepare_parallel_policy(cfg, world, start_distributed(cfg, world))
    if rank != 0:
        assert "rank 0 could not build the initial policy" in str(raised.value), raised.value
    assert "missing.safetensors" in str(raised.value)


def train_full(prepared, name):
    from vidpo.stages.pipeline import train_preference

    train_preference(config(prepared, *TRAININGS[name], "full"), prepared["root"] / f"full_{name}")


def worker(rank, port, result_dir, prepared):
    set_torchrun_env(rank, port, OMP_NUM_THREADS="1", VIDPO_DEVICE="cpu")
    with worker_results(rank, result_dir, teardown=vidpo_shutdown) as results:
        count_loads()
        for name in INITS:
            record(results, name, check_init, prepared, name, rank)
        for name in SAMPLING:
            record(results, name, check_sampling, prepared, name, rank)
        record(results, "failed_load", check_failed_load, prepared, rank)
        for name in TRAININGS:
            record(results, f"train_{name}", train_full, prepared, name)


# ----- the parent's side ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A micro DiT base, a tiny Wan directory (with a text conditioner for the micro world's conditions) and a tiny
    Wan 2.2 two-expert release, other weights for a frozen reference of each, and labelled pairs."""
    from vidpo.config import load_config
    from vidpo.models.adapters import TextConditioner
    from vidpo.stages.generate import generate_pairs
    from vidpo.stages.label import label_pairs
    from vidpo.training.modeling import build_policy, build_world
    from vidpo.utils import atomic

    root = tmp_path_factory.mktemp("sharded_init")
    cfg = load_config(None, list(MICRO))
    world = build_world(cfg)
    save_perturbed_base(cfg, root / "dit_base.safetensors")
    reference = perturb_seeded_(build_policy(cfg, world), 0.2, seed=5)
    atomic.save_safetensors(reference.state_dict(), root / "dit_reference.safetensors")
    wan = perturb_seeded_(tiny_wan(TextConditioner.random(world.vocab_size, TEXT_DIM, seed=2), in_channels=3,
                                   num_layers=2, seed=3), 0.1, seed=11)
    wan.save_pretrained(root / "wan")
    atomic.save_safetensors(wan.state_dict(), root / "wan_start.safetensors")
    atomic.save_safetensors(perturb_seeded_(wan, 0.1, seed=12).state_dict(), root / "wan_reference.safetensors")
    make_wan_dir(root / "wan22", two_experts=True)
    conditioner = TextConditioner.random(world.vocab_size, TEXT_DIM, seed=2)
    perturb_seeded_(tiny_cogvideox(conditioner, in_channels=3, num_layers=2, seed=3), 0.1, seed=11).save_pretrained(
        root / "cogvideox")
    prepared = {"root": root, "dit_base": str(root / "dit_base.safetensors"), "wan": str(root / "wan"),
                "wan22": str(root / "wan22"), "cogvideox": str(root / "cogvideox"), "pairs": str(root / "pairs"),
                "dit_start": root / "dit_base.safetensors", "wan_start": root / "wan_start.safetensors",
                "dit_reference": root / "dit_reference.safetensors",
                "wan_reference": root / "wan_reference.safetensors"}
    pairs_cfg = config(prepared, "dit", "frozen", "dp2_fsdp", "full")
    generate_pairs(pairs_cfg, root / "pairs")
    label_pairs(pairs_cfg, root / "pairs")
    return prepared


@pytest.fixture(scope="module")
def per_rank(prepared, tmp_path_factory):
    return spawn_workers(worker, str(tmp_path_factory.mktemp("sharded_init_results")), prepared)


@pytest.mark.parametrize("name", list(INITS) + list(SAMPLING))
def test_rank0_init_equals_full_and_loads_on_rank0_only(per_rank, name):
    assert_all_ranks_ok(per_rank, name)


def test_a_failed_load_on_rank0_raises_on_every_rank(per_rank):
    assert_all_ranks_ok(per_rank, "failed_load")


def test_parallel_init_takes_rank0_or_full():
    from vidpo.config import ConfigError, load_config

    assert load_config(None, []).parallel.init == "rank0"
    assert load_config(None, ["parallel.init=full"]).parallel.init == "full"
    with pytest.raises(ConfigError, match="parallel.init"):
        load_config(None, ["parallel.init=rank1"])


@pytest.mark.parametrize("name", list(TRAININGS))
def test_vidpo_train_with_rank0_init_ends_like_full(prepared, per_rank, name):
    assert_all_ranks_ok(per_rank, f"train_{name}")
    from vidpo.training import checkpoint as ckpt

    root = prepared["root"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", "train", str(blank_recipe(root / "blank.yaml")),
               "--out", str(root / f"rank0_{name}")]
    for item in overrides(prepared, *TRAININGS[name]) + ["parallel.init=rank0"]:
        command += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", VIDPO_DEVICE="cpu")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    log = done.stdout + done.stderr
    assert "init rank0: rank 0 loaded on cpu" in log and "init rank0: rank 1 built on meta" in log, log[-3000:]

    want = load_file(str(ckpt.find_weights(root / f"full_{name}")))
    got = load_file(str(ckpt.find_weights(root / f"rank0_{name}")))
    assert [row["step"] for row in train_rows(root / f"rank0_{name}")] == [1, 2]
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-6), key
    # Training moved the weights it trains (LoRA: the B factors start at 0), or the comparison would be vacuous.
    model, variant, _ = TRAININGS[name]
    if variant.startswith("lora"):
        assert all(got[k].abs().max() > 1e-4 for k in got if ".lora_B." in k)
    else:
        start = {k: v for k, v in load_file(str(prepared[f"{model}_start"])).items() if k in got}
        assert start and sum(not torch.allclose(got[k], start[k], atol=1e-5) for k in start) > len(start) // 2
