"""Benchmark of one DPO training step of a video DiT: plain implementation vs the optimized levers.

``--model dit`` (default) measures vidpo's DiT (``step_bench``); ``--model wan`` diffusers' WanTransformer3DModel
(``step_bench_wan``: presets tiny | small | 1.3b, ``--train lora | full``), where plain keeps a separate reference
copy, the eager loss and no checkpointing, and optimized uses the LoRA-off reference, the fused loss and
activation checkpointing.

Configurations measured in one run (all on the same model shape and static batch; ``step_bench``):
    plain          the public Flow-DPO code's way: eager, separate frozen reference, torch-op loss, AdamW
    optimized      --levers (default: every lever that wins on the device, see default_levers; on a CPU
                   bf16 and compile only where this run measured bf16 matmuls faster, see fast_bf16)
    optimized±X    the optimized set with one lever flipped (boolean levers) or set to each other value
                   (ac, attention): every lever is measured on and off. A flip that needs a GPU or a
                   missing package becomes a "skipped" row with the reason.

Per configuration: step time (median, 20/80 percentiles), video tokens/s (2B n / step time), model
TFLOP/s (4 F(2B) per step, DiTConfig.flops_per_forward), MFU against the matmul rate of the row's compute
dtype measured in the same run (bf16 with the bf16 lever, else fp32), peak memory (GPU), the activation memory the policy forward keeps for the
backward and the parameter memory the reference holds beyond the policy's (GPU and CPU; ``--no-memory`` skips the
two extra steps the first costs), speedup over plain, and a per-phase breakdown
(ref_fwd, policy_fwd, loss, bwd, optimizer; synchronised, so the phases add up to a bit more than a step).
Rows are appended to benchmarks/results/step.csv (columns in benchmarks/common.py); --report writes the
dated Markdown report.

Examples:
    python benchmarks/bench_step.py --preset tiny --flips compile,bf16,ac        # CPU, a few seconds a config
    python benchmarks/bench_step.py --device cuda --preset 1.3b --pairs 2 --frames 21 --height 60 \\
        --width 104 --cond-len 512 --ac full --report benchmarks/reports/2026-11-21_step_h100.md
    python benchmarks/bench_step.py --model wan --preset small --frames 4 --height 16 --width 16   # CPU, Wan
    python benchmarks/bench_step.py --model wan --preset 1.3b --device cuda --pairs 1 --frames 21 --height 60 \
        --width 104 --ac full --train lora --dry-run                  # the plan of benchmarks/run_gpu.sh's step
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
from step_bench import (
    AC_MODES,
    ATTENTION_CHOICES,
    BOOL_LEVERS,
    DPOStep,
    Levers,
    StepShape,
    lever_unavailable,
    matmul_rate_tflops,
    parse_levers,
    plain_levers,
    step_flops,
    time_steps,
)
from step_bench_wan import (  # noqa: E402
    TRAIN_MODES,
    WAN_AC_MODES,
    WAN_PRESETS,
    WanDPOStep,
    WanLevers,
    wan_config,
    wan_default_levers,
    wan_lever_unavailable,
    wan_plain_levers,
    wan_step_flops,
    wan_tokens,
)

from vidpo.models.dit import dit_config  # noqa: E402

KERNEL = "dpo_step"
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "step.csv")
FLIPPABLE = BOOL_LEVERS + ("ac", "attention")
WAN_FLIPPABLE = ("compile", "bf16", "ref_no_grad", "ref_bf16", "ref_lora_off", "fused_loss", "fused_adamw", "ac")


@dataclass
class Setup:
    """What the measuring loop needs of one model: its step, its lever rules, its sizes."""

    x: str                                         # the CSV's problem label
    flops: int                                     # model FLOPs of one step
    tokens: int                                    # video tokens of one step
    plain: Levers
    optimized: Levers
    flips: List[Tuple[str, Levers]]
    unavailable: Callable[[Levers], Optional[str]]
    make_step: Callable[[Levers], DPOStep]
    describe: str                                  # the report's model and batch lines


# bf16 autocast joins a CPU's optimized set only where this run measured its bf16 matmuls this much faster than
# fp32 (AVX512-BF16 / AMX parts: 4-5x through oneDNN); elsewhere bf16 on a CPU is emulated and slower.
CPU_BF16_MIN_GAIN = 1.5


def fast_bf16(device: torch.device, rates: Optional[Dict[str, Tuple[float, float, float]]]) -> bool:
    """Whether bf16 compute wins on ``device``: always on a GPU; on a CPU when the matmul rates measured in
    this run say so (``rates`` None, as in a dry run: not assumed)."""
    if device.type == "cuda":
        return True
    return bool(rates) and rates["bf16"][0] >= CPU_BF16_MIN_GAIN * rates["fp32"][0]


def default_levers(device: torch.device, ac: str, bf16: Optional[bool] = None) -> Levers:
    """Every lever that wins on ``device`` (fp8 and cuda_graph stay flips: they change numerics or
    need static everything, so they are measured but not assumed; plain SDPA picks its flash / cuDNN
    kernel itself, and forcing cuDNN is a flip). ``bf16``: whether bf16 compute is fast here (``fast_bf16``;
    default: on a GPU only). On a CPU with fast bf16, compile is in the set: fusing the bf16 casts and the
    elementwise work around the matmuls measured 1.09x (benchmarks/reports/2026-12-03_step_cpu.md); on an fp32 CPU
    step it measured level with eager and stays out."""
    gpu = device.type == "cuda"
    bf16 = gpu if bf16 is None else bf16
    candidates = [Levers(compile=bf16, ac=ac, attention=attention, bf16=bf16, ref_no_grad=True, ref_bf16=bf16,
                         fused_loss=True, fused_adamw=gpu) for attention in ("flash_attn", "sdpa")]
    for levers in candidates:
        if lever_unavailable(levers, device) is None:
            return levers
    return dataclasses.replace(candidates[-1], fused_loss=False)


def flipped_configs(optimized: Levers, flips: List[str], ac_modes=AC_MODES) -> List[Tuple[str, Levers]]:
    """(name, levers) for each one-lever change of ``optimized``."""
    out = []
    for lever in flips:
        current = getattr(optimized, lever)
        if isinstance(current, bool):
            out.append((f"{'-' if current else '+'}{lever}", dataclasses.replace(optimized, **{lever: not current})))
            continue
        for value in (ac_modes if lever == "ac" else ATTENTION_CHOICES):
            if value != current:
                out.append((f"{lever}={value}", dataclasses.replace(optimized, **{lever: value})))
    return out


def prepare(setup: Setup, levers: Levers, device) -> DPOStep:
    """Build the step and run it once (compiles / captures before any timing)."""
    step = setup.make_step(levers)
    loss = float(step.run())
    if not math.isfinite(loss):
        raise FloatingPointError(f"the step's loss is {loss}")
    step.first_loss = loss
    return step


def finish(step: DPOStep, levers: Levers, samples: List[float], memory: Optional[float], device,
           args) -> Dict[str, object]:
    """Memory and phase breakdown of a timed step; frees it; returns the result dict."""
    reference_mib = step.reference_parameter_bytes() / 2**20
    activations = (None, None) if levers.cuda_graph or args.no_memory else step.activation_memory()
    phases = {}
    if not levers.cuda_graph and not args.no_breakdown:
        runs = [step.run_phases() for _ in range(max(1, min(3, args.repeats)))]
        phases = {name: sorted(r[name] for r in runs)[len(runs) // 2] for name in DPOStep.PHASES}
    loss = step.first_loss
    del step
    if levers.compile:
        torch._dynamo.reset()               # drop the compiled blocks' caches before the next model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(ms=common.quantiles(samples), memory=memory, phases=phases, loss=loss, reference_mib=reference_mib,
                activation_mib=activations[0], backward_peak_mib=activations[1])


def measure(setup: Setup, levers: Levers, device, args) -> Dict[str, object]:
    """Build the step, time it, measure its memory and its phases; returns a result dict."""
    step = prepare(setup, levers, device)
    if device.type == "cuda":                # the peak of the timed steps, model and optimizer state included
        torch.cuda.reset_peak_memory_stats(device)
    samples = time_steps(step.run, device, warmup=args.warmup, repeats=args.repeats)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return finish(step, levers, samples, memory, device, args)


def measure_interleaved(setup: Setup, configs: List[Tuple[str, Levers]], device, args) -> Dict[str, object]:
    """Every configuration's step built and warm at once, then timed one step each in turn, the order rotated
    every round: a drift of the machine's speed (a shared host's neighbours, clocks) lands on every row alike
    instead of on whichever configurations ran during it. On a 2-core VM, rows timed in separate blocks drifted
    by up to 25% while each block's own 20-80% spread stayed under 5%. Returns {name: result dict or reason}."""
    steps, results = {}, {}
    for name, levers in configs:
        try:
            steps[name] = prepare(setup, levers, device)
            for _ in range(args.warmup):
                steps[name].run()
        except Exception as exc:  # a failed compile is a result of that lever, not a crash
            results[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            steps.pop(name, None)
            gc.collect()
    samples = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.repeats):
        shift = round_index % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            samples[name] += time_steps(steps[name].run, device, warmup=0, repeats=1)
    for name, levers in configs:
        if name in steps:
            results[name] = finish(steps.pop(name), levers, samples[name], None, device, args)
    return results


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
    row("step", "reference_parameter_memory", "MiB", result["reference_mib"])
    for metric, key in (("activation_memory", "activation_mib"), ("backward_peak_memory", "backward_peak_mib")):
        if result[key] is not None:
            row("step", metric, "MiB", result[key])
    for phase, ms in result["phases"].items():
        row(phase, "time", "ms", ms)
    return rows


