"""The exact oracle critic of the shapes world (vidpo.data.oracle)."""
import time

import pytest
import torch

from vidpo.config import WorldConfig
from vidpo.data.oracle import COMPONENTS, ShapesOracle, weighted_median
from vidpo.data.shapes import ShapesWorld
from vidpo.data.segments import segment_ids

ALL_SHAPES = ["square", "circle", "diamond"]
SEGMENTS_OF_2 = segment_ids(8, fps=8, segment_seconds=0.25)  # 4 segments of 2 frames


def gen(seed):
    return torch.Generator().manual_seed(seed)


def world_and_oracle(**overrides):
    overrides.setdefault("shapes", ALL_SHAPES)
    world = ShapesWorld(WorldConfig(**overrides))
    return world, ShapesOracle(world)


@pytest.fixture(scope="module")
def clean():
    """512 clean clips over every condition, their oracle and scores (4 segments of 2 frames)."""
    world, oracle = world_and_oracle()
    cond = world.condition(torch.arange(512) % world.num_conditions)
    batch = world.render(cond, gen(0))
    return world, oracle, cond, batch, oracle.score(batch.clips, cond, SEGMENTS_OF_2)


def blur(clips: torch.Tensor, passes: int) -> torch.Tensor:
    """Separable [1, 2, 1] / 4 spatial blur on the [0, 1] image (background stays black), ``passes`` times."""
    x = (clips + 1) / 2
    n, c, T, H, W = x.shape
    x = x.reshape(n * c * T, 1, H, W)
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=clips.dtype)
    for _ in range(passes):
        x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, 3), padding=(0, 1))
        x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 3, 1), padding=(1, 0))
    return x.reshape(n, c, T, H, W) * 2 - 1


def test_clean_clips_score_high_on_every_component(clean):
    _, _, _, _, score = clean
    assert score.total.shape == (512,) and score.segments.shape == (512, 4)
    assert float(score.total.min()) >= 0.9
    for name in COMPONENTS:
        assert float(score.components[name].min()) >= 0.9, name
        assert float(score.segment_components[name].min()) >= 0.9, name
    assert float(score.total.mean()) >= 0.98


def test_default_world_clean_clips_score_high():
    world, oracle = world_and_oracle(shapes=["square", "circle"], speed=1.0)
    batch, cond = world.sample_batch(256, gen(1), corrupt=False)
    assert float(oracle.score(batch.clips, cond).total.min()) >= 0.9


@pytest.mark.parametrize("overrides", [{"speed": 0.5}, {"speed": 1.5, "object_size": 4},
                                       {"directions": ["up-right", "down-left"], "object_size": 6}])
def test_clean_clips_score_high_in_other_worlds(overrides):
    world, oracle = world_and_oracle(**overrides)
    batch, cond = world.sample_batch(256, gen(2), corrupt=False)
    score = oracle.score(batch.clips, cond)
    for name in COMPONENTS:
        assert float(score.components[name].min()) >= 0.9, name


@pytest.mark.parametrize("kind", ["randn", "randn_half", "uniform", "black", "grey", "white", "salt"])
def test_noise_and_flat_clips_score_near_zero(clean, kind):
    _, oracle, cond, batch, _ = clean
    g = gen(3)
    shape = batch.clips.shape
    clips = {
        "randn": lambda: torch.randn(shape, generator=g),
        "randn_half": lambda: 0.5 * torch.randn(shape, generator=g),
        "uniform": lambda: torch.rand(shape, generator=g) * 2 - 1,
        "black": lambda: -torch.ones(shape),
        "grey": lambda: torch.zeros(shape),
        "white": lambda: torch.ones(shape),
        "salt": lambda: torch.where(torch.rand(shape, generator=g) < 0.08, 1.0, -1.0),
    }[kind]()
    score = oracle.score(clips, cond, SEGMENTS_OF_2)
    assert float(score.total.max()) <= 0.1
    for name in COMPONENTS:
        assert float(score.components[name].max()) <= 0.1, name


@pytest.mark.parametrize("corruption,component", [("wrong_colour", "colour"), ("reversed_direction", "motion"),
                                                  ("static", "motion")])
