"""Consistency distillation (vidpo.objectives.distill, vidpo.stages.preprocess, vidpo.objectives.rewards, vidpo.stages.distill_eval):
the CD target and loss and the teacher's guided solver step against direct float64 computations, the
student sampler, the reward mixture and its routing, resumable preprocessing, and a training process that
holds no teacher (measured in a fresh process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.micro import MICRO
from helpers.models import randomize_
from vidpo.utils import atomic
from vidpo.data.oracle import ShapesOracle
from vidpo.models import flow
from vidpo.models import motion_guidance as mg
from vidpo.training.modeling import build_policy, build_world
from vidpo.objectives import distill as cd
from vidpo.stages.preprocess import DistillData, draw_rows, preprocess_job, shard_path, teacher_grid, teacher_step
from vidpo.config import ConfigError, load_config
from vidpo.objectives.rewards import REWARDS, RewardMixture, RewardTerm, build_reward_mixture

REPO = Path(__file__).resolve().parent.parent
DISTILL = ["distill.grid_steps=8", "distill.skip=2", "distill.shard_size=8", "distill.batch_size=8",
           "distill.student_steps=[1,2]", "distill.teacher_steps=[4]", "distill.eval_steps=2"]


pytestmark = pytest.mark.usefixtures("one_thread")   # 2 threads on a shared 2-core machine: 10x slower


def micro_setup(extra=()):
    cfg = load_config(None, MICRO + DISTILL + list(extra))
    world = build_world(cfg)
    return cfg, world


# ----- CD target and loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("distance", ["huber", "l2"])
def test_cd_loss_matches_float64_reference_and_stops_the_target_gradient(distance):
    cfg, world = micro_setup(["model.attention=math"])
    model = randomize_(build_policy(cfg, world).double())
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    x_prev = torch.randn(3, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    t_prev = torch.tensor([0.0, 0.25, 0.75], dtype=torch.float64)
    cond = torch.tensor([[1, 5, 7], [2, 6, 8], [4, 5, 10]])

    loss, prediction, target = cd.cd_loss(model, x_t, t, x_prev, t_prev, cond, distance=distance, huber_c=0.01)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # Direct float64: f(x, t) = x - t v; the target row with t_prev = 0 is x_prev itself.
    direct_pred = x_t - t.view(-1, 1, 1, 1, 1) * model(x_t, t, cond)
    with torch.no_grad():
        direct_target = x_prev - t_prev.view(-1, 1, 1, 1, 1) * model(x_prev, t_prev, cond)
    assert torch.equal(direct_target[0], x_prev[0])
    diff = direct_pred - direct_target
    direct = (torch.sqrt(diff ** 2 + 0.01 ** 2) - 0.01).mean() if distance == "huber" else (diff ** 2).mean()
    torch.testing.assert_close(target, direct_target, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(prediction, direct_pred, atol=1e-12, rtol=1e-12)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    assert not target.requires_grad
    direct.backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # Without the stop-gradient the gradient differs: the test would notice a target that kept its graph.
    model.zero_grad()
    live_target = x_prev - t_prev.view(-1, 1, 1, 1, 1) * model(x_prev, t_prev, cond)
    cd.cd_distance(direct_pred.detach() * 0 + model(x_t, t, cond).mul(-t.view(-1, 1, 1, 1, 1)).add(x_t),
                   live_target, distance, 0.01).backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("distance", ["huber", "l2"])
def test_phased_cd_loss_matches_float64_reference_and_an_edge_maps_to_itself(distance):
    cfg, world = micro_setup(["model.attention=math", "distill.phases=2"])
    model = randomize_(build_policy(cfg, world).double())
    grid = teacher_grid(cfg).double()                                   # 0, 1/8, ..., 1; edges 0, 1/2, 1
    edges = cd.phase_boundaries(cfg.distill.phases, grid, cfg.distill.skip)
    torch.testing.assert_close(edges, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), atol=0, rtol=0)
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(4, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    x_prev = torch.randn(4, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    t, t_prev = grid[[2, 4, 6, 8]], grid[[0, 2, 4, 6]]
    cond = torch.tensor([[1, 5, 7], [2, 6, 8], [4, 5, 10], [3, 4, 9]])
    end = cd.phase_end(t, edges)
    # A time on an edge belongs to the phase below it (the sampler's step from that edge covers it).
    assert end.tolist() == [0.0, 0.0, 0.5, 0.5]
    assert cd.phase_end(torch.tensor([0.3, 0.5, 0.51, 1.0]), edges.float()).tolist() == [0.0, 0.0, 0.5, 0.5]

    loss, prediction, target = cd.cd_loss(model, x_t, t, x_prev, t_prev, cond, distance=distance, huber_c=0.01,
                                          end=end)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # Direct float64: f(x, t) = x + (s_m - t) v(x, t), both sides to the start s_m of t's phase.
    shape = (-1, 1, 1, 1, 1)
    want_end = torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64).view(shape)
    direct_pred = x_t + (want_end - t.view(shape)) * model(x_t, t, cond)
    with torch.no_grad():
        direct_target = x_prev + (want_end - t_prev.view(shape)) * model(x_prev, t_prev, cond)
        plain_target = x_prev - t_prev.view(shape) * model(x_prev, t_prev, cond)
    assert torch.equal(target[0], x_prev[0]) and torch.equal(target[2], x_prev[2])   # an edge maps to itself
    assert not torch.allclose(target[3], plain_target[3])                             # not the t = 0 target
    diff = direct_pred - direct_target
    direct = (torch.sqrt(diff ** 2 + 0.01 ** 2) - 0.01).mean() if distance == "huber" else (diff ** 2).mean()
    torch.testing.assert_close(prediction, direct_pred, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(target, direct_target, atol=1e-12, rtol=1e-12)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12) and not target.requires_grad
    direct.backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # Without phases the same call is plain CD (every point to t = 0).
    _, plain_prediction, _ = cd.cd_loss(model, x_t, t, x_prev, t_prev, cond, distance=distance, huber_c=0.01)
    with torch.no_grad():
        torch.testing.assert_close(plain_prediction, x_t - t.view(shape) * model(x_t, t, cond), atol=1e-12, rtol=0)


def test_phases_must_divide_the_solver_chain_and_need_the_edges():
    with pytest.raises(ConfigError, match="phases"):
        load_config(None, MICRO + DISTILL + ["distill.phases=3"])           # grid 8 / skip 2 = 4 solver steps
    with pytest.raises(ValueError, match="must divide"):
        cd.phase_boundaries(3, flow.time_grid(8, 1.0).flip(0), 2)
    cfg, world = micro_setup(["distill.phases=2"])
    assert cfg.distill.student_noise == "predicted" and micro_setup()[0].distill.student_noise == "fresh"
    with pytest.raises(ValueError, match="phase edges"):
        cd.ConsistencyDistillObjective(cfg, world, None, torch.device("cpu"))


def test_teacher_solver_step_matches_direct_float64_computation():
    cfg, world = micro_setup(["model.attention=math", "distill.motion_scale=0.8", "distill.motion_fraction=0.6",
                              "distill.curated_fraction=0.5", "distill.cfg_scale=2.0", "distill.motion_block=1"])
    teacher = randomize_(build_policy(cfg, world).double()).eval()
    grid = teacher_grid(cfg).double()
    rows = draw_rows(cfg, world, 0, grid)
    rows["x0"], rows["noise"] = rows["x0"].double(), rows["noise"].double()
    out = teacher_step(cfg, teacher, world, rows, grid, "cpu")

    tokens = world.tokens(rows["cond_ids"])
    null = torch.zeros_like(tokens)
    expected_motion = (rows["source"] == 0) & (rows["t"] > 1 - 0.6)
    assert torch.equal(out["motion"].bool(), expected_motion)
    assert 0 < int(expected_motion.sum()) < rows["t"].numel()            # both kinds of row are exercised
    x_t = (1 - rows["t"].view(-1, 1, 1, 1, 1)) * rows["x0"] + rows["t"].view(-1, 1, 1, 1, 1) * rows["noise"]
    with torch.no_grad():
        v_cond, v_null = teacher(x_t, rows["t"], tokens), teacher(x_t, rows["t"], null)
    v = v_null + 2.0 * (v_cond - v_null)
    for r in expected_motion.nonzero().flatten().tolist():
        # Reference: the clip itself, inverted up the grid to t_n by explicit Euler steps.
        x_ref = rows["x0"][r:r + 1]
        for i in range(int(rows["n"][r])):
            with torch.no_grad():
                x_ref = x_ref + (grid[i + 1] - grid[i]) * teacher(x_ref, grid[i].view(1), tokens[r:r + 1])
        a_ref = mg.reference_attention(teacher, x_ref, rows["t"][r:r + 1], tokens[r:r + 1], 1)
        grad, _ = mg.motion_guidance_gradient(teacher, x_t[r:r + 1], rows["t"][r:r + 1], tokens[r:r + 1], a_ref, 1)
        v[r] = v[r] + 0.8 * grad[0]
    x_prev = x_t + (rows["t_prev"] - rows["t"]).view(-1, 1, 1, 1, 1) * v
    torch.testing.assert_close(out["x_t"], x_t.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["x_prev"], x_prev.float(), atol=1e-6, rtol=1e-6)
    assert bool(out["energy"][expected_motion].isfinite().all()) and bool(out["energy"][~expected_motion].isnan().all())
    assert torch.equal(rows["n"] % 2, torch.zeros_like(rows["n"])) and int(rows["n"].min()) >= 2


# ----- the student's sampler --------------------------------------------------------------------------------
def test_student_times_and_sampler():
    grid = flow.time_grid(8, 1.0).flip(0)
    torch.testing.assert_close(cd.student_times(1, grid, 2), torch.tensor([1.0]))
    torch.testing.assert_close(cd.student_times(4, grid, 2), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    with pytest.raises(ValueError, match="student steps"):
        cd.student_times(5, grid, 2)
    cfg, world = micro_setup()
    model = randomize_(build_policy(cfg, world)).eval()
    cond = world.tokens(world.condition(torch.tensor([0, 5, 9])))
    noise = torch.randn(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    times = cd.student_times(4, grid, 2)
    # Re-noising with the implied noise is Euler with the same steps (the identity in the module doc).
    predicted = cd.consistency_sample(model, noise, cond, times, renoise="predicted")
    euler = flow.euler_sample(model, noise, cond, steps=4)
    torch.testing.assert_close(predicted, euler, atol=1e-5, rtol=1e-5)
    # Fresh noise depends on (seed, sample index, step) only: a row is the same alone or in a batch.
    both = cd.consistency_sample(model, noise, cond, times, seed=3, indices=[10, 11, 12])
    alone = cd.consistency_sample(model, noise[1:2], cond[1:2], times, seed=3, indices=[11])
    torch.testing.assert_close(both[1:2], alone, atol=2e-5, rtol=1e-5)   # fp32 batch-size rounding only
    one = cd.consistency_sample(model, noise, cond, times[:1], seed=3, indices=[10, 11, 12])
    with torch.no_grad():
        torch.testing.assert_close(one, noise - model(noise, torch.ones(3), cond), atol=1e-6, rtol=1e-6)


def test_phased_student_samples_deterministically_along_the_edges():
    cfg, world = micro_setup(["model.attention=math", "distill.phases=2"])
    model = randomize_(build_policy(cfg, world).double()).eval()
    grid = teacher_grid(cfg).double()
    edges = cd.phase_boundaries(2, grid, 2)
    cond = world.tokens(world.condition(torch.tensor([0, 5, 9])))
    noise = torch.randn(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # Reference: each step is the phased consistency function from an edge to the edge below it.
    x = noise
    with torch.no_grad():
        for m in (2, 1):
            x = cd.consistency_function(model, x, edges[m].expand(3), cond, edges[m - 1].expand(3))
    got = cd.consistency_sample(model, noise, cond, cd.student_times(2, grid, 2), renoise=cfg.distill.student_noise)
    torch.testing.assert_close(got, x, atol=1e-12, rtol=1e-12)


# ----- rewards --------------------------------------------------------------------------------------------
def test_reward_mixture_formula_gradient_and_ranking():
    cfg, world = micro_setup()
    oracle = ShapesOracle(world)
    cond_ids = world.condition(torch.tensor([0, 7, 13, 21]))
    clips = world.render(cond_ids, torch.Generator().manual_seed(4)).clips
    image, video = REWARDS["shapes_appearance"](oracle), REWARDS["shapes_motion"](oracle)
    mixture = RewardMixture([RewardTerm(image, 0.7), RewardTerm(video, 0.4)], image_frames=2)
    frames = mixture.draw_frames(4, world.frames, torch.Generator().manual_seed(5))
    assert frames.shape == (4, 2) and all(len(set(r)) == 2 for r in frames.tolist())
    x = (0.9 * clips).requires_grad_(True)
    total, parts = mixture(x, cond_ids, frames)
    direct_image = torch.stack([torch.stack([image(x[b:b + 1, :, f], cond_ids[b:b + 1])[0] for f in frames[b]]).mean()
                                for b in range(4)])
    score = oracle.score(x, cond_ids)
    direct_video = 0.5 * (score.components["motion"] + score.components["consistency"])
    torch.testing.assert_close(parts["shapes_appearance"], direct_image, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(parts["shapes_motion"], direct_video, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(total, 0.7 * direct_image + 0.4 * direct_video, atol=1e-6, rtol=1e-6)
    total.sum().backward()
    assert x.grad.isfinite().all() and x.grad.abs().sum() > 0
    # The right caption scores higher than a wrong colour.
    wrong = cond_ids.clone()
    wrong[:, 0] = (wrong[:, 0] + 1) % len(world.colours)
    assert bool((image(clips[:, :, 0], cond_ids) > image(clips[:, :, 0], wrong) + 0.3).all())
    with pytest.raises(ValueError, match="video-text reward"):
        build_reward_mixture(load_config(None, ["reward.image={shapes_motion: 1.0}"]).reward, oracle)


# ----- preprocessing, routing, training without a teacher, evaluation --------------------------------------
@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    """A micro teacher, its preprocessed data (12 rows, 2 of 3 shards then resumed) and a 2-step student."""
    root = tmp_path_factory.mktemp("distill")
    cfg, world = micro_setup()
    teacher = randomize_(build_policy(cfg, world), std=0.1)
    atomic.save_safetensors(teacher.state_dict(), root / "teacher" / "model.safetensors")
    over = MICRO + DISTILL + [f"distill.teacher={root / 'teacher'}", "distill.num_rows=20", "distill.motion_scale=1.0",
                              "distill.motion_fraction=0.7"]
    first = preprocess_job(load_config(None, over), root / "data", progress=False)
    return root, over, first


def test_preprocessing_is_resumable_and_refuses_other_settings(distill_run):
    root, over, first = distill_run
    assert first["computed"] == 3 and first["skipped"] == 0 and first["motion_rows"] > 0
    before = load_file(str(shard_path(root / "data", 1)))
    shard_path(root / "data", 1).unlink()                     # an interrupted run: shard 1 never finished
    (root / "data" / "shards" / "shard_00002.safetensors.tmp-4194305").write_bytes(b"half")  # no live pid
    again = preprocess_job(load_config(None, over), root / "data", progress=False)
    assert again["computed"] == 1 and again["skipped"] == 2
    after = load_file(str(shard_path(root / "data", 1)))      # the same data as the uninterrupted run
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)
    assert not list((root / "data" / "shards").glob("*.tmp-*"))
    # A config field added after the data were made (absent from meta.json) does not invalidate them.
    meta = json.loads((root / "data" / "meta.json").read_text())
    del meta["settings"]["world"]["static"]
    (root / "data" / "meta.json").write_text(json.dumps(meta))
    assert preprocess_job(load_config(None, over), root / "data", progress=False)["skipped"] == 3
    with pytest.raises(ConfigError, match="skip: 2 -> 4"):
        preprocess_job(load_config(None, over + ["distill.skip=4"]), root / "data", progress=False)
    data = DistillData(root / "data")
    assert len(data) == 20 and set(data.tensors) == set(DistillData.TRAIN_KEYS)


def test_reward_rows_follow_the_routed_subset(distill_run):
    root, over, _ = distill_run
    cfg = load_config(None, over + [f"distill.data={root / 'data'}", "reward.subset=web", "reward.max_rows=2",
                                    "reward.image={shapes_appearance: 1.0}", "train.batch_size=8"])
    world = build_world(cfg)
    data = DistillData(root / "data")
    mixture = build_reward_mixture(cfg.reward, ShapesOracle(world))
    objective = cd.ConsistencyDistillObjective(cfg, world, data, torch.device("cpu"), rewards=mixture)
    saw_web = False
    for step in range(4):
        batch = objective.micro_batch(step, 0)
        rows = batch["reward_rows"]
        assert bool((batch["source"][rows] == 1).all()) and int(rows.sum()) <= 2
        saw_web |= bool(rows.any())
        model = build_policy(cfg, world)
        loss, metrics = objective.loss(model, batch)
        assert loss.isfinite() and ("reward" in metrics) == bool(rows.any())
    assert saw_web


def test_phased_objective_rewards_score_the_one_step_clean_sample(distill_run):
    root, over, _ = distill_run
    cfg = load_config(None, over + [f"distill.data={root / 'data'}", "reward.subset=all", "reward.max_rows=8",
                                    "reward.image={shapes_appearance: 1.0}", "train.batch_size=8", "distill.phases=2"])
    world = build_world(cfg)
    mixture = build_reward_mixture(cfg.reward, ShapesOracle(world))
    seen = []

    class Recorder:
        names, draw_frames = mixture.names, mixture.draw_frames

        def __call__(self, x, cond_ids, frames):
            seen.append(x.detach().clone())
            return mixture(x, cond_ids, frames)

    edges = cd.phase_boundaries(2, teacher_grid(cfg), 2)
    objective = cd.ConsistencyDistillObjective(cfg, world, DistillData(root / "data"), torch.device("cpu"),
                                               rewards=Recorder(), boundaries=edges)
    batch = objective.micro_batch(0, 0)
    model = randomize_(build_policy(cfg, world))
    loss, metrics = objective.loss(model, batch)
    tokens = world.tokens(batch["cond_ids"])
    with torch.no_grad():
        x0 = batch["x_t"] - batch["t"].view(-1, 1, 1, 1, 1) * model(batch["x_t"], batch["t"], tokens)
    assert bool((cd.phase_end(batch["t"], edges) > 0).any())             # some rows do not map to t = 0
    torch.testing.assert_close(seen[0], x0[batch["reward_rows"]], atol=1e-5, rtol=1e-5)
    assert metrics["cd"] == pytest.approx(float(cd.cd_distance(*phased_pair(model, batch, tokens, edges),
                                                               "huber", cfg.distill.huber_c)), rel=1e-5)


def phased_pair(model, batch, tokens, edges):
    """The phased prediction and target of a batch, computed directly."""
    shape = (-1, 1, 1, 1, 1)
    end = cd.phase_end(batch["t"], edges).view(shape)
    with torch.no_grad():
        pred = batch["x_t"] + (end - batch["t"].view(shape)) * model(batch["x_t"], batch["t"], tokens)
        target = batch["x_prev"] + (end - batch["t_prev"].view(shape)) * model(batch["x_prev"], batch["t_prev"], tokens)
    return pred, target


def test_training_process_holds_no_teacher_and_eval_table(distill_run, tmp_path):
    root, over, _ = distill_run
    args = [a for o in over + [f"distill.data={root / 'data'}", "train.objective=consistency_distill",
                               "train.max_steps=2", "reward.video={shapes_oracle: 1.0}", "reward.subset=all",
                               "train.num_threads=1",
                               "model.patch_size=[1,4,4]"]  # the fixture's teacher: the preset's patches, not the recipe's
            for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "vidpo", "train", str(REPO / "recipes/shapes/pretrain.yaml"),
                           "--out", str(tmp_path / "student"), *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    residency = summary["residency"]
    assert residency["measured"] and residency["dit_models"] == {"VideoDiT": 1}
    assert residency["parameter_bytes"] == residency["student_parameter_bytes"]   # the student, nothing more
    assert summary["rewards"] == ["shapes_oracle"]

    from vidpo.stages.distill_eval import distill_eval_job

    cfg = load_config(None, over)
    out = distill_eval_job(cfg, tmp_path / "eval", {"cd": str(tmp_path / "student")}, num=4)
    table = json.loads((tmp_path / "eval" / "distill_eval.json").read_text())
    assert [(r["model"], r["steps"], r["nfe_per_clip"]) for r in table["rows"]] == \
        [("teacher", 4, 8), ("cd", 1, 1), ("cd", 2, 2)]
    assert table["rows"][0]["delta_vs_ref"]["mean"] == 0 and len(out["rows"]) == 3
    assert "| cd | 2 | 2 |" in (tmp_path / "eval" / "distill_eval.md").read_text()
