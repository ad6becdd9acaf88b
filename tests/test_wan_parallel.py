"""Wan 2.1 parallelized (``vidpo.models.wan.parallelize``) against the single-process diffusers model, with 2 real
gloo processes on CPU: forward outputs and every parameter gradient under TP=2, TP=2 + SP (with activation
checkpointing), CP=2 (Ulysses) and DP=2 sharded (FSDP2); then one DenseDPO training step of ``vidpo train``
(``model.kind=wan``) against the same step in one process (loss, gradient norm, updated weights): full
fine-tuning with a frozen reference under TP=2 + SP and CP=2, LoRA (reference = adapters off) under DP=2 FSDP.

Both workers build the same tiny random ``WanTransformer3DModel`` (weights perturbed so every norm weight differs
from 1 and a wrong shard shows) and the same inputs, compute the single-process reference themselves (the plain
diffusers model, no process group involved), then parallelize a copy. The loss is ``sum(out * w)`` for a fixed
random ``w``. What each rank's gradient must equal follows from the layout (``vidpo.models.dit.parallelize``):
  TP / SP   every rank computes the global loss: replicated parameters carry the full gradient, split ones this
            rank's TPShard of it;
  CP        each rank's loss covers its own frames: the gradients summed over the CP ranks are the full ones;
  DP FSDP   rank r takes batch row r; FSDP sums the gradients (divide factor 1) into this rank's shard.
"""
import pytest
import torch
import torch.distributed as dist
from dist_utils import (assert_all_ranks_ok, assert_step_matches_one_process, record, set_torchrun_env, spawn_workers,
                        vidpo_shutdown, worker_results)

pytest.importorskip("diffusers")
pytest.importorskip("megatron.core")

TEXT_DIM = 16
# name -> (ParallelConfig fields, parallelize_wan keyword arguments)
LAYOUTS = {
    "tp2": (dict(tp=2), {}),
    "tp2_sp_checkpointed": (dict(tp=2, sp=True), dict(activation_checkpointing="full")),
    "cp2": (dict(cp=2), {}),
    "dp2_fsdp": (dict(dp_shard=-1), {}),
}


def make_model():
    from vidpo.models.wan import WanAdapter, tiny_wan_transformer

    model = WanAdapter(tiny_wan_transformer(text_dim=TEXT_DIM, num_layers=2, seed=3))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 8, 8, generator=g)        # (B, C, T, H, W): 4 frames x 16 tokens per frame
    t = torch.tensor([0.35, 0.8])
    cond = torch.randn(2, 3, TEXT_DIM, generator=g)
    w = torch.randn(2, 3, 4, 8, 8, generator=g)
    return x, t, cond, w


def check_layout(name, rank):
    from vidpo.training import distributed
    from vidpo.config import ParallelConfig
    from vidpo.models.wan.parallelize import parallelize_wan

    fields, kwargs = LAYOUTS[name]
    ctx = distributed.init_distributed(ParallelConfig(**fields))
    x, t, cond, w = make_inputs()
    reference = make_model()
    out_ref = reference(x, t, cond)
    (out_ref * w).sum().backward()
    grads_ref = {n: p.grad for n, p in reference.named_parameters()}

    model = parallelize_wan(make_model(), ctx, **kwargs)
    rows = slice(None)
    if ctx.dp > 1:
        rows = ctx.dp_rows(x.shape[0])
    frames = model.local_frames(x.shape[2]) if ctx.cp > 1 else slice(None)
    out = model(x[rows], t[rows], cond[rows])
    torch.testing.assert_close(out, out_ref[rows][:, :, frames], rtol=1e-5, atol=1e-5)
    (out * w[rows][:, :, frames]).sum().backward()

    params = dict(model.named_parameters())
    assert set(params) == set(grads_ref), "the parallel model renamed parameters"
    plan = model.tp_plan
    if ctx.tp > 1:   # every attention / FFN projection and QK norm is split, nothing outside the blocks
        split = {"ffn.net.0.proj.weight", "ffn.net.0.proj.bias", "ffn.net.2.weight"}
        for a in ("attn1", "attn2"):
            split |= {f"{a}.{m}.{leaf}" for m in ("to_q", "to_k", "to_v") for leaf in ("weight", "bias")}
            split |= {f"{a}.to_out.0.weight", f"{a}.norm_q.weight", f"{a}.norm_k.weight"}
        assert {n.split("blocks.0.", 1)[1] for n in plan if "blocks.0." in n} == split
        assert all(".blocks." in n for n in plan)
    for n, p in params.items():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if ctx.cp > 1:   # per-frame partial gradients: the training loop sums them over the CP ranks
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.cp_group)
        want = grads_ref[n]
        if n in plan:
            want = plan[n].shard(want, ctx.tp_rank, ctx.tp)
        assert grad.shape == want.shape, f"{name} {n}: {tuple(grad.shape)} vs {tuple(want.shape)}"
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {n}: {m}")
        assert want.abs().max() > 0, f"{n} has no gradient: the check would be vacuous"
    # Every layout samples whole clips through the sampler hook (under CP the frames are gathered at each step).
    one = cond[rows][:1]
    sample = model.sample(one, (3, 4, 8, 8), seed=0, indices=[0], steps=2, cfg_scale=3.0)
    want = reference.sample(one, (3, 4, 8, 8), seed=0, indices=[0], steps=2, cfg_scale=3.0)
    torch.testing.assert_close(sample, want, rtol=1e-4, atol=1e-4)


