"""The shapes world (vidpo.data.shapes) and its pictures (vidpo.evaluation.visualize)."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vidpo.config import WorldConfig
from vidpo.data.shapes import ARTIFACT_KINDS, DIRECTIONS, PALETTE, RenderedBatch, ShapesWorld, shape_coverage
from vidpo.evaluation.visualize import save_gif, save_png_grid

ALL_SHAPES = ["square", "circle", "diamond"]


def make_world(**overrides) -> ShapesWorld:
    overrides.setdefault("shapes", ALL_SHAPES)
    return ShapesWorld(WorldConfig(**overrides))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clip_colour(clips: torch.Tensor) -> torch.Tensor:
    """RGB of the brightest pixel per (clip, frame): ``(n, T, 3)`` in [0, 1]."""
    x = (clips + 1) / 2
    n, _, T, H, W = x.shape
    flat = x.permute(0, 2, 1, 3, 4).reshape(n, T, 3, H * W)
    index = flat.amax(2).argmax(-1)
    return torch.gather(flat, 3, index[..., None, None].expand(n, T, 3, 1)).squeeze(-1)


def test_palette_has_required_saturated_colours():
    for name in ["red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange"]:
        rgb = PALETTE[name]
        assert len(rgb) == 3 and max(rgb) == 1.0 and min(rgb) >= 0.0


def test_vocabulary_enumeration_tokens_and_captions():
    world = make_world()
    nC, nS, nD = 4, 3, 4
    assert world.num_conditions == nC * nS * nD and world.cond_len == 3
    assert world.vocab_size == 1 + nC + nS + nD
    index = torch.arange(world.num_conditions)
    cond = world.condition(index)
    assert cond.shape == (world.num_conditions, 3) and cond.dtype == torch.long
    assert len({tuple(c) for c in cond.tolist()}) == world.num_conditions
    assert torch.equal(world.condition_index(cond), index)
    tokens = world.tokens(cond)
    assert int(tokens.min()) >= 1 and int(tokens.max()) == world.vocab_size - 1
    ranges = [set(tokens[:, k].tolist()) for k in range(3)]
    assert ranges[0] == set(range(1, 1 + nC)) and ranges[1] == set(range(1 + nC, 1 + nC + nS))
    assert ranges[2] == set(range(1 + nC + nS, 1 + nC + nS + nD))
    assert world.captions(torch.tensor([[0, 1, 1], [3, 2, 3]])) == ["a red circle moving left",
                                                                   "a yellow diamond moving down"]
    orange = ShapesWorld(WorldConfig(colours=["orange", "red"]))
    assert orange.captions(torch.tensor([[0, 0, 0]])) == ["an orange square moving right"]
    with pytest.raises(ValueError, match="out of range"):
        world.condition(torch.tensor([world.num_conditions]))
    with pytest.raises(ValueError, match="out of range"):
        world.tokens(torch.tensor([[0, 3, 0]]))


@pytest.mark.parametrize("corrupt", [False, True])
def test_render_is_deterministic_under_a_generator(corrupt):
    world = make_world(wrong_colour=0.2, reversed_direction=0.2, local_artifact=0.3, static=0.2)
    a, cond_a = world.sample_batch(64, gen(7), corrupt=corrupt)
    b, cond_b = world.sample_batch(64, gen(7), corrupt=corrupt)
    c, _ = world.sample_batch(64, gen(8), corrupt=corrupt)
    assert torch.equal(cond_a, cond_b) and torch.equal(a.clips, b.clips) and torch.equal(a.shown, b.shown)
    assert a.corruption == b.corruption and torch.equal(a.artifact_frames, b.artifact_frames)
    assert not torch.equal(a.clips, c.clips)


def test_clean_render_shapes_ranges_and_metadata():
    world = make_world()
    batch, cond = world.sample_batch(32, gen(0), corrupt=False)
    assert isinstance(batch, RenderedBatch)
    assert batch.clips.shape == (32, 3, 8, 16, 16) and batch.clips.dtype == torch.float32
    assert float(batch.clips.min()) == -1.0 and float(batch.clips.max()) <= 1.0
    assert torch.equal(batch.shown, cond)
    assert batch.corruption == ["none"] * 32 and bool((batch.artifact_frames == -1).all())
    # Most of every frame is black background; every frame shows some object.
    background = (batch.clips == -1).all(1).float().mean((-1, -2))
    assert bool((background > 0.8).all()) and bool((background < 0.98).all())
    # Colour of the drawn object is the caption's.
    expected = world.colour_rgb[cond[:, 0]]
    torch.testing.assert_close(clip_colour(batch.clips), expected[:, None, :].expand(32, 8, 3))


def test_clean_and_corrupted_renders_share_positions_when_the_motion_is_unchanged():
    world = make_world(wrong_colour=1.0)
    cond = world.condition(torch.arange(world.num_conditions))
    clean = world.render(cond, gen(3))
    wrong = world.render(cond, gen(3), corrupt=True)
    torch.testing.assert_close(clean.centers, wrong.centers)


@pytest.mark.parametrize("overrides", [
    {}, {"static": 1.0}, {"reversed_direction": 1.0}, {"local_artifact": 1.0},
    {"speed": 1.5, "object_size": 4, "directions": list(DIRECTIONS)},
])
def test_object_stays_fully_inside_the_frame(overrides):
    world = make_world(**overrides)
    cond = world.condition(torch.randint(world.num_conditions, (512,), generator=gen(1)))
    batch = world.render(cond, gen(2), corrupt=True)
    half = world.size / 2
    extent = torch.tensor([world.width, world.height], dtype=torch.float32)
    assert bool((batch.centers >= half - 1e-5).all()) and bool((batch.centers <= extent - half + 1e-5).all())
    # No clipping: each visible frame's drawn area equals the area of the same shape at the same
    # position in a frame padded by 8 px on every side (where nothing can be cut off).
    area = ((batch.clips + 1) / 2).amax(1).sum((-1, -2))  # = coverage, since every colour has max 1
    padded = torch.stack([shape_coverage(world.shapes[s], batch.centers[i] + 8, world.size, 32, 32).sum((-1, -2))
                          for i, s in enumerate(batch.shown[:, 1].tolist())])
    visible = area > 0
    assert float(visible.float().mean()) > 0.9
    torch.testing.assert_close(area[visible], padded[visible], atol=1e-4, rtol=1e-5)


def test_clean_motion_follows_the_caption():
    world = make_world(directions=list(DIRECTIONS), speed=1.0)
    cond = world.condition(torch.arange(world.num_conditions))
    batch = world.render(cond, gen(4))
    step = batch.centers[:, 1:] - batch.centers[:, :-1]
    expected = world.direction_vectors[cond[:, 2]] * world.speed
    torch.testing.assert_close(step, expected[:, None, :].expand_as(step), atol=1e-5, rtol=0)


def test_corruption_rates_match_the_config():
    fractions = {"wrong_colour": 0.1, "reversed_direction": 0.15, "local_artifact": 0.2, "static": 0.25}
    world = make_world(**fractions)
    batch, _ = world.sample_batch(8000, gen(5), corrupt=True)
    names = np.array(batch.corruption)
    for name, p in fractions.items():
        rate = float((names == name).mean())
        assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / 8000) + 1e-3, (name, rate, p)
    assert abs(float((names == "none").mean()) - 0.3) < 0.025
    kinds = np.array(batch.artifact_kind)[names == "local_artifact"]
    for kind in ARTIFACT_KINDS:
        assert abs(float((kinds == kind).mean()) - 1 / 3) < 0.05
    assert set(np.array(batch.artifact_kind)[names != "local_artifact"]) == {""}
    # With corrupt=False the fractions are ignored.
    clean, _ = world.sample_batch(256, gen(5), corrupt=False)
    assert set(clean.corruption) == {"none"}


def test_wrong_colour_shows_another_vocabulary_colour():
    world = make_world(wrong_colour=1.0)
    batch, cond = world.sample_batch(256, gen(6), corrupt=True)
    assert set(batch.corruption) == {"wrong_colour"}
    assert bool((batch.shown[:, 0] != cond[:, 0]).all())
    assert torch.equal(batch.shown[:, 1:], cond[:, 1:])
    assert len(set(batch.shown[:, 0].tolist())) == 4
    torch.testing.assert_close(clip_colour(batch.clips), world.colour_rgb[batch.shown[:, 0]][:, None].expand(256, 8, 3))


def test_reversed_direction_moves_opposite():
    world = make_world(reversed_direction=1.0)
    batch, cond = world.sample_batch(256, gen(7), corrupt=True)
    step = batch.centers[:, 1:] - batch.centers[:, :-1]
    expected = -world.direction_vectors[cond[:, 2]] * world.speed
    torch.testing.assert_close(step, expected[:, None].expand_as(step), atol=1e-5, rtol=0)
    opposite = {"right": "left", "left": "right", "up": "down", "down": "up"}
    assert [world.directions[d] for d in batch.shown[:, 2].tolist()] == \
        [opposite[world.directions[d]] for d in cond[:, 2].tolist()]


def test_static_does_not_move():
    world = make_world(static=1.0)
    batch, _ = world.sample_batch(128, gen(8), corrupt=True)
    assert bool((batch.shown[:, 2] == -1).all())
    assert torch.equal(batch.clips, batch.clips[:, :, :1].expand_as(batch.clips))


def test_local_artifacts_are_confined_to_an_aligned_window():
    L = 2
    world = make_world(local_artifact=1.0, artifact_segment_frames=L)
    cond = world.condition(torch.randint(world.num_conditions, (600,), generator=gen(9)))
    batch = world.render(cond, gen(10), corrupt=True)
    clean = world.render(cond, gen(10), corrupt=False)  # same start positions and velocities
    start, end = batch.artifact_frames[:, 0], batch.artifact_frames[:, 1]
    assert bool((end - start == L).all()) and bool((start % L == 0).all()) and bool((end <= 8).all())
    assert set(start.tolist()) == {0, 2, 4, 6}
    t = torch.arange(8)
    inside = (t >= start[:, None]) & (t < end[:, None])  # (n, T)
    differs = (batch.clips != clean.clips).flatten(3).any(-1).any(1)  # (n, T)
    assert torch.equal(differs, inside), "an artifact must change exactly the frames of its window"
    colours = clip_colour(batch.clips)
    for i, kind in enumerate(batch.artifact_kind):
        window = inside[i]
        if kind == "dropout":
            assert bool((batch.clips[i][:, window] == -1).all())
        elif kind == "flicker":
            shown_rgb = world.colour_rgb[batch.shown[i, 0]]
            assert bool(((colours[i][window] - shown_rgb).abs().sum(-1) >= 0.5).all())
            torch.testing.assert_close(batch.centers[i], clean.centers[i])
        else:
            assert kind == "jitter"
            jump = (batch.centers[i] - clean.centers[i]).norm(dim=-1)
            assert bool((jump[window] >= 1.0).all()) and bool((jump[~window] == 0).all())


def test_config_validation():
    with pytest.raises(ValueError, match="unknown"):
        ShapesWorld(WorldConfig(colours=["red", "mauve"]))
    with pytest.raises(ValueError, match="sum to"):
        ShapesWorld(WorldConfig(wrong_colour=0.6, static=0.6))
    with pytest.raises(ValueError, match="does not fit"):
        ShapesWorld(WorldConfig(object_size=12))
    with pytest.raises(ValueError, match="two colours"):
        ShapesWorld(WorldConfig(colours=["red"], wrong_colour=0.1))
    with pytest.raises(ValueError, match="artifact_segment_frames"):
        ShapesWorld(WorldConfig(artifact_segment_frames=9))


def test_sample_batch_draws_conditions_uniformly():
    world = make_world()
    _, cond = world.sample_batch(9600, gen(11), corrupt=False)
    counts = torch.bincount(world.condition_index(cond), minlength=world.num_conditions).double()
    expected = 9600 / world.num_conditions
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100, chi2  # 47 degrees of freedom: p(chi2 > 100) ~ 1e-5


def test_render_speed():
    world = make_world(wrong_colour=0.1, reversed_direction=0.1, local_artifact=0.2, static=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fair number on a shared 2-core machine
    try:
        world.sample_batch(256, gen(0))
        best = min(_timed(lambda: world.sample_batch(256, gen(1))) for _ in range(5))
    finally:
        torch.set_num_threads(threads)
    assert best < 0.2, f"rendering 256 clips took {best:.3f} s"


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_save_png_grid_and_gif(tmp_path):
    world = make_world()
    batch, cond = world.sample_batch(5, gen(12), corrupt=False)
    captions = world.captions(cond)
    png = save_png_grid(batch.clips, tmp_path / "grid.png", scale=3, captions=captions)
    gif = save_gif(batch.clips, tmp_path / "grid.gif", nrow=3, scale=2, captions=captions, fps=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.gif", "grid.png"]  # no temporaries left

    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[1] == 2 + 8 * (16 * 3 + 2) - 2 + 2
    # Frame t of clip 0 is the tile at (row 0, column t), upscaled with nearest neighbour.
    expected = ((batch.clips[0, :, 3] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    x0 = 2 + 3 * (16 * 3 + 2)
    np.testing.assert_array_equal(image[2:2 + 48:3, x0:x0 + 48:3], expected)

    with Image.open(gif) as animation:
        assert animation.n_frames == 8 and animation.info["duration"] == 250
        assert animation.size[0] == 2 + 3 * (16 * 2 + 2)
        animation.seek(5)
        frame = np.asarray(animation.convert("RGB"))
    expected = ((batch.clips[4, :, 5] + 1) * 127.5).round().permute(1, 2, 0).numpy()
    cell_h = (frame.shape[0] - 2) // 2
    tile = frame[2 + cell_h:2 + cell_h + 32:2, 2 + 34:2 + 34 + 32:2].astype(float)
    assert np.abs(tile - expected).max() <= 12  # GIF palette quantisation

    with pytest.raises(ValueError, match="captions"):
        save_gif(batch.clips, tmp_path / "bad.gif", captions=captions[:2])
    with pytest.raises(ValueError, match="shape"):
        save_png_grid(batch.clips[:, :2], tmp_path / "bad.png")
