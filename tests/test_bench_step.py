"""The DPO step benchmark: FLOP count against FlopCounterMode, lever parsing, and one CPU run's CSV rows.

Structure only: timings are never asserted (they are measurements, and this machine is shared).
"""
import csv
import dataclasses
import math
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vidpo.models.dit import dit_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_step  # noqa: E402
from step_bench import (DPOStep, Levers, StepShape, input_gradient_flops_skipped,  # noqa: E402
                        lever_unavailable, parse_levers, plain_levers, step_flops)

CPU = torch.device("cpu")
SMALL_TEXT = dict(cond_vocab_size=0, cond_dim=24, in_channels=5, patch_size=(2, 2, 2), width=48, depth=2,
                  num_heads=4, ffn_dim=72)


@pytest.mark.parametrize("overrides", [dict(width=64, depth=2, num_heads=4), SMALL_TEXT], ids=["tokens", "text"])
def test_step_flops_equal_direct_count_of_plain_step(overrides):
    """FlopCounterMode over one whole plain step (math attention, so every matmul is visible) counts
    exactly the analytic model FLOPs minus the input-gradient matmuls autograd skips."""
    cfg = dit_config("tiny", **overrides)
    shape = StepShape(pairs=1, frames=4, height=8, width=12, cond_len=3, segments=2)
    step = DPOStep(cfg, shape, dataclasses.replace(plain_levers(CPU), attention="math"), CPU)
    with FlopCounterMode(display=False) as counter:
        step.run()
    direct = counter.get_total_flops()
    assert direct == step_flops(step.config, shape) - input_gradient_flops_skipped(step.config, shape)
    forward = cfg.flops_per_forward(2, 4, 8, 12, 3)
    assert step_flops(cfg, shape) == 4 * forward
    assert 0 < input_gradient_flops_skipped(cfg, shape) < 0.1 * direct


def test_parse_levers_and_unavailable_reasons():
    levers = parse_levers("compile,ac=full,attention=math,fused_loss,-compile")
    assert levers == Levers(ac="full", attention="math", fused_loss=True)
    assert levers.label() == "ac=full,attention=math,fused_loss"
    with pytest.raises(ValueError, match="unknown lever 'compil'"):
        parse_levers("compil")
    with pytest.raises(ValueError, match="ac="):
        parse_levers("ac=some")
    assert "CUDA" in lever_unavailable(Levers(cuda_graph=True), CPU)
    assert "fp8" in lever_unavailable(Levers(fp8=True), CPU)
    assert lever_unavailable(Levers(attention="cudnn"), CPU).startswith("attention=cudnn")
    assert lever_unavailable(plain_levers(CPU), CPU) is None


def test_plain_and_fused_steps_agree_on_the_loss():
    """Same weights and batch: the eager-torch loss and the fused-kernel loss of the first step agree,
    and the optimizer moves the policy but never the reference copy."""
    cfg = dit_config("tiny", width=64, depth=2, num_heads=4)
    shape = StepShape(pairs=2, frames=4, height=8, width=8, cond_len=2, segments=2)
    plain = DPOStep(cfg, shape, plain_levers(CPU), CPU, beta=5e4, lr=1e-2)
    fused = DPOStep(cfg, shape, Levers(fused_loss=True, ref_no_grad=True, ac="selective"), CPU, beta=5e4, lr=1e-2)
    before = [p.detach().clone() for p in plain.reference.parameters()]
    first = [float(plain.run()), float(fused.run())]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    second = [float(plain.run()), float(fused.run())]
    assert second[0] != first[0]                         # the policy moved away from the reference
    assert second[0] == pytest.approx(second[1], rel=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, plain.reference.parameters()))


