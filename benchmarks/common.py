"""Shared helpers of the benchmarks: timing, bandwidth, peak memory, the results CSV (kernels); versions and
rounded CIs (all).

Timing: on a GPU ``triton.testing.do_bench`` (median and 20/80 quantiles, L2 flushed between runs);
on CPU a timeit-style loop (warm-up, then one timing per call until the time budget is spent). Every
measurement becomes tidy rows of one CSV (DESIGN.md section 5):

    kernel, provider, mode, metric, unit, x, y50, y20, y80, device, timestamp, version, command

Bandwidth is reported against the copy bandwidth measured in the same run and against the device's
nominal peak from ``PEAK_BANDWIDTH_GBPS`` (only where the device is in the table).
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x", "y50", "y20", "y80", "device",
               "timestamp", "version", "command")

# Nominal DRAM bandwidth (GB/s, 1e9 bytes) by a substring of torch.cuda.get_device_name().
# Longest match wins, so "H100 PCIe" is not taken for an SXM part.
PEAK_BANDWIDTH_GBPS = {
    "H100": 3350.0,  # H100 SXM5 80 GB HBM3
    "H100 PCIe": 2000.0,
    "H100 NVL": 3900.0,
    "H200": 4800.0,  # H200 SXM 141 GB HBM3e
    "GH200": 4000.0,
    "B200": 8000.0,
    "A100-SXM4-80GB": 2039.0,
    "A100-SXM4-40GB": 1555.0,
    "A100-PCIE-40GB": 1555.0,
    "A100 80GB PCIe": 1935.0,
    "L40S": 864.0,
    "RTX 4090": 1008.0,
}


@dataclass
class Row:
    kernel: str
    provider: str
    mode: str
    metric: str
    unit: str
    x: str
    y50: float
    y20: float
    y80: float
    device: str
    timestamp: str
    version: str
    command: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return device


def device_description(device: torch.device) -> str:
    """GPU name, or CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def peak_bandwidth_gbps(device: torch.device) -> Optional[float]:
    """Nominal peak of the device from PEAK_BANDWIDTH_GBPS, None when unknown (always on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_BANDWIDTH_GBPS if key in name]
    return PEAK_BANDWIDTH_GBPS[max(matches, key=len)] if matches else None


def versions() -> str:
    parts = []
    try:
        import vidpo

        parts.append(f"vidpo {vidpo.__version__}")
    except ImportError:
        pass
    parts.append(f"torch {torch.__version__}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if torch.version.cuda:
        parts.append(f"cuda {torch.version.cuda}")
    return "; ".join(parts)


def rounded_ci(stats: dict, digits: int = 4) -> list[float]:
    """``[mean, lo, hi]`` of a ``vidpo.evaluation.evaluate.mean_ci`` result, rounded: how the IPO measurements store CIs."""
    return [round(stats["mean"], digits), round(stats["ci95"][0], digits), round(stats["ci95"][1], digits)]


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
          grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn()``.

    GPU: triton.testing.do_bench. CPU: warm-up calls, then individual perf_counter timings until the
    budget (0.5 s quick, 3 s otherwise; at least 5 and at most 200 calls) is spent.
    """
    if device.type == "cuda":
        import triton.testing

        y50, y20, y80 = triton.testing.do_bench(
            fn, warmup=25 if quick else 100, rep=100 if quick else 500, quantiles=[0.5, 0.2, 0.8],
            grad_to_none=grad_to_none,
        )
        return float(y50), float(y20), float(y80)
    budget = 0.5 if quick else 3.0
    for _ in range(2):
        _clear_grads(grad_to_none)
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < budget and len(samples) < 200):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


def _clear_grads(tensors: Optional[Sequence[torch.Tensor]]) -> None:
    for tensor in tensors or ():
        tensor.grad = None


def quantiles(samples: Sequence[float]) -> Tuple[float, float, float]:
    """Median, 20th and 80th percentile of ``samples``."""
    cuts = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else [samples[0]] * 9
    return statistics.median(samples), cuts[1], cuts[7]


def copy_bandwidth_gbps(device: torch.device, nbytes: int, quick: bool = False) -> Tuple[float, float, float]:
    """Measured device copy bandwidth (read + write bytes / time) of a ``nbytes`` tensor copy, GB/s,
    as (median, 20th, 80th percentile); the 20th percentile of time is the 80th of bandwidth."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    y50, y20, y80 = bench(lambda: dst.copy_(src), device, quick=quick)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return moved / y50 / 1e6, moved / y80 / 1e6, moved / y20 / 1e6


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Extra peak device memory of one ``fn()`` call above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def memory_of_call(fn: Callable[[], object], device: torch.device) -> Tuple[object, Optional[float], Optional[float]]:
    """``(fn(), peak MiB, retained MiB)``: the highest memory allocated during the call and what is still allocated
    when it returns (e.g. the activations a forward keeps for its backward), both above the level at its start.

    GPU: the caching allocator's counters. CPU: the allocation / free events of ``torch.profiler`` with
    ``profile_memory`` (summed in time order); (result, None, None) when the profiler gives no memory events.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        return (out, (torch.cuda.max_memory_allocated(device) - before) / 2**20,
                (torch.cuda.memory_allocated(device) - before) / 2**20)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except (AttributeError, RuntimeError):    # a torch without kineto's event list
        return out, None, None
    if not events:
        return out, None, None
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return out, peak / 2**20, level / 2**20


def make_row(kernel, provider, mode, metric, unit, x, values, device_desc, stamp, version, command) -> Row:
    y50, y20, y80 = values if isinstance(values, tuple) else (values, values, values)
    return Row(kernel, provider, mode, metric, unit, x, round(float(y50), 6), round(float(y20), 6),
               round(float(y80), 6), device_desc, stamp, version, command)


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_rows(path: str, rows: Iterable[Row]) -> int:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new); returns the count."""
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    return len(rows)