def skipped_row(name, why, x, meta) -> common.Row:
    nan = float("nan")
    return common.Row(KERNEL, name, "step", "skipped", why.replace(",", ";"), x, nan, nan, nan, *meta)


def markdown_table(results: List[Tuple[str, Levers, object]], flops, tokens, peak: Callable[[Levers], float],
                   plain_ms) -> str:
    """One line per configuration (skipped ones with their reason)."""
    head = ("| config | levers | step ms (p20-p80) | tokens/s | TFLOP/s | MFU % | peak MiB | activations MiB | "
            "reference params MiB | x plain | ref_fwd | policy_fwd | loss | bwd | optimizer |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def mib(value):
        return f"{value:.1f}" if value is not None else "n/a"

    for name, levers, result in results:
        if isinstance(result, str):
            lines.append(f"| {name} | {levers.label()} | skipped: {result} |" + " |" * 12)
            continue
        y50, y20, y80 = result["ms"]
        tflops = flops / (y50 * 1e-3) / 1e12
        ph = [f"{result['phases'][p]:.1f}" if result["phases"] else "-" for p in DPOStep.PHASES]
        lines.append(f"| {name} | {levers.label()} | {y50:.1f} ({y20:.1f}-{y80:.1f}) | {tokens / (y50 * 1e-3):.0f} | "
                     f"{tflops:.4g} | {100 * tflops / peak(levers):.1f} | {mib(result['memory'])} | "
                     f"{mib(result['activation_mib'])} | {mib(result['reference_mib'])} | {plain_ms / y50:.2f} | "
                     + " | ".join(ph) + " |")
    return "\n".join(lines)


def write_report(path, args, setup: Setup, device_desc, version, command, rates, table, loaded) -> None:
    measured = "; ".join(f"{kind} {rate[0]:.4g} TFLOP/s (p20-p80 {rate[1]:.4g}-{rate[2]:.4g})"
                         for kind, rate in rates.items())
    text = f"""# DPO training step benchmark: {device_desc}, {datetime.date.today():%Y-%m}

{setup.describe}
- MFU is against the matmul rate of each row's compute dtype (bf16 with the bf16 lever, else fp32), measured in
  this run on {args.matmul_size}^3: {measured}. bf16 is in `optimized` when it measured faster
  ({"yes" if args.fast_bf16 else "no"} here).
- Versions: {version}.
- Command: `{command}`
{f"- Timings taken under load (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): ratios are indicative only." if loaded else ""}

Configurations: `plain` is the public Flow-DPO code's way (eager, separate frozen reference copy under
no_grad, loss in eager torch ops, default AdamW, SDPA, bf16 autocast on GPU / fp32 on CPU); `optimized` is
the lever set in its row; `+X` / `-X` / `X=v` rows flip one lever of `optimized`. Phase columns (ms) come
from separate steps with a device sync between phases. "activations" is what the policy forward and the loss
keep for the backward; "reference params" the parameter memory the reference holds beyond the policy's.

{table}
"""
    with open(path, "w") as f:
        f.write(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--model", default="dit", choices=("dit", "wan"),
                   help="vidpo's DiT, or diffusers' WanTransformer3DModel (step_bench_wan)")
    p.add_argument("--preset", default="tiny", help=f"DiT preset: tiny | small | base | 1.3b | 5b; Wan preset: "
                                                    f"{' | '.join(WAN_PRESETS)}")
    p.add_argument("--train", default="lora", choices=TRAIN_MODES, help="Wan only: LoRA adapters or every weight")
    p.add_argument("--lora-rank", type=int, default=None, help="Wan only: adapter rank (default 64; 4 for tiny)")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--frames", type=int, default=4, help="latent frames T")
    p.add_argument("--height", type=int, default=16, help="latent height H")
    p.add_argument("--width", type=int, default=16, help="latent width W")
    p.add_argument("--cond-len", type=int, default=None, help="condition tokens (default 512 text, 4 class)")
    p.add_argument("--segments", type=int, default=1, help="DenseDPO label segments (1 = Flow-DPO)")
    p.add_argument("--ac", default="none", choices=AC_MODES, help="activation checkpointing of plain (and of "
                                                                  "optimized for the DiT)")
    p.add_argument("--levers", default=None, help="optimized lever set, e.g. 'compile,bf16,fused_loss,ac=full' "
                                                  "(default: everything available on the device)")
    p.add_argument("--flips", default="all", help=f"levers to flip one at a time: all | none | subset of {FLIPPABLE} "
                                                  f"(Wan: {WAN_FLIPPABLE})")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 CPU, 5 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 5 CPU, 20 GPU)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="build every configuration at once and time them one step each in turn (default on a CPU, "
                        "whose shared host drifts; off on a GPU, where each row's peak memory must be its own)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the peak matmul (default 8192 GPU, 1024 CPU)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-phase timing")
    p.add_argument("--no-memory", action="store_true", help="skip the activation-memory steps")
    p.add_argument("--no-plain", action="store_true", help="measure optimized and its flips only (no speedup rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_RESULTS, help="CSV to append to (default: %(default)s)")
    p.add_argument("--report", default=None, help="write the Markdown report here")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and the configurations, print the "
                                                          "plan, measure nothing")
    args = p.parse_args(argv)
    flippable = WAN_FLIPPABLE if args.model == "wan" else FLIPPABLE
    args.flips = (list(flippable) if args.flips == "all" else
                  [] if args.flips == "none" else [f for f in args.flips.split(",") if f])
    unknown = [f for f in args.flips if f not in flippable]
    if unknown:
        p.error(f"unknown lever(s) in --flips for --model {args.model}: {unknown}; valid: {list(flippable)}")
    if args.model == "wan" and args.preset not in WAN_PRESETS:
        p.error(f"--model wan takes --preset {' | '.join(WAN_PRESETS)}, not {args.preset!r}")
    if args.model == "dit" and args.preset not in ("tiny", "small", "base", "1.3b", "5b"):
        p.error(f"unknown DiT preset {args.preset!r}")
    try:
        base = WanLevers(ac=args.ac) if args.model == "wan" else Levers(ac=args.ac)
        args.levers = parse_levers(args.levers, base) if args.levers else None
    except ValueError as exc:
        p.error(f"--levers: {exc}")
    return args