def test_cpu_run_writes_rows_and_mfu_is_flops_over_time_over_peak(tmp_path):
    out, report = tmp_path / "step.csv", tmp_path / "report.md"
    bench_step.main(["--device", "cpu", "--preset", "tiny", "--pairs", "1", "--frames", "2", "--height", "8",
                     "--width", "8", "--flips", "cuda_graph", "--repeats", "1", "--warmup", "0",
                     "--matmul-size", "128", "--out", str(out), "--report", str(report)])
    rows = list(csv.DictReader(open(out)))
    assert set(rows[0]) == set(bench_step.common.CSV_COLUMNS)
    by = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    rates = {kind: float(by[("torch", kind, "rate")]["y50"]) for kind in ("fp32", "bf16")}
    optimized_bf16 = rates["bf16"] >= bench_step.CPU_BF16_MIN_GAIN * rates["fp32"]   # chosen from the run's rates
    cfg = dit_config("tiny")
    flops = step_flops(cfg, StepShape(1, 2, 8, 8, 4))
    tokens = 2 * cfg.num_tokens(2, 8, 8)
    for name in ("plain", "optimized"):
        peak = rates["bf16" if name == "optimized" and optimized_bf16 else "fp32"]   # the row's own compute dtype
        ms = float(by[(name, "step", "time")]["y50"])
        tflops = flops / (ms * 1e-3) / 1e12
        close = dict(rel=1e-3, abs=2e-6)      # the CSV keeps 6 decimals
        assert float(by[(name, "step", "model_tflops")]["y50"]) == pytest.approx(tflops, **close)
        mfu = float(by[(name, "step", "mfu")]["y50"])
        # peak (TFLOP/s) is stored with 6 decimals too, which is coarse for a loaded CPU's rate
        assert abs(mfu / 100 * peak - tflops) <= 1e-3 * tflops + mfu / 100 * 1e-6 + 2e-6
        assert float(by[(name, "step", "tokens_per_s")]["y50"]) == pytest.approx(tokens / (ms * 1e-3), **close)
        phases = [float(by[(name, p, "time")]["y50"]) for p in DPOStep.PHASES]
        assert all(p > 0 for p in phases)
    assert float(by[("plain", "step", "speedup_vs_plain")]["y50"]) == pytest.approx(1.0)
    skipped = by[("+cuda_graph", "step", "skipped")]
    assert "CUDA" in skipped["unit"] and math.isnan(float(skipped["y50"]))
    text = report.read_text()
    assert "| plain |" in text and "skipped: cuda_graph" in text and "fp32 " in text and "bf16 " in text


def test_the_cpu_set_takes_bf16_and_compile_only_where_bf16_measured_faster():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    rate = lambda v: (v, v, v)  # noqa: E731
    assert bench_step.fast_bf16(cpu, {"fp32": rate(0.19), "bf16": rate(0.80)})
    assert not bench_step.fast_bf16(cpu, {"fp32": rate(0.19), "bf16": rate(0.20)})   # emulated bf16
    assert not bench_step.fast_bf16(cpu, None) and bench_step.fast_bf16(cuda, None)
    fast, slow = bench_step.default_levers(cpu, "none", True), bench_step.default_levers(cpu, "none", False)
    assert fast.bf16 and fast.compile and fast.ref_bf16 and not fast.fused_adamw
    assert not (slow.bf16 or slow.compile or slow.ref_bf16)
    assert bench_step.wan_default_levers(cpu, "lora", True).bf16


