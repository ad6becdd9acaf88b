"""Motion guidance (vidpo.models.motion_guidance) against direct float64 computations: the captured q/k of
a block, the temporal attention, the primary mask and PTA energy, the energy gradient, the guided velocity
and ODE inversion."""
import math

import pytest
import torch

from helpers.models import randomize_
from vidpo.models import motion_guidance as mg
from vidpo.models.dit import DiTConfig, build_dit
from vidpo.models.dit.rope import apply_rope, grid_positions, rope_cos_sin


pytestmark = pytest.mark.usefixtures("one_thread")   # 2 threads on a shared 2-core machine: 10x slower


def micro_dit(depth=3, seed=0, qk_norm=True):
    """A float64 DiT with every parameter random (so no adaLN-zero identity hides a path). Its RMSNorms
    compute in float32, so the finite-difference test turns them off to stay float64 end to end."""
    cfg = DiTConfig(in_channels=3, patch_size=(1, 2, 2), width=24, depth=depth, num_heads=2, cond_vocab_size=9,
                    attention="math", qk_norm=qk_norm)
    return randomize_(build_dit(cfg).double(), seed, std=0.2).eval()


def inputs(batch=2, frames=3, height=4, width=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, frames, height, width, generator=g, dtype=torch.float64)
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    cond = torch.randint(1, 9, (batch, 3), generator=g)
    return x, t, cond


def loop_temporal_attention(q, k, grid):
    """A[b,h,s,i,j] = exp(<q_(i,s), k_(j,s)>/sqrt d) / sum_j' exp(...), token (i, s) = i * S + s."""
    b, heads, _, d = q.shape
    frames, hh, ww = grid
    spatial = hh * ww
    out = torch.zeros(b, heads, spatial, frames, frames, dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            for s in range(spatial):
                for i in range(frames):
                    logits = [float(q[bi, h, i * spatial + s] @ k[bi, h, j * spatial + s]) / math.sqrt(d)
                              for j in range(frames)]
                    top = max(logits)
                    weights = [math.exp(z - top) for z in logits]
                    for j in range(frames):
                        out[bi, h, s, i, j] = weights[j] / sum(weights)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_temporal_attention_matches_loops(dtype, tol):
    grid = (3, 2, 3)            # odd, non-power-of-two frames and spatial sizes
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 18, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 18, 6, generator=g, dtype=torch.float64)
    expected = loop_temporal_attention(q, k, grid)
    got = mg.temporal_attention(q.to(dtype), k.to(dtype), grid)
    assert got.shape == (2, 2, 6, 3, 3)
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="do not match the grid"):
        mg.temporal_attention(q, k, (2, 2, 3))


def test_primary_mask_and_energy_match_direct_sum():
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(2, 2, 5, 4, 4, generator=g, dtype=torch.float64), -1)
    a_ref = torch.softmax(torch.randn(2, 2, 5, 4, 4, generator=g, dtype=torch.float64) * 3, -1)
    mask = mg.primary_mask(a_ref)
    assert torch.equal(mask.sum(-1), torch.ones(2, 2, 5, 4, dtype=torch.float64))
    energy = mg.motion_energy(a, a_ref)
    for b in range(2):
        direct = 0.0
        for h in range(2):
            for s in range(5):
                for i in range(4):
                    j = max(range(4), key=lambda jj: float(a_ref[b, h, s, i, jj]))
                    direct += float(a_ref[b, h, s, i, j] - a[b, h, s, i, j]) ** 2
        assert energy[b].item() == pytest.approx(direct, rel=1e-12)
    assert mg.motion_energy(a_ref, a_ref).abs().max() == 0


