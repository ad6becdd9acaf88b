"""Ahead-of-time compilation of the Triton kernels for GPUs this machine does not have (Hopper, Ampere).

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' semantics on CPU tensors but never meets the GPU
compiler, which is where layouts, dtype rules and register pressure fail. ``triton.compile`` with a
``GPUTarget`` lowers a kernel to PTX and assembles a cubin with Triton's bundled ``ptxas`` on any machine, GPU or
not. This module does that for every kernel of ``vidpo.kernels.segment_sums`` at the launch configurations
``launch_config`` produces for the benchmark's shapes, and reads what the GPU would run from ``ptxas -v``:
registers per thread, spill stores / loads (bytes), the stack frame and the shared memory Triton reserves.
From the PTX it reads the width of every global load and store: the value streams must move 16-byte vectors
(``ld.global.v4.b32``) wherever the plane alignment allows it (``plane_alignment``), since 2-byte scalar loads of
bf16 leave most of HBM's bandwidth unused. Pointer arguments are compiled with the alignment the runtime
specialises an aligned tensor to (16 bytes, as ``triton.jit`` does at launch); integer arguments without it, so
the vectors come from the kernels' own ALIGN constexpr and not from a lucky plane size.

A kernel that spills keeps its accumulators in local memory (DRAM behind L1), which turns a bandwidth-bound
reduction into a latency-bound one; a build with any spill is a failure, like a compile error.

    python -m vidpo.kernels.aot                       # sm_90a and sm_80, the benchmark's shapes; a table
    python -m vidpo.kernels.aot --json builds.json    # the same as JSON rows
    python -m vidpo.kernels.aot --planted-spill       # also a variant built to spill (one warp, a 4 x 1024
                                                      # fp32 tile per accumulator): shows the check failing
    python -m vidpo.kernels.aot --unaligned           # also the bf16 forward at ALIGN = 1: its 2-byte loads

Exit status 0 when every build compiled without a spill and with vector loads where its alignment allows them, 1
otherwise. The process must not run the interpreter: the kernels are defined once per process, as interpreted
functions when ``TRITON_INTERPRET=1`` is set, so ``main`` drops the variable before the kernels are defined (a test
runs this as a subprocess).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from vidpo.kernels.segment_sums import _kernels, launch_config

# (name, compute capability) of the targets; Triton names capability 90 "sm_90a" (wgmma / TMA enabled).
TARGETS = {"sm_90a": 90, "sm_80": 80}
# The fused-loss benchmark's latents (benchmarks/bench_dense_dpo.py): Wan 2.1 at 480p, B = 2..16 pairs (two
# rows per pair), the CPU-sized latent of its --quick run, and CogVideoX at 480 x 720 (60 x 90: a plane size
# divisible by 8, not 16).
BENCH_LATENTS = ((16, 21, 60, 104), (16, 21, 30, 52), (16, 13, 60, 90))
BENCH_PAIRS = (2, 4, 8, 16)
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}   # dynamic shared memory per block (CUDA programming guide)


@dataclass(frozen=True)
class Variant:
    """One compilation: a kernel at one tiling, input dtype and set of constexpr flags."""

    kernel: str                 # 'fwd' (segment_sq_err_sums) or 'bwd' (segment_scaled_residual)
    dtype: str                  # key of DTYPES: the activations' dtype
    block: int
    iters: int
    planes: int
    num_warps: int
    flags: Tuple[Tuple[str, bool], ...] = ()
    align: int = 16             # ALIGN: the plane alignment (plane_alignment)

    @property
    def label(self) -> str:
        flags = ",".join(f"{k}={int(v)}" for k, v in self.flags)
        return (f"{self.kernel}[{self.dtype}] BLOCK={self.block} ITERS={self.iters} PLANES={self.planes} "
                f"ALIGN={self.align} warps={self.num_warps}" + (f" {flags}" if flags else ""))


@dataclass
class Build:
    """What one compilation gave: ``error`` is set when it failed."""

    target: str
    variant: Variant
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    ptx_target: Optional[str] = None
    load_bits: Dict[str, int] = field(default_factory=dict)    # width in bits of each global load -> how many
    store_bits: Dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None
    problems: List[str] = field(default_factory=list)

    def to_row(self) -> dict:
        row = asdict(self)
        row["variant"] = {**asdict(self.variant), "flags": dict(self.variant.flags), "label": self.variant.label}
        return row


def bench_variants(dtypes: Sequence[str] = ("bf16", "fp32")) -> List[Variant]:
    """Every distinct (kernel, tiling, flags) the benchmark's shapes launch on a GPU, per dtype."""
    configs = set()
    for channels, frames, height, width in BENCH_LATENTS:
        for pairs in BENCH_PAIRS:
            cfg = launch_config(height * width, 2 * pairs * channels * frames, interpreter=False)
            configs.add((cfg.block, cfg.iters, cfg.planes, cfg.num_warps, cfg.align))
    out = []
    for dtype in dtypes:
        for block, iters, planes, warps, align in sorted(configs):
            for has_ref in (True, False):
                for from_noise in (False, True):
                    flags = (("HAS_REF", has_ref), ("TARGET_FROM_NOISE", from_noise))
                    out.append(Variant("fwd", dtype, block, iters, planes, warps, flags, align))
            for from_noise in (False, True):
                out.append(Variant("bwd", dtype, block, iters, planes, warps, (("TARGET_FROM_NOISE", from_noise),),
                                   align))
    return out


