"""Benchmark of the fused DenseDPO loss (forward, backward, forward + backward) against eager PyTorch.

Providers:
    torch    eager reference math (vidpo.kernels.reference through dense_dpo_loss(backend="torch"))
    compile  torch.compile of the same reference math
    triton   fused Triton kernels (GPU only; the CPU interpreter is a test tool, not a provider)
    cpp      C++/OpenMP kernels of vidpo._C (CPU)
    cuda     CUDA kernels of vidpo._C (GPU)

Bytes the fused op must move (the roofline of this memory-bound op), E = numel * itemsize per tensor:
    forward  reads v_theta, v_ref, target                3E
    backward reads v_theta, target, writes grad          3E
    full     both                                         6E
Before a provider is timed, its loss and its gradient in v_theta are checked against the float64 reference math on
the same inputs (``check_provider``); a provider that fails is never timed, its failure is printed and the script
exits with status 1 after measuring the others. Achieved GB/s is reported against the device copy bandwidth measured in the same run (and against the
nominal peak of PEAK_BANDWIDTH_GBPS on known GPUs). Rows are appended to
benchmarks/results/dense_dpo.csv (columns in benchmarks/common.py).

Examples:
    python benchmarks/bench_dense_dpo.py --quick                       # CPU: 4 pairs, 16x21x30x52
    python benchmarks/bench_dense_dpo.py --device cuda --pairs 4,8,16  # Wan-1.3B latents 16x21x60x104
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch._functorch.config as functorch_config  # noqa: E402

import common  # noqa: E402
from vidpo.kernels import dense_dpo_loss, dispatch, reference  # noqa: E402

KERNEL = "dense_dpo"
PROVIDERS = ("torch", "compile", "triton", "cpp", "cuda")
MODES = ("forward", "backward", "full")
BYTES_PER_ELEMENT_MOVED = {"forward": 3, "backward": 3, "full": 6}  # tensors of E bytes read/written
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dense_dpo.csv")
GPU_SHAPE, CPU_SHAPE = (16, 21, 60, 104), (16, 21, 30, 52)  # Wan-1.3B latent (C, T, H, W); a CPU-sized one
BETA = 500.0
# (loss rtol, loss atol, gradient relative L2) against float64: the fused kernels accumulate in fp32.
CHECK_TOLERANCE = {torch.float32: (1e-4, 1e-3, 1e-4), torch.bfloat16: (1e-2, 1e-2, 1e-2)}


def make_inputs(pairs: int, shape, num_segments: int, dtype, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random (2B, C, T, H, W) velocities and target, (B, S) labels with ties, even segments."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    full = (2 * pairs,) + tuple(shape)

    def rand():
        return torch.randn(full, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    frames = shape[1]
    labels = torch.randint(-1, 2, (pairs, num_segments), generator=g)
    labels[0, 0] = 1  # at least one non-tie segment
    return dict(
        v_theta=rand().requires_grad_(True),
        v_ref=rand(),
        target=rand(),
        labels=labels.to(device),
        segment_ids=(torch.arange(frames) * num_segments // frames).to(device),
    )


def provider_status(provider: str, device: torch.device) -> Tuple[bool, str]:
    if provider == "compile":
        return True, ""
    if provider == "triton" and device.type != "cuda":
        return False, "triton is benchmarked on GPUs only (the CPU interpreter is for tests)"
    return dispatch.backend_status(provider, device)


def loss_function(provider: str, inputs: Dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A no-argument callable returning the scalar loss of ``provider`` on ``inputs``."""
    args = (inputs["v_theta"], inputs["v_ref"], inputs["target"], inputs["labels"], inputs["segment_ids"], BETA)
    if provider == "compile":
        def reference_loss(v_theta, v_ref, target, labels, segment_ids, beta):
            return reference.dense_dpo_loss_reference(v_theta, v_ref, target, labels, segment_ids, beta).loss

        # The backward is timed by calling backward(retain_graph=True) on one graph again and again; torch >= 2.6
        # donates the compiled backward's saved buffers, which forbids that, so donation is off for the benchmark.
        functorch_config.donated_buffer = False
        compiled = torch.compile(reference_loss, dynamic=False)
        return lambda: compiled(*args)
    return lambda: dense_dpo_loss(*args, backend=provider).loss


