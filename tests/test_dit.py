"""Tests of the video DiT (vidpo.models.dit): shapes, full attention, RoPE, backends, init, conditions,
analytic FLOP / parameter counts, activation checkpointing. CPU-only, small shapes."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers.models import randomize_
from helpers.tolerances import ATTENTION, ROPE, assert_close_to_float64
from vidpo.models.dit import (PRESETS, AttentionBackendUnavailable, DiTConfig, attention, available_backends,
                              build_dit, dit_config, patchify, resolve_backend, unpatchify)
from vidpo.models.dit.attention import backend_importable
from vidpo.models.dit.model import CrossAttention, SelfAttention
from vidpo.models.dit.rope import apply_rope, grid_positions, rope_cos_sin, rope_split


def small_config(**overrides) -> DiTConfig:
    """A very small model (head_dim 24 -> RoPE split (8, 8, 8)) with class-token conditions."""
    fields = dict(in_channels=3, patch_size=(1, 2, 2), width=48, depth=2, num_heads=2, cond_vocab_size=10)
    fields.update(overrides)
    return DiTConfig(**fields)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Replace every parameter (including the zero-initialised ones) by Gaussian noise."""
    return randomize_(model, seed, std)


def random_inputs(cfg: DiTConfig, batch=2, frames=4, height=4, width=6, cond_len=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, height, width, generator=g)
    t = torch.rand(batch, generator=g)
    if cfg.cond_vocab_size:
        cond = torch.randint(1, cfg.cond_vocab_size, (batch, cond_len), generator=g)
    else:
        cond = torch.randn(batch, cond_len, cfg.cond_dim, generator=g)
    return x, t, cond


# ----- shapes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch, thw", [
    ((1, 4, 4), (3, 8, 12)),     # odd frame count with pt = 1
    ((2, 2, 2), (6, 4, 6)),      # T = 6 with pt = 2
    ((1, 2, 2), (5, 6, 2)),
    ((3, 1, 2), (3, 3, 4)),      # non-power-of-two patch
])
def test_output_shape_matches_input(patch, thw):
    cfg = small_config(patch_size=patch)
    model = randomize(build_dit(cfg))
    x, t, cond = random_inputs(cfg, frames=thw[0], height=thw[1], width=thw[2])
    v = model(x, t, cond)
    assert v.shape == x.shape and v.dtype == x.dtype
    assert torch.isfinite(v).all()


def test_out_channels_override():
    cfg = small_config(out_channels=5)
    x, t, cond = random_inputs(cfg)
    assert build_dit(cfg)(x, t, cond).shape == (2, 5) + x.shape[2:]


@pytest.mark.parametrize("thw, axis", [((5, 4, 4), "T"), ((4, 3, 4), "H"), ((4, 4, 7), "W")])
def test_indivisible_input_is_a_clear_error(thw, axis):
    cfg = small_config(patch_size=(2, 2, 2))
    x, t, cond = random_inputs(cfg, frames=thw[0], height=thw[1], width=thw[2])
    with pytest.raises(ValueError, match=f"input {axis}=.* not divisible by the patch size"):
        build_dit(cfg)(x, t, cond)


def test_patchify_roundtrip_and_token_order():
    x = torch.randn(2, 3, 6, 4, 8)
    tokens = patchify(x, (2, 2, 4))
    assert tokens.shape == (2, 3 * 2 * 2, 3 * 2 * 2 * 4)
    assert torch.equal(unpatchify(tokens, (3, 2, 2), (2, 2, 4), 3), x)
    # Tokens come in the order of grid_positions (t slowest, w fastest), which RoPE relies on.
    coords = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(5), torch.arange(7), indexing="ij"))
    assert torch.equal(patchify(coords[None].float(), (1, 1, 1))[0].long(), grid_positions((3, 5, 7)))


# ----- attention is full and non-causal --------------------------------------------------------------------
def test_attention_is_full_and_not_causal():
    cfg = small_config()
    model = randomize(build_dit(cfg))
    x, t, cond = random_inputs(cfg, frames=4, height=4, width=4)
    pt, ph, pw = cfg.patch_size

    x1 = x.clone().requires_grad_(True)
    model(x1, t, cond)[:, :, :pt, :ph, :pw].sum().backward()      # output at the first token
    assert x1.grad[:, :, -pt:].abs().sum() > 0                     # depends on the last frame

    x2 = x.clone().requires_grad_(True)
    model(x2, t, cond)[:, :, -pt:, -ph:, -pw:].sum().backward()   # output at the last token
    assert x2.grad[:, :, :pt].abs().sum() > 0                      # depends on the first frame


