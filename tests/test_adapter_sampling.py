"""The adapters' sampler hook: sampling and SDEdit with the model's own diffusers scheduler and CFG.

Each sampler is checked against a loop written here that calls the diffusers scheduler's ``set_timesteps`` /
``step`` directly on the same starting noise (the loop of CogVideoXPipeline / WanPipeline), and the engine's
pair generation and evaluation are checked to go through the hook (their outputs equal the hook's)."""
import pytest
import torch

pytest.importorskip("diffusers")

from helpers.models import TEXT_DIM, TEXT_LEN, tiny_cogvideox, tiny_wan  # noqa: E402
from vidpo.models.adapters import TextConditioner  # noqa: E402
from vidpo.models.cogvideox import CogVideoXAdapter  # noqa: E402
from vidpo.models.sampling import has_sampler_hook  # noqa: E402
from vidpo.utils.seeding import generator, randn_per_sample  # noqa: E402

C, T, S = 3, 4, 8
TOL = dict(rtol=1e-5, atol=1e-5)


def cogvideox(sampler=None, seed=0):
    return tiny_cogvideox(in_channels=C, frames=T, size=S, seed=seed, sampler=sampler)


def guided(model, x, k_or_t, cond, w):
    """CFG with two separate calls (the direct loops do not share the hook's batched call)."""
    t = torch.full((x.shape[0],), float(k_or_t))
    with torch.no_grad():
        v_c, v_u = model(x, t, cond), model(x, t, torch.zeros_like(cond))
    return v_u + w * (v_c - v_u)


def direct_cogvideox(model, scheduler, noise, cond, steps, w, *, start=0, x0=None, generators=None):
    """CogVideoXPipeline's denoising loop, with the scheduler called directly (DDIM or DPM-Solver++)."""
    from diffusers import CogVideoXDPMScheduler

    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    x = noise * scheduler.init_noise_sigma
    if x0 is not None:   # SDEdit: the scheduler's own forward process at the starting timestep
        x = scheduler.add_noise(x0, noise, timesteps[start:start + 1].repeat(x0.shape[0]))
    old = None
    for i in range(start, len(timesteps)):
        k = timesteps[i]
        v = guided(model, x, int(k) / 999, cond, w)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            back = timesteps[i - 1] if i > start else None
            x, old = scheduler.step(v, old, k, back, x, generator=generators, return_dict=False)
        else:
            x = scheduler.step(v, k, x, return_dict=False)[0]
    return x


def test_cogvideox_ddim_hook_equals_the_scheduler_loop():
    model = cogvideox("ddim")
    cond = torch.randn(2, TEXT_LEN, TEXT_DIM)
    out = model.sample(cond, (C, T, S, S), seed=3, indices=[4, 1], steps=4, cfg_scale=6.0, stream="s")
    from diffusers import CogVideoXDDIMScheduler

    noise = randn_per_sample((2, C, T, S, S), 3, [4, 1], "s")
    want = direct_cogvideox(model, CogVideoXDDIMScheduler.from_config(model.scheduler.config), noise, cond, 4, 6.0)
    torch.testing.assert_close(out, want, **TOL)
    assert out.abs().max() > 0.1 and torch.isfinite(out).all()
    # The hook is not the engine's Euler over a velocity: a v-prediction integrated as one differs.
    from vidpo.models import flow

    euler = flow.sample(lambda x, t, c: model(x, t, c), (2, C, T, S, S), cond, seed=3, indices=[4, 1], steps=4,
                        null_cond=torch.zeros_like(cond), cfg_scale=6.0, stream="s")
    assert (euler - out).abs().max() > 1e-2


