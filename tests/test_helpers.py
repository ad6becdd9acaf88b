"""The shared test helpers themselves (tests/helpers/).

The multi-process harness (``helpers.distributed.spawn_workers``): a start that dies in its rendezvous is
retried on a new port, a worker that dies after recording checks is a failure. The float64-reference comparison
(``helpers.tolerances.assert_close_to_float64``): it applies the dtype's row of the table, scales atol, and
rejects non-finite outputs (what a NaN-poisoned, unwritten kernel output element looks like).
"""
import os
import time

import pytest
import torch
from torch.multiprocessing.spawn import ProcessException

from helpers.distributed import record, spawn_workers, worker_results
from helpers.tolerances import (CSRC_PRIMITIVES, LOSS_KERNELS, Tolerance, assert_close_to_float64, max_abs)


def dies_once_then_checks(rank, port, result_dir, marker):
    # The first start's rank 1 aborts before any check, as in a lost rendezvous, where rank 0 waits for its
    # peer (here: for rank 1's "ready" file) until mp.spawn terminates it.
    ready = marker + ".ready"
    if rank == 1:
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.abort()
        open(ready, "w").close()
    else:
        for _ in range(600):
            if os.path.exists(ready):
                break
            time.sleep(0.1)
    with worker_results(rank, result_dir, teardown=lambda: None) as results:
        record(results, "port", lambda: None)
        results["port"] = port


def dies_after_a_check(rank, port, result_dir, marker):
    with worker_results(rank, result_dir, teardown=lambda: None) as results:
        record(results, "check", lambda: None)
    if rank == 1:
        os.abort()


def test_a_start_that_dies_before_any_check_is_retried(tmp_path):
    per_rank = spawn_workers(dies_once_then_checks, str(tmp_path), str(tmp_path / "marker"))
    assert (tmp_path / "marker").exists()       # the first start did die
    assert per_rank[0]["port"] == per_rank[1]["port"] and isinstance(per_rank[0]["port"], int)


def test_a_worker_that_dies_after_recording_checks_fails(tmp_path):
    with pytest.raises(ProcessException):
        spawn_workers(dies_after_a_check, str(tmp_path), str(tmp_path / "marker"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float64_comparison_applies_the_dtype_row_and_the_scale(dtype):
    tol = LOSS_KERNELS[dtype]
    reference = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    inside = reference + torch.tensor([0.5 * tol.atol, 0.0, 0.0], dtype=torch.float64)
    assert_close_to_float64(inside.to(dtype), inside, dtype, LOSS_KERNELS)   # off by the dtype's rounding only
    off = reference + torch.tensor([3 * tol.atol, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="what"):
        assert_close_to_float64(off, reference, dtype, LOSS_KERNELS, what="what")
    assert_close_to_float64(off, reference, dtype, LOSS_KERNELS, scale=4.0)   # atol * scale covers it
    with pytest.raises(KeyError, match="no tolerance"):
        assert_close_to_float64(reference, reference, torch.float16, LOSS_KERNELS)


def test_float64_comparison_rejects_poisoned_outputs():
    reference = torch.zeros(4, dtype=torch.float64)
    poisoned = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    with pytest.raises(AssertionError, match="NaN-poisoned"):
        assert_close_to_float64(poisoned, reference, torch.float32, CSRC_PRIMITIVES, scale=1.0)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_float64(torch.full((4,), float("inf")), reference, torch.float32, CSRC_PRIMITIVES)


def test_tables_and_scale():
    for table in (LOSS_KERNELS, CSRC_PRIMITIVES):
        assert all(isinstance(t, Tolerance) and 0 < t.atol and 0 < t.rtol < 1 for t in table.values())
    assert max_abs(torch.tensor([1.0, -3.0])) == 3.0 and max_abs(torch.zeros(0)) == 0.0
