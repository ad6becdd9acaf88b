"""Preference losses (vidpo.kernels) against the float64 eager reference, for every available backend.

Fresh random inputs per test; fp32 (~1e-5) and bf16 (~1e-2) tolerances; odd, non-power-of-two and
multi-chunk shapes; random labels with ties, all-tie pairs and an all-tie batch; S = 1; B = 1; the
x0/noise form of the target; KTO and flow matching. Every kernel output is NaN-poisoned before the
kernel runs (VIDPO_POISON_OUTPUTS=1), so an element a kernel forgets to write fails the comparison.
"""
import os

# Must precede the first triton kernel definition (vidpo.kernels defines them lazily on first use).
os.environ.setdefault("TRITON_INTERPRET", "1")

import logging  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.tolerances import LOSS_KERNELS, assert_close_to_float64  # noqa: E402
from vidpo.kernels import (  # noqa: E402
    available_backends,
    dense_dpo_loss,
    dispatch,
    flow_dpo_loss,
    flow_matching_loss,
    kto_loss,
    reference,
    resolve_backend,
)

BACKENDS = ("torch", "triton", "cpp", "cuda")
FUSED = ("triton", "cpp", "cuda")
DTYPES = (torch.float32, torch.bfloat16)

pytestmark = pytest.mark.usefixtures("poison_outputs")


def device_of(backend):
    # Triton runs on CPU tensors under the interpreter (the default here) and on the GPU with TRITON_INTERPRET=0
    # (benchmarks/run_gpu.sh).
    gpu_triton = backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
    return "cuda" if backend == "cuda" or gpu_triton else "cpu"


def require(backend):
    ok, reason = dispatch.backend_status(backend, device_of(backend))
    if not ok:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    return device_of(backend)


def rand(shape, dtype, device, generator):
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def close(actual, expected, dtype, scale=1.0, what=""):
    """allclose with the dtype's tolerance; ``scale`` is the typical magnitude of ``expected``."""
    assert_close_to_float64(actual, expected, dtype, LOSS_KERNELS, scale=scale, what=what)


# Shapes: (B, C, T, H, W, segment_ids). Unequal segments, odd sizes, a plane larger than one program's
# chunk (H*W = 8463 > 1024 * 8) so several programs share a plane, planes aligned to 8 elements.
CASES = {
    "odd_unequal_segments": (3, 3, 7, 5, 9, [0, 0, 1, 1, 1, 1, 2]),
    "one_segment": (2, 3, 5, 3, 7, [0, 0, 0, 0, 0]),
    "one_pair": (1, 2, 6, 4, 4, [0, 1, 1, 2, 3, 3]),
    "multi_chunk_plane": (1, 1, 3, 91, 93, [0, 0, 1]),
    # planes whose size is a multiple of 8, not 16 (as CogVideoX's 60 x 90): the kernels' ALIGN = 8 path
    "align_8_plane": (2, 2, 3, 12, 30, [0, 1, 1]),
    "align_8_multi_chunk": (1, 1, 2, 82, 100, [0, 1]),
}


def make_dpo_inputs(case, dtype, device, seed, noise_form=None):
    """Random v_theta, v_ref, target (or x0 + noise), labels with ties, segment_ids."""
    batch, channels, frames, height, width, segments = CASES[case]
    g = torch.Generator().manual_seed(seed)
    shape = (2 * batch, channels, frames, height, width)
    num_segments = max(segments) + 1
    inputs = dict(
        v_theta=rand(shape, dtype, device, g),
        v_ref=rand(shape, dtype, device, g),
        labels=torch.randint(-1, 2, (batch, num_segments), generator=g),
        segment_ids=torch.tensor(segments),
    )
    if batch > 1:
        inputs["labels"][0] = 0  # an all-tie pair contributes nothing
    if noise_form is None:
        inputs["target"] = rand(shape, dtype, device, g)
    else:
        inputs["x0"] = rand(shape, dtype, device, g)
        noise_rows = batch if noise_form == "shared" else 2 * batch
        inputs["noise"] = rand((noise_rows,) + shape[1:], dtype, device, g)
        inputs["target"] = None
    return inputs


