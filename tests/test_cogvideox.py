"""CogVideoX through diffusers: v-prediction Diffusion-DPO against the diffusers model called
directly, the engine-time <-> DDPM-timestep mapping, DDIM sampling with CFG, and LoRA export."""
import pytest
import torch
from torch.func import functional_call

pytest.importorskip("diffusers")

from helpers.models import TEXT_DIM, TEXT_LEN, add_random_lora, tiny_cogvideox  # noqa: E402
from vidpo.config import RunConfig  # noqa: E402
from vidpo.data.pairs import PairRecord  # noqa: E402
from vidpo.models.adapters import ATTENTION_LORA_TARGETS  # noqa: E402
from vidpo.models.cogvideox import CogVideoXAdapter, make_scheduler, tiny_cogvideox_transformer  # noqa: E402
from vidpo.models.lora import lora_disabled, lora_modules, merge_lora  # noqa: E402
from vidpo.objectives.preference import PreferenceObjective  # noqa: E402

C, T, S = 4, 4, 8


def lora_cogvideox(seed=0, num_layers=1):
    return add_random_lora(tiny_cogvideox(in_channels=C, frames=T, size=S, num_layers=num_layers, seed=seed), rank=2,
                           alpha=4.0, target_modules=ATTENTION_LORA_TARGETS, seed=seed + 11)


def alphas(k):
    """sqrt(abar_k), sqrt(1 - abar_k) in float64 from the scheduler's betas (zero-terminal-SNR, SNR shift 3)."""
    abar = make_scheduler().alphas_cumprod.double()[k]
    return abar.sqrt().view(-1, 1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1, 1)


def test_time_mapping_and_timestep_sampling():
    model = tiny_cogvideox(in_channels=C, frames=T, size=S)
    k = torch.arange(1000)
    assert torch.equal(model.discrete_timesteps(k.double().div(999).float()), k)
    draws = model.sample_timesteps(4000, torch.Generator().manual_seed(0))
    ks = model.discrete_timesteps(draws)
    assert ks.min() < 20 and ks.max() > 980 and abs(ks.double().mean().item() - 499.5) < 15  # uniform over k
    cfg = RunConfig().flow
    cfg.t_min, cfg.t_max = 0.3, 0.6
    ks = model.discrete_timesteps(model.sample_timesteps(500, torch.Generator().manual_seed(1), cfg))
    assert ks.min() >= 300 and ks.max() <= 599
    x0, noise, t = torch.randn(2, C, T, S, S), torch.randn(2, C, T, S, S), torch.tensor([100, 900]) / 999
    a, s = alphas(torch.tensor([100, 900]))
    torch.testing.assert_close(model.interpolate(x0, noise, t).double(), a * x0 + s * noise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.training_target(x0, noise, t).double(), a * noise - s * x0, rtol=1e-5, atol=1e-6)


def test_dpo_step_matches_diffusers_called_directly():
    model = lora_cogvideox(seed=1)
    g = torch.Generator().manual_seed(0)
    shape = (2, C, T, S, S)
    k = torch.tensor([250, 700])
    batch = {"first": torch.randn(shape, generator=g), "second": torch.randn(shape, generator=g),
             "noise": torch.randn(shape, generator=g), "t": k.double().div(999).float(),
             "tokens": torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g), "labels": torch.tensor([[1, -1], [0, 1]])}
    cfg = RunConfig()
    cfg.train.objective, cfg.pref.beta, cfg.pref.loss_backend = "dense_dpo", 200.0, "torch"

    def reference(x, t, c):
        with torch.no_grad(), lora_disabled(model):
            return model(x, t, c)
    records = [PairRecord(pair_id="p0", shard="s", row=0, cond_ids=[0, 0, 0], labels=[1, 1], video_label=1)]
    seg = torch.tensor([0, 0, 1, 1])
    objective = PreferenceObjective(cfg, None, torch.device("cpu"), records, None, seg, reference, process=model)
    loss, _ = objective.loss(model, batch)
    loss.backward()

    # Independent float64 computation: diffusers' transformer called directly on (B, T, C, H, W) with integer
    # timesteps, LoRA as functional weights W + (alpha/r) B A, Diffusion-DPO on the v-prediction error.
    base = {n: v.double() for n, v in model.transformer.state_dict().items() if ".lora_" not in n}
    factors = {n: (m.lora_A.weight.detach().double().requires_grad_(True),
                   m.lora_B.weight.detach().double().requires_grad_(True), m.scaling)
               for n, m in lora_modules(model.transformer)}
    policy = dict(base, **{f"{n}.weight": base[f"{n}.weight"] + s * b @ a for n, (a, b, s) in factors.items()})
    plain = tiny_cogvideox_transformer(text_dim=TEXT_DIM, text_len=TEXT_LEN, frames=T, size=S).double()
    x0 = torch.cat([batch["first"], batch["second"]]).double()
    eps = torch.cat([batch["noise"], batch["noise"]]).double()
    k2 = torch.cat([k, k])
    a, s = alphas(k2)
    x_k = a * x0 + s * eps
    emb = torch.cat([batch["tokens"], batch["tokens"]]).double()

    def call(weights):
        out = functional_call(plain, weights, (), dict(hidden_states=x_k.permute(0, 2, 1, 3, 4),
                                                       encoder_hidden_states=emb, timestep=k2, return_dict=False))[0]
        return out.permute(0, 2, 1, 3, 4)
    v = a * eps - s * x0
    err = lambda pred: torch.stack([((pred - v) ** 2)[:, :, seg == j].mean(dim=(1, 2, 3, 4)) for j in range(2)], 1)  # noqa: E731
    with torch.no_grad():
        err_ref = err(call(base))
    d = err(call(policy)) - err_ref
    labels = batch["labels"].double()
    per = -torch.nn.functional.logsigmoid(-200.0 / 2 * labels * (d[:2] - d[2:]))
    ref_loss = (per * (labels != 0)).sum() / (labels != 0).sum()
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_loss.item() > 1e-3
    for n, m in lora_modules(model.transformer):
        torch.testing.assert_close(m.lora_A.weight.grad.double(), factors[n][0].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.lora_B.weight.grad.double(), factors[n][1].grad, rtol=1e-4, atol=1e-6)


