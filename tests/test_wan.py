"""Wan 2.1 through diffusers: the adapter against the diffusers model called directly, LoRA export
into diffusers, the flow-match sampler, and `vidpo run` with a tiny Wan directory."""
import json

import pytest
import torch
from torch.func import functional_call

pytest.importorskip("diffusers")

from helpers.models import TEXT_DIM, TEXT_LEN, add_random_lora, tiny_wan  # noqa: E402
from vidpo.config import RunConfig  # noqa: E402
from vidpo.data.pairs import PairRecord  # noqa: E402
from vidpo.models.adapters import ATTENTION_LORA_TARGETS, TextConditioner  # noqa: E402
from vidpo.models.lora import lora_disabled, lora_modules, merge_lora  # noqa: E402
from vidpo.models.wan import WanAdapter, make_tiny_wan_dir, tiny_wan_transformer  # noqa: E402
from vidpo.objectives.preference import PreferenceObjective  # noqa: E402


def lora_wan(seed=0, num_layers=1):
    """A tiny Wan adapter with attention + MLP LoRA whose B factors are non-zero (so policy != reference)."""
    return add_random_lora(tiny_wan(num_layers=num_layers, seed=seed), rank=2, alpha=3.0,
                           target_modules=[*ATTENTION_LORA_TARGETS, "ffn.net.2"], seed=seed + 7)


def dpo_batch(seed=0, pairs=2, segments=2):
    g = torch.Generator().manual_seed(seed)
    shape = (pairs, 3, 4, 8, 8)
    return {"first": torch.randn(shape, generator=g), "second": torch.randn(shape, generator=g),
            "noise": torch.randn(shape, generator=g), "t": torch.rand(pairs, generator=g) * 0.8 + 0.1,
            "tokens": torch.randn(pairs, TEXT_LEN, TEXT_DIM, generator=g),
            "labels": torch.tensor([[1, -1], [0, 1]])[:pairs, :segments]}


def engine_loss(model, batch, process):
    cfg = RunConfig()
    cfg.train.objective = "dense_dpo"
    cfg.pref.beta = 50.0
    cfg.pref.loss_backend = "torch"
    records = [PairRecord(pair_id="p0", shard="s", row=0, cond_ids=[0, 0, 0], labels=[1, 1], video_label=1)]

    def reference(x, t, c):
        with torch.no_grad(), lora_disabled(model):
            return model(x, t, c)
    objective = PreferenceObjective(cfg, None, torch.device("cpu"), records, None, torch.tensor([0, 0, 1, 1]),
                                    reference, process=process)
    loss, _ = objective.loss(model, batch)
    return loss


def direct_diffusers_loss(model, batch, beta=50.0):
    """The same DenseDPO step computed from scratch in float64: the diffusers transformer called directly
    (timestep = 1000 t) with functional weights W + (alpha/r) B A, the reference with the base weights."""
    base = {k: v.double() for k, v in model.transformer.state_dict().items() if ".lora_" not in k}
    factors = {}
    for name, m in lora_modules(model.transformer):
        a = m.lora_A.weight.detach().double().requires_grad_(True)
        b = m.lora_B.weight.detach().double().requires_grad_(True)
        factors[name] = (a, b, m.scaling)
    plain = tiny_wan_transformer(text_dim=TEXT_DIM, num_layers=len(model.transformer.blocks)).double()
    policy = dict(base)
    for name, (a, b, s) in factors.items():
        policy[f"{name}.weight"] = base[f"{name}.weight"] + s * b @ a
    x0 = torch.cat([batch["first"], batch["second"]]).double()
    noise = torch.cat([batch["noise"], batch["noise"]]).double()
    t = torch.cat([batch["t"], batch["t"]]).double()
    emb = torch.cat([batch["tokens"], batch["tokens"]]).double()
    tb = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * noise

    def call(weights):
        return functional_call(plain, weights, (), dict(hidden_states=x_t, timestep=1000 * t,
                                                        encoder_hidden_states=emb, return_dict=False))[0]
    target = noise - x0
    err_theta = (call(policy) - target) ** 2
    with torch.no_grad():
        err_ref = (call(base) - target) ** 2
    seg = torch.tensor([0, 0, 1, 1])
    per_seg = lambda e: torch.stack([e[:, :, seg == s].mean(dim=(1, 2, 3, 4)) for s in range(2)], 1)  # noqa: E731
    d = per_seg(err_theta) - per_seg(err_ref)
    n = len(batch["t"])
    labels = batch["labels"].double()
    losses = -torch.nn.functional.logsigmoid(-beta / 2 * labels * (d[:n] - d[n:]))
    weight = (labels != 0).double() * 2  # 2 latent frames per segment: token-weighted mean over non-ties
    loss = (losses * weight).sum() / weight.sum()
    loss.backward()
    return loss, {name: (a.grad, b.grad) for name, (a, b, _) in factors.items()}


@pytest.mark.parametrize("use_process", [True, False], ids=["adapter_target", "fused_x0_noise"])
def test_dpo_step_matches_diffusers_called_directly(use_process):
    model = lora_wan(seed=1)
    batch = dpo_batch()
    loss = engine_loss(model, batch, model if use_process else None)
    loss.backward()
    ref_loss, ref_grads = direct_diffusers_loss(model, batch)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_loss.item() > 1e-3
    for name, m in lora_modules(model.transformer):
        ga, gb = ref_grads[name]
        torch.testing.assert_close(m.lora_A.weight.grad.double(), ga, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.lora_B.weight.grad.double(), gb, rtol=1e-4, atol=1e-6)
    assert any(m.lora_A.weight.grad.abs().max() > 0 for _, m in lora_modules(model))


