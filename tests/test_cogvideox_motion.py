"""Motion guidance on CogVideoX: the temporal-attention probe (``vidpo.models.cogvideox.motion``) reads the video
rows of the joint text-video attention's post-LayerNorm, post-RoPE q, k -- exactly what the block attends with, in
(t, h, w) token order -- for the 2B (sincos), 5B (RoPE) and 1.5 (RoPE + 2-frame patches) layouts; the motion
guidance gradient through the network matches a float64 reference written independently here; and the probe
cuts the forward pass, restores the processor and refuses what it cannot do."""
import pytest
import torch
import torch.nn.functional as F
from helpers.pipelines import TEXT_DIM, TEXT_TOKENS, tiny_cogvideox_transformer

pytest.importorskip("diffusers")

from vidpo.models import motion_guidance as mg  # noqa: E402
from vidpo.models.cogvideox import CogVideoXAdapter  # noqa: E402
from vidpo.models.cogvideox.motion import CogVideoXAttentionProbe, transformer_depth  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = ("2b", "5b", "1.5")
# Latents (T, H, W): non-square, so that rows and columns cannot be confused; 1.5's 2-frame temporal patches need
# an even frame count, and its RoPE grid ('slice') cannot exceed the tiny model's training grid of 2 x 2 patches.
LATENT = {"2b": (3, 4, 6), "5b": (3, 4, 6), "1.5": (4, 4, 2)}
PATCH_T = {"2b": 1, "5b": 1, "1.5": 2}
# The 5B / 1.5 models apply RoPE in float32 whatever the weights' dtype (diffusers' apply_rotary_emb computes
# x.float() * cos), so a float64 reference agrees with them to float32 rounding only; 2B is float64 throughout.
TOL = {"2b": 1e-10, "5b": 1e-5, "1.5": 1e-5}


def tiny_cogvideox(layout, dtype=torch.float64, layers=2):
    return CogVideoXAdapter(tiny_cogvideox_transformer(layout, seed=3, num_layers=layers)).to(dtype).eval()


def inputs(layout, dtype=torch.float64, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *LATENT[layout], generator=g).to(dtype)
    cond = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g).to(dtype)
    return x, cond


class _Captured(Exception):
    pass


def block_input(model, x, t, cond, block):
    """``attn1``'s inputs at ``transformer_blocks[block]`` (a forward pre-hook; the forward is cut there):
    (attn, video hidden states, text hidden states, the RoPE (cos, sin) or None)."""
    attn = model.transformer.transformer_blocks[block].attn1
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)
        raise _Captured

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(x, t, cond)
    except _Captured:
        pass
    finally:
        handle.remove()
    return attn, seen["hidden_states"], seen["encoder_hidden_states"], seen.get("image_rotary_emb")


def reference_qk(attn, video, text, rope):
    """Float64, written independently of diffusers' processor: the joint [text, video] rows through the q / k
    projections, a LayerNorm per head, RoPE as a complex rotation of consecutive feature pairs on the video rows;
    returns the video rows (B, heads, n, d)."""
    joint = torch.cat([text, video], 1).double()
    length = text.shape[1]

    def project(linear, norm):
        bias = None if linear.bias is None else linear.bias.double()
        y = F.linear(joint, linear.weight.double(), bias)
        y = y.reshape(*joint.shape[:2], attn.heads, -1).permute(0, 2, 1, 3)
        y = F.layer_norm(y, y.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)[:, :, length:]
        if rope is None:
            return y
        cos, sin = (r.double() for r in rope)          # (n, d), each angle repeated for its feature pair
        pairs = torch.complex(y[..., 0::2], y[..., 1::2]) * torch.complex(cos[:, 0::2], sin[:, 0::2])
        return torch.stack([pairs.real, pairs.imag], dim=-1).flatten(-2)

    return project(attn.to_q, attn.norm_q), project(attn.to_k, attn.norm_k)