def test_block_timing_without_interleave_writes_the_same_rows(tmp_path):
    out = tmp_path / "step.csv"
    bench_step.main(["--device", "cpu", "--preset", "tiny", "--pairs", "1", "--frames", "2", "--height", "8",
                     "--width", "8", "--flips", "none", "--repeats", "2", "--warmup", "0", "--matmul-size", "64",
                     "--no-interleave", "--no-breakdown", "--no-memory", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    times = {r["provider"]: float(r["y50"]) for r in rows if r["metric"] == "time" and r["mode"] == "step"}
    assert set(times) == {"plain", "optimized"} and all(t > 0 for t in times.values())


# ----- the Wan step (benchmarks/step_bench_wan.py): diffusers' WanTransformer3DModel ------------------------------
def test_wan_flops_equal_direct_count_of_a_forward():
    """The analytic Wan forward FLOPs equal FlopCounterMode over a real forward (math SDPA: every matmul visible)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from step_bench_wan import build_wan, wan_config, wan_flops_per_forward

    config = wan_config("tiny")
    model = build_wan(config, seed=0)
    x, t, cond = torch.randn(2, 4, 2, 6, 8), torch.rand(2), torch.randn(2, 5, config["text_dim"])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, cond)
    assert counter.get_total_flops() == wan_flops_per_forward(config, 2, 2, 6, 8, 5)


def test_wan_lora_off_reference_holds_no_weights_and_agrees_with_a_copy():
    """plain (a separate reference copy, eager loss, no checkpointing) and optimized (the LoRA-off reference, the
    fused loss, checkpointing) give the same losses over two steps; the copy holds the whole base model's bytes,
    the LoRA-off reference none, and checkpointing keeps less activation memory for the backward."""
    from step_bench_wan import WanDPOStep, wan_config, wan_default_levers, wan_plain_levers

    config = wan_config("tiny")
    shape = StepShape(pairs=2, frames=2, height=8, width=8, cond_len=6, segments=2)
    plain = WanDPOStep(config, shape, wan_plain_levers(CPU), CPU, lora_rank=4, beta=5e4, lr=1e-2)
    optimized = WanDPOStep(config, shape, wan_default_levers(CPU, "lora"), CPU, lora_rank=4, beta=5e4, lr=1e-2)
    assert optimized.levers.ref_lora_off and optimized.levers.fused_loss and optimized.levers.ac == "full"
    base_bytes = sum(p.numel() * p.element_size() for n, p in plain.policy.named_parameters() if "lora_" not in n)
    assert plain.reference_parameter_bytes() == base_bytes
    assert optimized.reference_parameter_bytes() == 0
    held_plain, peak_plain = plain.activation_memory()
    held_optimized, _ = optimized.activation_memory()
    assert 0 <= held_optimized < 0.5 * held_plain and peak_plain > 0
    first = [float(plain.run()), float(optimized.run())]
    assert first[0] == pytest.approx(math.log(2), rel=1e-6) and first[1] == pytest.approx(first[0], rel=1e-6)
    second = [float(plain.run()), float(optimized.run())]
    assert second[0] != first[0]                        # the adapters moved the policy away from the reference
    assert second[1] == pytest.approx(second[0], rel=1e-4)


def test_wan_cpu_run_writes_rows(tmp_path):
    out = tmp_path / "step.csv"
    bench_step.main(["--model", "wan", "--device", "cpu", "--preset", "tiny", "--pairs", "1", "--frames", "2",
                     "--height", "4", "--width", "4", "--cond-len", "4", "--flips", "ref_lora_off,ac",
                     "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--no-breakdown", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    by = {(r["provider"], r["metric"]): r for r in rows if r["mode"] == "step"}
    assert all(r["x"].startswith("wan-tiny-lora-B1xT2xH4xW4-tok16") for r in rows if r["kernel"] == "dpo_step")
    for name in ("plain", "optimized", "-ref_lora_off", "ac=none"):
        assert float(by[(name, "time")]["y50"]) > 0
    assert float(by[("optimized", "reference_parameter_memory")]["y50"]) == 0
    assert float(by[("-ref_lora_off", "reference_parameter_memory")]["y50"]) > 0
    assert float(by[("ac=none", "activation_memory")]["y50"]) > float(by[("optimized", "activation_memory")]["y50"])
    assert by[("ac=none", "activation_memory")]["unit"] == "MiB"
    with pytest.raises(SystemExit):                     # fp8 is not a Wan lever: --flips refuses it
        bench_step.parse_args(["--model", "wan", "--flips", "fp8"])
