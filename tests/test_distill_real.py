"""Consistency distillation of a release (T2V-Turbo-v2 on Wan): the temporal-attention rule read from Wan's
full 3-D attention, the motion energy and its gradient, the CD loss and the guided teacher step against
float64 references; the student's schedule; the reward models' gradients; and ``vidpo distill`` end to end
on a tiny random Wan 2.1 release: preprocessing that survives a kill, a training process holding one
transformer, and an export (OUT/lora + OUT/scheduler) that WanPipeline samples in 4 steps exactly like the
engine's student."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.pipelines import PROMPTS_FOR_TESTS, TEXT_DIM, tiny_wan_transformer, word_tokenizer

pytest.importorskip("diffusers")

from vidpo.config import load_config  # noqa: E402
from vidpo.models import motion_guidance as mg  # noqa: E402
from vidpo.models.wan import WanAdapter  # noqa: E402
from vidpo.models.wan.motion import WanAttentionProbe  # noqa: E402
from vidpo.objectives import distill as cd  # noqa: E402
from vidpo.stages.preprocess import guided_teacher_step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/wan/turbo_tiny_cpu.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_wan(dtype=torch.float32, layers=2):
    return WanAdapter(tiny_wan_transformer(16, seed=3, num_layers=layers)).to(dtype).eval()


def inputs(dtype, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 3, 4, 4, generator=g).to(dtype)
    cond = torch.randn(batch, 5, TEXT_DIM, generator=g).to(dtype)
    return x, cond


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


def reference_energy(model, x, t, cond, a_ref, block):
    with WanAttentionProbe(model, block, stop=True) as probe:
        q, k = probe.run(x, t, cond)
        grid = probe.grid(x)
    mask = torch.zeros_like(a_ref).scatter_(-1, a_ref.argmax(-1, keepdim=True), 1.0)
    return ((mask * (a_ref - reference_temporal_attention(q, k, grid))) ** 2).flatten(1).sum(1)


# ----- the rule: Wan's temporal attention --------------------------------------------------------------------
def test_wan_probe_reads_the_queries_and_keys_the_block_attends_with():
    """The probe's post-RoPE q, k (and v) rebuild the block's attention output exactly, so the temporal attention
    is read from what Wan really computes; the rule's A is a distribution over frames per (head, pixel, frame)."""
    model = tiny_wan(torch.float64)
    x, cond = inputs(torch.float64)
    t = torch.tensor([0.9, 0.4], dtype=torch.float64)
    seen = {}
    attn = model.transformer.blocks[1].attn1
    hook = attn.register_forward_hook(lambda m, args, out: seen.setdefault("out", out))
    with WanAttentionProbe(model, 1) as probe:
        full = model(x, t, cond)
        q, k, v = probe.q, probe.k, probe.v
    hook.remove()
    assert isinstance(attn.processor, type(attn.processor)) and "Probe" not in type(attn.processor).__name__
    rebuilt = torch.nn.functional.scaled_dot_product_attention(q, k, v.transpose(1, 2)).transpose(1, 2).flatten(2)
    rebuilt = attn.to_out[1](attn.to_out[0](rebuilt))
    torch.testing.assert_close(rebuilt, seen["out"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(x, t, cond), full)           # the probe left the model as it was
    grid = probe.grid(x)
    assert grid == (3, 2, 2) and q.shape == (2, 2, 12, 8)
    a = mg.temporal_attention(q, k, grid)
    assert a.shape == (2, 2, 4, 3, 3)
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    torch.testing.assert_close(a, reference_temporal_attention(q, k, grid), rtol=1e-12, atol=1e-12)


def test_two_expert_wan_is_probed_in_the_expert_of_each_row():
    """Wan 2.2 A14B: a row at t >= boundary is read from ``transformer``, one below from ``transformer_2``."""
    model = WanAdapter(tiny_wan_transformer(16, seed=3, num_layers=2),
                       transformer_2=tiny_wan_transformer(16, seed=4, num_layers=2), boundary_ratio=0.875).double()
    x, cond = inputs(torch.float64)
    t = torch.tensor([0.3, 0.95], dtype=torch.float64)
    with WanAttentionProbe(model, 1, stop=True) as probe:
        q, k = probe.run(x, t, cond)
    for row, expert in ((0, model.transformer_2), (1, model.transformer)):
        one = WanAdapter(expert).double()
        with WanAttentionProbe(one, 1, stop=True) as probe_one:
            q1, k1 = probe_one.run(x[row:row + 1], t[row:row + 1], cond[row:row + 1])
        torch.testing.assert_close(q[row:row + 1], q1, rtol=0, atol=0)
        torch.testing.assert_close(k[row:row + 1], k1, rtol=0, atol=0)
    assert not torch.allclose(q[0], q[1])


def test_motion_energy_of_queries_and_keys_and_its_gradient_match_float64_reference():
    """The PTA energy as a function of a block's (q, k): vidpo's float32 value and gradient against the masked
    full-softmax float64 reference, whose gradient is checked by central differences (exact float64 here)."""
    g = torch.Generator().manual_seed(0)
    grid = (3, 2, 2)
    q, k, q_ref, k_ref = (torch.randn(2, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(4))
    a_ref = reference_temporal_attention(q_ref, k_ref, grid)
    mask = torch.zeros_like(a_ref).scatter_(-1, a_ref.argmax(-1, keepdim=True), 1.0)

    def reference(q, k):
        return ((mask * (a_ref - reference_temporal_attention(q, k, grid))) ** 2).flatten(1).sum(1)

    q32, k32 = q.float().requires_grad_(True), k.float().requires_grad_(True)
    energy32 = mg.motion_energy(mg.temporal_attention(q32, k32, grid), a_ref.float())
    gq32, gk32 = torch.autograd.grad(energy32.sum(), (q32, k32))
    q64, k64 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    energy64 = reference(q64, k64)
    gq64, gk64 = torch.autograd.grad(energy64.sum(), (q64, k64))
    torch.testing.assert_close(energy32.double(), energy64.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gq32.double(), gq64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gk32.double(), gk64, rtol=1e-4, atol=1e-6)
    dq, dk = torch.randn(q.shape, generator=g, dtype=torch.float64), torch.randn(k.shape, generator=g,
                                                                                  dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        numeric = (reference(q + h * dq, k + h * dk).sum() - reference(q - h * dq, k - h * dk).sum()) / (2 * h)
    assert float(numeric) == pytest.approx(float((gq64 * dq).sum() + (gk64 * dk).sum()), rel=1e-7)


def test_wan_motion_guidance_gradient_matches_reference_through_the_network():
    """grad_x g(x) through Wan (whose blocks normalise in float32 whatever the weights' dtype) against the
    float64-weights model with the reference energy, and against central differences."""
    model32, model64 = tiny_wan(torch.float32), tiny_wan(torch.float64)
    x, cond = inputs(torch.float64, seed=1)
    x_ref, _ = inputs(torch.float64, seed=2)
    t = torch.tensor([0.9, 0.7], dtype=torch.float64)
    a_ref = mg.reference_attention(model64, x_ref, t, cond, 0, probe=WanAttentionProbe)
    grad32, energy32 = mg.motion_guidance_gradient(model32, x.float(), t.float(), cond.float(), a_ref.float(), 0,
                                                   probe=WanAttentionProbe)
    x64 = x.clone().requires_grad_(True)
    energy64 = reference_energy(model64, x64, t, cond, a_ref, 0)
    (grad64,) = torch.autograd.grad(energy64.sum(), x64)
    assert bool((energy64 > 0).all())
    torch.testing.assert_close(energy32.double(), energy64.detach(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-3, atol=1e-4 * float(grad64.abs().max()))
    # the gradient is the energy's derivative: central differences along a random direction (a step large
    # enough for the float32 normalisations inside Wan's blocks)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = 1e-3
    with torch.no_grad():
        plus = reference_energy(model64, x + h * direction, t, cond, a_ref, 0).sum()
        minus = reference_energy(model64, x - h * direction, t, cond, a_ref, 0).sum()
    assert float((plus - minus) / (2 * h)) == pytest.approx(float((grad64 * direction).sum()), rel=1e-2)


# ----- the CD target and loss, and the teacher's guided step, on Wan ---------------------------------------------
@pytest.mark.parametrize("distance", ["huber", "l2"])
def test_wan_cd_loss_matches_float64_reference(distance):
    model = tiny_wan(torch.float64)
    x_t, cond = inputs(torch.float64, seed=3)
    x_prev, _ = inputs(torch.float64, seed=4)
    t = torch.tensor([0.5, 1.0], dtype=torch.float64)
    t_prev = torch.tensor([0.0, 0.75], dtype=torch.float64)
    loss, prediction, target = cd.cd_loss(model, x_t, t, x_prev, t_prev, cond, distance=distance, huber_c=0.01)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    # f(x, t) = x - t v (c_skip = 1, c_out = -t); f(x, 0) = x exactly
    direct_pred = x_t - t.view(-1, 1, 1, 1, 1) * model(x_t, t, cond)
    with torch.no_grad():
        direct_target = x_prev - t_prev.view(-1, 1, 1, 1, 1) * model(x_prev, t_prev, cond)
    assert torch.equal(target[0], x_prev[0]) and not target.requires_grad
    diff = direct_pred - direct_target
    direct = (torch.sqrt(diff ** 2 + 0.01 ** 2) - 0.01).mean() if distance == "huber" else (diff ** 2).mean()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    direct.backward()
    for got, want in zip(grads, (p.grad for p in model.parameters() if p.grad is not None)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_wan_guided_teacher_step_matches_float64_reference():
    """x_prev = x_t + (t' - t) (v_neg + w (v_cond - v_neg) + eta grad g) with CFG against the negative prompt's
    embeddings and motion guidance on the first row only (the second is not a trusted source)."""
    cfg = load_config(RECIPE, ["distill.motion_scale=50.0", "distill.motion_fraction=0.5", "distill.cfg_scale=4.0",
                               "distill.motion_block=1"])
    model32, model64 = tiny_wan(torch.float32), tiny_wan(torch.float64)
    x0, cond = inputs(torch.float64, seed=6)
    noise, negative = inputs(torch.float64, seed=7)
    grid = torch.linspace(0, 1, 9)
    n = torch.tensor([8, 6])
    rows = {"x0": x0.float(), "noise": noise.float(), "t": grid[n], "t_prev": grid[n - 2], "n": n,
            "source": torch.tensor([0, 1])}
    out = guided_teacher_step(cfg, model32, rows, cond.float(), negative.float(), grid, "cpu", depth=2,
                              probe=WanAttentionProbe)
    assert out["motion"].tolist() == [1, 0]

    t, t_prev = grid[n].double(), grid[n - 2].double()
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    with torch.no_grad():
        v = model64(x_t, t, negative) + 4.0 * (model64(x_t, t, cond) - model64(x_t, t, negative))
    # the reference latent: Euler inversion of x0 on v_cond up to t_8 = 1, on the grid
    x_ref = x0[:1]
    with torch.no_grad():
        for i in range(8):
            x_ref = x_ref + float(grid[i + 1] - grid[i]) * model64(x_ref, grid[i:i + 1].double(), cond[:1])
    with WanAttentionProbe(model64, 1, stop=True) as probe, torch.no_grad():
        q, k = probe.run(x_ref, t[:1], cond[:1])
    a_ref = reference_temporal_attention(q, k, (3, 2, 2))
    x_guided = x_t[:1].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference_energy(model64, x_guided, t[:1], cond[:1], a_ref, 1).sum(), x_guided)
    v[:1] += 50.0 * grad
    want = x_t + (t_prev - t).view(-1, 1, 1, 1, 1) * v
    torch.testing.assert_close(out["x_t"].double(), x_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["x_prev"].double(), want, rtol=1e-4, atol=1e-5)
    assert float(grad.abs().max()) * 50.0 > 1e-3   # the motion term is not negligible: the test would see it


# ----- the student's schedule: what WanPipeline samples with -------------------------------------------------------
@pytest.mark.parametrize("shift,terminal", [(1.0, None), (3.0, 0.1)])
def test_student_sigmas_are_training_times_of_the_refined_teacher_grid(shift, terminal):
    scheduler = cd.flow_student_scheduler(4, shift=shift, terminal=terminal)
    sigmas = cd.student_sigmas(scheduler, 4)
    grid = cd.refined_grid(sigmas, 16)
    assert grid.numel() == 17 and float(grid[0]) == 0 and float(grid[-1]) == 1 and bool((grid[1:] > grid[:-1]).all())
    assert torch.equal(cd.student_times(4, grid, 2), sigmas[:-1])
    if terminal is None:
        torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    else:
        assert float(sigmas[3]) == pytest.approx(terminal, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_student_sampler_is_the_exported_schedulers_loop_bit_for_bit(dtype):
    """The scheduler's own set_timesteps / step loop (what WanPipeline runs) on a velocity in the model's dtype."""
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))

    def velocity(x, t, cond):
        return (x.to(dtype) @ weight.to(dtype)) * (1 + t.view(-1, 1, 1)).to(dtype)
    noise = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = cd.student_sigmas(cd.flow_student_scheduler(4, shift=3.0, terminal=0.1), 4)
    scheduler = cd.flow_student_scheduler(4, shift=3.0, terminal=0.1)
    scheduler.set_timesteps(4)
    latents = noise.float()
    for t in scheduler.timesteps:
        latents = scheduler.step(velocity(latents, (t / 1000).expand(2), None), t, latents, return_dict=False)[0]
    assert torch.equal(cd.sample_flow_student(velocity, noise, None, sigmas), latents.float())


# ----- reward models --------------------------------------------------------------------------------------------
def make_clip_dir(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=1),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8),
                        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(path))
    word_tokenizer(PROMPTS_FOR_TESTS).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("rule", ["clip_cosine", "clip_mean_cosine"])
def test_clip_reward_value_and_gradient_match_float64_reference(tmp_path, rule):
    import torch.nn.functional as F

    from vidpo.objectives.rewards_models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipReward

    path = make_clip_dir(tmp_path / "clip")
    texts = list(PROMPTS_FOR_TESTS[:3])
    r32 = ClipReward("clip", path, rule, texts)
    r64 = ClipReward("clip", path, rule, texts, dtype=torch.float64)
    shape = (2, 3, 32, 24) if rule == "clip_cosine" else (2, 3, 3, 32, 24)
    pixels = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    index = torch.tensor([2, 0])
    p32 = pixels.float().requires_grad_(True)
    value32 = r32(p32, index)
    (g32,) = torch.autograd.grad(value32.sum(), p32)

    # the declared rule, written out in float64 with the model's own feature heads
    p64 = pixels.clone().requires_grad_(True)
    frames = p64 if p64.dim() == 4 else p64.transpose(1, 2).reshape(-1, 3, 32, 24)
    x = F.interpolate((frames + 1) / 2, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(OPENAI_CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    image = r64.model.visual_projection(r64.model.vision_model(pixel_values=x).pooler_output)
    image = image / image.norm(dim=-1, keepdim=True)
    if p64.dim() == 5:
        image = image.view(2, 3, -1).mean(1)
        image = image / image.norm(dim=-1, keepdim=True)
    value64 = F.cosine_similarity(image, r64.text[index], dim=-1)
    (g64,) = torch.autograd.grad(value64.sum(), p64)
    assert r32.kind == ("image" if rule == "clip_cosine" else "video")
    torch.testing.assert_close(value32.double(), value64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-3, atol=1e-5 * float(g64.abs().max()))
    assert float(g64.abs().max()) > 0


def test_two_rewards_on_one_checkpoint_share_its_weights(tmp_path):
    """A frame reward and a video reward on one CLIP checkpoint load it once, and `vidpo scale` counts it once."""
    from types import SimpleNamespace

    from vidpo.cluster.reward_memory import _clip_counts, reward_memory
    from vidpo.config import RewardConfig
    from vidpo.objectives.rewards_models import build_model_rewards

    path = make_clip_dir(tmp_path / "clip")
    models = {"frames": {"path": str(path), "kind": "image", "rule": "clip_cosine"},
              "video": {"path": str(path), "kind": "video", "rule": "clip_mean_cosine"}}
    reward = RewardConfig(image={"frames": 1.0}, video={"video": 0.5}, models=models, max_rows=1)
    mixture = build_model_rewards(reward, list(PROMPTS_FOR_TESTS[:3]))
    assert [t.reward.rule for t in mixture.terms] == ["clip_cosine", "clip_mean_cosine"]
    assert mixture.terms[0].reward.model is mixture.terms[1].reward.model
    cfg = SimpleNamespace(reward=reward, model=SimpleNamespace(path=None))
    counted = reward_memory(cfg, (2, 4, 4), None, 1)
    params = sum(p.numel() for p in mixture.terms[0].reward.model.parameters())
    assert counted.weights == params * 4 and _clip_counts(str(path), 2)[0] == params
    assert counted.activations == _clip_counts(str(path), 2)[1] + _clip_counts(str(path), 5)[1]


# ----- vidpo distill on a tiny Wan release -------------------------------------------------------------------------
def turbo_workspace(root: Path, make_release):
    """``(root, server)`` for a release's distillation tests: ``make_release(root)`` builds the tiny release, a prompt
    file whose prompts name real clips (half 'web', two held out, one with a negative prompt), a CLIP reward model
    and the stub VLM judge (close ``server`` after)."""
    from helpers.video import encode_clip, make_frames
    from helpers.vlm_server import FakeVLM, Reply, brightness_verdict

    make_release(root)
    rows = []
    for i, text in enumerate(PROMPTS_FOR_TESTS):
        clip = encode_clip(root / "clips" / f"c{i}", make_frames(12, 40, 48), "h264", fps=8)
        row = {"id": f"p{i}", "prompt": text, "clip": str(clip), "source": "web" if i % 2 else "curated"}
        if i >= 6:
            row["split"] = "heldout"
        if i == 1:
            row["negative_prompt"] = "blurry, low quality"
        rows.append(row)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_clip_dir(root / "clip")
    server = FakeVLM()
    server.behaviour = lambda request: Reply(text=brightness_verdict(request, margin=0.5))
    return root, server


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Wan 2.1 release (2 blocks) in ``turbo_workspace``."""
    from helpers.pipelines import make_wan_dir

    root, server = turbo_workspace(tmp_path_factory.mktemp("turbo"),
                                   lambda r: make_wan_dir(r / "wan", prompts=PROMPTS_FOR_TESTS, num_layers=2))
    yield root, server
    server.close()
    assert not server.schema_errors, server.schema_errors[:3]


def sets(root, server, *extra):
    items = [f"model.path={root / 'wan'}", f"prompts.path={root / 'prompts.jsonl'}",
             f"label.vlm.base_url={server.base_url}", "train.num_threads=1", *extra]
    return [a for item in items for a in ("--set", item)]


def test_vidpo_distill_on_a_wan_release(workspace, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors import safe_open

    from vidpo.stages.distill_real import build_student
    from vidpo.stages.preprocess_real import preprocess_real_job, release_data, student_schedule
    from vidpo.training import checkpoint as ckpt

    root, server = workspace
    out = tmp_path / "turbo"
    reward = [f"reward.models={{clip: {{path: {root / 'clip'}, kind: image, rule: clip_cosine}}}}",
              "reward.image={clip: 1.0}", "distill.num_rows=16", "distill.shard_size=2"]   # 8 shards
    args = sets(root, server, *reward)

    # 1. preprocessing killed after its first shard (a real SIGKILL), then `vidpo distill` finishes the rest
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "vidpo", "preprocess", RECIPE, "--out", str(out / "data"), *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "data" / "shards" / "shard_00000.safetensors"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-3000:]
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in (out / "data" / "shards").glob("shard_*.safetensors")}
    assert 1 <= len(before) < 8

    # a fresh process, so that what it holds is what the distillation holds (nothing of this test's process)
    done = subprocess.run([sys.executable, "-m", "vidpo", "distill", RECIPE, "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    prep = summary["preprocess"]
    assert prep["skipped"] == len(before) and prep["computed"] == 8 - len(before)      # nothing redone, nothing lost
    for name, (inode, data) in before.items():
        path = out / "data" / "shards" / name
        assert path.stat().st_ino == inode and path.read_bytes() == data
    # ... and the shards equal those of an uninterrupted run, bit for bit
    cfg = load_config(RECIPE, [s for s in args if s != "--set"])
    import shutil

    for cache in ("prompt_embeddings",):   # the same encoded prompts (cached, keyed by their settings)
        shutil.copytree(out / "data" / cache, tmp_path / "fresh" / cache)
    # (written rank-sliced: rank 0 of 2 takes shards 0, 2, 4, 6; rank 1 the others and then writes the index)
    release = release_data(cfg, tmp_path / "fresh", torch.device("cpu"))
    first_rank = preprocess_real_job(cfg, tmp_path / "fresh", rank=0, world_size=2, release=release)
    assert first_rank["computed"] == 4 and not (tmp_path / "fresh" / "index.json").exists()
    fresh = preprocess_real_job(cfg, tmp_path / "fresh", rank=1, world_size=2, release=release)
    assert fresh["computed"] == 4 and fresh["motion_rows"] == prep["motion_rows"] > 0
    assert fresh["mean_guidance_to_velocity"] > 0
    for k in range(8):
        name = f"shard_{k:05d}.safetensors"
        with safe_open(str(out / "data" / "shards" / name), "pt") as a, \
                safe_open(str(tmp_path / "fresh" / "shards" / name), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for key in a.keys():   # energy is NaN on rows without motion guidance
                torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=0, atol=0, equal_nan=True)

    # 2. the training process held one transformer (the teacher's steps are in the shards) + the reward's models
    train = summary["train"]
    residency = train["residency"]
    assert residency["measured"] and residency["dit_models"] == {"WanTransformer3DModel": 1}
    from transformers import CLIPModel

    clip_bytes = sum(p.numel() * p.element_size() for p in CLIPModel.from_pretrained(str(root / "clip")).parameters())
    assert residency["reward_parameter_bytes"] == clip_bytes
    assert residency["parameter_bytes"] == (residency["student_parameter_bytes"] + residency["vae_parameter_bytes"]
                                            + clip_bytes)
    # `vidpo scale` counts the reward's models on the meta device as the run loaded them (the VAE and the CLIP model)
    from vidpo.cluster.scale import GIB, estimate

    on_paper = estimate(cfg, 1)
    assert on_paper.memory_gib["reward_models"] * GIB == pytest.approx(residency["vae_parameter_bytes"] + clip_bytes)
    assert on_paper.memory_gib["reward_activations"] > 0
    assert train["rewards"] == ["clip"]
    metrics = [json.loads(line) for line in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("reward_rows", 0) > 0 for row in metrics)

    # 3. the judged evaluation: teacher (16 steps + CFG) vs student (4 steps, no CFG), NFE and time per clip
    evaluation = summary["eval"]
    assert evaluation["judged"]["judge"] == "vlm" and evaluation["judged"]["failed"] == 0
    cost = evaluation["cost"]
    assert cost["teacher"]["nfe_per_clip"] == 32 and cost["student"]["nfe_per_clip"] == 4
    assert cost["teacher"]["seconds_per_clip"] > 0 and cost["student"]["seconds_per_clip"] > 0
    assert (out / "eval" / "judged.json").is_file()
    clip_scores = evaluation["rewards"]["clip"]
    assert -1 <= clip_scores["base"] <= 1 and -1 <= clip_scores["policy"] <= 1 and clip_scores["delta"]["n"] == 4

    # 4. OUT/lora + OUT/scheduler in WanPipeline: 4 steps, guidance 1, equal to the engine's student on fixed noise
    from helpers.pipelines import diffusers_pipeline, pipeline_latents

    from vidpo.objectives.distill import ConsistencyStudent

    pipe = diffusers_pipeline(root / "wan")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "scheduler"))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 16, 3, 4, 4, generator=g)
    cond = torch.randn(2, 8, TEXT_DIM, generator=g)
    base = pipeline_latents(pipe, noise, cond, None, 4, 1.0)
    pipe.load_lora_weights(str(out / "lora"))
    got = pipeline_latents(pipe, noise, cond, None, 4, 1.0)
    student, _ = build_student(cfg, torch.device("cpu"))
    ckpt.load_weights(student, out / "student")
    _, sigmas, _ = student_schedule(cfg)
    want = cd.sample_flow_student(ConsistencyStudent(student.eval(), sigmas), noise, cond, sigmas)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-4      # the LoRA was trained and loaded: without it the output differs


def test_fully_fine_tuned_student_exports_a_transformer_wan_pipeline_samples(workspace, tmp_path):
    """No ``lora`` section: every weight of the transformer trains, and OUT/transformer + OUT/scheduler in
    WanPipeline sample as the engine's student."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from helpers.pipelines import diffusers_pipeline, pipeline_latents

    from vidpo.stages.distill_real import train_distill_real
    from vidpo.stages.preprocess_real import preprocess_real_job, student_schedule

    root, server = workspace
    overrides = [s for s in sets(root, server, "distill.num_rows=4", "train.max_steps=2", "train.ckpt_every=2",
                                 "distill.motion_scale=0.0") if s != "--set"]
    cfg = load_config(RECIPE, overrides + [f"distill.data={tmp_path / 'data'}"])
    cfg.lora = None   # a recipe without a lora section (--set cannot remove a section)
    preprocess_real_job(cfg, tmp_path / "data")
    summary = train_distill_real(cfg, tmp_path / "student", export_dir=tmp_path / "out")
    student = summary["model"]
    # (what the whole process holds is measured in a fresh process by test_vidpo_distill_on_a_wan_release)
    assert summary["residency"]["student_parameter_bytes"] == sum(p.numel() * 4 for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())

    pipe = diffusers_pipeline(root / "wan")
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.transformer = WanTransformer3DModel.from_pretrained(str(tmp_path / "out" / "transformer"))
    assert any(not torch.equal(base_weights[k], v) for k, v in pipe.transformer.state_dict().items())
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "out" / "scheduler"))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 3, 4, 4, generator=g)
    cond = torch.randn(1, 8, TEXT_DIM, generator=g)
    _, sigmas, _ = student_schedule(cfg)
    want = cd.sample_flow_student(cd.ConsistencyStudent(student.eval(), sigmas), noise, cond, sigmas)
    torch.testing.assert_close(pipeline_latents(pipe, noise, cond, None, 4, 1.0), want, rtol=1e-5, atol=1e-5)


