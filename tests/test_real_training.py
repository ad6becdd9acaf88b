"""Training real (diffusers) models: each in its own forward process, with the recipe's activation checkpointing,
and exported where diffusers loads it.

* SFT on cached latents (``vidpo.objectives.latent_sft``) trains CogVideoX on its v-prediction DDPM: the loss and
  gradients equal a float64 computation with the scheduler's own ``add_noise`` / ``get_velocity`` and diffusers'
  transformer called directly, also through ``vidpo train``; the DiT keeps the rectified flow exactly.
* ``parallel.activation_checkpointing: full`` in one process (``vidpo.training.policy.prepare_policy``): every
  block of both Wan 2.2 experts (and of the DiT) runs again in the backward pass, with the same loss and gradients.
* A full fine-tune exports ``OUT/transformer/`` (+ ``OUT/transformer_2/``) (``vidpo.training.export``):
  ``WanTransformer3DModel.from_pretrained`` gives the trained weights and outputs, after a whole ``vidpo run`` over a
  Wan 2.2 two-expert release in one process, and from the consolidated checkpoint of a 2-process (TP=2) run.
"""
import contextlib
import copy
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.func import functional_call  # noqa: E402

pytest.importorskip("diffusers")

from helpers.distributed import assert_all_ranks_ok, record, set_torchrun_env, spawn_workers  # noqa: E402
from helpers.distributed import vidpo_shutdown, worker_results  # noqa: E402
from helpers.models import TEXT_DIM, TEXT_LEN, perturb_seeded_, save_perturbed_base, tiny_cogvideox  # noqa: E402
from helpers.pipelines import PROMPTS_FOR_TESTS, diffusers_pipeline, make_wan_dir  # noqa: E402
from helpers.runs import train_rows  # noqa: E402
from helpers.tolerances import ADAMW_FIRST_STEP, assert_close  # noqa: E402
from vidpo import kernels  # noqa: E402
from vidpo.config import load_config  # noqa: E402
from vidpo.data.latents import FORMAT  # noqa: E402
from vidpo.models import flow  # noqa: E402
from vidpo.objectives.latent_sft import LatentSFTObjective  # noqa: E402
from vidpo.training import checkpoint as ckpt  # noqa: E402
from vidpo.training.policy import prepare_policy  # noqa: E402
from vidpo.utils.seeding import generator  # noqa: E402

CPU = torch.device("cpu")
LATENT = (4, 4, 8, 8)          # the tiny CogVideoX's latent clip (C, T, H, W)


# ----- SFT on cached latents in the model's own process ---------------------------------------------------------
def write_latent_cache(root, rows=(3, 3), seed=0):
    """A `vidpo cache` directory (its documented format) of random latents LATENT and text (TEXT_LEN, TEXT_DIM)."""
    g = torch.Generator().manual_seed(seed)
    (root / "shards").mkdir(parents=True)
    shards, start = [], 0
    for k, n in enumerate(rows):
        name = f"shards/shard_{k:05d}.safetensors"
        save_file({"latents": torch.randn(n, *LATENT, generator=g), "text_emb": torch.randn(n, TEXT_LEN, TEXT_DIM,
                                                                                           generator=g),
                   "text_mask": torch.ones(n, TEXT_LEN, dtype=torch.bool)}, str(root / name))
        shards.append({"file": name, "rows": n, "clip_ids": [f"clip{i}" for i in range(start, start + n)]})
        start += n
    (root / "index.json").write_text(json.dumps({
        "format": FORMAT, "num_samples": start, "latent_shape": list(LATENT), "text_shape": [TEXT_LEN, TEXT_DIM],
        "dtype": "float32", "shards": shards, "skipped": []}))
    return root


def latent_cfg(cache, *extra):
    return load_config(None, ["data.source=latents", f"data.shards={cache}", "train.batch_size=3", "seed=5",
                              "flow.t_min=0.2", "flow.t_max=0.9", "flow.cond_dropout=0.3", "data.shuffle=true",
                              *extra])


def cogvideox_model(seed=1):
    """The tiny CogVideoX adapter (2 layers) with every parameter moved off its (partly zero) initialisation."""
    return perturb_seeded_(tiny_cogvideox(in_channels=LATENT[0], frames=LATENT[1], size=LATENT[2], num_layers=2,
                                          seed=seed), 0.1, seed=seed + 7)


