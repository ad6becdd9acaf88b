"""The multi-process test harness itself: a start that dies in its rendezvous is retried on a new port, a
worker that dies after recording checks is a failure (tests/dist_utils.spawn_workers)."""
import os
import time

import pytest
from torch.multiprocessing.spawn import ProcessException

from dist_utils import record, spawn_workers, worker_results


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