def test_adapter_is_the_rectified_flow_and_maps_time():
    model = tiny_wan()
    x0, noise, t = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8), torch.tensor([0.25, 0.9])
    torch.testing.assert_close(model.interpolate(x0, noise, t), (1 - t.view(-1, 1, 1, 1, 1)) * x0
                               + t.view(-1, 1, 1, 1, 1) * noise)
    torch.testing.assert_close(model.training_target(x0, noise, t), noise - x0)
    emb = torch.randn(2, TEXT_LEN, TEXT_DIM)
    direct = model.transformer(hidden_states=x0, timestep=t * 1000, encoder_hidden_states=emb, return_dict=False)[0]
    assert torch.equal(model(x0, t, emb), direct)
    # token-id conditions go through the TextConditioner; id 0 is the all-zero null embedding
    conditioned = WanAdapter(model.transformer, TextConditioner.random(5, TEXT_DIM, seed=3))
    tokens = torch.tensor([[1, 2, 3], [4, 1, 2]])
    assert torch.equal(conditioned(x0, t, tokens), model(x0, t, conditioned.conditioner(tokens)))
    assert torch.equal(conditioned.conditioner(conditioned.null_condition(tokens)), torch.zeros(2, 3, TEXT_DIM))


def test_flow_match_sampler_is_euler_over_the_scheduler_sigmas_with_cfg():
    model = tiny_wan(sample_shift=3.0)
    cond = torch.randn(2, TEXT_LEN, TEXT_DIM)
    out = model.sample(cond, (3, 4, 8, 8), seed=5, indices=[3, 9], steps=4, cfg_scale=4.0)
    from vidpo.utils.seeding import randn_per_sample

    x = randn_per_sample((2, 3, 4, 8, 8), 5, [3, 9], "sample").double()
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas.double()  # shifted (shift 3) grid ending at 0; timestep = 1000 sigma
    assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == 5
    torch.testing.assert_close(scheduler.timesteps.double() / 1000, sigmas[:-1])
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((2,), float(s))
            v_c, v_u = model(x.float(), t, cond).double(), model(x.float(), t, torch.zeros_like(cond)).double()
            x = x + (s_next - s) * (v_u + 4.0 * (v_c - v_u))
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)


def test_exported_lora_loads_into_diffusers_pipeline_and_matches_merged_model(tmp_path):
    pytest.importorskip("peft")
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    model = lora_wan(seed=2, num_layers=2)
    base_dir = tmp_path / "base"
    model.transformer.save_pretrained(base_dir)  # LoRALinear keeps base keys: this is the plain base model
    path = model.export_lora(tmp_path / "lora.safetensors")
    x, t, emb = torch.randn(1, 3, 4, 8, 8), torch.tensor([0.6]), torch.randn(1, TEXT_LEN, TEXT_DIM)
    with torch.no_grad():
        with lora_disabled(model):
            base_out = model(x, t, emb)
        merge_lora(model)
        merged_out = model(x, t, emb)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=WanTransformer3DModel.from_pretrained(base_dir, local_files_only=True))
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        loaded = pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=emb, return_dict=False)[0]
    assert (merged_out - base_out).abs().max() > 1e-3  # the adapters change the output
    torch.testing.assert_close(loaded, merged_out, rtol=1e-5, atol=1e-5)


def test_vidpo_run_with_a_tiny_wan_directory(tmp_path, micro_overrides):
    from diffusers import WanTransformer3DModel

    from vidpo.training.modeling import build_world
    from vidpo.stages.pipeline import run_pipeline
    from vidpo.config import load_config

    cfg0 = load_config(None, micro_overrides)
    model_dir = tmp_path / "wan"
    make_tiny_wan_dir(model_dir, vocab_size=build_world(cfg0).vocab_size, text_dim=TEXT_DIM, seed=4)
    cfg = load_config(None, micro_overrides + [
        "model.kind=wan", f"model.path={model_dir}", "train.objective=dense_dpo", "train.max_steps=2",
        "train.ckpt_every=2", "train.lr=1e-3", "train.warmup_steps=0", "flow.t_min=0.3",
        "lora.rank=2", "lora.alpha=2.0", 'lora.target_modules=["to_q","to_k","to_v","to_out.0"]'])
    summary = run_pipeline(cfg, tmp_path / "run")
    assert 0 <= summary["oracle"]["final"]["mean"] <= 1
    assert summary["implicit_accuracy"]["heldout"] is not None
    for name in ("summary.json", "report.html", "pairs/manifest.jsonl", "metrics.jsonl",
                 "lora/pytorch_lora_weights.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["objective"] == "dense_dpo"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("dpo_loss" in row for row in metrics)
    try:
        import peft  # noqa: F401
    except ImportError:
        return
    transformer = WanTransformer3DModel.from_pretrained(model_dir / "transformer", local_files_only=True)
    transformer.load_lora_adapter(str(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"),
                                  prefix="transformer")
    assert sum(".lora_A." in k for k in transformer.state_dict()) == 8  # q, k, v, out of attn1 and attn2