def float64_v_prediction_loss(model, batch):
    """mean((v_theta(x_k, k, c) - v)^2) in float64: x_k and v from the scheduler's own ``add_noise`` /
    ``get_velocity`` at the integer timesteps k = t * 999, diffusers' transformer called directly on (B, T, C, H, W).
    Returns (loss, {name: float64 parameter}) for the gradients."""
    scheduler = copy.deepcopy(model.scheduler)
    k = torch.round(batch["t"].double() * 999).long()
    x0, eps = batch["x0"].double(), batch["noise"].double()
    x_k, v = scheduler.add_noise(x0, eps, k), scheduler.get_velocity(x0, eps, k)
    plain = copy.deepcopy(model.transformer).double()
    weights = {n: p.detach().double().requires_grad_(True) for n, p in plain.named_parameters()}
    out = functional_call(plain, weights, (), dict(hidden_states=x_k.permute(0, 2, 1, 3, 4), timestep=k,
                                                   encoder_hidden_states=batch["cond"].double(), return_dict=False))[0]
    loss = ((out.permute(0, 2, 1, 3, 4) - v) ** 2).mean()
    return loss, weights


def test_latent_sft_trains_cogvideox_on_its_v_prediction_ddpm(tmp_path):
    cfg = latent_cfg(write_latent_cache(tmp_path / "cache"))
    model = cogvideox_model()
    objective = LatentSFTObjective(cfg, CPU, process=model)
    try:
        batch = objective.micro_batch(0, 0)
    finally:
        objective.close()
    # every draw from its sample's stream, the timesteps the adapter's: integer DDPM steps in [t_min, t_max]
    for row, position in enumerate(batch["positions"].tolist()):
        g = generator(cfg.seed, "latent_sft", position)
        assert torch.equal(batch["t"][row:row + 1], model.sample_timesteps(1, g, cfg.flow))
        assert torch.equal(batch["noise"][row], torch.randn(LATENT, generator=g))
    k = torch.round(batch["t"].double() * 999)
    assert torch.equal(k.div(999).float(), batch["t"]) and k.min() >= 200 and k.max() <= 899

    loss, _ = objective.loss(model, batch)
    loss.backward()
    ref_loss, weights = float64_v_prediction_loss(model, batch)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    for name, p in model.transformer.named_parameters():
        torch.testing.assert_close(p.grad.double(), weights[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # the rectified flow would train something else (the check is not vacuous)
    flow_loss = kernels.flow_matching_loss(
        model(flow.interpolate(batch["x0"], batch["noise"], batch["t"]), batch["t"], batch["cond"]).float(),
        flow.velocity_target(batch["x0"], batch["noise"]))
    assert abs(flow_loss.item() - loss.item()) > 1e-2 * loss.item()


def test_vidpo_train_on_latents_passes_the_model_its_process(tmp_path):
    """``vidpo train`` (data.source latents) over a CogVideoX model directory: the first logged loss is the
    v-prediction loss of the first batch under the initial weights."""
    from vidpo.models.cogvideox import CogVideoXAdapter
    from vidpo.stages.jobs import train_job

    cache = write_latent_cache(tmp_path / "cache")
    cogvideox_model().save_pretrained(tmp_path / "cog")
    cfg = latent_cfg(cache, "model.kind=cogvideox", f"model.path={tmp_path / 'cog'}", "train.max_steps=1",
                     "train.log_every=1", "train.progress=false")
    summary = train_job(cfg, tmp_path / "run", resume=False)
    assert summary["steps"] == 1
    model = CogVideoXAdapter.from_pretrained(tmp_path / "cog")
    objective = LatentSFTObjective(cfg, CPU, process=model)
    try:
        want, _ = objective.loss(model, objective.micro_batch(0, 0))
    finally:
        objective.close()
    (row,) = train_rows(tmp_path / "run")
    assert row["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_latent_sft_keeps_the_rectified_flow_for_the_dit(tmp_path):
    from vidpo.training.modeling import build_policy

    cfg = latent_cfg(write_latent_cache(tmp_path / "cache"), "model.width=32", "model.depth=1", "model.num_heads=2")
    model = perturb_seeded_(build_policy(cfg, None), 0.05, seed=3)
    objective = LatentSFTObjective(cfg, CPU, process=model)
    try:
        batch = objective.micro_batch(0, 0)
    finally:
        objective.close()
    assert objective.process is None
    f = cfg.flow
    for row, position in enumerate(batch["positions"].tolist()):
        g = generator(cfg.seed, "latent_sft", position)
        assert torch.equal(batch["t"][row:row + 1], flow.sample_timesteps(
            1, g, logit_mean=f.logit_mean, logit_std=f.logit_std, t_min=f.t_min, t_max=f.t_max))
    loss, _ = objective.loss(model, batch)
    x_t = flow.interpolate(batch["x0"], batch["noise"], batch["t"])
    want = kernels.flow_matching_loss(model(x_t, batch["t"], batch["cond"]).float(),
                                      flow.velocity_target(batch["x0"], batch["noise"]).float())
    assert torch.equal(loss, want)


# ----- activation checkpointing from the recipe, in one process ---------------------------------------------------
def _blocks(model):
    """Every transformer block of the policy: both experts' of a Wan adapter, the DiT's."""
    if hasattr(model, "experts"):
        return [block for _, expert in model.experts() for block in expert.blocks]
    return list(model.blocks)


@contextlib.contextmanager
def counting_block_calls(model):
    """Counts the forward calls of every block (module hooks do not run when checkpointing recomputes a block, so
    each block's ``forward`` is wrapped)."""
    calls = []
    blocks = _blocks(model)
    for block in blocks:
        def forward(*args, _forward=block.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)
        block.forward = forward
    try:
        yield calls
    finally:
        for block in blocks:
            del block.forward


def _loss_grads_and_block_calls(model, x, t, cond, target):
    with counting_block_calls(model) as calls:
        loss = ((model(x, t, cond).float() - target) ** 2).mean()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("variant", ["wan2.2-full", "wan2.2-lora", "dit"])
def test_activation_checkpointing_in_one_process_same_loss_and_gradients(tmp_path, micro_overrides, variant):
    world = None
    if variant == "dit":
        from vidpo.training.modeling import build_world

        cfg = load_config(None, micro_overrides)
        world = build_world(cfg)
        base = save_perturbed_base(cfg, tmp_path / "base.safetensors")
        args = micro_overrides + [f"train.init_from={base}"]
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 3, 4, 8, 8, generator=g), torch.tensor([0.9, 0.3])
        cond = torch.randint(1, 4, (2, 3), generator=g)
    else:
        model_dir = make_wan_dir(tmp_path / "wan", two_experts=True, num_layers=2)
        args = ["model.kind=wan", f"model.path={model_dir}"]
        if variant.endswith("lora"):
            args += ["lora.rank=2", "lora.alpha=2.0", 'lora.target_modules=["to_q","to_v","ffn.net.2"]']
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 16, 3, 4, 4, generator=g), torch.tensor([0.95, 0.3])   # a row per expert
        cond = torch.randn(2, 8, TEXT_DIM, generator=g)
    target = torch.randn(x.shape, generator=g)
    plain, _, _, _ = prepare_policy(load_config(None, args), world, CPU)
    checkpointed, reference, _, _ = prepare_policy(
        load_config(None, args + ["parallel.activation_checkpointing=full"]), world, CPU)
    if variant.endswith("lora"):   # adapters with B != 0, the same in both models
        checkpointed.load_state_dict(perturb_seeded_(plain, 0.1, seed=4).state_dict())
    loss, grads, calls = _loss_grads_and_block_calls(plain, x, t, cond, target)
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_grads_and_block_calls(checkpointed, x, t, cond, target)
    n_blocks = len(_blocks(plain))
    assert calls == n_blocks and calls_ckpt == 2 * n_blocks    # every block recomputed in the backward pass
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    assert grads and set(grads_ckpt) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    if variant.endswith("lora"):
        assert all(".lora_" in name for name in grads)
    with counting_block_calls(checkpointed) as calls:   # the reference computes no gradients: nothing to recompute
        reference(x, t, cond)
    assert len(calls) == (n_blocks if variant.endswith("lora") else 0)   # LoRA off, or a frozen copy


# ----- full fine-tuning exports a transformer diffusers loads ------------------------------------------------------
def full_recipe(path, *extra_sections) -> str:
    """recipes/wan/tiny_cpu.yaml without its lora section: a full fine-tune against a frozen reference."""
    with open("recipes/wan/tiny_cpu.yaml") as f:
        recipe = yaml.safe_load(f)
    recipe.pop("lora")
    recipe["pref"]["reference"] = "frozen_copy"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def wan_forward(transformer, x, t, cond):
    """A diffusers Wan transformer called as WanPipeline calls it, at engine time t (timestep 1000 t)."""
    return transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond, return_dict=False)[0]