def oracle_dpo(inputs, beta, label_smoothing=0.0):
    """float64 reference loss and v_theta gradient."""
    def f64(t):
        return None if t is None else t.detach().cpu().double()

    v_theta = f64(inputs["v_theta"]).requires_grad_(True)
    out = reference.dense_dpo_loss_reference(
        v_theta, f64(inputs["v_ref"]), f64(inputs["target"]), inputs["labels"], inputs["segment_ids"], beta,
        x0=f64(inputs.get("x0")), noise=f64(inputs.get("noise")), label_smoothing=label_smoothing,
    )
    out.loss.backward()
    return out, v_theta.grad


def run_dpo(inputs, beta, backend, label_smoothing=0.0):
    v_theta = inputs["v_theta"].clone().requires_grad_(True)
    out = dense_dpo_loss(
        v_theta, inputs["v_ref"], inputs["target"], inputs["labels"], inputs["segment_ids"], beta,
        backend=backend, x0=inputs.get("x0"), noise=inputs.get("noise"), label_smoothing=label_smoothing,
    )
    out.loss.backward()
    return out, v_theta.grad


def check_dpo(out, grad, expected, expected_grad, dtype, v_theta, beta):
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert grad.dtype == v_theta.dtype and grad.shape == v_theta.shape
    close(out.loss, expected.loss, dtype, what="loss")
    # d = err_theta - err_ref cancels: its rounding error scales with err, not with d.
    d_scale = float(torch.cat([expected.err_theta, expected.err_ref]).abs().max())
    close(out.margin, expected.margin, dtype, beta * d_scale, what="margin")
    close(out.d_first, expected.d_first, dtype, d_scale, what="d_first")
    close(out.d_second, expected.d_second, dtype, d_scale, what="d_second")
    close(out.err_theta, expected.err_theta, dtype, what="err_theta")
    close(out.err_ref, expected.err_ref, dtype, what="err_ref")
    assert int(out.n_nontie) == int(expected.n_nontie)
    # Accuracy can only differ where a margin sits within rounding of 0.
    nonzero_margins = expected.margin.abs()[expected.margin != 0]
    if float(torch.cat([nonzero_margins, torch.ones(1, dtype=nonzero_margins.dtype)]).min()) > 1e-3:
        assert float(out.accuracy) == pytest.approx(float(expected.accuracy), abs=1e-6)
    close(grad, expected_grad, dtype, float(expected_grad.abs().max()) + 1e-12, what="grad v_theta")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_dpo_matches_float64_reference(backend, case, dtype):
    device = require(backend)
    inputs = make_dpo_inputs(case, dtype, device, seed=zlib.crc32(f"{backend}/{case}".encode()) % 1000)
    beta = 40.0
    expected, expected_grad = oracle_dpo(inputs, beta)
    out, grad = run_dpo(inputs, beta, backend)
    check_dpo(out, grad, expected, expected_grad, dtype, inputs["v_theta"], beta)


