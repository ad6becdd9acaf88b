"""Benchmark of one DPO training step of the video DiT: plain implementation vs the optimized levers.

Configurations measured in one run (all on the same model shape and static batch; ``step_bench``):
    plain          the public Flow-DPO code's way: eager, separate frozen reference, torch-op loss, AdamW
    optimized      --levers (default: every lever available on the device, see default_levers)
    optimized±X    the optimized set with one lever flipped (boolean levers) or set to each other value
                   (ac, attention): every lever is measured on and off. A flip that needs a GPU or a
                   missing package becomes a "skipped" row with the reason.

Per configuration: step time (median, 20/80 percentiles), video tokens/s (2B n / step time), model
TFLOP/s (4 F(2B) per step, DiTConfig.flops_per_forward), MFU against the matmul rate measured in the same
run (bf16 on GPU, fp32 on CPU), peak memory (GPU), speedup over plain, and a per-phase breakdown
(ref_fwd, policy_fwd, loss, bwd, optimizer; synchronised, so the phases add up to a bit more than a step).
Rows are appended to benchmarks/results/step.csv (columns in benchmarks/common.py); --report writes the
dated Markdown report.

Examples:
    python benchmarks/bench_step.py --preset tiny --flips compile,bf16,ac        # CPU, a few seconds a config
    python benchmarks/bench_step.py --device cuda --preset 1.3b --pairs 2 --frames 21 --height 60 \\
        --width 104 --cond-len 512 --ac full --report benchmarks/reports/2026-11-21_step_h100.md
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from vidpo.models.dit import dit_config  # noqa: E402
from step_bench import (AC_MODES, ATTENTION_CHOICES, BOOL_LEVERS, DPOStep, Levers, StepShape, lever_unavailable,
                        matmul_rate_tflops, measure_peak_memory, parse_levers, plain_levers, step_flops, time_steps)

KERNEL = "dpo_step"
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "step.csv")
FLIPPABLE = BOOL_LEVERS + ("ac", "attention")


def default_levers(device: torch.device, ac: str) -> Levers:
    """Every lever that can run on ``device`` (fp8 and cuda_graph stay flips: they change numerics or
    need static everything, so they are measured but not assumed; plain SDPA picks its flash / cuDNN
    kernel itself, and forcing cuDNN is a flip)."""
    gpu = device.type == "cuda"
    candidates = [Levers(compile=gpu, ac=ac, attention=attention, bf16=gpu, ref_no_grad=True, ref_bf16=gpu,
                         fused_loss=True, fused_adamw=gpu) for attention in ("flash_attn", "sdpa")]
    for levers in candidates:
        if lever_unavailable(levers, device) is None:
            return levers
    return dataclasses.replace(candidates[-1], fused_loss=False)


def flipped_configs(optimized: Levers, flips: List[str]) -> List[Tuple[str, Levers]]:
    """(name, levers) for each one-lever change of ``optimized``."""
    out = []
    for lever in flips:
        current = getattr(optimized, lever)
        if lever in BOOL_LEVERS:
            out.append((f"{'-' if current else '+'}{lever}", dataclasses.replace(optimized, **{lever: not current})))
            continue
        for value in (AC_MODES if lever == "ac" else ATTENTION_CHOICES):
            if value != current:
                out.append((f"{lever}={value}", dataclasses.replace(optimized, **{lever: value})))
    return out


def measure(cfg, shape, levers: Levers, device, args) -> Dict[str, object]:
    """Build the step, time it, measure its peak memory and its phases; returns a result dict."""
    step = DPOStep(cfg, shape, levers, device, seed=args.seed)
    loss = float(step.run())               # compiles / captures before timing
    samples = time_steps(step.run, device, warmup=args.warmup, repeats=args.repeats)
    memory = measure_peak_memory(step.run, device)
    phases = {}
    if not levers.cuda_graph and not args.no_breakdown:
        runs = [step.run_phases() for _ in range(max(1, min(3, args.repeats)))]
        phases = {name: sorted(r[name] for r in runs)[len(runs) // 2] for name in DPOStep.PHASES}
    del step
    if levers.compile:
        torch._dynamo.reset()               # drop the compiled blocks' caches before the next model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(ms=common.quantiles(samples), memory=memory, phases=phases, loss=loss)


def result_rows(name, result, flops, tokens, peak_tflops, plain_ms, x, meta) -> List[common.Row]:
    rows = []

    def row(mode, metric, unit, values):
        rows.append(common.make_row(KERNEL, name, mode, metric, unit, x, values, *meta))

    y50, y20, y80 = result["ms"]
    slow_fast = (y50, y80, y20)                      # a slow step is a low rate: swap the quantiles
    row("step", "time", "ms", (y50, y20, y80))
    row("step", "tokens_per_s", "tokens/s", tuple(tokens / (ms * 1e-3) for ms in slow_fast))
    tflops = tuple(flops / (ms * 1e-3) / 1e12 for ms in slow_fast)
    row("step", "model_tflops", "TFLOP/s", tflops)
    row("step", "mfu", "%", tuple(100 * v / peak_tflops for v in tflops))
    if plain_ms is not None:
        row("step", "speedup_vs_plain", "x", plain_ms / y50)
    if result["memory"] is not None:
        row("step", "peak_memory", "MiB", result["memory"])
    for phase, ms in result["phases"].items():
        row(phase, "time", "ms", ms)
    return rows


def skipped_row(name, why, x, meta) -> common.Row:
    nan = float("nan")
    return common.Row(KERNEL, name, "step", "skipped", why.replace(",", ";"), x, nan, nan, nan, *meta)


def markdown_table(results: List[Tuple[str, Levers, object]], flops, tokens, peak_tflops, plain_ms) -> str:
    """One line per configuration (skipped ones with their reason)."""
    head = ("| config | levers | step ms (p20-p80) | tokens/s | TFLOP/s | MFU % | peak MiB | x plain | "
            "ref_fwd | policy_fwd | loss | bwd | optimizer |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, levers, result in results:
        if isinstance(result, str):
            lines.append(f"| {name} | {levers.label()} | skipped: {result} |" + " |" * 10)
            continue
        y50, y20, y80 = result["ms"]
        tflops = flops / (y50 * 1e-3) / 1e12
        memory = f"{result['memory']:.0f}" if result["memory"] is not None else "n/a"
        ph = [f"{result['phases'][p]:.1f}" if result["phases"] else "-" for p in DPOStep.PHASES]
        lines.append(f"| {name} | {levers.label()} | {y50:.1f} ({y20:.1f}-{y80:.1f}) | {tokens / (y50 * 1e-3):.0f} | "
                     f"{tflops:.4g} | {100 * tflops / peak_tflops:.1f} | {memory} | {plain_ms / y50:.2f} | "
                     + " | ".join(ph) + " |")
    return "\n".join(lines)


def write_report(path, args, cfg, shape, device_desc, version, command, rate, table, loaded) -> None:
    tokens_per_video = cfg.num_tokens(shape.frames, shape.height, shape.width)
    kind = "bf16" if args.device_type == "cuda" else "fp32"
    text = f"""# DPO training step benchmark: {device_desc}, {datetime.date.today():%Y-%m}