@pytest.fixture(scope="module")
def vlm():
    from helpers.vlm_server import FakeVLM, Reply, brightness_verdict

    server = FakeVLM()
    server.behaviour = lambda request: Reply(text=brightness_verdict(request, margin=0.5))
    yield server
    server.close()


def test_full_fine_tune_exports_transformers_diffusers_loads(tmp_path, vlm):
    """A whole ``vidpo run`` over a Wan 2.2 two-expert release and a prompt file, no LoRA: OUT/transformer and
    OUT/transformer_2 load with ``WanTransformer3DModel.from_pretrained`` into the release's pipeline and hold the
    trained policy's weights and outputs."""
    from diffusers import WanTransformer3DModel
    from helpers.video import encode_clip, make_frames

    from vidpo.cli import main as cli
    from vidpo.training.modeling import build_policy

    rows = []
    for i, text in enumerate(PROMPTS_FOR_TESTS[:6]):
        clip = encode_clip(tmp_path / "clips" / f"c{i}", make_frames(12, 40, 48), "h264", fps=8)
        rows.append({"id": f"p{i}", "prompt": text, "clip": str(clip)})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = make_wan_dir(tmp_path / "wan", two_experts=True, prompts=PROMPTS_FOR_TESTS)
    out = tmp_path / "run"
    args = ["run", full_recipe(tmp_path / "recipe.yaml"), "--out", str(out)]
    for item in (f"model.path={model_dir}", f"prompts.path={tmp_path / 'prompts.jsonl'}", "prompts.heldout_fraction=0",
                 f"label.vlm.base_url={vlm.base_url}", "generate.heldout_pairs=0", "eval.judge=none",
                 "train.max_steps=2", "flow.t_min=0.0"):
        args += ["--set", item]
    assert cli(args) == 0
    assert not (out / "lora").exists() and json.loads((out / "summary.json").read_text())["train"]["steps"] == 2

    cfg = load_config(out / "config.yaml")
    policy = build_policy(cfg, None, CPU)
    ckpt.load_weights(policy, out)
    pipe = diffusers_pipeline(model_dir)
    moved = 0
    for name, expert in policy.experts():
        exported = WanTransformer3DModel.from_pretrained(str(out / name), local_files_only=True)
        got, want, base = exported.state_dict(), expert.state_dict(), getattr(pipe, name).state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), name
        moved += any(not torch.equal(want[k], base[k]) for k in want)
        setattr(pipe, name, exported)
    assert moved >= 1   # training changed the weights: the comparison is not with the release itself
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 8, TEXT_DIM, generator=g)
    t = torch.tensor([0.95, 0.3])   # one row per expert (boundary 0.875)
    with torch.no_grad():
        got = policy(x, t, cond)
        want = torch.cat([wan_forward(pipe.transformer, x[:1], t[:1], cond[:1]),
                          wan_forward(pipe.transformer_2, x[1:], t[1:], cond[1:])])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def tp2_worker(rank, port, result_dir, prepared):
    from helpers.parallel import CASES, train_layout

    set_torchrun_env(rank, port, OMP_NUM_THREADS="1", VIDPO_DEVICE="cpu")
    with worker_results(rank, result_dir, teardown=vidpo_shutdown) as results:
        record(results, "train_tp2_sp", train_layout, CASES["wan"], prepared, "train_tp2_sp")