@pytest.mark.parametrize("noise_form", ["shared", "per_video"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_x0_noise_target_equals_materialised_target(backend, dtype, noise_form):
    device = require(backend)
    inputs = make_dpo_inputs("odd_unequal_segments", dtype, device, seed=7, noise_form=noise_form)
    beta = 40.0
    expected, expected_grad = oracle_dpo(inputs, beta)
    out, grad = run_dpo(inputs, beta, backend)
    check_dpo(out, grad, expected, expected_grad, dtype, inputs["v_theta"], beta)

    rows = torch.arange(inputs["x0"].shape[0]) % inputs["noise"].shape[0]
    materialised = dict(inputs, target=inputs["noise"][rows.to(device)] - inputs["x0"], x0=None, noise=None)
    out_materialised, grad_materialised = run_dpo(materialised, beta, backend)
    if dtype == torch.float32:  # bf16 rounds the materialised target once more
        close(out.loss, out_materialised.loss, dtype, what="loss x0/noise vs target")
        close(grad, grad_materialised, dtype, float(grad.abs().max()), what="grad x0/noise vs target")


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_is_conservative_dpo(backend):
    device = require(backend)
    inputs = make_dpo_inputs("odd_unequal_segments", torch.float32, device, seed=23)
    beta, eps = 40.0, 0.2
    expected, expected_grad = oracle_dpo(inputs, beta, eps)
    out, grad = run_dpo(inputs, beta, backend, eps)
    check_dpo(out, grad, expected, expected_grad, torch.float32, inputs["v_theta"], beta)
    # cDPO: each label is flipped with probability eps, i.e. the mixture of the losses of y and -y ...
    plain, plain_grad = oracle_dpo(inputs, beta)
    flipped, flipped_grad = oracle_dpo(dict(inputs, labels=-inputs["labels"]), beta)
    torch.testing.assert_close(expected.loss, (1 - eps) * plain.loss + eps * flipped.loss)
    torch.testing.assert_close(expected_grad, (1 - eps) * plain_grad + eps * flipped_grad)
    # ... whose per-label optimum is sigmoid(margin) = 1 - eps (a bounded margin), not margin -> infinity.
    from vidpo.kernels.losses import smoothed_dpo_terms

    m = torch.logit(torch.tensor(1 - eps, dtype=torch.float64)).requires_grad_(True)
    smoothed_dpo_terms(m, eps).backward()
    assert abs(float(m.grad)) < 1e-12
    with pytest.raises(ValueError, match="label_smoothing"):
        run_dpo(inputs, beta, backend, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tie_batch_gives_zero_loss_and_zero_gradient(backend):
    device = require(backend)
    inputs = make_dpo_inputs("odd_unequal_segments", torch.float32, device, seed=3)
    inputs["labels"] = torch.zeros_like(inputs["labels"])
    out, grad = run_dpo(inputs, 40.0, backend)
    assert float(out.loss.detach()) == 0.0 and torch.isfinite(out.loss.detach())
    assert torch.equal(grad.abs(), torch.zeros_like(grad)), "an all-tie batch must give exactly zero gradients"
    assert int(out.n_nontie) == 0 and float(out.accuracy) == 0.0
    assert torch.isfinite(out.margin).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_dpo_is_dense_dpo_with_one_segment_and_positive_labels(backend):
    device = require(backend)
    inputs = make_dpo_inputs("one_segment", torch.float32, device, seed=11)
    v_theta = inputs["v_theta"].clone().requires_grad_(True)
    out = flow_dpo_loss(v_theta, inputs["v_ref"], inputs["target"], 25.0, backend=backend)
    out.loss.backward()
    inputs["labels"] = torch.ones(v_theta.shape[0] // 2, 1, dtype=torch.long)
    expected, expected_grad = oracle_dpo(inputs, 25.0)
    check_dpo(out, v_theta.grad, expected, expected_grad, torch.float32, v_theta, 25.0)
    # Flow-DPO in closed form: mean over pairs of -log sigmoid(-beta/2 (d_w - d_l)).
    d = expected.err_theta - expected.err_ref
    batch = d.shape[0] // 2
    closed_form = -torch.nn.functional.logsigmoid(-12.5 * (d[:batch] - d[batch:])).mean()
    close(out.loss, closed_form, torch.float32, what="closed-form Flow-DPO")


def kto_inputs(dtype, device, seed, noise_form=None):
    g = torch.Generator().manual_seed(seed)
    shape = (5, 3, 7, 5, 9)
    inputs = dict(
        v_theta=rand(shape, dtype, device, g),
        v_ref=rand(shape, dtype, device, g),
        desirable=torch.tensor([True, False, True, True, False]),
        target=rand(shape, dtype, device, g) if noise_form is None else None,
    )
    if noise_form is not None:
        inputs["x0"] = rand(shape, dtype, device, g)
        inputs["noise"] = rand(shape, dtype, device, g)
    return inputs


@pytest.mark.parametrize("noise_form", [None, "per_video"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kto_matches_float64_reference(backend, dtype, noise_form):
    device = require(backend)
    inputs = kto_inputs(dtype, device, seed=5, noise_form=noise_form)
    # Shift v_ref so that the mean reward is positive and the clamp of z is not trivially 0.
    inputs["v_ref"] = (inputs["v_ref"].float() * 1.05).to(dtype)
    kwargs = dict(lambda_d=1.0, lambda_u=1.5)
    v64 = inputs["v_theta"].detach().cpu().double().requires_grad_(True)

    def f64(t):
        return None if t is None else t.cpu().double()

    expected = reference.kto_loss_reference(
        v64, f64(inputs["v_ref"]), f64(inputs["target"]), inputs["desirable"], 20.0,
        x0=f64(inputs.get("x0")), noise=f64(inputs.get("noise")), **kwargs,
    )
    expected.loss.backward()
    v_theta = inputs["v_theta"].clone().requires_grad_(True)
    out = kto_loss(
        v_theta, inputs["v_ref"], inputs["target"], inputs["desirable"], 20.0, backend=backend,
        x0=inputs.get("x0"), noise=inputs.get("noise"), **kwargs,
    )
    out.loss.backward()
    assert float(expected.ref_point) > 0.0, "test inputs should exercise a positive reference point"
    close(out.loss, expected.loss, dtype, what="kto loss")
    close(out.reward, expected.reward, dtype, float(expected.reward.abs().max()), what="kto reward")
    close(out.ref_point, expected.ref_point, dtype, float(expected.ref_point), what="kto ref point")
    assert v_theta.grad.dtype == dtype
    close(v_theta.grad, v64.grad, dtype, float(v64.grad.abs().max()), what="kto grad")


@pytest.mark.parametrize("weights", [None, "random", "zero"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_matching_matches_float64_reference(backend, dtype, weights):
    device = require(backend)
    g = torch.Generator().manual_seed(13)
    shape = (3, 3, 7, 5, 9)
    v, target = rand(shape, dtype, device, g), rand(shape, dtype, device, g)
    row_weights = {None: None, "random": torch.rand(3, generator=g), "zero": torch.zeros(3)}[weights]
    v64 = v.detach().cpu().double().requires_grad_(True)
    expected = reference.flow_matching_loss_reference(v64, target.cpu().double(), row_weights=row_weights)
    expected.backward()
    v_theta = v.clone().requires_grad_(True)
    loss = flow_matching_loss(v_theta, target, backend=backend, row_weights=row_weights)
    loss.backward()
    if weights == "zero":
        assert float(loss.detach()) == 0.0 and torch.equal(v_theta.grad.abs(), torch.zeros_like(v_theta.grad))
    if weights is None:  # the plain mean over every element
        close(loss, ((v.double().cpu() - target.double().cpu()) ** 2).mean(), dtype, what="flow matching mean")
    close(loss, expected, dtype, what="flow matching vs reference")
    close(v_theta.grad, v64.grad, dtype, float(v64.grad.abs().max()) + 1e-12, what="flow matching grad")


@pytest.mark.parametrize("target_form", ["target", "shared_noise"])
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FUSED)
def test_primitives_write_every_element_and_match_reference(backend, dtype, with_ref, target_form):
    """Both primitives of a fused backend on their own, outputs NaN-poisoned before the kernel runs."""
    device = require(backend)
    g = torch.Generator().manual_seed(17)
    shape = (4, 3, 7, 5, 9)
    v_theta, v_ref = rand(shape, dtype, device, g), rand(shape, dtype, device, g)
    if target_form == "target":
        target, x0, noise = rand(shape, dtype, device, g), None, None
    else:
        target, x0, noise = None, rand(shape, dtype, device, g), rand((2,) + shape[1:], dtype, device, g)
    segment_ids = torch.tensor([0, 0, 1, 1, 1, 2, 2], device=device)
    prims = dispatch.primitives(backend)
    v_ref_arg = v_ref if with_ref else None

    sums = prims.segment_sq_err_sums(v_theta, v_ref_arg, target, x0, noise, segment_ids, 3)

    def f64(t):
        return None if t is None else t.cpu().double()

    expected = reference.segment_sq_err_sums_reference(
        f64(v_theta), f64(v_ref_arg), f64(target), f64(x0), f64(noise), segment_ids.cpu(), 3
    )
    assert sums.shape == (2 if with_ref else 1, 4, 3) and sums.dtype == torch.float32
    close(sums, expected, dtype, float(expected.abs().max()), what="segment sums")

    coef = torch.randn(4, 3, generator=g).to(device)
    grad = prims.segment_scaled_residual(v_theta, target, x0, noise, coef, segment_ids)
    expected_grad = reference.segment_scaled_residual_reference(
        f64(v_theta), f64(target), f64(x0), f64(noise), coef.cpu().double(), segment_ids.cpu()
    )
    assert grad.dtype == dtype and grad.shape == shape
    close(grad, expected_grad, dtype, float(expected_grad.abs().max()), what="scaled residual")


def test_reference_backend_gives_no_gradient_to_v_ref():
    inputs = make_dpo_inputs("one_pair", torch.float32, "cpu", seed=2)
    v_ref = inputs["v_ref"].clone().requires_grad_(True)
    v_theta = inputs["v_theta"].clone().requires_grad_(True)
    for backend in available_backends("cpu"):
        out = dense_dpo_loss(v_theta, v_ref, inputs["target"], inputs["labels"], inputs["segment_ids"], 10.0,
                             backend=backend)
        out.loss.backward()
        assert v_ref.grad is None, backend
        assert v_theta.grad is not None
        v_theta.grad = None


def test_bad_inputs_give_clear_errors():
    inputs = make_dpo_inputs("odd_unequal_segments", torch.float32, "cpu", seed=1)

    def args(**overrides):
        names = ("v_theta", "v_ref", "target", "labels", "segment_ids")
        return {**{k: inputs[k] for k in names}, "beta": 1.0, **overrides}

    with pytest.raises(ValueError, match="target requires grad"):
        dense_dpo_loss(**args(target=inputs["target"].clone().requires_grad_(True)))
    with pytest.raises(ValueError, match="non-decreasing"):
        dense_dpo_loss(**args(segment_ids=torch.tensor([0, 1, 0, 1, 1, 2, 2])))
    with pytest.raises(ValueError, match=r"segments \[1\] have no frame"):
        dense_dpo_loss(**args(segment_ids=torch.tensor([0, 0, 0, 2, 2, 2, 2])))
    with pytest.raises(ValueError, match="labels must be"):
        dense_dpo_loss(**args(labels=inputs["labels"][:2]))
    with pytest.raises(TypeError, match="one dtype"):
        dense_dpo_loss(**args(v_ref=inputs["v_ref"].bfloat16()))
    with pytest.raises(ValueError, match="either target or both x0 and noise"):
        dense_dpo_loss(**args(x0=inputs["v_ref"], noise=inputs["v_ref"]))
    with pytest.raises(ValueError, match="noise must be"):
        dense_dpo_loss(**args(target=None, x0=inputs["v_ref"], noise=inputs["v_ref"][:4]))
    with pytest.raises(ValueError, match="unknown loss backend 'tpu'"):
        dense_dpo_loss(**args(backend="tpu"))
    with pytest.raises(RuntimeError, match="'cuda' is unavailable on cpu"):
        dense_dpo_loss(**args(backend="cuda"))


def test_segment_layouts_are_checked_once_and_again_when_they_change():
    """The fused path checks and counts a CPU segment layout once (keyed by its values): the same ids give the very
    tensors of the first call, changed ids (in place too) are checked again, and a bad layout still raises."""
    from vidpo.kernels import losses

    ids = torch.tensor([0, 0, 1, 1, 2])
    first = losses._segments("f", ids, 5, 3, 4, 6, None, torch.device("cpu"))
    again = losses._segments("f", ids.clone(), 5, 3, 4, 6, None, torch.device("cpu"))
    assert again[0] is first[0] and again[1] is first[1] and first[1].tolist() == [48.0, 48.0, 24.0]
    ids[4] = 1                                       # changed in place: checked again, and now wrong
    with pytest.raises(ValueError, match="segments \\[2\\] have no frame"):
        losses._segments("f", ids, 5, 3, 4, 6, None, torch.device("cpu"))
    other = losses._segments("f", torch.tensor([0, 1, 1, 2, 2]), 5, 3, 4, 6, None, torch.device("cpu"))
    assert other[1].tolist() == [24.0, 48.0, 48.0] and other[0].tolist() == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="non-decreasing"):
        losses._segments("f", torch.tensor([0, 1, 0, 1, 2]), 5, 3, 4, 6, None, torch.device("cpu"))


def test_dispatch_auto_choice_and_single_log(caplog):
    assert "torch" in available_backends("cpu")
    auto = resolve_backend("auto", "cpu")
    assert auto == ("cpp" if "cpp" in available_backends("cpu") else "torch")
    with caplog.at_level(logging.INFO, logger="vidpo.kernels"):
        dispatch._logged_choices.clear()
        for _ in range(3):
            resolve_backend("torch", "cpu")
    assert sum("loss backend 'torch'" in r.getMessage() for r in caplog.records) == 1


def test_triton_on_cpu_requires_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = dispatch.backend_status("triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")


@pytest.mark.parametrize("tile", [256, 2048, 16384])
@pytest.mark.parametrize("shape", [(6, 3, 7, 5, 9), (2, 1, 3, 91, 93)], ids=["small_planes", "multi_chunk"])
def test_triton_tilings_cover_every_plane_and_chunk(monkeypatch, tile, shape):
    """Several plane-blocks per grid (with a partial last block) and several chunks per plane, which the
    default interpreter tile folds into one or two programs."""
    require("triton")
    from vidpo.kernels import segment_sums

    monkeypatch.setattr(segment_sums, "INTERPRETER_TILE", tile)
    cfg = segment_sums.launch_config(shape[3] * shape[4], shape[0] * shape[1] * shape[2])
    if tile == 256 and shape[3] * shape[4] < 256:  # several plane-blocks, the last one partial
        assert cfg.programs > 1 and (shape[0] * shape[1] * shape[2]) % cfg.planes != 0
    if shape[3] * shape[4] > 8192:
        assert cfg.chunks > 1
    g = torch.Generator().manual_seed(23)
    v_theta, v_ref, x0 = (rand(shape, torch.float32, "cpu", g) for _ in range(3))
    noise = rand((shape[0] // 2,) + shape[1:], torch.float32, "cpu", g)
    segment_ids = torch.arange(shape[2]) * 2 // shape[2]
    sums = segment_sums.segment_sq_err_sums(v_theta, v_ref, None, x0, noise, segment_ids, 2)
    expected = reference.segment_sq_err_sums_reference(
        v_theta.double(), v_ref.double(), None, x0.double(), noise.double(), segment_ids, 2)
    close(sums, expected, torch.float32, float(expected.abs().max()), what="segment sums")
    coef = torch.randn(shape[0], 2, generator=g)
    grad = segment_sums.segment_scaled_residual(v_theta, None, x0, noise, coef, segment_ids)
    expected_grad = reference.segment_scaled_residual_reference(
        v_theta.double(), None, x0.double(), noise.double(), coef.double(), segment_ids)
    close(grad, expected_grad, torch.float32, float(expected_grad.abs().max()), what="scaled residual")
