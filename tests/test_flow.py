"""Rectified flow: timesteps, interpolation, Euler/CFG sampling, SDEdit, per-sample determinism."""
import torch

from vidpo.models import flow
from vidpo.utils.seeding import derive_seed, generator, randn_per_sample


def linear_field(target):
    """Exact velocity field of the straight path to a fixed clean point: v(x, t) = (x - target) / t."""
    def fn(x, t, c):
        return (x - target) / t.view(-1, 1, 1, 1, 1).clamp_min(1e-6)
    return fn


def test_timesteps_range_and_distribution():
    t = flow.sample_timesteps(20000, generator(0, "t"), t_min=0.3, t_max=0.9)
    assert t.min() >= 0.3 and t.max() <= 0.9
    t = flow.sample_timesteps(20000, generator(0, "t"))
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(torch.logit(t).std().item() - 1.0) < 0.03


def test_interpolation_and_target():
    x0, eps = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t = torch.tensor([0.0, 1.0])
    xt = flow.interpolate(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])
    # d x_t / d t = u along the path.
    t1, t2 = torch.full((2,), 0.3), torch.full((2,), 0.5)
    fd = (flow.interpolate(x0, eps, t2) - flow.interpolate(x0, eps, t1)) / 0.2
    torch.testing.assert_close(fd, flow.velocity_target(x0, eps), rtol=1e-4, atol=1e-4)


def test_euler_recovers_target_of_exact_field():
    target = torch.randn(3, 3, 2, 4, 4)
    x1 = torch.randn_like(target)
    out = flow.euler_sample(linear_field(target), x1, torch.zeros(3, 1), steps=7)
    torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-4)


def test_cfg_combines_conditional_and_null():
    def fn(x, t, c):
        return torch.ones_like(x) * c.view(-1, 1, 1, 1, 1).float()
    x = torch.zeros(2, 1, 1, 1, 1)
    v = flow.guided_velocity(fn, x, torch.ones(2), torch.tensor([2, 2]), torch.tensor([0, 0]), 3.0)
    assert torch.allclose(v, torch.full_like(v, 6.0))  # 0 + 3 * (2 - 0)


def test_per_sample_determinism():
    shape = (4, 3, 2, 4, 4)
    a = randn_per_sample(shape, 5, [10, 11, 12, 13], "s")
    b = randn_per_sample((1,) + shape[1:], 5, [12], "s")
    assert torch.equal(a[2], b[0])
    assert not torch.equal(randn_per_sample(shape, 6, [10, 11, 12, 13], "s"), a)
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2) != derive_seed(1, "a", 3)

    def model(x, t, c):
        return 0.5 * x + t.view(-1, 1, 1, 1, 1)
    full = flow.sample(model, shape, torch.zeros(4, 1), seed=3, indices=[0, 1, 2, 3], steps=3)
    one = flow.sample(model, (1,) + shape[1:], torch.zeros(1, 1), seed=3, indices=[2], steps=3)
    torch.testing.assert_close(full[2:3], one, rtol=0, atol=0)


def test_sdedit_endpoints():
    def model(x, t, c):
        return torch.tanh(x) + t.view(-1, 1, 1, 1, 1)
    x0 = torch.randn(2, 3, 2, 4, 4)
    cond = torch.zeros(2, 1)
    assert torch.equal(flow.sdedit(model, x0, cond, 0.0, seed=1, indices=[0, 1]), x0)
    plain = flow.sample(model, x0.shape, cond, seed=1, indices=[0, 1], steps=5)
    assert torch.equal(flow.sdedit(model, x0, cond, 1.0, seed=1, indices=[0, 1], steps=5), plain)
    mid = flow.sdedit(model, x0, cond, 0.5, seed=1, indices=[0, 1], steps=5)
    assert not torch.allclose(mid, plain)


def test_sdedit_per_row_levels_match_scalar_calls():
    target = torch.randn(3, 3, 2, 4, 4)
    x0 = torch.randn_like(target)
    field = linear_field(target)
    cond = torch.zeros(3, 1)
    etas = torch.tensor([0.3, 0.6, 1.0])
    rows = flow.sdedit(field, x0, cond, etas, seed=2, indices=[0, 1, 2], steps=4)
    for i, eta in enumerate(etas.tolist()):
        one = flow.sdedit(linear_field(target[i:i + 1]), x0[i:i + 1], cond[:1], eta, seed=2, indices=[i], steps=4)
        torch.testing.assert_close(rows[i:i + 1], one, rtol=1e-6, atol=1e-6)


def test_time_grid_shift_and_structural_grid():
    g = flow.time_grid(4)
    assert torch.allclose(g, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s = flow.time_grid(4, 1.0, shift=3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and (s[1:-1] > g[1:-1]).all()
    assert torch.allclose(flow.time_grid(2, 0.5), torch.tensor([0.5, 0.25, 0.0]))
