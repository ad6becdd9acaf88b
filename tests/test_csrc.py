"""vidpo._C: the C++ (OpenMP) and CUDA paired-loss primitives and their torch custom ops.

Every result is compared with a float64 computation written directly from the formulas
    sums[k, n, s] = sum_{c, h, w, t : seg[t] == s} (v_k - u)^2,   grad = coef[n, seg[t]] * (v_theta - u),
    u = target or noise[n % M] - x0[n],
on fresh random inputs, with outputs NaN-poisoned before the kernels run (VIDPO_POISON_OUTPUTS=1) so an
unwritten element fails. The CUDA sources are compiled (not run) with nvcc; CUDA tests run only on a GPU.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from helpers.tolerances import CSRC_PRIMITIVES, assert_close_to_float64, max_abs
from vidpo.kernels import cpp_backend, cuda_backend

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc") else None)
HAS_GPU = torch.cuda.is_available()

# (N, C, T, H, W, segment ids): odd sizes, 1x1 planes, a plane longer than the CPU's fp32 chunk (4096),
# a plane divisible by 8 (the CUDA vector path), unequal segments, frames in no segment (-1, >= S).
CASES = {
    "odd": (2, 3, 7, 5, 9, [0, 1, 1, 1, 2, 2, 2]),
    "1x1": (4, 1, 3, 1, 1, [0, 0, 1]),
    "vec8": (4, 4, 5, 4, 6, [0, 1, 1, 2, 2]),
    "long_plane": (2, 2, 2, 64, 72, [0, 1]),
    "excluded": (2, 2, 6, 3, 4, [-1, 0, 0, 1, 1, 3]),
}
NUM_SEGMENTS = {"odd": 3, "1x1": 2, "vec8": 3, "long_plane": 2, "excluded": 2}


pytestmark = pytest.mark.usefixtures("poison_outputs")


@pytest.fixture(scope="module", autouse=True)
def _extension_built():
    # Fails (not skips) with the build command when the extension is missing.
    cpp_backend.extension()


def make_inputs(case, dtype, target_form, with_ref=True, device="cpu", target_dtype=None, seed=0):
    """Random (v_theta, v_ref, target, x0, noise, segment_ids, S) for a CASES entry.

    target_form: 'target' | 'noise_pair' (M = N / 2, one noise per pair) | 'noise_each' (M = N).
    """
    n, c, t, h, w, ids = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    target_dtype = target_dtype or dtype

    def rand(batch, dt):
        return torch.randn(batch, c, t, h, w, generator=gen, dtype=torch.float64).to(dt).to(device)

    v_theta = rand(n, dtype)
    v_ref = rand(n, dtype) if with_ref else None
    target = x0 = noise = None
    if target_form == "target":
        target = rand(n, target_dtype)
    else:
        x0 = rand(n, target_dtype)
        noise = rand(n // 2 if target_form == "noise_pair" else n, target_dtype)
    return v_theta, v_ref, target, x0, noise, torch.tensor(ids, device=device), NUM_SEGMENTS[case]


def reference_target(v_theta, target, x0, noise):
    if target is not None:
        return target.double()
    rows = torch.arange(v_theta.shape[0], device=v_theta.device) % noise.shape[0]
    return noise.double()[rows] - x0.double()


def reference_sums(v_theta, v_ref, target, x0, noise, segment_ids, num_segments):
    """(K, N, S) float64 from the formula."""
    u = reference_target(v_theta, target, x0, noise)
    values = [v_theta] if v_ref is None else [v_theta, v_ref]
    out = torch.zeros(len(values), v_theta.shape[0], num_segments, dtype=torch.float64, device=v_theta.device)
    for k, v in enumerate(values):
        per_frame = ((v.double() - u) ** 2).sum(dim=(1, 3, 4))  # (N, T)
        for s in range(num_segments):
            out[k, :, s] = per_frame[:, segment_ids == s].sum(dim=1)
    return out


def reference_residual(v_theta, target, x0, noise, coef, segment_ids):
    """float64 coef[n, seg[t]] * (v_theta - u); 0 on frames in no segment."""
    u = reference_target(v_theta, target, x0, noise)
    num_segments = coef.shape[1]
    valid = (segment_ids >= 0) & (segment_ids < num_segments)
    per_frame = coef.double()[:, segment_ids.clamp(0, num_segments - 1)] * valid.double()  # (N, T)
    return per_frame[:, None, :, None, None] * (v_theta.double() - u)


def assert_close(actual, expected, dtype):
    """``actual`` against the float64 formula: rtol and atol both relative to the reference's largest magnitude."""
    assert_close_to_float64(actual, expected, dtype, CSRC_PRIMITIVES, scale=max(max_abs(expected), 1e-6))