def check_provider(provider: str, inputs: Dict[str, torch.Tensor]) -> Optional[str]:
    """None when ``provider``'s loss and d loss / d v_theta match the float64 reference math, else what differs."""
    v_theta = inputs["v_theta"]
    loss = loss_function(provider, inputs)()
    (grad,) = torch.autograd.grad(loss, v_theta)
    v64 = v_theta.detach().double().requires_grad_(True)
    expected = reference.dense_dpo_loss_reference(v64, inputs["v_ref"].double(), inputs["target"].double(),
                                                  inputs["labels"], inputs["segment_ids"], BETA).loss
    (expected_grad,) = torch.autograd.grad(expected, v64)
    rtol, atol, grad_tol = CHECK_TOLERANCE.get(v_theta.dtype, CHECK_TOLERANCE[torch.bfloat16])
    value, expected_value = float(loss.detach()), float(expected.detach())
    loss_error = abs(value - expected_value)
    grad_error = float((grad.double() - expected_grad).norm() / expected_grad.norm().clamp_min(1e-30))
    problems = []
    if not loss_error <= rtol * abs(expected_value) + atol:
        problems.append(f"loss {value:.6g} vs float64 {expected_value:.6g}")
    if not grad_error <= grad_tol:
        problems.append(f"gradient relative L2 error {grad_error:.3g} > {grad_tol:g}")
    return "; ".join(problems) or None