def dit_setup(args, device) -> Setup:
    cfg = dit_config(args.preset)
    cond_len = args.cond_len or (4 if cfg.uses_class_tokens else 512)
    shape = StepShape(args.pairs, args.frames, args.height, args.width, cond_len, args.segments)
    per_video = cfg.num_tokens(shape.frames, shape.height, shape.width)
    tokens = shape.videos() * per_video
    optimized = args.levers or default_levers(device, args.ac, args.fast_bf16)
    describe = (f"- Model: preset `{args.preset}` ({cfg.num_params() / 1e6:.1f} M parameters, width {cfg.width}, "
                f"depth {cfg.depth}).\n"
                f"- Batch: {shape.pairs} pairs = {shape.videos()} videos of latent (C={cfg.in_channels}, "
                f"T={shape.frames}, H={shape.height}, W={shape.width}), patch {cfg.patch_size}: {per_video} tokens "
                f"per video, {tokens} per step; {shape.cond_len} condition tokens; {shape.segments} label "
                f"segment(s).\n"
                f"- Model FLOPs per step: 4 F(2B) = {step_flops(cfg, shape) / 1e12:.4g} TFLOP (policy forward + "
                f"backward 3F, reference forward F; `DiTConfig.flops_per_forward`; activation-checkpoint "
                f"recomputation not counted).")
    return Setup(
        x=f"{args.preset}-B{shape.pairs}xT{shape.frames}xH{shape.height}xW{shape.width}-tok{tokens}-L{cond_len}"
          f"-S{shape.segments}",
        flops=step_flops(cfg, shape), tokens=tokens, plain=plain_levers(device, args.ac), optimized=optimized,
        flips=flipped_configs(optimized, args.flips), unavailable=lambda levers: lever_unavailable(levers, device),
        make_step=lambda levers: DPOStep(cfg, shape, levers, device, seed=args.seed), describe=describe)