def test_multi_process_full_fine_tune_exports_the_consolidated_transformer(tmp_path_factory):
    """2 gloo processes (TP=2 + SP) train a tiny Wan one DenseDPO step; rank 0 exports OUT/transformer from the
    consolidated checkpoint: diffusers loads exactly those weights, which equal the one-process run's export up
    to AdamW's first-step tolerance, and its outputs are the engine's on the checkpoint."""
    pytest.importorskip("megatron.core")
    from diffusers import WanTransformer3DModel
    from helpers.parallel import CASES, prepare

    from vidpo.models.wan import WanAdapter

    root = tmp_path_factory.mktemp("wan_train")
    prepared = prepare(CASES["wan"], root)
    verdicts = spawn_workers(tp2_worker, str(tmp_path_factory.mktemp("wan_tp2")), prepared)
    assert_all_ranks_ok(verdicts, "train_tp2_sp")
    run, single = root / "train_tp2_sp", root / "single_full"
    consolidated = load_file(str(ckpt.find_weights(run)))
    exported = WanTransformer3DModel.from_pretrained(str(run / "transformer"), local_files_only=True)
    state = exported.state_dict()
    assert set(state) == {k.removeprefix("transformer.") for k in consolidated if k.startswith("transformer.")}
    assert all(torch.equal(state[k], consolidated[f"transformer.{k}"]) for k in state)
    one_process = WanTransformer3DModel.from_pretrained(str(single / "transformer"), local_files_only=True)
    start = WanAdapter.from_pretrained(prepared["model_dir"]).transformer.state_dict()
    for key, want in one_process.state_dict().items():
        assert not torch.equal(want, start[key]), f"{key} did not move: the comparison would be vacuous"
        assert_close(state[key], want, ADAMW_FIRST_STEP, key)
    engine = WanAdapter.from_pretrained(prepared["model_dir"])
    missing, unexpected = engine.load_state_dict(consolidated, strict=False)
    assert not unexpected and set(missing) <= {"conditioner.table"}   # a buffer: consolidated are the parameters
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 3, 4, 8, 8, generator=g), torch.tensor([0.35, 0.8]), torch.randn(2, 3, TEXT_DIM,
                                                                                                 generator=g)
    with torch.no_grad():
        torch.testing.assert_close(wan_forward(exported, x, t, cond), engine(x, t, cond), rtol=0, atol=0)