# ----- RoPE -------------------------------------------------------------------------------------------------
def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Direct float64 rotation, pair by pair, from the documented formula."""
    d = x.shape[-1]
    d_hw = 2 * (d // 6)
    parts = [d - 2 * d_hw, d_hw, d_hw]
    out = torch.empty_like(x, dtype=torch.float64)
    for token in range(x.shape[-2]):
        pair = 0
        for axis, size in enumerate(parts):
            for i in range(size // 2):
                angle = float(positions[token, axis]) * theta ** (-2.0 * i / size)
                c, s = math.cos(angle), math.sin(angle)
                a, b = x[..., token, 2 * pair].double(), x[..., token, 2 * pair + 1].double()
                out[..., token, 2 * pair] = a * c - b * s
                out[..., token, 2 * pair + 1] = a * s + b * c
                pair += 1
    return out


def test_rope_split_like_wan():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(24) == (8, 8, 8)
    assert rope_split(64) == (24, 20, 20)
    with pytest.raises(ValueError):
        rope_split(7)


@pytest.mark.parametrize("head_dim, theta", [(24, 10000.0), (40, 500.0)])
def test_rope_matches_float64_reference(head_dim, theta):
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 30, (9, 3), generator=g)
    x = torch.randn(2, 3, 9, head_dim, generator=g)
    expected = rope_reference(x, positions, theta)
    cos64, sin64 = rope_cos_sin(positions, head_dim, theta, dtype=torch.float64)
    assert_close_to_float64(apply_rope(x.double(), cos64, sin64), expected, torch.float64, ROPE)
    cos, sin = rope_cos_sin(positions, head_dim, theta)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.float32
    assert_close_to_float64(out, expected, torch.float32, ROPE)
    out_bf16 = apply_rope(x.bfloat16(), cos, sin)
    assert out_bf16.dtype == torch.bfloat16
    assert_close_to_float64(out_bf16, expected, torch.bfloat16, ROPE)


def test_rope_preserves_norm_and_sees_only_relative_positions():
    head_dim, theta = 24, 10000.0
    g = torch.Generator().manual_seed(1)
    q = torch.randn(head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(head_dim, generator=g, dtype=torch.float64)

    def rotate(vec, pos):
        cos, sin = rope_cos_sin(torch.tensor([pos]), head_dim, theta, dtype=torch.float64)
        return apply_rope(vec[None], cos, sin)[0]

    p_q, p_k, shift = (1, 2, 3), (4, 0, 7), (5, 11, 2)
    moved = lambda p: tuple(a + b for a, b in zip(p, shift))  # noqa: E731
    torch.testing.assert_close(rotate(q, p_q).norm(), q.norm(), rtol=1e-13, atol=0)
    dot = rotate(q, p_q) @ rotate(k, p_k)
    torch.testing.assert_close(rotate(q, moved(p_q)) @ rotate(k, moved(p_k)), dot, rtol=1e-12, atol=1e-12)
    # ... and it does see the relative position, along every axis.
    for axis in range(3):
        other = list(p_k)
        other[axis] += 1
        assert abs(float(rotate(q, p_q) @ rotate(k, tuple(other))) - float(dot)) > 1e-6


# ----- attention backends -----------------------------------------------------------------------------------
def attention_reference(q, k, v):
    scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v.double()


@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_attention_backends_match_float64_reference(backend, dtype):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 7, 10, generator=g, dtype=dtype)     # Nq = 7, Nk = 5: cross-attention shapes
    k = torch.randn(2, 3, 5, 10, generator=g, dtype=dtype)
    v = torch.randn(2, 3, 5, 10, generator=g, dtype=dtype)
    out = attention(q, k, v, backend)
    assert out.shape == (2, 3, 7, 10) and out.dtype == dtype
    assert_close_to_float64(out, attention_reference(q, k, v), dtype, ATTENTION)


def test_model_sdpa_and_math_backends_agree():
    cfg = small_config()
    x, t, cond = random_inputs(cfg)
    sdpa_model = randomize(build_dit(cfg))
    math_model = randomize(build_dit(small_config(attention="math")))
    assert sdpa_model.attention_backend == "sdpa" and math_model.attention_backend == "math"
    torch.testing.assert_close(sdpa_model(x, t, cond), math_model(x, t, cond), rtol=1e-5, atol=1e-5)
    math_model.set_attention_backend("sdpa")
    torch.testing.assert_close(sdpa_model(x, t, cond), math_model(x, t, cond), rtol=0, atol=0)


@pytest.mark.parametrize("backend, install", [
    ("flash_attn", "pip install flash-attn --no-build-isolation"),
    ("te", r"pip install transformer-engine\[pytorch\]"),
])
def test_missing_backend_is_a_clear_error(backend, install):
    if backend_importable(backend):
        pytest.skip(f"{backend} is importable here")
    assert backend not in available_backends()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(AttentionBackendUnavailable, match=install):
        attention(q, q, q, backend)
    with pytest.raises(AttentionBackendUnavailable, match=f"'{backend}'"):
        resolve_backend(backend)
    with pytest.raises(AttentionBackendUnavailable, match=install):
        build_dit(small_config(attention=backend))


def test_backend_names_and_auto_resolution():
    assert {"sdpa", "math"} <= set(available_backends())
    assert resolve_backend("sdpa") == "sdpa"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="did you mean 'sdpa'"):
        resolve_backend("spda")
    with pytest.raises(ValueError, match="attention"):
        small_config(attention="flash")


# ----- module layout: fused projections are [q; k; v] and [k; v] --------------------------------------------
def test_self_attention_layout_against_float64_reference():
    torch.manual_seed(3)
    width, head_dim, n = 48, 12, 10
    module = randomize(SelfAttention(width, head_dim, qk_norm=True, eps=1e-6, backend="sdpa"))
    x = torch.randn(2, n, width)
    positions = torch.randint(0, 5, (n, 3))
    cos, sin = rope_cos_sin(positions, head_dim)

    w, b = module.qkv.weight.double(), module.qkv.bias.double()
    x64 = x.double()

    def heads(z):      # (B, n, D) -> (B, heads, n, head_dim), heads contiguous in D
        return z.view(2, n, -1, head_dim).transpose(1, 2)

    def rms(z, weight):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()

    q = heads(x64 @ w[:width].T + b[:width])
    k = heads(x64 @ w[width:2 * width].T + b[width:2 * width])
    v = heads(x64 @ w[2 * width:].T + b[2 * width:])
    cos64, sin64 = rope_cos_sin(positions, head_dim, dtype=torch.float64)
    q = apply_rope(rms(q, module.q_norm.weight), cos64, sin64)
    k = apply_rope(rms(k, module.k_norm.weight), cos64, sin64)
    out = attention_reference(q, k, v).transpose(1, 2).reshape(2, n, width)
    expected = out @ module.proj.weight.double().T + module.proj.bias.double()
    torch.testing.assert_close(module(x, cos, sin).double(), expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_layout_against_float64_reference():
    width, head_dim = 24, 6
    module = randomize(CrossAttention(width, head_dim, qk_norm=False, eps=1e-6, backend="math"), seed=4)
    x, ctx = torch.randn(3, 5, width), torch.randn(3, 2, width)
    w, b = module.kv.weight.double(), module.kv.bias.double()

    def heads(z):
        return z.view(z.shape[0], z.shape[1], -1, head_dim).transpose(1, 2)

    q = heads(x.double() @ module.q.weight.double().T + module.q.bias.double())
    k = heads(ctx.double() @ w[:width].T + b[:width])
    v = heads(ctx.double() @ w[width:].T + b[width:])
    out = attention_reference(q, k, v).transpose(1, 2).reshape(3, 5, width)
    expected = out @ module.proj.weight.double().T + module.proj.bias.double()
    torch.testing.assert_close(module(x, ctx).double(), expected, rtol=1e-5, atol=1e-5)


def test_module_names_for_parallel_and_lora_plans():
    names = {name for name, _ in build_dit(small_config()).named_modules()}
    for suffix in ("attn.qkv", "attn.proj", "cross.q", "cross.kv", "cross.proj", "mlp.fc1", "mlp.fc2"):
        assert f"blocks.0.{suffix}" in names and f"blocks.1.{suffix}" in names
    assert {"patch_embed", "adaLN", "final.adaLN", "final.linear", "time_embed.fc1", "cond_embed.table"} <= names


# ----- initialisation and conditioning ----------------------------------------------------------------------
def test_untrained_output_is_exactly_zero_until_weights_change():
    cfg = small_config()
    model = build_dit(cfg)
    x, t, cond = random_inputs(cfg)
    assert torch.count_nonzero(model(x, t, cond)) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.modulation) == 0
    randomize(model)
    assert model(x, t, cond).abs().min() > 0


@pytest.mark.parametrize("text", [False, True])
def test_condition_and_time_change_the_output(text):
    cfg = small_config(cond_vocab_size=0, cond_dim=12) if text else small_config()
    model = randomize(build_dit(cfg))
    x, t, cond = random_inputs(cfg, seed=5)
    _, _, other = random_inputs(cfg, seed=6)
    null = model.null_condition(cond)
    assert null.shape == cond.shape and null.dtype == cond.dtype and torch.count_nonzero(null) == 0
    v = model(x, t, cond)
    assert (v - model(x, t, other)).abs().max() > 1e-3
    assert (v - model(x, t, null)).abs().max() > 1e-3
    assert (v - model(x, 1.0 - t, cond)).abs().max() > 1e-3
    # A scalar t is broadcast over the batch.
    torch.testing.assert_close(model(x, torch.tensor(0.3), cond), model(x, torch.full((2,), 0.3), cond))


def test_wrong_condition_kind_is_a_clear_error():
    class_model = build_dit(small_config())
    text_model = build_dit(small_config(cond_vocab_size=0, cond_dim=12))
    x = torch.randn(2, 3, 2, 4, 4)
    t = torch.rand(2)
    with pytest.raises(TypeError, match="class-token"):
        class_model(x, t, torch.randn(2, 3, 12))
    with pytest.raises(TypeError, match="text-embedding"):
        text_model(x, t, torch.randint(0, 10, (2, 3)))
    with pytest.raises(ValueError, match="batch"):
        class_model(x, t, torch.randint(0, 10, (3, 3)))


def test_bf16_autocast_and_bf16_parameters():
    cfg = small_config()
    model = randomize(build_dit(cfg))
    x, t, cond = random_inputs(cfg)
    ref = model(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)
    out = model.to(torch.bfloat16)(x, t, cond)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


# ----- analytic counts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize("patch, thw", [((1, 2, 2), (3, 4, 6)), ((2, 4, 2), (4, 8, 6))])
def test_flops_per_forward_matches_flop_counter(text, patch, thw):
    """FlopCounterMode counts aten mm / addmm / bmm / baddbmm (every Linear, and with the 'math' backend the
    attention's QK^T and AV matmuls) at 2*m*n*k; the analytic count covers exactly the same matmuls, so they
    agree exactly. ('math' because the counter has no formula for CPU's fused SDPA kernel.)"""
    extra = dict(cond_vocab_size=0, cond_dim=20) if text else {}
    cfg = small_config(patch_size=patch, attention="math", ffn_dim=72, out_channels=2, **extra)
    model = build_dit(cfg)
    x, t, cond = random_inputs(cfg, batch=3, frames=thw[0], height=thw[1], width=thw[2], cond_len=5)
    with FlopCounterMode(display=False) as counter:
        model(x, t, cond)
    assert counter.get_total_flops() == cfg.flops_per_forward(3, *thw, cond_len=5)


def test_training_step_costs_about_three_forwards():
    cfg = small_config(attention="math")
    model = build_dit(cfg)
    x, t, cond = random_inputs(cfg, frames=4, height=8, width=8)
    with FlopCounterMode(display=False) as counter:
        model(x, t, cond).square().mean().backward()
    ratio = counter.get_total_flops() / cfg.flops_per_forward(2, 4, 8, 8, 3)
    # Below 3 only by the input gradients nobody needs (patch_embed and the timestep MLP's first layer).
    assert 2.9 < ratio <= 3.0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_num_params_matches_the_built_model(preset):
    cfg = dit_config(preset)
    model = build_dit(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_num_params_without_qk_norm_and_with_text():
    for cfg in (small_config(qk_norm=False), small_config(cond_vocab_size=0, cond_dim=7, ffn_dim=50)):
        assert sum(p.numel() for p in build_dit(cfg).parameters()) == cfg.num_params()


def test_preset_sizes():
    assert 1.0e6 <= dit_config("tiny").num_params() <= 1.4e6
    assert 1.3e9 <= dit_config("1.3b").num_params() <= 1.5e9
    assert 4.5e9 <= dit_config("5b").num_params() <= 5.5e9
    big = dit_config("1.3b")
    assert (big.width, big.depth, big.num_heads, big.resolved_ffn_dim, big.patch_size, big.in_channels,
            big.cond_dim) == (1536, 30, 12, 8960, (1, 2, 2), 16, 4096)


def test_dit_config_overrides():
    cfg = dit_config("tiny", width=None, depth=2, patch_size=[1, 2, 2], attention=None)
    assert cfg.depth == 2 and cfg.width == 128 and cfg.patch_size == (1, 2, 2) and cfg.attention == "sdpa"
    assert PRESETS["tiny"].depth == 4
    with pytest.raises(ValueError, match="did you mean 'depth'"):
        dit_config("tiny", deph=3)
    with pytest.raises(ValueError, match="did you mean '1.3b'"):
        dit_config("1.3B")
    with pytest.raises(ValueError, match="divisible"):
        dit_config("tiny", num_heads=3)


# ----- activation checkpointing -----------------------------------------------------------------------------
def test_activation_checkpointing_gives_identical_outputs_and_gradients():
    cfg = small_config()
    plain = randomize(build_dit(cfg))
    ckpt = randomize(build_dit(small_config(activation_checkpointing="full")))
    x, t, cond = random_inputs(cfg)
    outputs, grads = [], []
    for model in (plain, ckpt):
        x_in = x.clone().requires_grad_(True)
        out = model(x_in, t, cond)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append([x_in.grad] + [p.grad for p in model.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