def wan_setup(args, device) -> Setup:
    config = wan_config(args.preset)
    cond_len = args.cond_len or 512
    shape = StepShape(args.pairs, args.frames, args.height, args.width, cond_len, args.segments)
    per_video = wan_tokens(config, shape.frames, shape.height, shape.width)
    tokens = shape.videos() * per_video
    rank = args.lora_rank or (4 if args.preset == "tiny" else 64)
    optimized = args.levers or wan_default_levers(device, args.train, args.fast_bf16)
    train = f"LoRA rank {rank} on {', '.join(('to_q', 'to_k', 'to_v', 'to_out.0'))}" if args.train == "lora" else \
        "full fine-tuning"
    width = config["num_attention_heads"] * config["attention_head_dim"]
    describe = (f"- Model: diffusers `WanTransformer3DModel`, preset `{args.preset}` (random weights; width {width}, "
                f"{config['num_layers']} blocks, ffn {config['ffn_dim']}), {train}.\n"
                f"- Batch: {shape.pairs} pairs = {shape.videos()} videos of latent (C={config['in_channels']}, "
                f"T={shape.frames}, H={shape.height}, W={shape.width}), patch {tuple(config['patch_size'])}: "
                f"{per_video} tokens per video, {tokens} per step; {cond_len} text tokens; {shape.segments} label "
                f"segment(s).\n"
                f"- Model FLOPs per step: 4 F(2B) = {wan_step_flops(config, shape) / 1e12:.4g} TFLOP "
                f"(`step_bench_wan.wan_flops_per_forward`; activation-checkpoint recomputation not counted).")
    return Setup(
        x=f"wan-{args.preset}-{args.train}-B{shape.pairs}xT{shape.frames}xH{shape.height}xW{shape.width}-tok{tokens}"
          f"-L{cond_len}-S{shape.segments}",
        flops=wan_step_flops(config, shape), tokens=tokens, plain=wan_plain_levers(device, args.ac),
        optimized=optimized, flips=flipped_configs(optimized, args.flips, WAN_AC_MODES),
        unavailable=lambda levers: wan_lever_unavailable(levers, device, args.train),
        make_step=lambda levers: WanDPOStep(config, shape, levers, device, train=args.train, lora_rank=rank,
                                            seed=args.seed), describe=describe)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device) if not args.dry_run else torch.device(
        "cuda" if args.device.startswith("cuda") else "cpu")
    args.device_type = device.type
    gpu = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.repeats = args.repeats if args.repeats is not None else (20 if gpu else 5)
    args.matmul_size = args.matmul_size or (8192 if gpu else 1024)
    args.interleave = (not gpu) if args.interleave is None else args.interleave
    if args.interleave and gpu:
        print("--interleave on a GPU: every configuration stays resident, so no per-row peak memory is reported")
    # Both rates, measured before the lever set is chosen: a CPU's optimized set takes bf16 from them.
    rates = None if args.dry_run else {kind: matmul_rate_tflops(device, args.matmul_size, dtype)
                                       for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    args.fast_bf16 = fast_bf16(device, rates)
    setup = (wan_setup if args.model == "wan" else dit_setup)(args, device)
    configs = ([] if args.no_plain else [("plain", setup.plain)]) + [("optimized", setup.optimized)] + setup.flips
    if args.dry_run:
        print(f"dry run: {setup.x}; {setup.flops / 1e12:.4g} TFLOP per step; {args.warmup} + {args.repeats} steps "
              f"per configuration")
        for name, levers in configs:
            why = setup.unavailable(levers)
            print(f"{name:>22}  [{levers.label()}]" + (f"  skipped: {why}" if why else ""))
        return 0
    meta = (common.device_description(device), common.timestamp(), common.versions(), common.command_line())
    rows = [common.make_row("matmul", "torch", kind, "rate", "TFLOP/s", f"{args.matmul_size}^3", rate, *meta)
            for kind, rate in rates.items()]
    flops, tokens, x = setup.flops, setup.tokens, setup.x
    print(f"device: {meta[0]}; measured matmul rate fp32 {rates['fp32'][0]:.4g}, bf16 {rates['bf16'][0]:.4g} "
          f"TFLOP/s (bf16 in optimized: {args.fast_bf16}); {x}; {flops / 1e12:.4g} TFLOP per step")

    def peak(levers: Levers) -> float:
        """The matmul rate of the compute dtype this lever set runs in."""
        return rates["bf16" if levers.bf16 else "fp32"][0]

    available = [(name, levers) for name, levers in configs if setup.unavailable(levers) is None]
    timed = measure_interleaved(setup, available, device, args) if args.interleave else {}
    results, plain_ms = [], None
    for name, levers in configs:
        why = setup.unavailable(levers)
        if why is not None:
            result = why
        elif args.interleave:
            result = timed[name]
        else:
            try:
                result = measure(setup, levers, device, args)
            except Exception as exc:  # an OOM or a failed capture/compile is a result of that lever, not a crash
                result = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
        if isinstance(result, str):
            print(f"{name:>22}  skipped: {result}")
            rows.append(skipped_row(name, result, x, meta))
            results.append((name, levers, result))
            continue
        if name == "plain":
            plain_ms = result["ms"][0]
        rows += result_rows(name, result, flops, tokens, peak(levers), plain_ms, x, meta)
        results.append((name, levers, result))
        mem = f" {result['memory']:.0f} MiB" if result["memory"] is not None else ""
        act = f" act {result['activation_mib']:.1f} MiB" if result["activation_mib"] is not None else ""
        mfu = 100 * flops / (result["ms"][0] * 1e-3) / 1e12 / peak(levers)
        speedup = plain_ms / result["ms"][0] if plain_ms else math.nan
        print(f"{name:>22}  {result['ms'][0]:9.2f} ms  MFU {mfu:5.1f}%  x{speedup:.2f}{mem}{act} "
              f"ref {result['reference_mib']:.1f} MiB  loss {result['loss']:.5f}  [{levers.label()}]")
    written = common.append_rows(args.out, rows)
    print(f"appended {written} rows to {args.out}")
    if args.report:
        table = markdown_table(results, flops, tokens, peak, plain_ms or math.nan)
        loaded = not gpu and os.getloadavg()[0] > 2 * (os.cpu_count() or 1)
        write_report(args.report, args, setup, meta[0], meta[2], meta[3], rates, table, loaded)
        print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