def check_unsupported(rank):
    from vidpo.training import distributed
    from vidpo.config import ParallelConfig
    from vidpo.models.lora import apply_lora
    from vidpo.models.wan import WanAdapter, tiny_wan_transformer
    from vidpo.models.wan.parallelize import parallelize_wan

    ctx = distributed.init_distributed(ParallelConfig(tp=2))
    lora = make_model()
    apply_lora(lora, rank=2, target_modules=["to_q"])
    with pytest.raises(NotImplementedError, match="LoRA"):
        parallelize_wan(lora, ctx)
    i2v = WanAdapter(tiny_wan_transformer(text_dim=TEXT_DIM))
    i2v.transformer.blocks[0].attn2.add_k_proj = torch.nn.Linear(4, 16)
    with pytest.raises(NotImplementedError, match="image-to-video"):
        parallelize_wan(i2v, ctx)


# ----- one training step through the engine (pipeline -> trainer -> DCP checkpoint) ------------------------------
# Full fine-tuning with a frozen reference copy; LoRA (attention) with the reference = adapters switched off.
VARIANTS = {"full": ["pref.reference=frozen_copy"],
            "lora": ["pref.reference=lora_disabled", "lora.rank=2", "lora.alpha=2.0",
                     'lora.target_modules=["to_q","to_k","to_v","to_out.0"]']}
# name -> (variant, parallel overrides)
TRAIN_LAYOUTS = {"train_tp2_sp": ("full", ["parallel.tp=2", "parallel.sp=true"]),
                 "train_cp2": ("full", ["parallel.cp=2"]),
                 "train_lora_dp2_fsdp": ("lora", ["parallel.dp_shard=2"])}


def train_config(prepared, variant, *extra):
    from vidpo.config import load_config

    # An lr that moves every weight, constant. No clipping: clipping would scale the smallest gradient elements
    # down to AdamW's eps, where its first step lr * g / (|g| + eps) turns fp32 summation-order differences
    # into visible update differences. The global norm (over TP shards and replicated weights) is compared.
    return load_config(None, prepared["micro"] + [
        "model.kind=wan", f"model.path={prepared['model_dir']}", f"pref.pairs={prepared['pairs']}",
        "train.objective=dense_dpo", *VARIANTS[variant], "train.max_steps=1", "train.ckpt_every=1",
        "train.lr=1e-2", "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.grad_clip=1e6",
        "train.batch_size=4", "flow.t_min=0.3", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import MICRO

    from vidpo.training.modeling import build_world
    from vidpo.models.adapters import TextConditioner
    from vidpo.models.wan import WanAdapter
    from vidpo.stages.generate import generate_pairs
    from vidpo.stages.label import label_pairs
    from vidpo.stages.pipeline import train_preference
    from vidpo.config import load_config

    root = tmp_path_factory.mktemp("wan_train")
    world = build_world(load_config(None, list(MICRO)))
    model = make_model()
    WanAdapter(model.transformer, TextConditioner.random(world.vocab_size, TEXT_DIM, seed=2)).save_pretrained(
        root / "wan")
    prepared = {"micro": list(MICRO), "model_dir": str(root / "wan"), "pairs": str(root / "pairs"), "root": root}
    cfg = train_config(prepared, "full")
    generate_pairs(cfg, root / "pairs")
    label_pairs(cfg, root / "pairs")
    for variant in VARIANTS:
        train_preference(train_config(prepared, variant), root / f"single_{variant}")
    return prepared


def train_layout(prepared, name):
    """One of the worker's training runs (TRAIN_LAYOUTS[name]), into ``<root>/<name>``."""
    from vidpo.stages.pipeline import train_preference

    variant, parallel = TRAIN_LAYOUTS[name]
    train_preference(train_config(prepared, variant, *parallel), prepared["root"] / name)


def worker(rank, port, result_dir, prepared=None):
    set_torchrun_env(rank, port, OMP_NUM_THREADS="1", VIDPO_DEVICE="cpu")
    with worker_results(rank, result_dir, teardown=vidpo_shutdown) as results:
        for name in LAYOUTS:
            record(results, name, check_layout, name, rank)
        record(results, "unsupported", check_unsupported, rank)
        for name in TRAIN_LAYOUTS:
            record(results, name, train_layout, prepared, name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared):
    return spawn_workers(worker, str(tmp_path_factory.mktemp("wan_parallel")), prepared)


@pytest.mark.parametrize("name", [*LAYOUTS, "unsupported"])
def test_parallel_wan_matches_single_process(runs, name):
    assert_all_ranks_ok(runs, name)


@pytest.mark.parametrize("name", list(TRAIN_LAYOUTS))
def test_parallel_wan_training_step_matches_one_process(runs, prepared, name):
    assert_all_ranks_ok(runs, name)
    variant = TRAIN_LAYOUTS[name][0]
    assert_step_matches_one_process(prepared["root"] / f"single_{variant}", prepared["root"] / name,
                                    make_model().state_dict(), lora=variant == "lora", what=name)


def test_single_process_parallel_form_is_the_diffusers_model():
    """Without process groups the parallel modules reduce to the diffusers computation (same names, outputs)."""
    from vidpo.models.dit.parallelize import ShardSpec
    from vidpo.models.wan.parallelize import ParallelWanAdapter, ParallelWanTransformer

    reference = make_model()
    model = make_model()
    model = ParallelWanAdapter(model, ParallelWanTransformer(model.transformer, ShardSpec()))
    x, t, cond, _ = make_inputs()
    assert torch.equal(model(x, t, cond), reference(x, t, cond))
    # Same names in the same order (a checkpoint's index-keyed optimizer state relies on the order).
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