def test_ddim_sampler_with_cfg_matches_the_ddim_update():
    model = tiny_cogvideox(in_channels=C, frames=T, size=S)
    cond = torch.randn(2, TEXT_LEN, TEXT_DIM)
    out = model.sample(cond, (C, T, S, S), seed=2, indices=[0, 5], steps=3, cfg_scale=6.0)
    from vidpo.utils.seeding import randn_per_sample

    scheduler = make_scheduler()
    scheduler.set_timesteps(3)
    abar = scheduler.alphas_cumprod.double()
    ks = scheduler.timesteps.tolist()
    x = randn_per_sample((2, C, T, S, S), 2, [0, 5], "sample").double()
    with torch.no_grad():
        for i, k in enumerate(ks):
            t = torch.full((2,), k / 999)
            v_c, v_u = model(x.float(), t, cond).double(), model(x.float(), t, torch.zeros_like(cond)).double()
            v = v_u + 6.0 * (v_c - v_u)
            x0_pred = abar[k].sqrt() * x - (1 - abar[k]).sqrt() * v
            eps_pred = (1 - abar[k]).sqrt() * x + abar[k].sqrt() * v
            # diffusers' CogVideoX DDIM steps back by N // steps (the last step lands on k = 0, not on abar = 1)
            k_prev = k - 1000 // 3
            prev = abar[k_prev] if k_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x = prev.sqrt() * x0_pred + (1 - prev).sqrt() * eps_pred   # deterministic DDIM (eta = 0)
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)


def test_exported_lora_loads_into_diffusers_and_matches_merged_model(tmp_path):
    pytest.importorskip("peft")
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    model = lora_cogvideox(seed=3, num_layers=2)
    model.transformer.save_pretrained(tmp_path / "base")
    path = model.export_lora(tmp_path / "lora.safetensors")
    x, t, emb = torch.randn(1, C, T, S, S), torch.tensor([500 / 999]), torch.randn(1, TEXT_LEN, TEXT_DIM)
    with torch.no_grad():
        with lora_disabled(model):
            base_out = model(x, t, emb)
        merge_lora(model)
        merged_out = model(x, t, emb)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=make_scheduler(),
                             transformer=CogVideoXTransformer3DModel.from_pretrained(tmp_path / "base",
                                                                                     local_files_only=True))
    pipe.load_lora_weights(str(path))
    transformer = pipe.transformer
    with torch.no_grad():
        loaded = transformer(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=emb,
                             timestep=torch.tensor([500]), return_dict=False)[0].permute(0, 2, 1, 3, 4)
    assert (merged_out - base_out).abs().max() > 1e-3
    torch.testing.assert_close(loaded, merged_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, shapes", [("5b", [(4, 8, 8), (4, 8, 12), (2, 12, 8)]),
                                            ("1.5", [(4, 8, 8), (2, 6, 8)])])
def test_rope_layouts_match_the_pipelines_rotary_embedding(layout, shapes):
    """CogVideoX-5B / 1.5 take their 3-D RoPE from the pipeline, not from the transformer: the adapter computes it
    as ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` does (called here as the reference, with the
    latent grid of a VAE of spatial factor 8), for square and non-square clips; without it the output differs."""
    import types

    from diffusers import CogVideoXPipeline

    transformer = tiny_cogvideox_transformer(text_dim=TEXT_DIM, text_len=TEXT_LEN, frames=T, size=S, layout=layout)
    model = CogVideoXAdapter(transformer)
    pipeline = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=transformer)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0.3, 0.8])
    cond = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)
    for frames, height, width in shapes:
        x = torch.randn(2, C, frames, height, width, generator=g)
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipeline, height * 8, width * 8, frames, "cpu")
        call = dict(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=cond,
                    timestep=model.discrete_timesteps(t), return_dict=False)
        with torch.no_grad():
            got = model(x, t, cond)
            want = transformer(**call, image_rotary_emb=rope)[0].permute(0, 2, 1, 3, 4)
            without = transformer(**call)[0].permute(0, 2, 1, 3, 4)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert (got - without).abs().max() > 1e-3, "the RoPE made no difference: the check would be vacuous"
    assert CogVideoXAdapter(tiny_cogvideox_transformer()).rotary_embedding(T, S, S, "cpu") is None   # 2B: sincos


def test_rope_crop_region_matches_diffusers():
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    from vidpo.models.cogvideox.model import _centre_crop_region

    for rows in range(1, 12):
        for cols in range(1, 12):
            for base in ((30, 45), (8, 8), (5, 9)):
                assert _centre_crop_region((rows, cols), base) == \
                    get_resize_crop_region_for_grid((rows, cols), base[1], base[0]), (rows, cols, base)
