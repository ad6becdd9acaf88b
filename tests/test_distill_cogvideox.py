"""Consistency distillation of a CogVideoX release (T2V-Turbo-v2 on a v-prediction DDPM): the process's forward
path, DDIM step, clean end and phased inverse against diffusers' ``CogVideoXDDIMScheduler``; the student's trailing
timesteps and the teacher's whole-timestep grid; the CD loss and the guided teacher step (CFG, motion guidance,
DDIM inversion) against float64 references; and ``vidpo distill`` end to end on a tiny random CogVideoX-2B release:
a training process holding one transformer, and an export (OUT/lora + OUT/scheduler) that CogVideoXPipeline samples
in 4 steps exactly like the engine's student."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.pipelines import PROMPTS_FOR_TESTS, TEXT_DIM, TEXT_TOKENS, tiny_cogvideox_transformer

pytest.importorskip("diffusers")

from vidpo.config import ConfigError, load_config  # noqa: E402
from vidpo.models import motion_guidance as mg  # noqa: E402
from vidpo.models.cogvideox import COGVIDEOX_SCHEDULER, CogVideoXAdapter  # noqa: E402
from vidpo.models.cogvideox.motion import CogVideoXAttentionProbe  # noqa: E402
from vidpo.objectives import distill as cd  # noqa: E402
from vidpo.objectives.distill_process import VPredictionProcess  # noqa: E402
from vidpo.stages.preprocess import guided_teacher_step  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/cogvideox/turbo_tiny_cpu.yaml"
TOP = 999
pytestmark = pytest.mark.usefixtures("one_thread")


def ddim_scheduler(**overrides):
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**{**COGVIDEOX_SCHEDULER, **overrides})


def abar64(k):
    """The scheduler's alphas_cumprod at integer timesteps ``k`` in float64, 1 at the clean end k = 0."""
    table = ddim_scheduler().alphas_cumprod.double()
    k = torch.as_tensor(k)
    return torch.where(k == 0, torch.ones((), dtype=torch.float64), table[k])


def bcast(v):
    return v.view(-1, 1, 1, 1, 1)


def tiny_cogvideox(dtype=torch.float32, layers=2, layout="2b"):
    return CogVideoXAdapter(tiny_cogvideox_transformer(layout, seed=3, num_layers=layers)).to(dtype).eval()


def inputs(dtype, batch=2, seed=0, frames=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, 4, 4, generator=g).to(dtype)
    cond = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g).to(dtype)
    return x, cond


def times(*k):
    return torch.tensor(k, dtype=torch.float64).div(TOP).float()