# ------------------------------------------------------------------------------------------------
# CPU primitives against the float64 formula.

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("target_form", ["target", "noise_pair", "noise_each"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["paired", "no_ref"])
def test_cpu_sums_match_float64_formula(case, dtype, target_form, with_ref):
    inputs = make_inputs(case, dtype, target_form, with_ref)
    out = cpp_backend.segment_sq_err_sums(*inputs)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (2 if with_ref else 1, inputs[0].shape[0], inputs[-1]) and out.dtype == expected_dtype
    assert_close(out, reference_sums(*inputs), dtype)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("target_form", ["target", "noise_pair", "noise_each"])
def test_cpu_residual_matches_float64_formula(case, dtype, target_form):
    v_theta, _, target, x0, noise, ids, num_segments = make_inputs(case, dtype, target_form, with_ref=False)
    coef = torch.randn(v_theta.shape[0], num_segments, generator=torch.Generator().manual_seed(1))
    grad = cpp_backend.segment_scaled_residual(v_theta, target, x0, noise, coef, ids)
    assert grad.shape == v_theta.shape and grad.dtype == dtype and grad.is_contiguous()
    assert_close(grad, reference_residual(v_theta, target, x0, noise, coef, ids), dtype)


@pytest.mark.parametrize("value_dtype,target_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16_values_fp32_target", "fp32_values_bf16_target"])
def test_cpu_mixed_value_and_target_dtypes(value_dtype, target_dtype):
    inputs = make_inputs("odd", value_dtype, "noise_pair", target_dtype=target_dtype)
    assert_close(cpp_backend.segment_sq_err_sums(*inputs), reference_sums(*inputs), torch.bfloat16)
    v_theta, _, target, x0, noise, ids, num_segments = inputs
    coef = torch.randn(v_theta.shape[0], num_segments)
    assert_close(cpp_backend.segment_scaled_residual(v_theta, target, x0, noise, coef, ids),
                 reference_residual(v_theta, target, x0, noise, coef, ids), torch.bfloat16)


def test_cpu_segment_without_frames_is_zero_and_written():
    v_theta, v_ref, target, x0, noise, ids, _ = make_inputs("odd", torch.float32, "target")
    out = cpp_backend.segment_sq_err_sums(v_theta, v_ref, target, x0, noise, ids, 5)  # segments 3, 4 empty
    assert torch.equal(out[:, :, 3:], torch.zeros(2, 2, 2))
    assert_close(out, reference_sums(v_theta, v_ref, target, x0, noise, ids, 5), torch.float32)


def test_cpu_int32_segment_ids_and_empty_batch():
    v_theta, v_ref, target, x0, noise, ids, num_segments = make_inputs("odd", torch.float32, "noise_each")
    assert torch.equal(cpp_backend.segment_sq_err_sums(v_theta, v_ref, target, x0, noise, ids.int(), num_segments),
                       cpp_backend.segment_sq_err_sums(v_theta, v_ref, target, x0, noise, ids, num_segments))
    empty = [t[:0] for t in (v_theta, v_ref, x0, noise)]
    assert cpp_backend.segment_sq_err_sums(empty[0], empty[1], None, empty[2], empty[3], ids, 3).shape == (2, 0, 3)
    coef = torch.ones(0, 3)
    assert cpp_backend.segment_scaled_residual(empty[0], None, empty[2], empty[3], coef, ids).shape == empty[0].shape