def reference_temporal_attention(q, k, grid):
    """Float64, written differently from vidpo's: the full n x n logits, masked to keys at the query's spatial
    position, softmax over those, then gathered into (B, heads, S, T', T')."""
    frames, height, width = grid
    spatial = height * width
    n = q.shape[2]
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) / q.shape[-1] ** 0.5
    position = torch.arange(n) % spatial                      # tokens in (t, h, w) order
    same = position[:, None] == position[None, :]
    probs = torch.softmax(logits.masked_fill(~same, float("-inf")), dim=-1)
    out = torch.empty(q.shape[0], q.shape[1], spatial, frames, frames, dtype=torch.float64)
    for s in range(spatial):
        rows = torch.arange(frames) * spatial + s
        out[:, :, s] = probs[:, :, rows][:, :, :, rows]
    return out


def grid_of(layout):
    """(T', H', W'): patch_size 2 in space, patch_size_t in time."""
    frames, height, width = LATENT[layout]
    return frames // PATCH_T[layout], height // 2, width // 2


def reference_energy(model, x, t, cond, a_ref, block, layout):
    q, k = reference_qk(*block_input(model, x, t, cond, block))
    mask = torch.zeros_like(a_ref).scatter_(-1, a_ref.argmax(-1, keepdim=True), 1.0)
    return ((mask * (a_ref - reference_temporal_attention(q, k, grid_of(layout)))) ** 2).flatten(1).sum(1)