def test_cogvideox_dpm_hook_equals_the_scheduler_loop_with_per_sample_step_noise():
    model = cogvideox("dpm")
    cond = torch.randn(2, TEXT_LEN, TEXT_DIM)
    out = model.sample(cond, (C, T, S, S), seed=5, indices=[7, 2], steps=4, cfg_scale=5.0, stream="s")
    from diffusers import CogVideoXDPMScheduler

    noise = randn_per_sample((2, C, T, S, S), 5, [7, 2], "s")
    gens = [generator(5, "s", "steps", i) for i in (7, 2)]     # DPM's step noise: one stream per sample
    want = direct_cogvideox(model, CogVideoXDPMScheduler.from_config(model.scheduler.config), noise, cond, 4, 5.0,
                            generators=gens)
    torch.testing.assert_close(out, want, **TOL)
    # Sample i depends only on (seed, stream, i): alone, or in another batch order, it is the same sample.
    alone = model.sample(cond[1:], (C, T, S, S), seed=5, indices=[2], steps=4, cfg_scale=5.0, stream="s")
    torch.testing.assert_close(alone[0], out[1], **TOL)
    other = model.sample(cond, (C, T, S, S), seed=5, indices=[7, 2], steps=4, cfg_scale=5.0, stream="t")
    assert (other - out).abs().max() > 1e-3


def test_cogvideox_sdedit_enters_the_grid_at_eta_with_add_noise():
    model = cogvideox("ddim")
    cond = torch.randn(3, TEXT_LEN, TEXT_DIM)
    x0 = torch.randn(3, C, T, S, S)
    eta = torch.tensor([0.6, 0.3, 0.6])
    out = model.sdedit(x0, cond, eta, seed=1, indices=[0, 1, 2], steps=5, cfg_scale=4.0, stream="e")
    from diffusers import CogVideoXDDIMScheduler

    noise = randn_per_sample(tuple(x0.shape), 1, [0, 1, 2], "e")
    grid = CogVideoXDDIMScheduler.from_config(model.scheduler.config)
    grid.set_timesteps(5)                       # trailing: 999, 799, 599, 399, 199
    for rows, e in (([0, 2], 0.6), ([1], 0.3)):
        start = next(i for i, k in enumerate(grid.timesteps.tolist()) if k / 999 <= e)
        assert grid.timesteps[start] == (599 if e == 0.6 else 199)
        sched = CogVideoXDDIMScheduler.from_config(model.scheduler.config)
        want = direct_cogvideox(model, sched, noise[rows], cond[rows], 5, 4.0, start=start, x0=x0[rows])
        torch.testing.assert_close(out[rows], want, **TOL)
    # eta below the whole grid: nothing to denoise; eta = 1 starts from (almost) pure noise like sampling.
    torch.testing.assert_close(model.sdedit(x0, cond, 0.1, seed=1, indices=[0, 1, 2], steps=5, cfg_scale=4.0), x0)


def test_wan_unipc_hook_equals_the_scheduler_loop_and_sdedit_from_1_is_sampling():
    from diffusers import UniPCMultistepScheduler

    model = tiny_wan(sampler="unipc", sample_shift=3.0)
    cond = torch.randn(2, TEXT_LEN, TEXT_DIM)
    out = model.sample(cond, (C, T, S, S), seed=2, indices=[0, 6], steps=5, cfg_scale=5.0, stream="w")
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=3.0)
    sched.set_timesteps(5)
    x = randn_per_sample((2, C, T, S, S), 2, [0, 6], "w")
    for timestep in sched.timesteps:            # WanPipeline: the transformer gets the scheduler's timestep
        x = sched.step(guided(model, x, float(timestep) / 1000, cond, 5.0), timestep, x, return_dict=False)[0]
    torch.testing.assert_close(out, x, **TOL)
    x0 = torch.randn(2, C, T, S, S)
    again = model.sdedit(x0, cond, 1.0, seed=2, indices=[0, 6], steps=5, cfg_scale=5.0, stream="w")
    torch.testing.assert_close(again, out, **TOL)
    partial = model.sdedit(x0, cond, 0.7, seed=2, indices=[0, 6], steps=5, cfg_scale=5.0, stream="w")
    assert (partial - out).abs().max() > 1e-3 and (partial - x0).abs().max() > 1e-3


