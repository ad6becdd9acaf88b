"""CogVideoX parallelized (``vidpo.models.cogvideox.parallelize``) against the single-process diffusers model, with 2
real gloo processes on CPU: forward outputs and every parameter gradient under TP=2 (with activation
checkpointing), CP=2 (Ulysses over the video stream, the text stream replicated) and DP=2 sharded (FSDP2), for the
2B layout (sincos positions), the 5B layout (3-D RoPE) and the 1.5 layout (RoPE, 2-frame temporal patches); then
one DenseDPO training step of ``vidpo train`` (``model.kind=cogvideox``) against the same step in one process
(loss, gradient norm, updated weights): full fine-tuning with a frozen reference under TP=2 and CP=2, LoRA
(reference = adapters off) under DP=2 FSDP.

What each rank's gradient must equal (as for Wan, ``tests/test_wan_parallel.py``): TP ranks compute the global
loss, so replicated parameters carry the full gradient and split ones this rank's TPShard of it; each CP rank's
loss covers its own frames, so the gradients summed over the CP ranks are the full ones; FSDP ranks take one batch
row each and FSDP sums the gradients into this rank's shard.
"""
import pytest
import torch
import torch.distributed as dist
from dist_utils import (assert_all_ranks_ok, assert_step_matches_one_process, record, set_torchrun_env, spawn_workers,
                        vidpo_shutdown, worker_results)

pytest.importorskip("diffusers")
pytest.importorskip("megatron.core")

TEXT_DIM, TEXT_LEN = 16, 3
# name -> (model layout, ParallelConfig fields, parallelize_cogvideox keyword arguments)
LAYOUTS = {
    "tp2_checkpointed_2b": ("2b", dict(tp=2), dict(activation_checkpointing="full")),
    "cp2_2b": ("2b", dict(cp=2), {}),
    "dp2_fsdp_2b": ("2b", dict(dp_shard=-1), {}),
    "tp2_5b": ("5b", dict(tp=2), {}),
    "cp2_5b": ("5b", dict(cp=2), {}),
    "cp2_1.5": ("1.5", dict(cp=2), {}),
}


def make_model(layout="2b", channels=4):
    from vidpo.models.cogvideox import CogVideoXAdapter, tiny_cogvideox_transformer

    model = CogVideoXAdapter(tiny_cogvideox_transformer(in_channels=channels, text_dim=TEXT_DIM, text_len=TEXT_LEN,
                                                        frames=4, size=8, num_layers=2, seed=3, layout=layout))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():   # every norm weight away from 1, every bias away from 0: a wrong shard shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 4, 8, 8, generator=g)        # (B, C, T, H, W): 4 latent frames x 16 tokens per frame
    t = torch.tensor([0.35, 0.8])
    cond = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)
    w = torch.randn(2, 4, 4, 8, 8, generator=g)
    return x, t, cond, w


def check_layout(name, rank):
    from vidpo.training import distributed
    from vidpo.config import ParallelConfig
    from vidpo.models.cogvideox.parallelize import parallelize_cogvideox

    layout, fields, kwargs = LAYOUTS[name]
    ctx = distributed.init_distributed(ParallelConfig(**fields))
    x, t, cond, w = make_inputs()
    reference = make_model(layout)
    out_ref = reference(x, t, cond)
    (out_ref * w).sum().backward()
    grads_ref = {n: p.grad for n, p in reference.named_parameters()}

    model = parallelize_cogvideox(make_model(layout), ctx, **kwargs)
    rows = ctx.dp_rows(x.shape[0]) if ctx.dp > 1 else slice(None)
    frames = model.local_frames(x.shape[2]) if ctx.cp > 1 else slice(None)
    out = model(x[rows], t[rows], cond[rows])
    torch.testing.assert_close(out, out_ref[rows][:, :, frames], rtol=1e-5, atol=1e-5)
    (out * w[rows][:, :, frames]).sum().backward()

    params = dict(model.named_parameters())
    assert list(params) == list(grads_ref), "the parallel model renamed or reordered parameters"
    plan = model.tp_plan
    if ctx.tp > 1:   # the attention / FFN projections are split, nothing outside the blocks
        split = {f"attn1.{m}.{leaf}" for m in ("to_q", "to_k", "to_v") for leaf in ("weight", "bias")}
        split |= {"attn1.to_out.0.weight", "ff.net.0.proj.weight", "ff.net.0.proj.bias", "ff.net.2.weight"}
        assert {n.split("transformer_blocks.0.", 1)[1] for n in plan if "transformer_blocks.0." in n} == split
        assert all(".transformer_blocks." in n for n in plan)
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
    # Every layout samples whole clips through the sampler hook (under CP the frames are gathered at each step).
    one = cond[rows][:1]
    sample = model.sample(one, (4, 4, 8, 8), seed=0, indices=[0], steps=2, cfg_scale=3.0)
    want = reference.sample(one, (4, 4, 8, 8), seed=0, indices=[0], steps=2, cfg_scale=3.0)
    torch.testing.assert_close(sample, want, rtol=1e-4, atol=1e-4)