def test_probe_captures_the_blocks_post_rope_qk_and_leaves_forward_unchanged():
    model = micro_dit()
    x, t, cond = inputs()
    block = 1
    seen = {}
    handle = model.blocks[block].attn.register_forward_pre_hook(lambda mod, args: seen.update(input=args[0]))
    with torch.no_grad():
        plain = model(x, t, cond)
    handle.remove()
    attn = model.blocks[block].attn
    h = seen["input"]                                            # (B, n, D): the attention's input
    qkv = h @ attn.qkv.weight.T + attn.qkv.bias
    b, n, _ = h.shape
    q, k, _ = qkv.view(b, n, 3, 2, 12).unbind(2)

    def rms(z, w):
        return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    q, k = rms(q, attn.q_norm.weight).transpose(1, 2), rms(k, attn.k_norm.weight).transpose(1, 2)
    grid = model.config.patch_grid(3, 4, 6)
    cos, sin = rope_cos_sin(grid_positions(grid), 12, model.config.rope_theta, torch.float64)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    with torch.no_grad(), mg.TemporalAttentionProbe(model, block) as probe:
        full = model(x, t, cond)
    # The model's RMSNorm computes in float32 (vidpo.models.dit.model.RMSNorm): float32 tolerance.
    torch.testing.assert_close(probe.q, q, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probe.k, k, atol=1e-6, rtol=1e-5)
    assert torch.equal(full, plain)                             # observing changes nothing
    full_q, full_k = probe.q, probe.k
    with torch.no_grad(), mg.TemporalAttentionProbe(model, block, stop=True) as probe:
        q2, k2 = probe.run(x, t, cond)
    assert torch.equal(q2, full_q) and torch.equal(k2, full_k)   # stopping early gives the same q, k
    assert all(blk.attn.qk_observer is None for blk in model.blocks)   # detached after the context
    with pytest.raises(ValueError, match="out of range"):
        mg.TemporalAttentionProbe(model, 3)


def test_energy_gradient_matches_finite_differences_and_lowers_energy():
    model = micro_dit(qk_norm=False)
    x, t, cond = inputs(seed=4)
    x_ref = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    block = 2
    a_ref = mg.reference_attention(model, x_ref, t, cond, block)
    mask = mg.primary_mask(a_ref)

    def energy(z):
        with torch.no_grad(), mg.TemporalAttentionProbe(model, block, stop=True) as probe:
            q, k = probe.run(z, t, cond)
        return mg.motion_energy(mg.temporal_attention(q, k, mg.token_grid(model, z)), a_ref, mask)

    grad, value = mg.motion_guidance_gradient(model, x, t, cond, a_ref, block)
    torch.testing.assert_close(value, energy(x), atol=1e-12, rtol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        direction = torch.randn(x.shape, generator=g, dtype=torch.float64)
        h = 1e-6
        numeric = (energy(x + h * direction) - energy(x - h * direction)) / (2 * h)   # (B,)
        analytic = (grad * direction).flatten(1).sum(1)
        torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-5)
    # A small step against the gradient lowers every row's energy (what the guidance term does).
    step = 1e-3 / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1)
    assert bool((energy(x - step * grad) < value).all())


def test_guided_velocity_is_cfg_plus_eta_grad_on_selected_rows():
    model = micro_dit()
    x, t, cond = inputs(batch=3, seed=7)
    null = model.null_condition(cond)
    rows = torch.tensor([True, False, True])
    block, w, eta = 0, 2.5, 0.7
    x_ref = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    a_ref = mg.reference_attention(model, x_ref[rows], t[rows], cond[rows], block)
    v, stats = mg.guided_velocity(model, x, t, cond, null, w, motion_scale=eta, ref_attention=a_ref,
                                  motion_rows=rows, block=block)
    with torch.no_grad():
        expected = model(x, t, null) + w * (model(x, t, cond) - model(x, t, null))
    grad, _ = mg.motion_guidance_gradient(model, x[rows], t[rows], cond[rows], a_ref, block)
    expected[rows] += eta * grad
    torch.testing.assert_close(v, expected, atol=1e-10, rtol=1e-10)
    assert stats["energy"].shape == (2,) and bool((stats["guidance_rms"] > 0).all())
    plain, none = mg.guided_velocity(model, x, t, cond, null, w)
    assert none == {}
    torch.testing.assert_close(plain[~rows], v[~rows], atol=1e-12, rtol=0)


def test_inversion_is_the_upward_euler_recurrence():
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(2, 3, 2, 2, 2, generator=g, dtype=torch.float64)
    cond = torch.zeros(2, 3, dtype=torch.long)

    def velocity(x, t, c):
        return torch.sin(x) * (1 + t.view(-1, 1, 1, 1, 1)) - 0.3

    times = torch.tensor([0.0, 0.125, 0.3, 0.55])
    out = mg.invert(velocity, x0, cond, times)
    assert out.shape == (4,) + x0.shape
    x = x0.clone()
    for i in range(3):
        dt = float(times[i + 1] - times[i])
        x = x + dt * (torch.sin(x) * (1 + float(times[i])) - 0.3)
        torch.testing.assert_close(out[i + 1], x, atol=1e-12, rtol=1e-12)
    assert torch.equal(out[0], x0)
    with pytest.raises(ValueError, match="strictly increasing"):
        mg.invert(velocity, x0, cond, torch.tensor([0.0, 0.5, 0.5]))