def test_phased_release_student_maps_to_its_own_sigmas(workspace, tmp_path):
    """``distill.phases = eval_steps``: the phase edges are the exported scheduler's sigmas (increasing), the loss
    of the same rows differs from the plain targets', and a phase count other than eval_steps is one clear error."""
    from vidpo.config import ConfigError
    from vidpo.stages.distill_real import release_phase_edges, train_distill_real
    from vidpo.stages.preprocess_real import preprocess_real_job, student_schedule

    root, server = workspace
    # 8 rows drawn with replacement, 8 a step: rows past the first phase (whose start is 0 either way) are drawn
    overrides = [s for s in sets(root, server, "distill.num_rows=8", "train.max_steps=1", "train.ckpt_every=1",
                                 "distill.motion_scale=0.0", "train.log_every=1", "train.batch_size=8")
                 if s != "--set"]
    cfg = load_config(RECIPE, overrides + [f"distill.data={tmp_path / 'data'}"])
    preprocess_real_job(cfg, tmp_path / "data")
    _, sigmas, _ = student_schedule(cfg)
    phased = load_config(RECIPE, overrides + [f"distill.data={tmp_path / 'data'}", "distill.phases=4"])
    edges = release_phase_edges(phased)
    assert torch.equal(edges, sigmas.flip(0).float()) and edges[0] == 0 and edges[-1] == 1
    assert release_phase_edges(cfg) is None
    with pytest.raises(ConfigError, match="phases = 2: a release student's phases"):
        release_phase_edges(load_config(RECIPE, overrides + ["distill.phases=2"]))

    def first_loss(run_cfg, out):
        train_distill_real(run_cfg, out, export_dir=out / "export")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in rows if "loss" in r)
    plain, with_phases = first_loss(cfg, tmp_path / "plain"), first_loss(phased, tmp_path / "phased")
    assert math.isfinite(with_phases) and with_phases != plain