def test_each_corruption_lowers_its_component(corruption, component):
    world, oracle = world_and_oracle(**{corruption: 1.0})
    batch, cond = world.sample_batch(256, gen(4), corrupt=True)
    score = oracle.score(batch.clips, cond)
    assert float(score.components[component].max()) <= 0.1
    for other in COMPONENTS:
        if other != component:
            assert float(score.components[other].min()) >= 0.9, other
    assert float(score.total.max()) <= 0.78


def test_another_shape_lowers_the_shape_component(clean):
    world, oracle, cond, _, _ = clean
    drawn = cond.clone()
    for offset in (1, 2):
        drawn[:, 1] = (cond[:, 1] + offset) % 3
        score = oracle.score(world.render(drawn, gen(0)).clips, cond)
        assert float(score.components["shape"].max()) <= 0.1
        for other in ("colour", "motion", "consistency"):
            assert float(score.components[other].min()) >= 0.9


@pytest.mark.parametrize("artifact", ["flicker", "dropout", "jitter"])
def test_local_artifact_hits_consistency_of_its_segment_only(artifact):
    world, oracle = world_and_oracle(local_artifact=1.0, artifact_segment_frames=2)
    batch, cond = world.sample_batch(600, gen(5), corrupt=True)
    chosen = torch.tensor([k == artifact for k in batch.artifact_kind])
    assert int(chosen.sum()) > 100
    score = oracle.score(batch.clips[chosen], cond[chosen], SEGMENTS_OF_2)
    consistency = score.segment_components["consistency"]
    hit = batch.artifact_frames[chosen, 0] // 2
    affected = consistency.gather(1, hit[:, None]).squeeze(1)
    others = consistency.masked_fill(torch.nn.functional.one_hot(hit, 4).bool(), float("inf"))
    assert float(affected.max()) <= 0.1
    assert float(others.min()) >= 0.9
    # The segment total drops there too, and the affected segment is always the worst one.
    assert torch.equal(score.segments.argmin(1), hit)


def test_graded_partial_credit_for_blurry_objects(clean):
    _, oracle, cond, batch, score = clean
    totals = [float(score.total.mean())]
    for passes in (1, 2, 4, 8):
        totals.append(float(oracle.score(blur(batch.clips, passes), cond).total.mean()))
    assert all(a > b for a, b in zip(totals, totals[1:])), totals
    assert 0.5 < totals[1] < 0.97 and 0.2 < totals[3] < 0.85
    # A dimmed object is also partial, not zero.
    dim = oracle.score((batch.clips + 1) * 0.6 - 1, cond).total
    assert 0.2 < float(dim.mean()) < 0.9


def test_segment_and_clip_scores_are_consistent(clean):
    _, oracle, cond, batch, score = clean
    for name in COMPONENTS:
        torch.testing.assert_close(score.segment_components[name].mean(1), score.components[name])
        torch.testing.assert_close(score.frame_components[name].mean(1), score.components[name])
    torch.testing.assert_close(score.segments, torch.stack([score.segment_components[k] for k in COMPONENTS]).mean(0))
    torch.testing.assert_close(score.total, torch.stack([score.components[k] for k in COMPONENTS]).mean(0))
    whole = oracle.score(batch.clips[:32], cond[:32])
    assert whole.segments.shape == (32, 1)
    torch.testing.assert_close(whole.segments[:, 0], whole.total)
    torch.testing.assert_close(whole.total, score.total[:32])
    # Uneven segments: the clip score is the frame-count-weighted mean of segment scores.
    uneven = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    parts = oracle.score(batch.clips[:32], cond[:32], uneven)
    torch.testing.assert_close(parts.segments @ torch.tensor([3.0, 1.0, 4.0]) / 8, whole.total)