# ----- the process against diffusers' scheduler ------------------------------------------------------------------
def test_forward_path_predictions_and_ddim_step_are_the_schedulers():
    process = VPredictionProcess(COGVIDEOX_SCHEDULER)
    sch = ddim_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, generator=g,
                                                                                  dtype=torch.float64)
    for k in (999, 749, 62, 1):
        kk = torch.tensor([k, k])
        x_k = process.interpolate(x0, eps, times(k, k))
        torch.testing.assert_close(x_k, sch.add_noise(x0, eps, kk), rtol=1e-12, atol=1e-12)
        v = sch.get_velocity(x0, eps, kk)
        got_x0, got_eps = process.predictions(x_k, times(k, k), v)    # the v-parameterisation's identities
        torch.testing.assert_close(got_x0, x0, rtol=1e-10, atol=1e-10)
        if k < 999:   # at zero SNR eps^ = x exactly; x0 alone is recoverable from v
            torch.testing.assert_close(got_eps, eps, rtol=1e-10, atol=1e-10)

    # the student's 4 DDIM steps: the process's step = the scheduler's step, the last one to the clean end = x0^
    sch.set_timesteps(4)
    assert sch.timesteps.tolist() == [999, 749, 499, 249]
    x = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    for i, k in enumerate(sch.timesteps.tolist()):
        v = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
        after = [749, 499, 249, 0][i]
        prev, x0_hat = sch.step(v, k, x, return_dict=False)
        torch.testing.assert_close(process.step(x, times(k, k), times(after, after), v), prev, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(process.consistency_function(lambda *_: v, x, times(k, k), None), x0_hat,
                                   rtol=1e-9, atol=1e-9)
        x = prev

    # the clean end: a = 1, s = 0 (not the DDPM's k = 0 level); f(x, 0) = x; f(x, e) = x at t = e
    a, s = process.coefficients(times(0, 1))
    assert a.tolist()[0] == 1.0 and s.tolist()[0] == 0.0 and 0 < float(s[1]) < 0.1
    v = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    assert torch.equal(process.consistency_function(lambda *_: v, x, times(0, 0), None), x)
    torch.testing.assert_close(process.consistency_function(lambda *_: v, x, times(499, 499), None, times(499, 499)),
                               x, rtol=1e-12, atol=1e-12)
    # a phased f maps back to the one-step x0^ the rewards score
    t, e = times(749, 311), times(249, 62)
    f = process.step(x, t, e, v)
    torch.testing.assert_close(process.clean_from(x, t, f, e), process.predictions(x, t, v)[0], rtol=1e-9, atol=1e-9)


def test_student_timesteps_are_training_times_of_a_whole_timestep_grid():
    process = VPredictionProcess(COGVIDEOX_SCHEDULER)
    d = SimpleNamespace(eval_steps=4, grid_steps=16, skip=2, student_shift=1.0, student_terminal=None)
    scheduler, sigmas, grid = process.student_schedule(d)
    assert type(scheduler).__name__ == "CogVideoXDDIMScheduler" and scheduler.config.timestep_spacing == "trailing"
    assert (sigmas.double() * TOP).round().tolist() == [999, 749, 499, 249, 0]
    k = (grid.double() * TOP)
    assert float((k - k.round()).abs().max()) < 1e-3      # float32 engine times of whole timesteps
    k = k.round()
    assert bool((k[1:] > k[:-1]).all()) and k[0] == 0 and k[-1] == 999
    assert k[:5].tolist() == [0, 62, 124, 187, 249]
    assert torch.equal(cd.student_times(4, grid, 2), sigmas[:-1])          # every student time is a training time
    # the adapter maps each grid time back to its integer timestep exactly
    assert torch.equal(CogVideoXAdapter.discrete_timesteps(SimpleNamespace(num_train_timesteps=1000), grid),
                       k.long())
    # CogVideoX-5B's release scheduler is DPM-Solver++: the student still samples with DDIM on its noise schedule
    dpm = dict(COGVIDEOX_SCHEDULER, _class_name="CogVideoXDPMScheduler", timestep_spacing="leading")
    scheduler, sigmas5b, _ = VPredictionProcess(dpm).student_schedule(d)
    assert type(scheduler).__name__ == "CogVideoXDDIMScheduler" and torch.equal(sigmas5b, sigmas)

    with pytest.raises(ConfigError, match="eval_steps = 3 must divide"):
        process.student_schedule(SimpleNamespace(**{**vars(d), "eval_steps": 3, "grid_steps": 12}))
    with pytest.raises(ConfigError, match="student_shift"):
        process.student_schedule(SimpleNamespace(**{**vars(d), "student_shift": 3.0}))
    with pytest.raises(ConfigError, match="more than its 249 whole timesteps"):
        process.student_schedule(SimpleNamespace(**{**vars(d), "grid_steps": 1000}))
    with pytest.raises(ConfigError, match="predicts 'epsilon'"):
        VPredictionProcess(dict(COGVIDEOX_SCHEDULER, prediction_type="epsilon"))


def test_a_release_student_refuses_context_parallel_in_one_clear_error():
    """(Tensor parallel is laid out by test_torchrun_trains_a_fully_fine_tuned_student_tensor_and_sequence_parallel.)"""
    with pytest.raises(ConfigError, match="context parallel is not supported for it"):
        load_config(RECIPE, ["parallel.cp=2", "cluster.gpus_per_node=2"])


# ----- the loss and the teacher step against float64 references ----------------------------------------------------
@pytest.mark.parametrize("phased", [False, True])
def test_cogvideox_cd_loss_matches_float64_reference(phased):
    """L = mean huber(f(x_t, t), sg[f(x_prev, t')]) with f the DDIM jump of the v-prediction to the clean end (or to
    the phase's start): written out with the scheduler's alphas_cumprod in float64."""
    process = VPredictionProcess(COGVIDEOX_SCHEDULER)
    model32, model64 = tiny_cogvideox(torch.float32), tiny_cogvideox(torch.float64)
    x_t, cond = inputs(torch.float64, seed=1)
    x_prev, _ = inputs(torch.float64, seed=2)
    k, k_prev = torch.tensor([999, 311]), torch.tensor([937, 249])
    end_k = torch.tensor([749, 249]) if phased else torch.tensor([0, 0])
    end = times(*end_k.tolist()) if phased else None
    loss, prediction, target = cd.cd_loss(model32, x_t.float(), times(*k.tolist()), x_prev.float(),
                                          times(*k_prev.tolist()), cond.float(), distance="huber", huber_c=0.01,
                                          end=end, process=process)
    assert not target.requires_grad and prediction.requires_grad

    def f(x, kk):
        a, s = bcast(abar64(kk).sqrt()), bcast((1 - abar64(kk)).sqrt())
        a_e, s_e = bcast(abar64(end_k).sqrt()), bcast((1 - abar64(end_k)).sqrt())
        v = model64(x, kk.double() / TOP, cond)
        return a_e * (a * x - s * v) + s_e * (s * x + a * v)
    with torch.no_grad():
        want_prediction, want_target = f(x_t, k), f(x_prev, k_prev)
    want = (torch.sqrt((want_prediction - want_target) ** 2 + 1e-4) - 0.01).mean()
    torch.testing.assert_close(prediction.double(), want_prediction, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(target.double(), want_target, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model32.parameters())


@pytest.mark.parametrize("layout", ["2b", "5b", "1.5"])
def test_cogvideox_guided_teacher_step_matches_float64_reference(layout):
    """x_prev = DDIM(x_t, k -> k', v_neg + w (v_cond - v_neg) + eta grad g) in the scheduler's own form (a_t x +
    b_t x0^), with motion guidance on the first row only, its reference latent the DDIM inversion of x0; on the 2B
    layout (sincos positions), the 5B one (3-D RoPE, which the probe applies as the model does) and 1.5's (RoPE and
    2-frame temporal patches)."""
    cfg = load_config(RECIPE, ["distill.motion_scale=50.0", "distill.motion_fraction=0.5", "distill.cfg_scale=4.0",
                               "distill.motion_block=1", "model.path=/unused"])
    process = VPredictionProcess(COGVIDEOX_SCHEDULER)
    model32, model64 = tiny_cogvideox(torch.float32, layout=layout), tiny_cogvideox(torch.float64, layout=layout)
    frames = 4 if layout == "1.5" else 3          # 1.5's 2-frame temporal patches need an even latent frame count
    x0, cond = inputs(torch.float64, seed=6, frames=frames)
    noise, negative = inputs(torch.float64, seed=7, frames=frames)
    grid_k = torch.tensor([0, 62, 124, 187, 249, 499, 749, 874, 999])
    grid = times(*grid_k.tolist())
    n = torch.tensor([8, 6])
    rows = {"x0": x0.float(), "noise": noise.float(), "t": grid[n], "t_prev": grid[n - 2], "n": n,
            "source": torch.tensor([0, 1])}
    out = guided_teacher_step(cfg, model32, rows, cond.float(), negative.float(), grid, "cpu", depth=2,
                              probe=CogVideoXAttentionProbe, process=process)
    assert out["motion"].tolist() == [1, 0]

    k, k_prev = grid_k[n], grid_k[n - 2]
    ab, ab_prev = bcast(abar64(k)), bcast(abar64(k_prev))
    t = k.double() / TOP
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        v = model64(x_t, t, negative) + 4.0 * (model64(x_t, t, cond) - model64(x_t, t, negative))
    # the reference latent: DDIM inversion of x0 on v_cond from the clean end up to k = 999, on the grid
    x_ref = x0[:1]
    with torch.no_grad():
        for i in range(8):
            a, s = abar64(grid_k[i]).sqrt(), (1 - abar64(grid_k[i])).sqrt()
            a2, s2 = abar64(grid_k[i + 1]).sqrt(), (1 - abar64(grid_k[i + 1])).sqrt()
            vv = model64(x_ref, grid_k[i:i + 1].double() / TOP, cond[:1])
            x_ref = a2 * (a * x_ref - s * vv) + s2 * (s * x_ref + a * vv)
    a_ref = mg.reference_attention(model64, x_ref, t[:1], cond[:1], 1, probe=CogVideoXAttentionProbe)
    grad, _ = mg.motion_guidance_gradient(model64, x_t[:1], t[:1], cond[:1], a_ref, 1, probe=CogVideoXAttentionProbe)
    v[:1] += 50.0 * grad
    # CogVideoXDDIMScheduler.step's own form
    x0_hat = ab.sqrt() * x_t - (1 - ab).sqrt() * v
    a_t = ((1 - ab_prev) / (1 - ab)).sqrt()
    want = a_t * x_t + (ab_prev.sqrt() - ab.sqrt() * a_t) * x0_hat
    torch.testing.assert_close(out["x_t"].double(), x_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["x_prev"].double(), want, rtol=1e-4, atol=1e-5)
    assert float(grad.abs().max()) * 50.0 > 1e-3   # the motion term is not negligible: the test would see it


# ----- vidpo distill on a tiny CogVideoX release -----------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny CogVideoX-2B release (2 blocks) in ``test_distill_real.turbo_workspace``."""
    from helpers.pipelines import make_cogvideox_dir
    from test_distill_real import turbo_workspace

    root, server = turbo_workspace(tmp_path_factory.mktemp("turbo_cog"),
                                   lambda r: make_cogvideox_dir(r / "cog", prompts=PROMPTS_FOR_TESTS, num_layers=2))
    yield root, server
    server.close()
    assert not server.schema_errors, server.schema_errors[:3]


def sets(root, server, *extra):
    items = [f"model.path={root / 'cog'}", f"prompts.path={root / 'prompts.jsonl'}",
             f"label.vlm.base_url={server.base_url}", "train.num_threads=1", *extra]
    return [a for item in items for a in ("--set", item)]


def test_vidpo_distill_on_a_cogvideox_release(workspace, tmp_path):
    from diffusers import CogVideoXDDIMScheduler
    from helpers.pipelines import diffusers_pipeline, pipeline_latents

    from vidpo.stages.distill_real import build_student
    from vidpo.stages.preprocess_real import distill_process, student_schedule
    from vidpo.training import checkpoint as ckpt

    root, server = workspace
    out = tmp_path / "turbo"
    reward = [f"reward.models={{clip: {{path: {root / 'clip'}, kind: image, rule: clip_cosine}}}}",
              "reward.image={clip: 1.0}", "distill.num_rows=8", "distill.shard_size=4"]
    args = sets(root, server, *reward)
    # a fresh process, so that what it holds is what the distillation holds (nothing of this test's process)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "vidpo", "distill", RECIPE, "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    prep = summary["preprocess"]
    assert prep["computed"] == 2 and prep["motion_rows"] > 0 and prep["mean_guidance_to_velocity"] > 0
    assert prep["student_sigmas"] == [round(k / TOP, 6) for k in (999, 749, 499, 249, 0)]
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert "v_prediction" in json.dumps(meta)          # the noise schedule is part of the data's settings

    # the training process held one transformer (the teacher's steps are in the shards) + the reward's models
    train = summary["train"]
    residency = train["residency"]
    assert residency["measured"] and residency["dit_models"] == {"CogVideoXTransformer3DModel": 1}
    assert train["rewards"] == ["clip"]
    metrics = [json.loads(line) for line in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("reward_rows", 0) > 0 for row in metrics)

    # the judged evaluation: teacher (its DDIM, 16 steps + CFG) vs student (4 steps, no CFG)
    evaluation = summary["eval"]
    assert evaluation["judged"]["judge"] == "vlm" and evaluation["judged"]["failed"] == 0
    cost = evaluation["cost"]
    assert cost["teacher"]["nfe_per_clip"] == 32 and cost["student"]["nfe_per_clip"] == 4
    # OUT/report.html: the student's curves, the summary, the judged teacher / student videos side by side
    page = (out / "report.html").read_text()
    assert "teacher and student side by side" in page and "Win rate of the student over the teacher" in page
    assert page.count("<video") == 8 and (out / "report" / "loss.png").is_file()

    # OUT/lora + OUT/scheduler in CogVideoXPipeline: 4 steps, guidance 1, equal to the engine's student on fixed noise
    cfg = load_config(RECIPE, [s for s in args if s != "--set"])
    exported = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert exported["_class_name"] == "CogVideoXDDIMScheduler" and exported["timestep_spacing"] == "trailing"
    pipe = diffusers_pipeline(root / "cog")
    pipe.scheduler = CogVideoXDDIMScheduler.from_pretrained(str(out / "scheduler"))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 16, 3, 4, 4, generator=g)
    cond = torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=g)
    base = pipeline_latents(pipe, noise, cond, None, 4, 1.0)
    pipe.load_lora_weights(str(out / "lora"))
    got = pipeline_latents(pipe, noise, cond, None, 4, 1.0)
    student, _ = build_student(cfg, torch.device("cpu"))
    ckpt.load_weights(student, out / "student")
    _, sigmas, _ = student_schedule(cfg)
    process = distill_process(cfg)
    want = process.sample_student(cd.ConsistencyStudent(student.eval(), sigmas, process.sample_student), noise, cond,
                                  sigmas)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-4      # the LoRA was trained and loaded: without it the output differs