def test_cpu_non_contiguous_inputs_give_contiguous_outputs():
    v_theta, v_ref, target, x0, noise, ids, num_segments = make_inputs("vec8", torch.float32, "noise_pair")
    # Same values through channels-last-like strides (the layout an unpatchify permute leaves behind).
    strided = [t.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3) for t in (v_theta, v_ref, x0, noise)]
    assert not strided[0].is_contiguous()
    out = cpp_backend.segment_sq_err_sums(strided[0], strided[1], None, strided[2], strided[3], ids, num_segments)
    assert torch.equal(out, cpp_backend.segment_sq_err_sums(v_theta, v_ref, None, x0, noise, ids, num_segments))
    coef = torch.randn(v_theta.shape[0], num_segments)
    grad = cpp_backend.segment_scaled_residual(strided[0], None, strided[2], strided[3], coef, ids)
    assert grad.is_contiguous()
    assert torch.equal(grad, cpp_backend.segment_scaled_residual(v_theta, None, x0, noise, coef, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_results_are_bit_identical_across_runs_and_thread_counts(dtype):
    inputs = make_inputs("long_plane", dtype, "noise_pair")
    coef = torch.randn(inputs[0].shape[0], inputs[-1])
    threads = torch.get_num_threads()
    runs = []
    try:
        for num_threads in (threads, threads, 1, 3):
            torch.set_num_threads(num_threads)
            runs.append((cpp_backend.segment_sq_err_sums(*inputs),
                         cpp_backend.segment_scaled_residual(inputs[0], *inputs[2:5], coef, inputs[5])))
    finally:
        torch.set_num_threads(threads)
    for sums, grad in runs[1:]:
        assert torch.equal(sums, runs[0][0]) and torch.equal(grad, runs[0][1])


_sums = cpp_backend.segment_sq_err_sums
_residual = cpp_backend.segment_scaled_residual


@pytest.mark.parametrize("call,match", [
    (lambda v, r, x0, nz, ids: _sums(v, r, v, x0, nz, ids, 3), "either target or"),
    (lambda v, r, x0, nz, ids: _sums(v, r, None, x0, None, ids, 3), "x0 and noise"),
    (lambda v, r, x0, nz, ids: _sums(v, r, None, x0, torch.cat([nz] * 3), ids, 3), "noise batch M"),
    (lambda v, r, x0, nz, ids: _sums(v, r, None, x0, nz, ids[:-1], 3), "one entry per"),
    (lambda v, r, x0, nz, ids: _sums(v, r.double(), None, x0, nz, ids, 3), "v_ref must have"),
    (lambda v, r, x0, nz, ids: _sums(v[0], r, None, x0, nz, ids, 3), "must be 5-D"),
    (lambda v, r, x0, nz, ids: _sums(v, r, None, x0, nz, ids, 0), "num_segments"),
    (lambda v, r, x0, nz, ids: _sums(v.half(), None, v, None, None, ids, 3), "float32, bfloat16"),
    (lambda v, r, x0, nz, ids: _residual(v, None, x0, nz, torch.ones(3, 3), ids), "coef must be"),
], ids=["both_targets", "noise_missing", "bad_noise_batch", "short_segment_ids", "ref_dtype", "not_5d",
        "no_segments", "half", "coef_shape"])
def test_cpu_bad_inputs_raise_clear_errors(call, match):
    v_theta, v_ref, _, x0, noise, ids, _ = make_inputs("odd", torch.float32, "noise_pair")
    with pytest.raises(RuntimeError, match=match):
        call(v_theta, v_ref, x0, noise, ids)


# ------------------------------------------------------------------------------------------------
# Custom ops: registration, fake tensors, autograd, torch.compile.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("target_form", ["target", "noise_pair"])
def test_opcheck_cpu_custom_ops(dtype, target_form):
    v_theta, v_ref, target, x0, noise, ids, num_segments = make_inputs("odd", dtype, target_form)
    v_theta.requires_grad_(True)
    torch.library.opcheck(cpp_backend.segment_sq_err_sums_cpu, (v_theta, v_ref, target, x0, noise, ids, num_segments))
    torch.library.opcheck(cpp_backend.segment_sq_err_sums_cpu, (v_theta, None, target, x0, noise, ids, num_segments))
    coef = torch.randn(v_theta.shape[0], num_segments, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(cpp_backend.segment_scaled_residual_cpu, (v_theta.detach(), target, x0, noise, coef, ids))


@pytest.mark.parametrize("target_form", ["target", "noise_pair", "noise_each"])
def test_gradcheck_sums_op_float64(target_form):
    v_theta, v_ref, target, x0, noise, ids, num_segments = make_inputs("excluded", torch.float64, target_form)
    v_theta.requires_grad_(True)
    v_ref.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: cpp_backend.segment_sq_err_sums(a, b, target, x0, noise, ids, num_segments), (v_theta, v_ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sums_op_gradient_matches_float64_formula(dtype):
    v_theta, v_ref, target, x0, noise, ids, num_segments = make_inputs("odd", dtype, "noise_pair")
    v_theta.requires_grad_(True)
    grad_out = torch.randn(2, v_theta.shape[0], num_segments)
    cpp_backend.segment_sq_err_sums(v_theta, v_ref, target, x0, noise, ids, num_segments).backward(grad_out)
    expected = reference_residual(v_theta.detach(), target, x0, noise, 2 * grad_out[0].double(), ids)
    assert v_theta.grad.dtype == dtype
    assert_close(v_theta.grad, expected, dtype)


def test_sums_op_rejects_a_target_that_requires_grad():
    v_theta, v_ref, target, x0, noise, ids, num_segments = make_inputs("odd", torch.float32, "target")
    with pytest.raises(RuntimeError, match="target requires grad"):
        cpp_backend.segment_sq_err_sums(v_theta.requires_grad_(), v_ref, target.requires_grad_(), x0, noise, ids,
                                        num_segments)


def test_sums_op_under_torch_compile_fullgraph():
    v_theta, v_ref, target, x0, noise, ids, num_segments = make_inputs("vec8", torch.float32, "noise_pair")

    def paired_loss(v):
        sums = cpp_backend.segment_sq_err_sums_cpu(v, v_ref, target, x0, noise, ids, num_segments)
        return torch.nn.functional.logsigmoid(sums[0] - sums[1]).sum()

    compiled = torch.compile(paired_loss, backend="aot_eager", fullgraph=True)
    eager_v, compiled_v = v_theta.clone().requires_grad_(), v_theta.clone().requires_grad_()
    paired_loss(eager_v).backward()
    compiled(compiled_v).backward()
    assert torch.equal(eager_v.grad, compiled_v.grad)


# ------------------------------------------------------------------------------------------------
# Availability reporting.

def test_backends_report_availability():
    assert cpp_backend.available() and cpp_backend.is_available() and cpp_backend.unavailable_reason() == ""
    if cpp_backend.extension().built_with_cuda() and HAS_GPU:
        assert cuda_backend.available()
    else:
        assert not cuda_backend.available() and cuda_backend.unavailable_reason()
        with pytest.raises(RuntimeError, match="vidpo CUDA kernels unavailable"):
            cuda_backend.segment_sq_err_sums(*make_inputs("odd", torch.float32, "target"))
    from vidpo.kernels import dispatch
    assert dispatch.backend_status("cpp", "cpu") == (True, "")


def test_missing_extension_gives_the_build_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vidpo._C", None)  # makes `from vidpo import _C` raise ImportError
    monkeypatch.delattr(sys.modules["vidpo"], "_C", raising=False)
    module, reason = cpp_backend._load_extension()
    assert module is None
    assert reason.startswith("vidpo._C not built: run pip install --no-build-isolation -e .")


# ------------------------------------------------------------------------------------------------
# CUDA sources: compiled here (nvcc, compile-only), run only on a GPU.

def _cuda_include_dir():
    nvcc = Path(os.path.realpath(NVCC)) if NVCC else None
    for candidate in ([nvcc.parents[1] / "include"] if nvcc else []) + [Path("/usr/local/cuda/include")]:
        if (candidate / "cuda_runtime_api.h").exists():
            return candidate
    wrapper = Path(NVCC).read_text(errors="ignore") if NVCC else ""  # /usr/local/bin/nvcc may be a script
    for token in wrapper.split():
        if token.endswith("/bin/nvcc") and (Path(token).parents[1] / "include" / "cuda_runtime_api.h").exists():
            return Path(token).parents[1] / "include"
    return None


@pytest.fixture(scope="module")
def cuda_compiles(tmp_path_factory):
    """Compile every csrc/*.cu with nvcc for sm_90a and syntax-check the CUDA binding with g++ (both at once)."""
    from torch.utils import cpp_extension

    out = tmp_path_factory.mktemp("cuda_build")
    jobs = {}
    for source in sorted(CSRC.glob("*.cu")):
        # torch's own nvcc flags (no implicit half/bf16 conversions, ...) as a CUDAExtension build uses.
        cmd = [NVCC, *cpp_extension.COMMON_NVCC_FLAGS, "-O3", "--use_fast_math", "-std=c++17",
               "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC",
               "-c", str(source), "-o", str(out / (source.stem + ".o"))]
        jobs[source.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cuda_include = _cuda_include_dir()
    if cuda_include is not None and shutil.which("g++"):
        # The CPU torch wheel ships c10/cuda headers but not their generated config header; a minimal
        # stand-in lets the binding be type-checked against the real torch API without a CUDA torch.
        shim = out / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [out / "shim", *cpp_extension.include_paths(), sysconfig.get_paths()["include"], cuda_include]
        cmd = ["g++", "-fsyntax-only", "-std=c++17", "-DVIDPO_WITH_CUDA", *[f"-I{p}" for p in includes],
               str(CSRC / "segment_sums_cuda_bind.cpp")]
        jobs["segment_sums_cuda_bind.cpp"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                              text=True)
    return {name: (job.wait(timeout=600), job.stdout.read()) for name, job in jobs.items()}


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc_for_sm90a(cuda_compiles):
    sources = sorted(p.name for p in CSRC.glob("*.cu"))
    assert sources, "no csrc/*.cu found"
    for name in sources:
        returncode, log = cuda_compiles[name]
        assert returncode == 0, f"nvcc failed on {name}:\n{log[-4000:]}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_binding_typechecks_against_torch_headers(cuda_compiles):
    if "segment_sums_cuda_bind.cpp" not in cuda_compiles:
        pytest.skip("CUDA runtime headers or g++ not found")
    returncode, log = cuda_compiles["segment_sums_cuda_bind.cpp"]
    assert returncode == 0, f"g++ -fsyntax-only -DVIDPO_WITH_CUDA failed:\n{log[-4000:]}"


needs_cuda_kernels = pytest.mark.skipif(not cuda_backend.available(), reason=cuda_backend.unavailable_reason() or "")


def _misaligned(t):
    """Same values at an address 2 elements past a 16-byte boundary (forces the scalar CUDA path)."""
    storage = torch.empty(t.numel() + 2, dtype=t.dtype, device=t.device)
    view = storage[2:].view(t.shape)
    view.copy_(t)
    return view


@needs_cuda_kernels
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target_form", ["target", "noise_pair", "noise_each"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_cuda_primitives_match_float64_formula(case, dtype, target_form, aligned):
    inputs = list(make_inputs(case, dtype, target_form, device="cuda"))
    if not aligned:
        inputs[:5] = [_misaligned(t) if t is not None else None for t in inputs[:5]]
    v_theta, v_ref, target, x0, noise, ids, num_segments = inputs
    sums = cuda_backend.segment_sq_err_sums(*inputs)
    assert sums.dtype == torch.float32 and sums.shape == (2, v_theta.shape[0], num_segments)
    assert_close(sums, reference_sums(*inputs), dtype)
    assert torch.equal(sums, cuda_backend.segment_sq_err_sums(*inputs)), "CUDA sums are not deterministic"
    coef = torch.randn(v_theta.shape[0], num_segments, device="cuda")
    grad = cuda_backend.segment_scaled_residual(v_theta, target, x0, noise, coef, ids)
    assert grad.dtype == dtype and grad.shape == v_theta.shape
    assert_close(grad, reference_residual(v_theta, target, x0, noise, coef, ids), dtype)
    cpu_sums = cpp_backend.segment_sq_err_sums(*[t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs])
    assert_close(sums, cpu_sums.double(), dtype)


@needs_cuda_kernels
def test_cuda_custom_ops_opcheck_and_gradient():
    v_theta, v_ref, target, x0, noise, ids, num_segments = make_inputs("vec8", torch.float32, "noise_pair",
                                                                       device="cuda")
    v_theta.requires_grad_(True)
    torch.library.opcheck(cuda_backend.segment_sq_err_sums_cuda, (v_theta, v_ref, target, x0, noise, ids, num_segments))
    coef = torch.randn(v_theta.shape[0], num_segments, device="cuda")
    torch.library.opcheck(cuda_backend.segment_scaled_residual_cuda, (v_theta.detach(), target, x0, noise, coef, ids))
    grad_out = torch.randn(2, v_theta.shape[0], num_segments, device="cuda")
    cuda_backend.segment_sq_err_sums(v_theta, v_ref, target, x0, noise, ids, num_segments).backward(grad_out)
    expected = reference_residual(v_theta.detach(), target, x0, noise, 2 * grad_out[0].double(), ids)
    assert_close(v_theta.grad, expected, torch.float32)