def test_hook_detection():
    from vidpo.models.dit import build_dit, dit_config

    assert has_sampler_hook(cogvideox()) and has_sampler_hook(tiny_wan())
    assert not has_sampler_hook(build_dit(dit_config("tiny", in_channels=3, cond_vocab_size=5)))
    with pytest.raises(ValueError, match="ddim"):
        tiny_wan(sampler="ddim")


# ----- generation and evaluation go through the hook -----------------------------------------------------
@pytest.fixture
def cogvideox_run(tmp_path, micro_overrides):
    from vidpo.training.modeling import build_world
    from vidpo.config import load_config

    world = build_world(load_config(None, micro_overrides))
    model_dir = tmp_path / "cogvideox"
    tiny_cogvideox(TextConditioner.random(world.vocab_size, TEXT_DIM, seed=4), in_channels=C, frames=T, size=S,
                   seed=3).save_pretrained(model_dir)

    def config(*extra):
        return load_config(None, micro_overrides + ["model.kind=cogvideox", f"model.path={model_dir}",
                                                    "model.sampler=dpm", "generate.num_pairs=4",
                                                    "generate.heldout_pairs=0", *extra])
    return config, world


def test_generation_and_evaluation_use_the_models_scheduler(cogvideox_run, tmp_path):
    from safetensors.torch import load_file

    from vidpo.data.oracle import ShapesOracle
    from vidpo.evaluation.evaluate import eval_conditions, evaluate_model
    from vidpo.training.modeling import build_policy
    from vidpo.data.pairs import shard_name
    from vidpo.stages.generate import generate_pairs

    config, world = cogvideox_run
    cfg = config()
    model = build_policy(cfg, world)
    assert isinstance(model, CogVideoXAdapter) and model.sampler_name == "dpm"
    shape = (C, T, S, S)

    generate_pairs(cfg, tmp_path / "pairs")
    shard = load_file(str(tmp_path / "pairs" / shard_name(0)))
    tokens = world.tokens(shard["cond_ids"])
    for key, stream in (("first", "train-pair-a"), ("second", "train-pair-b")):
        want = model.sample(tokens, shape, seed=cfg.seed, indices=[0, 1, 2, 3], steps=cfg.generate.steps,
                            cfg_scale=cfg.generate.cfg_scale, stream=stream).clamp(-1, 1)
        torch.testing.assert_close(shard[key], want, **TOL)

    scfg = config("generate.mode=structural", "generate.eta_min=0.4", "generate.eta_max=1.0")
    generate_pairs(scfg, tmp_path / "structural")
    shard = load_file(str(tmp_path / "structural" / shard_name(0)))
    want = model.sdedit(shard["gt"], tokens, shard["eta"], seed=cfg.seed, indices=[0, 1, 2, 3],
                        steps=cfg.generate.steps, cfg_scale=cfg.generate.cfg_scale, stream="train-sdedit-a")
    torch.testing.assert_close(shard["first"], want.clamp(-1, 1), **TOL)

    result = evaluate_model(model, cfg, world, ShapesOracle(world), num_samples=4)
    cond = world.tokens(eval_conditions(world, 4))
    want = model.sample(cond, shape, seed=cfg.seed, indices=[cfg.eval.seed_offset + i for i in range(4)],
                        steps=cfg.eval.steps, cfg_scale=cfg.eval.cfg_scale, stream="eval").clamp(-1, 1)
    torch.testing.assert_close(result.samples, want, **TOL)


def test_sampler_config_is_checked_against_the_model_kind(cogvideox_run, micro_overrides):
    from vidpo.training.modeling import build_policy
    from vidpo.config import ConfigError, load_config

    config, world = cogvideox_run
    with pytest.raises(ConfigError, match="model.sampler 'unipc'"):
        build_policy(config("model.sampler=unipc"), world)
    with pytest.raises(ConfigError, match="model.sample_shift"):
        build_policy(config("model.sampler=ddim", "model.sample_shift=3.0"), world)
    with pytest.raises(ConfigError, match="model.sampler 'ddim'"):
        build_policy(load_config(None, micro_overrides + ["model.sampler=ddim"]), world)