def test_release_distillation_refuses_what_it_cannot_do_in_one_clear_error():
    from vidpo.config import ConfigError
    from vidpo.stages.preprocess_real import check_release_family, student_schedule

    with pytest.raises(ConfigError, match=r"model.kind=dit: consistency distillation of a release supports "
                                          r"\['cogvideox', 'wan'\]"):
        toy = load_config(RECIPE)
        toy.model.kind = "dit"         # (a recipe cannot load like this: the toy DiT distils through the shapes world)
        check_release_family(toy)
    with pytest.raises(ConfigError, match="multiple of distill.eval_steps"):
        student_schedule(load_config(RECIPE, ["distill.grid_steps=20"]))
    with pytest.raises(ConfigError, match=r"distill.student_terminal must be in \(0, 1\)"):
        load_config(RECIPE, ["distill.student_terminal=1.5"])
    with pytest.raises(ConfigError, match="reward.models"):
        load_config(RECIPE, ["reward.models={clip: {path: /x, kind: video, rule: clip_cosine}}"])


def test_a_bad_source_in_the_prompt_file_is_one_error_naming_its_line(workspace, tmp_path, capsys):
    from vidpo.cli import main as cli

    root, server = workspace
    lines = (root / "prompts.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["source"] = "webvid"
    lines[2] = json.dumps(row)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    args = sets(root, server)
    args[args.index(f"prompts.path={root / 'prompts.jsonl'}")] = f"prompts.path={prompts}"
    assert cli(["preprocess", RECIPE, "--out", str(tmp_path / "data"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{prompts}:3" in err[0] and "'webvid'" in err[0], err
    assert not (tmp_path / "data" / "prompt_embeddings").exists()


def test_two_expert_student_schedule_routes_like_wan_pipeline(tmp_path):
    """Wan 2.2 A14B: the student's sigmas cross the experts' boundary (1.0 -> transformer, 0.75 .. 0.25 ->
    transformer_2) and the engine's sampler routes each step as WanPipeline with the exported scheduler does."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from helpers.pipelines import diffusers_pipeline, make_wan_dir, pipeline_latents

    from vidpo.models.registry import load_adapter

    release = make_wan_dir(tmp_path / "wan22", two_experts=True, prompts=PROMPTS_FOR_TESTS)
    scheduler = cd.flow_student_scheduler(4)
    scheduler.save_pretrained(str(tmp_path / "scheduler"))
    sigmas = cd.student_sigmas(scheduler, 4)
    pipe = diffusers_pipeline(release)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "scheduler"))
    adapter = load_adapter("wan", release).eval()
    assert adapter.high_noise(sigmas[:-1]).tolist() == [True, False, False, False]
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 16, 3, 4, 4, generator=g)
    cond = torch.randn(1, 8, TEXT_DIM, generator=g)
    want = cd.sample_flow_student(cd.ConsistencyStudent(adapter, sigmas), noise, cond, sigmas)
    torch.testing.assert_close(pipeline_latents(pipe, noise, cond, None, 4, 1.0), want, rtol=1e-5, atol=1e-5)


def test_flow_process_is_the_generic_ddim_process_at_a_equal_1_minus_t_s_equal_t():
    """Wan's process (vidpo.objectives.distill_process.FlowProcess): its Euler step, consistency function, phased
    inverse and inversion, written in the flow form, equal the generic DDIM forms with a = 1 - t, s = t."""
    from vidpo.objectives.distill_process import DiffusionProcess, FlowProcess

    flow_process = FlowProcess()

    class Generic(DiffusionProcess):   # the base class's DDIM step, inversion and phased inverse
        coefficients, predictions = FlowProcess.coefficients, FlowProcess.predictions
    generic = Generic()
    g = torch.Generator().manual_seed(0)
    x, v, x0, eps = (torch.randn(3, 4, 2, 2, 2, generator=g, dtype=torch.float64) for _ in range(4))
    t, t_to, end = (torch.tensor(v, dtype=torch.float64) for v in ([0.9, 0.5, 0.25], [0.7, 0.25, 0.0],
                                                                    [0.75, 0.25, 0.0]))
    for name, args in (("interpolate", (x0, eps, t)), ("step", (x, t, t_to, v)),
                       ("clean_from", (x, t, x + (end - t).view(-1, 1, 1, 1, 1) * v, end))):
        torch.testing.assert_close(getattr(flow_process, name)(*args), getattr(generic, name)(*args),
                                   rtol=1e-12, atol=1e-12)
    for e in (None, end):
        torch.testing.assert_close(flow_process.consistency_function(lambda *_: v, x, t, None, e),
                                   generic.consistency_function(lambda *_: v, x, t, None, e), rtol=1e-12, atol=1e-12)
    model = tiny_wan(torch.float64)
    x0 = torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 5, TEXT_DIM, generator=g, dtype=torch.float64)
    times = torch.linspace(0, 1, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(flow_process.invert(model, x0, cond, times), generic.invert(model, x0, cond, times),
                                   rtol=1e-10, atol=1e-10)