def test_prefer_signs_and_ties():
    world, oracle = world_and_oracle(local_artifact=1.0)
    cond = world.condition(torch.arange(96) % world.num_conditions)
    good = world.render(cond, gen(6))
    bad = world.render(cond, gen(6), corrupt=True)
    labels = oracle.prefer(good.clips, bad.clips, cond, SEGMENTS_OF_2, tie_margin=0.05)
    assert labels.dtype == torch.long and labels.shape == (96, 4)
    hit = torch.nn.functional.one_hot(bad.artifact_frames[:, 0] // 2, 4).bool()
    assert bool((labels[hit] == 1).all())
    assert bool((labels[~hit] == 0).all())  # identical segments are ties
    assert torch.equal(oracle.prefer(bad.clips, good.clips, cond, SEGMENTS_OF_2, tie_margin=0.05), -labels)
    assert bool((oracle.prefer(good.clips, good.clips, cond, SEGMENTS_OF_2, tie_margin=0.0) == 0).all())
    assert bool((oracle.prefer(good.clips, bad.clips, cond, SEGMENTS_OF_2, tie_margin=1.0) == 0).all())
    whole = oracle.prefer(good.clips, bad.clips, cond, None, tie_margin=0.05)
    assert whole.shape == (96, 1) and bool((whole == 1).all())
    # The margin is strict: a difference equal to the margin is a tie.
    diff = oracle.score(good.clips, cond).total - oracle.score(bad.clips, cond).total
    exact = oracle.prefer(good.clips[:1], bad.clips[:1], cond[:1], None, tie_margin=float(diff[0]))
    assert int(exact) == 0


def test_gradient_matches_finite_differences_float64():
    world, oracle = world_and_oracle(local_artifact=0.5)
    batch, cond = world.sample_batch(6, gen(7), corrupt=True)
    g = gen(8)
    # A blurred, noisy clip: no pixel sits exactly on a clamp's kink and every term is active.
    clips = blur(batch.clips.double(), 1) + 0.05 * torch.randn(batch.clips.shape, generator=g, dtype=torch.float64)
    for name in COMPONENTS + ("total",):
        x = clips.clone().requires_grad_(True)
        score = oracle.score(x, cond, SEGMENTS_OF_2)
        assert score.total.dtype == torch.float64
        value = score.total if name == "total" else score.components[name]
        value.sum().backward()
        direction = torch.randn(clips.shape, generator=g, dtype=torch.float64)
        eps = 1e-6

        def f(z):
            s = oracle.score(z, cond, SEGMENTS_OF_2)
            return (s.total if name == "total" else s.components[name]).sum()
        numeric = (f(clips + eps * direction) - f(clips - eps * direction)) / (2 * eps)
        analytic = (x.grad * direction).sum()
        assert abs(float(numeric)) > 1e-4, name  # the check must not pass trivially
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_gradient_flows_to_clips_float32(clean):
    _, oracle, cond, batch, _ = clean
    x = blur(batch.clips[:16], 1).requires_grad_(True)
    score = oracle.score(x, cond[:16], SEGMENTS_OF_2)
    score.segments.sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    # Ascending the reward improves the blurred clip.
    better = (x + 0.5 * x.grad / x.grad.abs().max()).clamp(-1, 1).detach()
    assert float(oracle.score(better, cond[:16]).total.mean()) > float(score.total.detach().mean())
    # Empty and clean frames give finite (zero or not) gradients, never NaN.
    for clips in (-torch.ones_like(batch.clips[:4]), batch.clips[:4]):
        z = clips.clone().requires_grad_(True)
        oracle.score(z, cond[:4], SEGMENTS_OF_2).total.sum().backward()
        assert torch.isfinite(z.grad).all()


def test_float64_and_float32_agree(clean):
    _, oracle, cond, batch, _ = clean
    single = oracle.score(batch.clips[:64], cond[:64], SEGMENTS_OF_2)
    double = oracle.score(batch.clips[:64].double(), cond[:64], SEGMENTS_OF_2)
    torch.testing.assert_close(single.segments.double(), double.segments, atol=1e-4, rtol=0)


def test_scoring_speed(clean):
    world, oracle, cond, batch, _ = clean
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fair number on a shared 2-core machine
    try:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            oracle.score(batch.clips, cond, SEGMENTS_OF_2)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert best < 0.5, f"scoring 512 clips took {best:.3f} s"


def test_weighted_median_matches_brute_force():
    g = gen(9)
    values = torch.randn(200, 7, generator=g, dtype=torch.float64)
    values[:50, 3] = values[:50, 1]  # ties
    weights = torch.rand(200, 7, generator=g, dtype=torch.float64)
    weights[50:80, :3] = 0
    got = weighted_median(values, weights)
    for i in range(200):
        w = weights[i].clamp_min(0) + 1e-6
        order = values[i].argsort()
        cum = w[order].cumsum(0)
        expected = values[i][order][int((cum < 0.5 * cum[-1]).sum())]
        assert float(got[i]) == float(expected)
    # Equal weights give the lower median; zero weights fall back to it too.
    v = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    assert float(weighted_median(v, torch.ones(1, 4))) == 2.0
    assert float(weighted_median(v, torch.zeros(1, 4))) == 2.0
    assert float(weighted_median(v, torch.tensor([[1.0, 0, 0, 0]]))) == 4.0


def test_bad_inputs_raise(clean):
    _, oracle, cond, batch, _ = clean
    with pytest.raises(ValueError, match="shape"):
        oracle.score(batch.clips[:, :, :, :8], cond)
    with pytest.raises(ValueError, match="conditions for"):
        oracle.score(batch.clips[:4], cond[:3])
    with pytest.raises(ValueError, match="entries for 8 frames"):
        oracle.score(batch.clips[:4], cond[:4], torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="contiguous"):
        oracle.score(batch.clips[:4], cond[:4], torch.tensor([0, 0, 2, 2, 2, 2, 2, 2]))
    with pytest.raises(ValueError, match="at least 2 frames"):
        oracle.score(batch.clips[:4, :, :1], cond[:4])
    with pytest.raises(ValueError, match="floating-point"):
        oracle.score(batch.clips[:4].long(), cond[:4])
    with pytest.raises(ValueError, match="tie_margin"):
        oracle.prefer(batch.clips[:4], batch.clips[:4], cond[:4], None, tie_margin=-0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_match_cpu(clean):
    world, oracle, cond, batch, score = clean
    device_score = oracle.score(batch.clips.cuda(), cond.cuda(), SEGMENTS_OF_2.cuda())
    torch.testing.assert_close(device_score.segments.cpu(), score.segments, atol=1e-4, rtol=0)
    rendered = world.render(cond, torch.Generator(device="cuda").manual_seed(0))
    assert rendered.clips.is_cuda and float(oracle.score(rendered.clips, cond).total.min()) >= 0.9
    labels = oracle.prefer(batch.clips.cuda(), -torch.ones_like(batch.clips).cuda(), cond, SEGMENTS_OF_2)
    assert bool((labels == 1).all())


@pytest.mark.parametrize("corruption", ["none", "wrong_colour", "reversed_direction", "static"])
def test_failure_modes_flag_exactly_the_corruption_rendered(corruption):
    world, oracle = world_and_oracle(**({} if corruption == "none" else {corruption: 1.0}))
    batch, cond = world.sample_batch(256, gen(8), corrupt=corruption != "none")
    modes = oracle.failure_modes(batch.clips, cond)
    assert set(modes) == {"missing", "wrong_colour", "reversed_direction", "static"}
    for name, flags in modes.items():
        assert flags.shape == (256,) and flags.dtype == torch.bool
        assert flags.all() if name == corruption else not flags.any(), (name, flags.float().mean())


def test_failure_mode_rates_track_a_mixture_and_noise_is_missing():
    world, oracle = world_and_oracle(wrong_colour=0.3, reversed_direction=0.3)
    batch, cond = world.sample_batch(512, gen(9), corrupt=True)
    modes = oracle.failure_modes(batch.clips, cond)
    shown = {name: torch.tensor([c == name for c in batch.corruption]) for name in ("wrong_colour", "reversed_direction")}
    for name, truth in shown.items():
        assert torch.equal(modes[name], truth), name
    noise = torch.rand(16, 3, 8, 16, 16, generator=gen(10)) * 2 - 1
    assert oracle.failure_modes(noise, cond[:16])["missing"].all()
