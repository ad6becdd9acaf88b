"""benchmarks/run_gpu.sh on CPU: its dry run checks every step and the time budget; the gates that keep an unchecked
kernel's speed out of the results (the GPU-test gate, the fused loss's float64 check, the VAE's dtype check)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_dense_dpo  # noqa: E402
import bench_vae  # noqa: E402
import run_gpu_checks  # noqa: E402

STEPS = ("env", "build", "tests", "dense_dpo", "step_lora_32k", "step_full_32k", "step_lora_75k", "vae", "dali")


def run_script(tmp_path, **env):
    full_env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--dry-run"], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_dry_run_checks_every_step_and_fits_the_budget(tmp_path):
    done = run_script(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in STEPS:
        assert f"dry run: {step} ok" in done.stdout
    estimates = [int(line.split()[1]) for line in done.stdout.splitlines()
                 if line.startswith("  ") and line.split()[0] in STEPS]
    assert len(estimates) == len(STEPS) and sum(estimates) <= 480
    assert f"estimated {sum(estimates)} s of 480" in done.stdout


def test_dry_run_fails_over_budget_and_on_a_broken_step(tmp_path):
    over = run_script(tmp_path, BUDGET_S="100")
    assert over.returncode == 1 and "OVER BUDGET" in over.stderr
    broken = run_script(tmp_path, STEPS="vae", PYTHON="false")     # an interpreter that fails every command
    assert broken.returncode == 1 and "dry run: vae FAILED" in broken.stderr


def junit(tmp_path, cases):
    body = "".join(f'<testcase classname="tests.test_losses" name="{name}">{extra}</testcase>' for name, extra in cases)
    path = tmp_path / "tests.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return str(path)


def test_gpu_test_gate_fails_on_any_skip_and_on_an_untested_backend(tmp_path):
    passing = [("test_dense_dpo[fp32-odd-triton]", ""), ("test_dense_dpo[fp32-odd-cuda]", "")]
    assert run_gpu_checks.main([junit(tmp_path, passing)]) == 0
    skipped = passing + [("test_kto[bf16-cuda]", '<skipped message="backend cuda unavailable"/>')]
    assert run_gpu_checks.main([junit(tmp_path, skipped)]) == 1
    counts, problems = run_gpu_checks.summarize(junit(tmp_path, passing[:1]))
    assert counts == {"triton": 1, "cuda": 0} and problems == ["no test of the cuda backend passed"]


def test_fused_loss_check_passes_real_kernels_and_catches_a_wrong_one(monkeypatch):
    inputs = bench_dense_dpo.make_inputs(2, (3, 5, 4, 6), 2, torch.float32, "cpu")
    assert bench_dense_dpo.check_provider("torch", inputs) is None
    assert bench_dense_dpo.check_provider("cpp", inputs) is None
    right = bench_dense_dpo.loss_function
    monkeypatch.setattr(bench_dense_dpo, "loss_function", lambda p, i: (lambda: right(p, i)() * 1.001))
    assert "loss" in bench_dense_dpo.check_provider("torch", inputs)


def test_vae_decode_benchmark_checks_then_writes_frames_per_second(tmp_path):
    out = tmp_path / "vae.csv"
    assert bench_vae.main(["--device", "cpu", "--tiny", "--latent", "16,2,4,4", "--warmup", "0", "--repeats", "1",
                           "--out", str(out)]) == 0
    rows = {r["metric"]: r for r in csv.DictReader(open(out))}
    assert rows["frames_per_s"]["x"] == "tiny-B1xC16xT2xH4xW4" and float(rows["frames_per_s"]["y50"]) > 0
    assert float(rows["check_error"]["y50"]) <= bench_vae.TOLERANCE[torch.float32]
    vae = bench_vae.build_vae(True, torch.device("cpu"))
    with pytest.raises(AssertionError, match="differs from float32"):    # a different decoder is caught
        bench_vae.check_decoder(vae, bench_vae.build_vae(True, torch.device("cpu"), seed=1), "cpu", torch.float32, 16)
