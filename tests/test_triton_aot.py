"""The Triton kernels compiled ahead of time for Hopper (sm_90a) and Ampere (sm_80) without a GPU
(vidpo.kernels.aot): every kernel at every launch configuration of the benchmark's shapes compiles, uses no
local-memory spill and fits the shared memory; a variant made to spill is caught. One subprocess does every
build (the kernels must be defined without the interpreter this suite runs them under)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from vidpo.kernels.aot import TARGETS, bench_variants, planted_spill_variant, ptxas_path  # noqa: E402
from vidpo.kernels.segment_sums import GPU_TILE, INTERPRETER_TILE, launch_config  # noqa: E402


def _ptxas_missing() -> str:
    try:
        path = ptxas_path(90)
    except Exception as exc:  # an older Triton without the NVIDIA backend's tool lookup
        return f"no ptxas: {exc}"
    return "" if path and os.path.exists(path) else "Triton's bundled ptxas is not installed"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    reason = _ptxas_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "vidpo.kernels.aot", "--planted-spill", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    rows = json.loads(out.read_text())
    return done, rows


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(builds):
    done, rows = builds
    planted = planted_spill_variant().label
    real = [r for r in rows if r["variant"]["label"] != planted]
    expected = {(t, v.label) for t in TARGETS for v in bench_variants(["bf16", "fp32"])}
    assert {(r["target"], r["variant"]["label"]) for r in real} == expected
    assert {r["variant"]["kernel"] for r in real} == {"fwd", "bwd"}
    bad = [(r["target"], r["variant"]["label"], r["problems"]) for r in real if r["problems"]]
    assert not bad, bad
    for r in real:
        assert r["error"] is None and r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert 0 < r["registers"] <= 128, r            # 4 warps of streaming loads: far from the 255 cap
        assert r["shared_bytes"] <= 1024
    assert {r["ptx_target"] for r in real if r["target"] == "sm_90a"} == {"sm_90a"}
    assert {r["ptx_target"] for r in real if r["target"] == "sm_80"} == {"sm_80"}
    assert "ok" in done.stdout


def test_a_planted_spill_fails_the_check(builds):
    done, rows = builds
    planted = [r for r in rows if r["variant"]["label"] == planted_spill_variant().label]
    assert len(planted) == len(TARGETS)
    for r in planted:
        # Triton 3.9's ptxas fills all 255 registers before it spills, 3.6's (the GPU image's) stops at 168:
        # either way far above every real variant's <= 128.
        assert r["error"] is None and r["spill_stores"] > 0 and r["registers"] > 128
        assert any(p.startswith("spills") for p in r["problems"]), r["problems"]
    assert done.returncode == 1
    assert f"{len(TARGETS)} of {len(rows)} builds failed the check" in done.stderr


def test_the_gpu_tiling_is_asked_for_explicitly():
    gpu = launch_config(30 * 52, 2 * 4 * 16 * 21, interpreter=False)
    interpreted = launch_config(30 * 52, 2 * 4 * 16 * 21, interpreter=True)
    assert gpu.block * gpu.planes <= GPU_TILE < interpreted.block * interpreted.planes <= INTERPRETER_TILE
    assert (gpu.block, gpu.iters, gpu.chunks) == (interpreted.block, interpreted.iters, interpreted.chunks)
