"""The Triton kernels compiled ahead of time for Hopper (sm_90a) and Ampere (sm_80) without a GPU
(vidpo.kernels.aot): every kernel at every launch configuration of the benchmark's shapes compiles, uses no
local-memory spill, fits the shared memory and moves its value streams in 16-byte vectors; a variant made to spill
is caught, and one without the alignment hint shows the scalar loads it would make. One subprocess does every
build (the kernels must be defined without the interpreter this suite runs them under)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from vidpo.kernels.aot import (  # noqa: E402
    TARGETS,
    bench_variants,
    planted_spill_variant,
    ptxas_path,
    unaligned_variant,
)
from vidpo.kernels.segment_sums import GPU_TILE, INTERPRETER_TILE, launch_config, plane_alignment  # noqa: E402


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
    done = subprocess.run([sys.executable, "-m", "vidpo.kernels.aot", "--planted-spill", "--unaligned", "--json",
                           str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    rows = json.loads(out.read_text())
    return done, rows


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(builds):
    done, rows = builds
    extra = {planted_spill_variant().label, unaligned_variant().label}
    real = [r for r in rows if r["variant"]["label"] not in extra]
    expected = {(t, v.label) for t in TARGETS for v in bench_variants(["bf16", "fp32"])}
    assert {(r["target"], r["variant"]["label"]) for r in real} == expected
    assert {r["variant"]["kernel"] for r in real} == {"fwd", "bwd"}
    bad = [(r["target"], r["variant"]["label"], r["problems"]) for r in real if r["problems"]]
    assert not bad, bad
    for r in real:
        assert r["error"] is None and r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert 0 < r["registers"] <= 128, r            # 4 warps of streaming loads: far from the 255 cap
        assert r["shared_bytes"] <= 1024
    # the value streams move 16-byte vectors: every forward load, and all but the backward's per-plane segment id
    # and coefficient, is 128 bits wide, and so is every gradient store
    for r in real:
        narrow = {bits: n for bits, n in r["load_bits"].items() if int(bits) < 128}
        assert sum(narrow.values()) <= (2 * r["variant"]["planes"] if r["variant"]["kernel"] == "bwd" else 0), r
        assert r["load_bits"].get("128", 0) > 0
        if r["variant"]["kernel"] == "bwd":
            assert set(r["store_bits"]) == {"128"}, r
    assert {r["variant"]["align"] for r in real} == {8, 16}    # Wan's 60 x 104 planes and CogVideoX's 60 x 90
    assert {r["ptx_target"] for r in real if r["target"] == "sm_90a"} == {"sm_90a"}
    assert {r["ptx_target"] for r in real if r["target"] == "sm_80"} == {"sm_80"}
    assert "ok" in done.stdout


def test_a_planted_spill_fails_the_check(builds):
    done, rows = builds
    planted = [r for r in rows if r["variant"]["label"] == planted_spill_variant().label]
    assert len(planted) == len(TARGETS)
    for r in planted:
        assert r["error"] is None and r["spill_stores"] > 0 and r["registers"] == 255
        assert any(p.startswith("spills") for p in r["problems"]), r["problems"]
    assert done.returncode == 1
    assert f"{len(TARGETS)} of {len(rows)} builds failed the check" in done.stderr


def test_the_gpu_tiling_is_asked_for_explicitly():
    gpu = launch_config(30 * 52, 2 * 4 * 16 * 21, interpreter=False)
    interpreted = launch_config(30 * 52, 2 * 4 * 16 * 21, interpreter=True)
    assert gpu.block * gpu.planes <= GPU_TILE < interpreted.block * interpreted.planes <= INTERPRETER_TILE
    assert (gpu.block, gpu.iters, gpu.chunks) == (interpreted.block, interpreted.iters, interpreted.chunks)


def test_plane_alignment_is_the_largest_power_of_two_up_to_16_dividing_the_plane():
    sizes = {60 * 104: 16, 60 * 90: 8, 30 * 52: 8, 90 * 160: 16, 6 * 6: 4, 5 * 9: 1, 2 * 7: 2, 82 * 100: 8}
    assert {size: plane_alignment(size) for size in sizes} == sizes
    assert launch_config(60 * 90, 64, interpreter=False).align == 8


def test_the_alignment_hint_is_what_vectorises_a_plane(builds):
    """The same kernel and tiling at ALIGN = 1 (a plane of odd size) loads bf16 two bytes at a time, and the check
    expects no more of it; at ALIGN = 8 it loads 16-byte vectors."""
    _, rows = builds
    unaligned = [r for r in rows if r["variant"]["label"] == unaligned_variant().label]
    assert len(unaligned) == len(TARGETS)
    for r in unaligned:
        assert set(r["load_bits"]) == {"16"} and not r["problems"], r
        twin = next(x for x in rows if x["target"] == r["target"] and x["variant"]["label"] ==
                    r["variant"]["label"].replace("ALIGN=1 ", "ALIGN=8 "))
        assert set(twin["load_bits"]) == {"128"}