- Model: preset `{args.preset}` ({cfg.num_params() / 1e6:.1f} M parameters, width {cfg.width}, depth {cfg.depth}).
- Batch: {shape.pairs} pairs = {shape.videos()} videos of latent (C={cfg.in_channels}, T={shape.frames}, H={shape.height}, W={shape.width}), patch {cfg.patch_size}: {tokens_per_video} tokens per video, {shape.videos() * tokens_per_video} per step; {shape.cond_len} condition tokens; {shape.segments} label segment(s).
- Model FLOPs per step: 4 F(2B) = {step_flops(cfg, shape) / 1e12:.4g} TFLOP (policy forward + backward 3F, reference forward F; `DiTConfig.flops_per_forward`; activation-checkpoint recomputation not counted).
- MFU is against the {kind} matmul rate measured in this run: {rate[0]:.4g} TFLOP/s (p20-p80 {rate[1]:.4g}-{rate[2]:.4g}) on {args.matmul_size}^3{" (CPU: fp32 rate, since the CPU step runs fp32)" if kind == "fp32" else ""}.
- Versions: {version}.
- Command: `{command}`
{f"- Timings taken under load (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): ratios are indicative only." if loaded else ""}

Configurations: `plain` is the public Flow-DPO code's way (eager, separate frozen reference copy under
no_grad, loss in eager torch ops, default AdamW, SDPA, bf16 autocast on GPU / fp32 on CPU); `optimized` is
the lever set in its row; `+X` / `-X` / `X=v` rows flip one lever of `optimized`. Phase columns (ms) come
from separate steps with a device sync between phases.