def planted_spill_variant() -> Variant:
    """A forward variant that must spill: one warp holding two 4 x 1024 fp32 accumulators (256 per thread)."""
    return Variant("fwd", "fp32", 1024, 1, 4, 1, (("HAS_REF", True), ("TARGET_FROM_NOISE", True)))


def unaligned_variant() -> Variant:
    """A bf16 forward variant at ALIGN = 1 (a plane of odd size): shows the scalar loads the hint removes."""
    return Variant("fwd", "bf16", 1024, 6, 1, 4, (("HAS_REF", True), ("TARGET_FROM_NOISE", False)), 1)


def _signature(variant: Variant) -> Tuple[Dict[str, str], Dict[str, object]]:
    """(signature, constexprs) of ``triton.compiler.ASTSource`` for the kernel's parameters, in order."""
    act = DTYPES[variant.dtype]
    tiling = {"BLOCK": variant.block, "ITERS": variant.iters, "PLANES": variant.planes}
    if variant.kernel == "fwd":
        signature = {"v_theta_ptr": act, "v_ref_ptr": act, "target_ptr": act, "x0_ptr": act, "noise_ptr": act,
                     "partial_theta_ptr": "*fp32", "partial_ref_ptr": "*fp32", "plane_units": "i32",
                     "num_planes": "i32", "planes_per_row": "i32", "noise_rows": "i32", "chunks_per_plane": "i32"}
        names = ("HAS_REF", "TARGET_FROM_NOISE", "BLOCK", "ITERS", "PLANES", "ALIGN")
    elif variant.kernel == "bwd":
        signature = {"v_theta_ptr": act, "target_ptr": act, "x0_ptr": act, "noise_ptr": act, "coef_ptr": "*fp32",
                     "segment_ids_ptr": "*i64", "grad_ptr": act, "plane_units": "i32", "num_planes": "i32",
                     "frames": "i32", "planes_per_row": "i32", "noise_rows": "i32", "num_segments": "i32",
                     "chunks_per_plane": "i32"}
        names = ("TARGET_FROM_NOISE", "BLOCK", "ITERS", "PLANES", "ALIGN")
    else:
        raise ValueError(f"unknown kernel {variant.kernel!r}: 'fwd' or 'bwd'")
    constexprs = {**dict(variant.flags), **tiling, "ALIGN": variant.align}
    missing = [n for n in names if n not in constexprs]
    if missing:
        raise ValueError(f"{variant.label}: constexpr {missing} not given")
    signature.update({n: "constexpr" for n in names})
    return signature, {n: constexprs[n] for n in names}


def ptxas_path(capability: int) -> str:
    """Triton's bundled ptxas for this capability (the one ``triton.compile`` itself runs)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability).path


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(text: str) -> Optional[Tuple[int, int, int, int]]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from a ``ptxas -v`` log, or None."""
    regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
    if regs is None or spill is None:
        return None
    stack, stores, loads = (int(v) for v in spill.groups())
    return int(regs.group(1)), stores, loads, stack


def ptxas_usage(ptx: str, target: str, capability: int) -> Tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) from ``ptxas -v`` on ``ptx``."""
    with tempfile.TemporaryDirectory(prefix="vidpo-aot-") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        done = subprocess.run([ptxas_path(capability), "-v", f"--gpu-name={target}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")
    usage = parse_ptxas_log(text)
    if usage is None:
        raise RuntimeError(f"ptxas -v printed no resource usage: {text.strip()[-300:]}")
    return usage


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9]+)*)")
ELEMENT_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}


def access_widths(ptx: str, kind: str) -> Dict[str, int]:
    """``{bits: count}`` of the PTX's global loads (``kind`` 'ld') or stores ('st'): ``ld.global.v4.b32`` is 128."""
    widths: Dict[str, int] = {}
    for op, modifiers in _ACCESS.findall(ptx):
        if op != kind:
            continue
        parts = modifiers.strip(".").split(".")
        lanes = next((int(p[1:]) for p in parts if p in ("v2", "v4", "v8")), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if p[:1] in "bfsu" and p[1:].isdigit()), 0)
        key = str(lanes * bits)
        widths[key] = widths.get(key, 0) + 1
    return dict(sorted(widths.items(), key=lambda kv: int(kv[0])))