# ----- the rule: CogVideoX's temporal attention ------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cogvideox_probe_reads_the_queries_and_keys_the_block_attends_with(layout):
    """The probe's joint q, k, v rebuild the block's attention output (text and video rows) exactly, its video q
    over the joint keys rebuilds the video rows, its q, k equal an independent recomputation from the block's
    inputs, and the rule's A is a distribution over (patch) frames per (head, pixel, frame)."""
    model = tiny_cogvideox(layout)
    x, cond = inputs(layout)
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    seen = {}
    attn = model.transformer.transformer_blocks[1].attn1
    original = attn.processor
    hooks = [attn.register_forward_hook(lambda m, args, out: seen.update(out=out)),
             attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(inp=kwargs), with_kwargs=True)]
    with CogVideoXAttentionProbe(model, -1) as probe:              # -1: the last of 2 blocks
        full = model(x, t, cond)
        q, k, v = probe.q, probe.k, probe.v
        joint_q, joint_k, joint_v, length = probe.joint_q, probe.joint_k, probe.joint_v, probe.text_length
    for hook in hooks:
        hook.remove()
    assert attn.processor is original
    video_out, text_out = seen["out"]

    def project_out(heads_out):                                    # (B, heads, rows, d) -> attn1's output rows
        return attn.to_out[1](attn.to_out[0](heads_out.transpose(1, 2).flatten(2)))

    rebuilt = project_out(F.scaled_dot_product_attention(joint_q, joint_k, joint_v))
    assert length == TEXT_TOKENS
    torch.testing.assert_close(rebuilt[:, length:], video_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rebuilt[:, :length], text_out, rtol=1e-10, atol=1e-10)
    # the softmax of each video query runs over [text keys, video keys]; the probe's q, v are the video rows
    torch.testing.assert_close(project_out(F.scaled_dot_product_attention(q, joint_k, joint_v)), video_out,
                               rtol=1e-10, atol=1e-10)
    assert torch.equal(v, joint_v[:, :, length:].transpose(1, 2))
    torch.testing.assert_close(model(x, t, cond), full, rtol=0, atol=0)          # the probe left the model as it was

    inp = seen["inp"]
    assert (inp.get("image_rotary_emb") is None) == (layout == "2b")             # the adapter passes its RoPE in
    q_ref, k_ref = reference_qk(attn, inp["hidden_states"], inp["encoder_hidden_states"], inp.get("image_rotary_emb"))
    torch.testing.assert_close(q, q_ref, rtol=TOL[layout], atol=TOL[layout])
    torch.testing.assert_close(k, k_ref, rtol=TOL[layout], atol=TOL[layout])

    grid = probe.grid(x)
    head_dim = 8 if layout == "2b" else 16
    assert grid == grid_of(layout) and q.shape == k.shape == (2, 2, grid[0] * grid[1] * grid[2], head_dim)
    a = mg.temporal_attention(q, k, grid)
    assert a.shape == (2, 2, grid[1] * grid[2], grid[0], grid[0])
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    torch.testing.assert_close(a, reference_temporal_attention(q, k, grid), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cogvideox_probe_orders_video_tokens_t_h_w(layout):
    """At block 0 a video token's q, k depend on its own latent patch only (patch embedding, norm and projections
    act per token), so perturbing the patch at (t, h, w) = (last, 1, 0) of row 0 changes exactly q row
    ``t H' W' + h W' + w`` of row 0: the probe's tokens are the video patches in (t, h, w) row-major order."""
    model = tiny_cogvideox(layout)
    x, cond = inputs(layout, seed=4)
    t = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with CogVideoXAttentionProbe(model, 0, stop=True) as probe:
        q0, k0 = probe.run(x, t, cond)
        bumped = x.clone()
        frame = LATENT[layout][0] - 1
        bumped[0, :, frame, 2:4, 0:2] += 1.0
        q1, k1 = probe.run(bumped, t, cond)
    frames, height, width = probe.grid(x)
    token = (frame // PATCH_T[layout]) * height * width + 1 * width + 0
    for before, after in ((q0, q1), (k0, k1)):
        changed = (after - before).abs().amax(dim=(1, 3)) > 0                     # (B, n)
        expected = torch.zeros_like(changed)
        expected[0, token] = True
        assert torch.equal(changed, expected), changed


def test_fused_projections_are_read_like_separate_ones():
    """``fuse_qkv_projections`` (one ``to_qkv``, FusedCogVideoXAttnProcessor2_0) gives the probe the same q, k."""
    model = tiny_cogvideox("5b")
    x, cond = inputs("5b", seed=5)
    t = torch.tensor([0.8, 0.2], dtype=torch.float64)
    with CogVideoXAttentionProbe(model, 1, stop=True) as probe:
        q, k = probe.run(x, t, cond)
    model.transformer.fuse_qkv_projections()
    assert type(model.transformer.transformer_blocks[1].attn1.processor).__name__.startswith("Fused")
    with CogVideoXAttentionProbe(model, 1, stop=True) as probe:
        q_fused, k_fused = probe.run(x, t, cond)
    torch.testing.assert_close(q_fused, q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k_fused, k, rtol=1e-12, atol=1e-12)


# ----- the motion guidance gradient through the network ---------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cogvideox_motion_guidance_gradient_matches_reference_through_the_network(layout):
    """grad_x g(x) and g(x) through CogVideoX against the reference energy (independent q, k and masked
    full-softmax temporal attention, float64), for the float64 and float32 models; the reference's own
    gradient is checked by central differences."""
    model64, model32 = tiny_cogvideox(layout, torch.float64), tiny_cogvideox(layout, torch.float32)
    x, cond = inputs(layout, seed=1)
    x_ref, _ = inputs(layout, seed=2)
    t = torch.tensor([0.9, 0.7], dtype=torch.float64)
    block = 1
    with torch.no_grad():
        a_ref = reference_temporal_attention(*reference_qk(*block_input(model64, x_ref, t, cond, block)),
                                             grid_of(layout))
    a_probe = mg.reference_attention(model64, x_ref, t, cond, block, probe=CogVideoXAttentionProbe)
    torch.testing.assert_close(a_probe, a_ref, rtol=TOL[layout], atol=TOL[layout])

    x64 = x.clone().requires_grad_(True)
    energy_ref = reference_energy(model64, x64, t, cond, a_ref, block, layout)
    (grad_ref,) = torch.autograd.grad(energy_ref.sum(), x64)
    assert bool((energy_ref > 0).all()) and float(grad_ref.abs().max()) > 0

    grad64, energy64 = mg.motion_guidance_gradient(model64, x, t, cond, a_ref, block, probe=CogVideoXAttentionProbe)
    assert grad64.dtype == torch.float64 and float(grad64.abs().max()) > 0
    scale = float(grad_ref.abs().max())
    torch.testing.assert_close(energy64, energy_ref.detach(), rtol=TOL[layout], atol=1e-12)
    torch.testing.assert_close(grad64, grad_ref, rtol=TOL[layout], atol=TOL[layout] * scale)

    grad32, energy32 = mg.motion_guidance_gradient(model32, x.float(), t.float(), cond.float(), a_ref.float(), block,
                                                   probe=CogVideoXAttentionProbe)
    torch.testing.assert_close(energy32.double(), energy_ref.detach(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad32.double(), grad_ref, rtol=1e-3, atol=1e-4 * scale)

    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        plus = reference_energy(model64, x + h * direction, t, cond, a_ref, block, layout).sum()
        minus = reference_energy(model64, x - h * direction, t, cond, a_ref, block, layout).sum()
    assert float((plus - minus) / (2 * h)) == pytest.approx(float((grad_ref * direction).sum()), rel=1e-3)


# ----- the probe's contract ---------------------------------------------------------------------------------------
def test_stop_cuts_the_forward_and_the_processor_comes_back():
    """stop=True: nothing after the probed block runs (block 0 of 2); without it the whole model runs; either way
    the original processors are back after the ``with``, also when the forward raised."""
    model = tiny_cogvideox("5b")
    x, cond = inputs("5b", seed=6)
    t = torch.tensor([0.6, 0.3], dtype=torch.float64)
    blocks = model.transformer.transformer_blocks
    originals = [block.attn1.processor for block in blocks]
    calls = {"block1": 0, "proj_out": 0}
    hooks = [blocks[1].register_forward_hook(lambda *a: calls.__setitem__("block1", calls["block1"] + 1)),
             model.transformer.proj_out.register_forward_hook(
                 lambda *a: calls.__setitem__("proj_out", calls["proj_out"] + 1))]
    assert transformer_depth(model) == 2 and transformer_depth(model.transformer) == 2
    with CogVideoXAttentionProbe(model, 0, stop=True) as probe:
        q, k = probe.run(x, t, cond)
    assert calls == {"block1": 0, "proj_out": 0}
    assert [block.attn1.processor for block in blocks] == originals
    with CogVideoXAttentionProbe(model, -2) as probe:                  # -2 is block 0 too; no stop: all runs
        q_full, _ = probe.run(x, t, cond)
    assert calls == {"block1": 1, "proj_out": 1}
    torch.testing.assert_close(q_full, q, rtol=0, atol=0)
    for hook in hooks:
        hook.remove()

    with pytest.raises(RuntimeError, match="shapes"), CogVideoXAttentionProbe(model, 0):
        model(x, t, cond[:, :, :3])                                   # a forward that fails inside the model
    assert [block.attn1.processor for block in blocks] == originals


def test_probe_refuses_a_second_probe_and_an_out_of_range_block():
    model = tiny_cogvideox("2b")
    with CogVideoXAttentionProbe(model, 1):
        with pytest.raises(RuntimeError, match="another probe"):
            with CogVideoXAttentionProbe(model, -1):
                pass
        with CogVideoXAttentionProbe(model, 0):                       # another block is free
            pass
    for block in (2, -3):
        with pytest.raises(ValueError, match=r"block .* out of range .* 2 blocks \(valid: -2 \.\. 1\)"):
            CogVideoXAttentionProbe(model, block)