def check_unsupported(rank):
    from vidpo.training import distributed
    from vidpo.config import ParallelConfig
    from vidpo.models.cogvideox.parallelize import parallelize_cogvideox
    from vidpo.models.lora import apply_lora

    ctx = distributed.init_distributed(ParallelConfig(tp=2))
    lora = make_model()
    apply_lora(lora, rank=2, target_modules=["to_q"])
    with pytest.raises(NotImplementedError, match="LoRA"):
        parallelize_cogvideox(lora, ctx)
    ctx = distributed.init_distributed(ParallelConfig(tp=2, sp=True))
    with pytest.raises(NotImplementedError, match="sequence parallel"):
        parallelize_cogvideox(make_model(), ctx)


# ----- one training step through the engine (pipeline -> trainer -> DCP checkpoint) ------------------------------
VARIANTS = {"full": ["pref.reference=frozen_copy"],
            "lora": ["pref.reference=lora_disabled", "lora.rank=2", "lora.alpha=2.0",
                     'lora.target_modules=["to_q","to_k","to_v","to_out.0"]']}
# name -> (variant, parallel overrides)
TRAIN_LAYOUTS = {"train_tp2": ("full", ["parallel.tp=2"]),
                 "train_cp2": ("full", ["parallel.cp=2"]),
                 "train_lora_dp2_fsdp": ("lora", ["parallel.dp_shard=2"])}


def train_config(prepared, variant, *extra):
    from vidpo.config import load_config

    # As tests/test_wan_parallel.py: an lr that moves every weight, constant, no clipping.
    return load_config(None, prepared["micro"] + [
        "model.kind=cogvideox", f"model.path={prepared['model_dir']}", f"pref.pairs={prepared['pairs']}",
        "train.objective=dense_dpo", *VARIANTS[variant], "train.max_steps=1", "train.ckpt_every=1",
        "train.lr=1e-2", "train.warmup_steps=0", "train.min_lr_ratio=1.0", "train.grad_clip=1e6",
        "train.batch_size=4", "flow.t_min=0.3", *extra])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from conftest import MICRO

    from vidpo.training.modeling import build_world
    from vidpo.models.adapters import TextConditioner
    from vidpo.models.cogvideox import CogVideoXAdapter
    from vidpo.stages.generate import generate_pairs
    from vidpo.stages.label import label_pairs
    from vidpo.stages.pipeline import train_preference
    from vidpo.config import load_config

    root = tmp_path_factory.mktemp("cogvideox_train")
    world = build_world(load_config(None, list(MICRO)))
    model = make_model(channels=3)   # the shapes world's RGB clips stand in for latents
    CogVideoXAdapter(model.transformer, TextConditioner.random(world.vocab_size, TEXT_DIM, seed=2)).save_pretrained(
        root / "cogvideox")
    prepared = {"micro": list(MICRO), "model_dir": str(root / "cogvideox"), "pairs": str(root / "pairs"),
                "root": root}
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
    return spawn_workers(worker, str(tmp_path_factory.mktemp("cogvideox_parallel")), prepared)


@pytest.mark.parametrize("name", [*LAYOUTS, "unsupported"])
def test_parallel_cogvideox_matches_single_process(runs, name):
    assert_all_ranks_ok(runs, name)


@pytest.mark.parametrize("name", list(TRAIN_LAYOUTS))
def test_parallel_cogvideox_training_step_matches_one_process(runs, prepared, name):
    assert_all_ranks_ok(runs, name)
    variant = TRAIN_LAYOUTS[name][0]
    # Adding one vector to every key shifts each query's logits by a constant, which softmax ignores: the key
    # norm's bias has a gradient of 0 up to rounding, which AdamW's first step (lr g / (|g| + eps)) amplifies.
    assert_step_matches_one_process(prepared["root"] / f"single_{variant}", prepared["root"] / name,
                                    make_model(channels=3).state_dict(), lora=variant == "lora", what=name,
                                    ignore=lambda key: key.endswith("attn1.norm_k.bias"))


@pytest.mark.parametrize("layout", ["2b", "5b", "1.5"])
def test_single_process_parallel_form_is_the_diffusers_model(layout):
    """Without process groups the parallel modules reduce to the diffusers computation (same names, order,
    outputs)."""
    from vidpo.models.cogvideox.parallelize import ParallelCogVideoXAdapter, ParallelCogVideoXTransformer
    from vidpo.models.dit.parallelize import ShardSpec

    reference = make_model(layout)
    model = make_model(layout)
    model = ParallelCogVideoXAdapter(model, ParallelCogVideoXTransformer(model.transformer, ShardSpec()))
    x, t, cond, _ = make_inputs()
    torch.testing.assert_close(model(x, t, cond), reference(x, t, cond), rtol=0, atol=0)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    with pytest.raises(NotImplementedError, match="into a CogVideoXAdapter"):
        model.save_pretrained("unused")