def test_phased_cogvideox_student_jumps_to_its_own_timesteps_and_rewards_score_the_clean_sample(workspace, tmp_path):
    """``distill.phases = eval_steps``: the edges are the exported DDIM scheduler's timesteps (increasing, the clean
    end first); a phased step trains with a finite loss other than the plain one, and the reward models score the
    one-step clean sample recovered from the phased prediction."""
    from vidpo.stages.distill_real import release_phase_edges, train_distill_real
    from vidpo.stages.preprocess_real import preprocess_real_job

    root, server = workspace
    overrides = [s for s in sets(root, server, "distill.num_rows=8", "train.max_steps=1", "train.ckpt_every=1",
                                 "distill.motion_scale=0.0", "train.log_every=1", "train.batch_size=8",
                                 f"reward.models={{clip: {{path: {root / 'clip'}, kind: image, rule: clip_cosine}}}}",
                                 "reward.image={clip: 1.0}", "reward.subset=all", "reward.max_rows=8")
                 if s != "--set"]
    cfg = load_config(RECIPE, overrides + [f"distill.data={tmp_path / 'data'}"])
    preprocess_real_job(cfg, tmp_path / "data")
    phased = load_config(RECIPE, overrides + [f"distill.data={tmp_path / 'data'}", "distill.phases=4"])
    edges = release_phase_edges(phased)
    assert (edges.double() * TOP).round().tolist() == [0, 249, 499, 749, 999]

    def first_row(run_cfg, out):
        train_distill_real(run_cfg, out, export_dir=out / "export")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if "loss" in r)
    plain, with_phases = first_row(cfg, tmp_path / "plain"), first_row(phased, tmp_path / "phased")
    assert with_phases["cd"] != plain["cd"] and with_phases["reward_rows"] == 8
    # the same rows and the same student before its first step: the same one-step clean samples, the same reward
    assert with_phases["reward"] == pytest.approx(plain["reward"], rel=1e-4, abs=1e-6)