def expected_vector_bits(variant: Variant) -> int:
    """The widest access the plane alignment allows a value stream: 16 bytes, or ALIGN elements if fewer."""
    return min(128, variant.align * ELEMENT_BITS[variant.dtype])


def narrow_accesses(variant: Variant, loads: Dict[str, int], stores: Dict[str, int]) -> List[str]:
    """Problems when value loads or stores are narrower than ``expected_vector_bits``. The backward kernel also
    loads each plane's segment id and coefficient (2 per plane, scalars by nature); the forward kernel's stores are
    one partial sum per plane."""
    want = expected_vector_bits(variant)
    narrow_loads = sum(n for bits, n in loads.items() if int(bits) < want)
    allowed = 2 * variant.planes if variant.kernel == "bwd" else 0
    problems = []
    if narrow_loads > allowed:
        problems.append(f"global loads narrower than {want} bits: {loads} (value streams must be vectors)")
    if variant.kernel == "bwd" and any(int(bits) < want for bits in stores):
        problems.append(f"gradient stores narrower than {want} bits: {stores}")
    return problems


def compile_variant(variant: Variant, target: str) -> Build:
    """Compile ``variant`` for ``target`` ('sm_90a', 'sm_80') and check it (no error, no spill, shared fits)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    build = Build(target, variant)
    capability = TARGETS[target]
    try:
        kernel = getattr(_kernels(), variant.kernel)
        signature, constexprs = _signature(variant)
        aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
                   for name, kind in signature.items() if kind.startswith("*")}
        # Triton's own ptxas run (its flags: --regAllocOptLevel=2 on Triton >= 3.9, -lineinfo) is the cubin that
        # would run: its log is read; compiled afresh (no cache hit, which would skip ptxas and its log).
        from triton import knobs

        log = io.StringIO()
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned),
                                      target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": variant.num_warps})
        ptx = compiled.asm["ptx"]
        build.load_bits, build.store_bits = access_widths(ptx, "ld"), access_widths(ptx, "st")
        build.ptx_target = next((line.split()[1] for line in ptx.splitlines() if line.startswith(".target")), None)
        build.shared_bytes = int(compiled.metadata.shared)
        usage = parse_ptxas_log(log.getvalue())
        build.registers, build.spill_stores, build.spill_loads, build.stack_bytes = usage or ptxas_usage(
            ptx, build.ptx_target or f"sm_{capability}", capability)
    except Exception as exc:  # a compile error is a result to report, not a crash of the whole check
        build.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        build.problems.append(f"compile error: {build.error}")
        return build
    build.problems += narrow_accesses(variant, build.load_bits, build.store_bits)
    if build.spill_stores or build.spill_loads:
        build.problems.append(f"spills {build.spill_stores} bytes stores / {build.spill_loads} bytes loads "
                              f"({build.registers} registers, {build.stack_bytes} bytes stack)")
    if build.shared_bytes > SHARED_LIMIT[capability]:
        build.problems.append(f"needs {build.shared_bytes} bytes of shared memory, over {SHARED_LIMIT[capability]}")
    if target == "sm_90a" and build.ptx_target != "sm_90a":
        build.problems.append(f"PTX targets {build.ptx_target}, not sm_90a")
    return build


def table(builds: Sequence[Build]) -> str:
    lines = [f"{'target':7s} {'kernel':80s} {'regs':>4s} {'spill st/ld':>11s} {'shared':>6s} "
             f"{'load bits':>16s}  status"]
    for b in builds:
        spill = "-" if b.spill_stores is None else f"{b.spill_stores}/{b.spill_loads}"
        loads = ",".join(f"{n}x{bits}" for bits, n in b.load_bits.items()) or "-"
        lines.append(f"{b.target:7s} {b.variant.label:80s} {b.registers if b.registers is not None else '-':>4} "
                     f"{spill:>11s} {b.shared_bytes if b.shared_bytes is not None else '-':>6} {loads:>16s}  "
                     + ("; ".join(b.problems) if b.problems else "ok"))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidpo.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm_90a,sm_80", help=f"comma-separated, of {sorted(TARGETS)}")
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--planted-spill", action="store_true", help="also build a variant made to spill")
    parser.add_argument("--unaligned", action="store_true",
                        help="also build a variant without the plane-alignment hint (ALIGN = 1)")
    parser.add_argument("--json", help="write the builds as a JSON list to this file")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)   # before the kernels are defined (module docstring)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9's default, stated (it warns otherwise)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS] + [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"unknown target or dtype {unknown}")
    variants = bench_variants([d for d in args.dtypes.split(",") if d])
    if args.planted_spill:
        variants.append(planted_spill_variant())
    if args.unaligned:
        variants.append(unaligned_variant())
    builds = [compile_variant(v, t) for t in targets for v in variants]
    print(table(builds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([b.to_row() for b in builds], fh, indent=1)
    failed = [b for b in builds if b.problems]
    if failed:
        print(f"{len(failed)} of {len(builds)} builds failed the check", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
