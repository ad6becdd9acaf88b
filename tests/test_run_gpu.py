"""benchmarks/run_gpu.sh on CPU: its dry run checks every step and the time budget; the gates that keep an unchecked
kernel's speed out of the results (the GPU-test gate, the fused loss's float64 check, the VAE's dtype check); the
packages the GPU image lacks: named before anything runs, fetched as wheels and installed from the carried folder."""
import base64
import csv
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_dense_dpo  # noqa: E402
import bench_vae  # noqa: E402
import run_gpu_checks  # noqa: E402

STEPS = ("env", "build", "tests", "dense_dpo", "step_lora_32k", "step_full_32k", "step_lora_75k", "vae", "dali")


def run_script(tmp_path, *args, **env):
    full_env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                "WHEELS": str(tmp_path / "no_wheels"), **env}
    full_env.pop("TRITON_INTERPRET", None)
    args = [a for a in (args or ("--dry-run",)) if a]      # "" runs for real
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=300)


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


def test_a_run_leaves_few_files_in_out_and_packs_its_logs(tmp_path):
    """The device tool brings back at most 8 files from $OUT: the run keeps the CSVs, the report and one archive of
    every log there. The env step runs on any machine (its GPU tools may be missing), so a real run of it is checked."""
    import tarfile

    out, reports, results = tmp_path / "out", tmp_path / "reports", tmp_path / "results"
    done = run_script(tmp_path / "dry", "", STEPS="env", OUT=str(out), WORK=str(tmp_path / "work"),
                      REPORTS_DIR=str(reports), RESULTS_DIR=str(results))
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and "logs.tar.gz" in files
    (report,) = [f for f in files if f.endswith(".md")]
    assert (reports / report).read_text() == (out / report).read_text()
    text = (out / report).read_text()
    assert "| env | ok |" in text and "torch 2." in text and "$OUT/logs.tar.gz" in text
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert "./logs/env.log" in archive.getnames()
    assert not list(results.glob("*.csv"))            # the env step writes no rows


def test_what_came_back_is_imported_once(tmp_path):
    came_back, results, reports = tmp_path / "came_back", tmp_path / "results", tmp_path / "reports"
    (came_back / "results").mkdir(parents=True)
    header = "kernel,provider,mode,metric,unit,x,y50,y20,y80,device,timestamp,version,command\n"
    fresh = ["dense_dpo,cuda,full,time,ms,B2,1.0,0.9,1.1,NVIDIA H200,2026-12-04T10:00:00Z,v,c\n",
             "dense_dpo,triton,full,time,ms,B2,1.2,1.1,1.3,NVIDIA H200,2026-12-04T10:00:00Z,v,c\n"]
    (came_back / "results" / "dense_dpo.csv").write_text(header + "".join(fresh))
    (came_back / "results" / "vae.csv").write_text(header + fresh[0])
    (came_back / "2026-12-04_gpu_h200.md").write_text("# vidpo GPU measurements: h200\n")
    results.mkdir()
    old = "dense_dpo,cpp,full,time,ms,B4,2.0,1.9,2.1,AMD EPYC,2026-12-03T10:00:00Z,v,c\n"
    (results / "dense_dpo.csv").write_text(header + old)
    env = dict(RESULTS_DIR=str(results), REPORTS_DIR=str(reports))
    first = run_script(tmp_path, "--import", str(came_back), **env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (results / "dense_dpo.csv").read_text() == header + old + "".join(fresh)
    assert (results / "vae.csv").read_text() == header + fresh[0]
    assert (reports / "2026-12-04_gpu_h200.md").is_file()
    again = run_script(tmp_path, "--import", str(came_back), **env)
    assert again.returncode == 0 and again.stdout.count("already in") == 2
    assert (results / "dense_dpo.csv").read_text() == header + old + "".join(fresh)
    missing = run_script(tmp_path, "--import", str(tmp_path / "nowhere"), **env)
    assert missing.returncode == 2 and "--import needs the folder" in missing.stderr


def hide_module(tmp_path, name):
    """A sitecustomize that makes ``name`` unimportable, as on a GPU image that lacks it."""
    folder = tmp_path / "hide"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, fullname, path=None, target=None):\n"
        f"        if fullname.split('.')[0] == {name!r}:\n"
        "            raise ModuleNotFoundError(fullname)\n"
        "sys.meta_path.insert(0, Hide())\n")
    return str(folder)


def test_a_step_whose_import_is_missing_fails_the_dry_run_naming_it(tmp_path):
    done = run_script(tmp_path, STEPS="dense_dpo vae", PYTHONPATH=hide_module(tmp_path, "diffusers"))
    assert done.returncode == 1
    assert "dry run: dense_dpo ok" in done.stdout and "dry run: vae FAILED" in done.stderr
    assert "needs diffusers" in done.stderr and "--fetch-wheels" in done.stderr


def make_wheel(folder, name="vidpo_gpu_probe", version="0.1"):
    """A minimal pure-Python wheel: one module holding VALUE = 7."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 7\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_wheels_are_fetched_from_the_list_then_installed_for_every_step(tmp_path):
    registry = tmp_path / "registry"
    make_wheel(registry)
    listing = tmp_path / "wheels.txt"
    listing.write_text("# what the GPU image lacks\nvidpo-gpu-probe==0.1   # the probe\n")
    wheels, site = tmp_path / "carried", tmp_path / "site"
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(registry), "PIP_CONSTRAINT": "", "WHEELS": str(wheels),
               "GPU_WHEELS_LIST": str(listing)}
    fetched = run_script(tmp_path, "--fetch-wheels", **offline)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert [p.name for p in wheels.glob("*.whl")] == ["vidpo_gpu_probe-0.1-py3-none-any.whl"]
    assert "for Python 3.12" in fetched.stdout
    done = run_script(tmp_path, STEPS="env", WHEELS=str(wheels), SITE=str(site))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"installed 1 carried wheel(s) from {wheels} into {site}" in done.stdout
    probe = subprocess.run([sys.executable, "-c", "import vidpo_gpu_probe as p; print(p.VALUE, p.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert probe.stdout.split()[0] == "7" and probe.stdout.split()[1].startswith(str(site))
    listing.write_text("vidpo-gpu-probe==9.9\n")                      # a version the registry lacks
    missing = run_script(tmp_path, "--fetch-wheels", **offline)
    assert missing.returncode == 1 and "pip download failed for: vidpo-gpu-probe==9.9" in missing.stderr


def test_the_carried_list_pins_what_the_gpu_steps_import():
    pinned = [line.split("#")[0].strip() for line in (ROOT / "benchmarks" / "gpu_wheels.txt").read_text().splitlines()]
    pinned = [p for p in pinned if p]
    assert pinned and all("==" in p for p in pinned)
    suite_pin = re.search(r'"(diffusers==[^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert suite_pin in pinned                                    # the version the CPU suite checks the Wan step with


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