def test_torchrun_trains_the_student_data_parallel_as_one_process(workspace, tmp_path, monkeypatch):
    """``torchrun --nproc-per-node 2 -m vidpo train`` of a release student (FSDP over 2 ranks, LoRA, a CLIP reward on
    some rows of each rank's half of the batch): every rank draws the whole batch and keeps its rows, its loss is its
    share of the global loss, so the logged losses and the exported LoRA equal one process's up to the order of the
    data-parallel sums; rank 0 exports the consolidated adapters and the scheduler. ``vidpo distill`` itself stays one
    process and says how to run the stages under torchrun; run after them in one process, it keeps the data and the
    trained student and exports and evaluates."""
    from helpers.distributed import free_port
    from safetensors.torch import load_file

    from vidpo.stages.distill import distill_job
    from vidpo.stages.distill_real import train_distill_real
    from vidpo.stages.preprocess_real import preprocess_real_job

    pytest.importorskip("megatron.core")
    root, server = workspace
    run = tmp_path / "run"
    data = run / "data"
    extra = [f"reward.models={{clip: {{path: {root / 'clip'}, kind: image, rule: clip_cosine}}}}",
             "reward.image={clip: 1.0}", "reward.subset=all", "reward.max_rows=3", "distill.num_rows=8",
             "distill.shard_size=4", "distill.motion_scale=0.0", "train.batch_size=4", "train.max_steps=3",
             "train.ckpt_every=3", "train.log_every=1", f"distill.data={data}"]
    args = sets(root, server, *extra)
    cfg = load_config(RECIPE, [s for s in args if s != "--set"])
    preprocess_real_job(cfg, data)
    train_distill_real(cfg, tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", "train", RECIPE, "--out", str(run / "student"),
               *args, "--set", "parallel.dp_shard=2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    two_dir = run / "student"

    def rows(directory):
        return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]
    one, two = rows(tmp_path / "one"), rows(two_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    assert any(r["reward_rows"] > 0 for r in one)
    for a, b in zip(one, two):
        for key in ("loss", "cd", "reward", "reward_rows"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
    lora = [load_file(str(d / "lora" / "pytorch_lora_weights.safetensors")) for d in (tmp_path / "one", two_dir)]
    assert lora[0].keys() == lora[1].keys()
    for key in lora[0]:
        torch.testing.assert_close(lora[1][key], lora[0][key], rtol=1e-3, atol=5e-5)
    residency = [json.loads((d / "summary.json").read_text())["residency"] for d in (tmp_path / "one", two_dir)]
    assert residency[0]["dit_models"] == {"CogVideoXTransformer3DModel": 1}
    assert residency[1]["dit_models"] == {"ParallelCogVideoXTransformer": 1}     # the student alone, parallelized
    assert (two_dir / "scheduler" / "scheduler_config.json").read_text() == \
        (tmp_path / "one" / "scheduler" / "scheduler_config.json").read_text()

    with monkeypatch.context() as env_of_torchrun:      # `vidpo distill` started by torchrun
        env_of_torchrun.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="torchrun .* -m vidpo train"):
            distill_job(cfg, run)
    summary = distill_job(cfg, run)       # then in one process: nothing recomputed, the student exported, evaluated
    assert summary["preprocess"]["computed"] == 0 and summary["train"]["steps"] == 3
    kept = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    assert kept.keys() == lora[1].keys() and all(torch.equal(kept[k], lora[1][k]) for k in kept)
    assert summary["eval"]["cost"]["student"]["nfe_per_clip"] == 4 and (run / "report.html").is_file()


def test_torchrun_trains_a_fully_fine_tuned_student_tensor_and_sequence_parallel(workspace, tmp_path):
    """No ``lora`` section, ``parallel.tp=2`` + ``parallel.sp=true``: both ranks hold half of every projection and
    half of the video tokens between them, take the same rows, and the losses and the exported transformer equal one
    process's up to the order of the split sums."""
    import yaml
    from diffusers import CogVideoXTransformer3DModel
    from helpers.distributed import free_port

    from vidpo.stages.distill_real import train_distill_real
    from vidpo.stages.preprocess_real import preprocess_real_job

    pytest.importorskip("megatron.core")
    root, server = workspace
    recipe = yaml.safe_load((REPO / RECIPE).read_text())
    del recipe["lora"]
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump(recipe))
    data = tmp_path / "data"
    args = sets(root, server, "distill.num_rows=4", "distill.motion_scale=0.0", "train.batch_size=2",
                "train.max_steps=2", "train.ckpt_every=2", "train.log_every=1", f"distill.data={data}")
    cfg = load_config(str(full), [s for s in args if s != "--set"])
    assert cfg.lora is None
    preprocess_real_job(cfg, data)
    train_distill_real(cfg, tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "vidpo", "train", str(full), "--out", str(tmp_path / "two"),
               *args, "--set", "parallel.tp=2", "--set", "parallel.sp=true", "--set", "cluster.gpus_per_node=2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)] for run in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    weights = [CogVideoXTransformer3DModel.from_pretrained(str(tmp_path / run / "transformer")).state_dict()
               for run in ("one", "two")]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-3, atol=5e-5)


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_reward_decode_of_a_latent_prefix_is_the_whole_clips_first_frames(workspace, tmp_path, family):
    """``reward.decode_latent_frames`` K: both families' VAEs are causal in time, so decoding the first K latent frames
    gives the whole clip's first 1 + 4 (K - 1) pixel frames (to rounding), and the gradient reaches those latents
    only; the rewards then pick their frames among them. CogVideoX's decoder takes latent frames in pairs after the
    first three: its prefix must be odd and >= 3, and one that is not is one clear error."""
    from helpers.pipelines import make_wan_dir

    from vidpo.models.pipeline_dir import PipelineDirectory
    from vidpo.stages.distill_real import check_decode_prefix, differentiable_decode, reward_frames

    root, _ = workspace
    path = root / "cog" if family == "cogvideox" else make_wan_dir(tmp_path / "wan", num_layers=1)
    vae = PipelineDirectory.open(path, family).vae("cpu", torch.float32)
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    k = 3 if family == "cogvideox" else 2
    with torch.no_grad():
        whole = differentiable_decode(vae)(latents)
    prefix_latents = latents.clone().requires_grad_(True)
    prefix = differentiable_decode(vae, k)(prefix_latents)
    frames = 1 + 4 * (k - 1)
    assert whole.shape[2] == 17 and prefix.shape[2] == frames
    torch.testing.assert_close(prefix, whole[:, :, :frames], rtol=1e-4, atol=1e-4)
    prefix.sum().backward()
    assert bool(prefix_latents.grad[:, :, :k].abs().sum() > 0) and bool(prefix_latents.grad[:, :, k:].eq(0).all())
    cfg = load_config(RECIPE, [f"reward.decode_latent_frames={k}", "model.path=/unused", f"model.kind={family}"])
    assert reward_frames(cfg, vae, 17) == frames
    check_decode_prefix(cfg)
    if family == "cogvideox":
        with pytest.raises(ConfigError, match="decode_latent_frames = 2: CogVideoX's VAE"):
            check_decode_prefix(load_config(RECIPE, ["reward.decode_latent_frames=2", "model.path=/unused"]))
    with pytest.raises(ConfigError, match="decode_latent_frames"):
        load_config(RECIPE, ["reward.decode_latent_frames=0"])