def mode_function(mode: str, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
    if mode == "forward":
        return loss_fn
    if mode == "backward":
        loss = loss_fn()
        return lambda: loss.backward(retain_graph=True)
    return lambda: loss_fn().backward()


def shape_label(pairs: int, shape, num_segments: int, dtype) -> str:
    c, t, h, w = shape
    return f"B{pairs}xC{c}xT{t}xH{h}xW{w}xS{num_segments}-{str(dtype).replace('torch.', '')}"


def run_case(args, device, pairs, shape, dtype, copy_gbps, meta, failed: List[str]) -> List[common.Row]:
    """All providers and modes on one problem size; returns the CSV rows and prints a table. A provider that fails
    its check is appended to ``failed`` and not timed."""
    inputs = make_inputs(pairs, shape, args.segments, dtype, device)
    element_bytes = inputs["v_theta"].numel() * inputs["v_theta"].element_size()
    x = shape_label(pairs, shape, args.segments, dtype)
    peak = common.peak_bandwidth_gbps(device)
    rows: List[common.Row] = []
    eager_ms: Dict[str, float] = {}
    print(f"\n{x}  ({element_bytes / 2**20:.1f} MiB per tensor)")
    print(f"{'provider':>8} {'mode':>8} {'ms p50':>9} {'p20':>9} {'p80':>9} {'GB/s':>8} {'%copy':>6} {'x eager':>7}")

    def row(provider, mode, metric, unit, values):
        rows.append(common.make_row(KERNEL, provider, mode, metric, unit, x, values, *meta))

    for provider in args.providers:
        ok, reason = provider_status(provider, device)
        if not ok:
            print(f"{provider:>8}  skipped: {reason}")
            continue
        wrong = check_provider(provider, inputs)   # also compiles / JITs the kernels before timing
        if wrong is not None:
            print(f"{provider:>8}  CHECK FAILED (not timed): {wrong}")
            failed.append(f"{provider} at {x}: {wrong}")
            continue
        loss_fn = loss_function(provider, inputs)
        for mode in args.modes:
            fn = mode_function(mode, loss_fn)
            ms = common.bench(fn, device, quick=args.quick, grad_to_none=[inputs["v_theta"]])
            moved = BYTES_PER_ELEMENT_MOVED[mode] * element_bytes
            gbps = (moved / ms[0] / 1e6, moved / ms[2] / 1e6, moved / ms[1] / 1e6)  # slow time = low GB/s
            row(provider, mode, "time", "ms", ms)
            row(provider, mode, "bandwidth", "GB/s", gbps)
            row(provider, mode, "fraction_of_copy_bandwidth", "%", tuple(100 * g / copy_gbps for g in gbps))
            if peak is not None:
                row(provider, mode, "fraction_of_peak_bandwidth", "%", tuple(100 * g / peak for g in gbps))
            if provider == "torch":
                eager_ms[mode] = ms[0]
            speedup = eager_ms[mode] / ms[0] if mode in eager_ms else float("nan")
            if mode in eager_ms:
                row(provider, mode, "speedup_vs_eager", "x", speedup)
            memory = common.peak_memory_mib(fn, device)
            if memory is not None:
                row(provider, mode, "peak_memory", "MiB", memory)
            inputs["v_theta"].grad = None
            print(f"{provider:>8} {mode:>8} {ms[0]:9.3f} {ms[1]:9.3f} {ms[2]:9.3f} {gbps[0]:8.1f} "
                  f"{100 * gbps[0] / copy_gbps:6.1f} {speedup:7.2f}")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: cuda when present)")
    parser.add_argument("--pairs", default=None, help="comma-separated pair counts B (default: 4,8,16 GPU; 4 CPU)")
    parser.add_argument("--shape", default=None,
                        help="C,T,H,W of one latent (default: 16,21,60,104 GPU; 16,21,30,52 CPU)")
    parser.add_argument("--segments", type=int, default=5, help="segments S over the T latent frames (default 5)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--out", default=DEFAULT_RESULTS, help="CSV to append to (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, measure nothing")
    args = parser.parse_args(argv)
    args.providers = [p for p in args.providers.split(",") if p]
    args.modes = [m for m in args.modes.split(",") if m]
    for value, valid, what in ((args.providers, PROVIDERS, "provider"), (args.modes, MODES, "mode")):
        unknown = [v for v in value if v not in valid]
        if unknown:
            parser.error(f"unknown {what} {unknown}; valid: {valid}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = (torch.device("cuda" if args.device.startswith("cuda") else "cpu") if args.dry_run
              else common.resolve_device(args.device))
    gpu = device.type == "cuda"
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else (GPU_SHAPE if gpu else CPU_SHAPE)
    if len(shape) != 4:
        raise SystemExit(f"--shape must be C,T,H,W, got {args.shape}")
    default_pairs = ("4" if args.quick else "4,8,16") if gpu else "4"
    pairs_list = [int(v) for v in (args.pairs or default_pairs).split(",")]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    if args.dry_run:
        print(f"dry run: providers {args.providers}, modes {args.modes}, pairs {pairs_list}, latent {shape}, {dtype}")
        return 0
    meta = (common.device_description(device), common.timestamp(), common.versions(), common.command_line())

    copy_bytes = (1 << 30) if gpu else (64 << 20 if args.quick else 256 << 20)
    copy = common.copy_bandwidth_gbps(device, copy_bytes, quick=args.quick)
    rows = [common.make_row("copy", "torch", "copy", "bandwidth", "GB/s", f"{copy_bytes >> 20}MiB", copy, *meta)]
    peak = common.peak_bandwidth_gbps(device)
    print(f"device: {meta[0]}; measured copy bandwidth {copy[0]:.1f} GB/s"
          + (f" (nominal peak {peak:.0f} GB/s)" if peak else ""))
    failed: List[str] = []
    for pairs in pairs_list:
        rows += run_case(args, device, pairs, shape, dtype, copy[0], meta, failed)
    written = common.append_rows(args.out, rows)
    print(f"\nappended {written} rows to {args.out}")
    if failed:
        print("CHECK FAILED (these providers were not timed):\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
