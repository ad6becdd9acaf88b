"""The parallelized diffusers adapters against the single-process diffusers model, with 2 real gloo processes on
CPU (tests/test_adapter_parallel.py): one harness for every adapter, one ``AdapterCase`` per model.

Layout checks: both workers build the same tiny random adapter (weights perturbed so every norm weight differs
from 1 and a wrong shard shows) and the same inputs, compute the single-process reference themselves (the plain
diffusers model, no process group involved), then parallelize a copy and compare the forward output, every
parameter gradient and a sampled clip. The loss is ``sum(out * w)`` for a fixed random ``w``. What each rank's
gradient must equal follows from the layout (``vidpo.models.dit.parallelize``):
  TP / SP   every rank computes the global loss: replicated parameters carry the full gradient, split ones this
            rank's TPShard of it;
  CP        each rank's loss covers its own frames: the gradients summed over the CP ranks are the full ones;
  DP FSDP   rank r takes batch row r; FSDP sums the gradients (divide factor 1) into this rank's shard.

Training checks: one DenseDPO step of ``vidpo train`` (``model.kind=<kind>``) under a parallel layout against the
same step in one process (loss, gradient norm, updated weights): full fine-tuning with a frozen reference copy, or
LoRA with the reference = adapters switched off.

The workers are this module's ``worker`` (pickled by reference); they find their ``AdapterCase`` by kind in
``CASES``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import pytest
import torch
import torch.distributed as dist

from helpers.distributed import record, set_torchrun_env, spawn_workers, vidpo_shutdown, worker_results
from helpers.micro import MICRO
from helpers.models import TEXT_DIM, TEXT_LEN, perturb_seeded_, tiny_cogvideox, tiny_wan
from helpers.tolerances import ADAMW_FIRST_STEP, Tolerance, assert_close, same

# Parallel model against the single-process one, fp32, both computed in the worker.
FORWARD = same(1e-5)
GRADIENT = Tolerance(rtol=1e-4, atol=1e-5)
SAMPLE = same(1e-4)

# Full fine-tuning with a frozen reference copy; LoRA (attention) with the reference = adapters switched off.
VARIANTS = {"full": ["pref.reference=frozen_copy"],
            "lora": ["pref.reference=lora_disabled", "lora.rank=2", "lora.alpha=2.0",
                     'lora.target_modules=["to_q","to_k","to_v","to_out.0"]']}


@dataclasses.dataclass(frozen=True)
class AdapterCase:
    """What the harness needs to know about one adapter."""
    kind: str                       # model.kind
    adapter: str                    # the single-process adapter class (named in the parallel form's refusals)
    build: Callable                 # (architecture layout or None, in_channels) -> unperturbed tiny adapter
    parallelize: str                # "module:function"
    single_process_form: str        # "module:AdapterClass:TransformerClass", the parallel modules without groups
    channels: int                   # latent channels of the layout checks
    train_channels: int             # channels of the training runs' model (the shapes world's RGB clips)
    layouts: Dict[str, Tuple[Optional[str], dict, dict]]   # name -> (architecture, ParallelConfig, parallelize kw)
    train_layouts: Dict[str, Tuple[str, list]]             # name -> (VARIANTS key, parallel overrides)
    architectures: Tuple[Optional[str], ...]               # of the single-process form test
    block_prefix: str               # the transformer blocks' ModuleList
    tp_split: FrozenSet[str]        # parameter names inside block 0 that TP splits (nothing outside the blocks is)
    every_parameter_has_gradient: bool   # the layout check's vacuity guard applies to every parameter
    unsupported: Callable           # (ctx, parallelize, make_model) -> None: model-specific refusals, under TP=2
    ignore_in_training_step: Callable = lambda key: False  # weights whose update is rounding noise


def resolve(spec: str) -> list:
    """``"module:name1:name2"`` -> [module.name1, module.name2] (vidpo's parallel code is imported on use)."""
    module, *names = spec.split(":")
    module = importlib.import_module(module)
    return [getattr(module, name) for name in names]


# ----- the models --------------------------------------------------------------------------------------------
def _wan_unsupported(ctx, parallelize, make_model):
    i2v = tiny_wan()
    i2v.transformer.blocks[0].attn2.add_k_proj = torch.nn.Linear(4, 16)
    with pytest.raises(NotImplementedError, match="image-to-video"):
        parallelize(i2v, ctx)


def _cogvideox_unsupported(ctx, parallelize, make_model):
    fused = make_model()
    fused.transformer.fuse_qkv_projections()
    with pytest.raises(NotImplementedError, match="unfused q/k/v projections"):
        parallelize(fused, ctx)


def _wan_tp_split():
    split = {"ffn.net.0.proj.weight", "ffn.net.0.proj.bias", "ffn.net.2.weight"}
    for a in ("attn1", "attn2"):   # every attention / FFN projection and QK norm is split
        split |= {f"{a}.{m}.{leaf}" for m in ("to_q", "to_k", "to_v") for leaf in ("weight", "bias")}
        split |= {f"{a}.to_out.0.weight", f"{a}.norm_q.weight", f"{a}.norm_k.weight"}
    return frozenset(split)


def _cogvideox_tp_split():
    split = {f"attn1.{m}.{leaf}" for m in ("to_q", "to_k", "to_v") for leaf in ("weight", "bias")}
    split |= {"attn1.to_out.0.weight", "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight"}
    return frozenset(split)   # the attention / FFN projections


CASES = {
    "wan": AdapterCase(
        kind="wan", adapter="WanAdapter",
        build=lambda architecture, channels: tiny_wan(in_channels=channels, num_layers=2, seed=3),
        parallelize="vidpo.models.wan.parallelize:parallelize_wan",
        single_process_form="vidpo.models.wan.parallelize:ParallelWanAdapter:ParallelWanTransformer",
        channels=3, train_channels=3,
        layouts={"tp2": (None, dict(tp=2), {}),
                 "tp2_sp_checkpointed": (None, dict(tp=2, sp=True), dict(activation_checkpointing="full")),
                 "cp2": (None, dict(cp=2), {}),
                 "dp2_fsdp": (None, dict(dp_shard=-1), {})},
        train_layouts={"train_tp2_sp": ("full", ["parallel.tp=2", "parallel.sp=true"]),
                       "train_cp2": ("full", ["parallel.cp=2"]),
                       "train_lora_dp2_fsdp": ("lora", ["parallel.dp_shard=2"])},
        architectures=(None,),
        block_prefix="blocks", tp_split=_wan_tp_split(), every_parameter_has_gradient=True,
        unsupported=_wan_unsupported),
    # 2B layout (sincos positions), 5B (3-D RoPE), 1.5 (RoPE, 2-frame temporal patches). CP splits the video
    # stream (Ulysses), SP splits it by tokens over the TP ranks; the text stream stays replicated.
    "cogvideox": AdapterCase(
        kind="cogvideox", adapter="CogVideoXAdapter",
        build=lambda architecture, channels: tiny_cogvideox(in_channels=channels, num_layers=2, seed=3,
                                                            layout=architecture or "2b"),
        parallelize="vidpo.models.cogvideox.parallelize:parallelize_cogvideox",
        single_process_form=("vidpo.models.cogvideox.parallelize:ParallelCogVideoXAdapter:"
                             "ParallelCogVideoXTransformer"),
        channels=4, train_channels=3,
        layouts={"tp2_checkpointed_2b": ("2b", dict(tp=2), dict(activation_checkpointing="full")),
                 "tp2_sp_checkpointed_2b": ("2b", dict(tp=2, sp=True), dict(activation_checkpointing="full")),
                 "tp2_sp_5b": ("5b", dict(tp=2, sp=True), {}),
                 "cp2_2b": ("2b", dict(cp=2), {}),
                 "dp2_fsdp_2b": ("2b", dict(dp_shard=-1), {}),
                 "tp2_5b": ("5b", dict(tp=2), {}),
                 "cp2_5b": ("5b", dict(cp=2), {}),
                 "cp2_1.5": ("1.5", dict(cp=2), {}),
                 "tp2_sp_1.5": ("1.5", dict(tp=2, sp=True), {})},
        train_layouts={"train_tp2": ("full", ["parallel.tp=2"]),
                       "train_tp2_sp": ("full", ["parallel.tp=2", "parallel.sp=true"]),
                       "train_cp2": ("full", ["parallel.cp=2"]),
                       "train_lora_dp2_fsdp": ("lora", ["parallel.dp_shard=2"])},
        architectures=("2b", "5b", "1.5"),
        block_prefix="transformer_blocks", tp_split=_cogvideox_tp_split(), every_parameter_has_gradient=False,
        unsupported=_cogvideox_unsupported,
        # Adding one vector to every key shifts each query's logits by a constant, which softmax ignores: the key
        # norm's bias has a gradient of 0 up to rounding, which AdamW's first step (lr g / (|g| + eps)) amplifies.
        ignore_in_training_step=lambda key: key.endswith("attn1.norm_k.bias")),
}


def make_model(case: AdapterCase, architecture: Optional[str] = None, channels: Optional[int] = None):
    """The case's tiny adapter (2 layers, seed 3) with every parameter perturbed (0.1, seed 11)."""
    return perturb_seeded_(case.build(architecture, channels or case.channels), 0.1, seed=11)


def make_inputs(channels: int):
    """(x, t, cond, w): 2 clips of 4 frames x 16 tokens per frame, their times, text, and the loss weights."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, channels, 4, 8, 8, generator=g)        # (B, C, T, H, W)
    t = torch.tensor([0.35, 0.8])
    cond = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)
    w = torch.randn(2, channels, 4, 8, 8, generator=g)
    return x, t, cond, w


# ----- checks run by the workers ----------------------------------------------------------------------------
def check_layout(case: AdapterCase, name: str):
    from vidpo.config import ParallelConfig
    from vidpo.training import distributed

    architecture, fields, kwargs = case.layouts[name]
    (parallelize,) = resolve(case.parallelize)
    ctx = distributed.init_distributed(ParallelConfig(**fields))
    x, t, cond, w = make_inputs(case.channels)
    reference = make_model(case, architecture)
    out_ref = reference(x, t, cond)
    (out_ref * w).sum().backward()
    grads_ref = {n: p.grad for n, p in reference.named_parameters()}

    model = parallelize(make_model(case, architecture), ctx, **kwargs)
    rows = ctx.dp_rows(x.shape[0]) if ctx.dp > 1 else slice(None)
    frames = model.local_frames(x.shape[2]) if ctx.cp > 1 else slice(None)
    out = model(x[rows], t[rows], cond[rows])
    assert_close(out, out_ref[rows][:, :, frames], FORWARD)
    (out * w[rows][:, :, frames]).sum().backward()

    params = dict(model.named_parameters())
    assert list(params) == list(grads_ref), "the parallel model renamed or reordered parameters"
    plan = model.tp_plan
    if ctx.tp > 1:
        block = f"{case.block_prefix}.0."
        assert {n.split(block, 1)[1] for n in plan if block in n} == case.tp_split
        assert all(f".{case.block_prefix}." in n for n in plan)
    for n, p in params.items():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if ctx.cp > 1:   # per-frame partial gradients: the training loop sums them over the CP ranks
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.cp_group)
        want = grads_ref[n]
        if n in plan:
            want = plan[n].shard(want, ctx.tp_rank, ctx.tp)
        assert grad.shape == want.shape, f"{name} {n}: {tuple(grad.shape)} vs {tuple(want.shape)}"
        assert_close(grad, want, GRADIENT, f"{name} {n}")
        if case.every_parameter_has_gradient:
            assert want.abs().max() > 0, f"{n} has no gradient: the check would be vacuous"
    # Every layout samples whole clips through the sampler hook (under CP the frames are gathered at each step).
    one = cond[rows][:1]
    shape = (case.channels, 4, 8, 8)
    sample = model.sample(one, shape, seed=0, indices=[0], steps=2, cfg_scale=3.0)
    want = reference.sample(one, shape, seed=0, indices=[0], steps=2, cfg_scale=3.0)
    assert_close(sample, want, SAMPLE)


def check_unsupported(case: AdapterCase):
    """LoRA'd models are refused (merge first), and what else the case refuses."""
    from vidpo.config import ParallelConfig
    from vidpo.models.lora import apply_lora
    from vidpo.training import distributed

    (parallelize,) = resolve(case.parallelize)
    ctx = distributed.init_distributed(ParallelConfig(tp=2))
    lora = make_model(case)
    apply_lora(lora, rank=2, target_modules=["to_q"])
    with pytest.raises(NotImplementedError, match="LoRA"):
        parallelize(lora, ctx)
    case.unsupported(ctx, parallelize, lambda: make_model(case))


def train_config(case: AdapterCase, prepared: dict, variant: str, *extra):
    from vidpo.config import load_config

    # An lr that moves every weight, constant. No clipping: clipping would scale the smallest gradient elements
    # down to AdamW's eps, where its first step lr * g / (|g| + eps) turns fp32 summation-order differences
    # into visible update differences. The global norm (over TP shards and replicated weights) is compared.
    return load_config(None, prepared["micro"] + [
        f"model.kind={case.kind}", f"model.path={prepared['model_dir']}", f"pref.pairs={prepared['pairs']}",
        "train.objective=dense_dpo", *VARIANTS[variant], "train.max_steps=1", "train.ckpt_every=1",
        "train.lr=1e-2", "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.grad_clip=1e6",
        "train.batch_size=4", "flow.t_min=0.3", *extra])


def train_layout(case: AdapterCase, prepared: dict, name: str):
    """One of the worker's training runs (``case.train_layouts[name]``), into ``<root>/<name>``."""
    from vidpo.stages.pipeline import train_preference

    variant, parallel = case.train_layouts[name]
    train_preference(train_config(case, prepared, variant, *parallel), prepared["root"] / name)


def worker(rank, port, result_dir, kind, prepared):
    case = CASES[kind]
    set_torchrun_env(rank, port, OMP_NUM_THREADS="1", VIDPO_DEVICE="cpu")
    with worker_results(rank, result_dir, teardown=vidpo_shutdown) as results:
        for name in case.layouts:
            record(results, name, check_layout, case, name)
        record(results, "unsupported", check_unsupported, case)
        for name in case.train_layouts:
            record(results, name, train_layout, case, prepared, name)


# ----- the parent's side ------------------------------------------------------------------------------------
def prepare(case: AdapterCase, root) -> dict:
    """A tiny model directory of the case (``model.path``) with a text conditioner for the micro world's
    conditions, labelled pairs, and the single-process one-step run of every variant (``<root>/single_<v>``)."""
    from vidpo.config import load_config
    from vidpo.models.adapters import TextConditioner
    from vidpo.stages.generate import generate_pairs
    from vidpo.stages.label import label_pairs
    from vidpo.stages.pipeline import train_preference
    from vidpo.training.modeling import build_world

    world = build_world(load_config(None, list(MICRO)))
    model = make_model(case, channels=case.train_channels)
    type(model)(model.transformer, TextConditioner.random(world.vocab_size, TEXT_DIM, seed=2)).save_pretrained(
        root / case.kind)
    prepared = {"micro": list(MICRO), "model_dir": str(root / case.kind), "pairs": str(root / "pairs"),
                "root": root}
    cfg = train_config(case, prepared, "full")
    generate_pairs(cfg, root / "pairs")
    label_pairs(cfg, root / "pairs")
    for variant in VARIANTS:
        train_preference(train_config(case, prepared, variant), root / f"single_{variant}")
    return prepared


def run_workers(case: AdapterCase, prepared: dict, result_dir) -> list:
    """Every check of the case in 2 worker processes: the per-rank verdicts (``helpers.distributed``)."""
    return spawn_workers(worker, str(result_dir), case.kind, prepared)


def assert_step_matches_one_process(reference_dir, run_dir, start: dict, *, lora: bool, what: str,
                                    ignore=lambda key: False) -> None:
    """The first training step of ``run_dir`` (a multi-process ``vidpo train`` run of a diffusers model) equals
    that of ``reference_dir`` (one process): loss, gradient norm and DPO loss of the metrics row, and every
    ``transformer.*`` weight of the consolidated checkpoint. ``start`` is the initial state dict: under LoRA the
    base weights must not have moved; otherwise every compared weight must have (or the check is vacuous).
    ``ignore(key)`` names weights whose update is rounding noise (a gradient that is 0 analytically)."""
    from safetensors.torch import load_file

    from helpers.runs import train_rows
    from vidpo.training import checkpoint as ckpt

    (expected,), (actual,) = train_rows(reference_dir), train_rows(run_dir)
    for key in ("loss", "grad_norm", "dpo_loss"):
        if key in expected:
            assert actual[key] == pytest.approx(expected[key], rel=2e-5, abs=1e-6), f"{what} {key}"
    assert expected["grad_norm"] > 1e-3
    want = load_file(str(ckpt.find_weights(reference_dir)))
    got = load_file(str(ckpt.find_weights(run_dir)))
    params = [k for k in want if k.startswith(("transformer.", "transformer_2."))]   # every expert
    assert params and set(params) <= set(got)
    for key in params:
        if ignore(key):
            continue
        if lora and ".lora_" not in key:
            assert torch.equal(got[key], start[key]), f"{key} is frozen under LoRA"
            continue
        if key in start and start[key].is_floating_point():
            assert not torch.equal(want[key], start[key]), f"{key} did not move: the comparison would be vacuous"
        assert_close(got[key], want[key], ADAMW_FIRST_STEP, f"{what} {key}")