{table}
"""
    with open(path, "w") as f:
        f.write(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--preset", default="tiny", help="DiT preset: tiny | small | base | 1.3b | 5b")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--frames", type=int, default=4, help="latent frames T")
    p.add_argument("--height", type=int, default=16, help="latent height H")
    p.add_argument("--width", type=int, default=16, help="latent width W")
    p.add_argument("--cond-len", type=int, default=None, help="condition tokens (default 512 text, 4 class)")
    p.add_argument("--segments", type=int, default=1, help="DenseDPO label segments (1 = Flow-DPO)")
    p.add_argument("--ac", default="none", choices=AC_MODES, help="activation checkpointing of plain + optimized")
    p.add_argument("--levers", default=None, help="optimized lever set, e.g. 'compile,bf16,fused_loss,ac=full' "
                                                  "(default: everything available on the device)")
    p.add_argument("--flips", default="all", help=f"levers to flip one at a time: all | none | subset of {FLIPPABLE}")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 CPU, 5 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 5 CPU, 20 GPU)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the peak matmul (default 8192 GPU, 1024 CPU)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-phase timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_RESULTS, help="CSV to append to (default: %(default)s)")
    p.add_argument("--report", default=None, help="write the Markdown report here")
    args = p.parse_args(argv)
    args.flips = (list(FLIPPABLE) if args.flips == "all" else
                  [] if args.flips == "none" else [f for f in args.flips.split(",") if f])
    unknown = [f for f in args.flips if f not in FLIPPABLE]
    if unknown:
        p.error(f"unknown lever(s) in --flips: {unknown}; valid: {list(FLIPPABLE)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    args.device_type = device.type
    gpu = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.repeats = args.repeats if args.repeats is not None else (20 if gpu else 5)
    args.matmul_size = args.matmul_size or (8192 if gpu else 1024)
    cfg = dit_config(args.preset)
    cond_len = args.cond_len or (4 if cfg.uses_class_tokens else 512)
    shape = StepShape(args.pairs, args.frames, args.height, args.width, cond_len, args.segments)
    tokens = shape.videos() * cfg.num_tokens(shape.frames, shape.height, shape.width)
    flops = step_flops(cfg, shape)
    meta = (common.device_description(device), common.timestamp(), common.versions(), common.command_line())
    x = f"{args.preset}-B{shape.pairs}xT{shape.frames}xH{shape.height}xW{shape.width}-tok{tokens}-L{cond_len}-S{shape.segments}"

    rate = matmul_rate_tflops(device, args.matmul_size, torch.bfloat16 if gpu else torch.float32)
    rows = [common.make_row("matmul", "torch", "bf16" if gpu else "fp32", "rate", "TFLOP/s",
                            f"{args.matmul_size}^3", rate, *meta)]
    print(f"device: {meta[0]}; measured matmul rate {rate[0]:.4g} TFLOP/s; {x}; {flops / 1e12:.4g} TFLOP per step")

    optimized = parse_levers(args.levers, Levers(ac=args.ac)) if args.levers else default_levers(device, args.ac)
    configs = [("plain", plain_levers(device, args.ac)), ("optimized", optimized)] + flipped_configs(optimized,
                                                                                                      args.flips)
    results, plain_ms = [], None
    for name, levers in configs:
        why = lever_unavailable(levers, device)
        if why is None:
            try:
                result = measure(cfg, shape, levers, device, args)
            except Exception as exc:  # an OOM or a failed capture/compile is a result of that lever, not a crash
                result = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
        else:
            result = why
        if isinstance(result, str):
            print(f"{name:>22}  skipped: {result}")
            rows.append(skipped_row(name, result, x, meta))
            results.append((name, levers, result))
            continue
        if name == "plain":
            plain_ms = result["ms"][0]
        rows += result_rows(name, result, flops, tokens, rate[0], plain_ms, x, meta)
        results.append((name, levers, result))
        mem = f" {result['memory']:.0f} MiB" if result["memory"] is not None else ""
        mfu = 100 * flops / (result["ms"][0] * 1e-3) / 1e12 / rate[0]
        speedup = plain_ms / result["ms"][0] if plain_ms else math.nan
        print(f"{name:>22}  {result['ms'][0]:9.2f} ms  MFU {mfu:5.1f}%  x{speedup:.2f}{mem}  "
              f"loss {result['loss']:.5f}  [{levers.label()}]")
    written = common.append_rows(args.out, rows)
    print(f"appended {written} rows to {args.out}")
    if args.report:
        table = markdown_table(results, flops, tokens, rate[0], plain_ms or math.nan)
        loaded = not gpu and os.getloadavg()[0] > 2 * (os.cpu_count() or 1)
        write_report(args.report, args, cfg, shape, meta[0], meta[2], meta[3], rate, table, loaded)
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
