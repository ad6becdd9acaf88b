"""The harness shared by the tests that start real multi-process (gloo, CPU) runs.

Every such test module follows one pattern: the parent picks a free TCP port, ``torch.multiprocessing``
spawns ``WORLD`` workers, each worker runs a list of named checks (or training runs) and records ``"ok"`` or
the traceback per name in a dict, writes that dict to ``<result_dir>/rank<r>.json`` and tears its process
group down; the parent reads the per-rank dicts back and one pytest test per name asserts that every rank
passed. The pieces of that pattern live here; what each worker checks stays in its test module (or, for the
parallel-vs-one-process equivalence of the diffusers adapters, in ``helpers.parallel``).

Why results travel through JSON files rather than exceptions: one failing check must not hide the others
(each gets its own pytest test and traceback), and a worker that raises makes ``mp.spawn`` report only that
one exception. Workers are module-level functions (of the test modules or of ``helpers``): the ``spawn``
start method pickles them by reference, and the children find both their module and this one on the parent's
``sys.path`` (which holds ``tests/``, see ``helpers/__init__.py``).
"""
import contextlib
import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

WORLD = 2
# gloo's default collective timeout is 30 minutes: a rank that failed before a collective would leave the
# other one waiting that long. Two minutes is far above any collective in these tests.
GLOO_TIMEOUT_S = 120
# Starts of a multi-process test that died before any rank wrote a result (see spawn_workers).
RENDEZVOUS_ATTEMPTS = 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for the rendezvous (``MASTER_PORT`` / ``tcp://``).

    The OS picks it (bind to port 0), so parallel test sessions do not collide on a fixed port. The socket
    is closed before the workers bind it; the short race is accepted, as everywhere this trick is used.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_torchrun_env(rank: int, port: int, world: int = WORLD, **extra: str) -> None:
    """Set the environment variables torchrun would set for ``rank`` (plus ``extra``, e.g. OMP_NUM_THREADS).

    Used by workers whose code under test starts the process group itself from the environment
    (``vidpo.training.distributed.init_distributed``), so it runs exactly as under torchrun.
    """
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **extra)


def init_gloo(rank: int, port: int, world: int = WORLD) -> None:
    """Start the default gloo process group over TCP on 127.0.0.1:``port`` (for workers that test
    collectives directly, without vidpo's own setup)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))


def destroy_gloo() -> None:
    """Teardown for workers started with ``init_gloo``. Guarded so that a failed init reports its own
    error rather than a second one from destroying a group that does not exist."""
    if dist.is_initialized():
        dist.destroy_process_group()


def vidpo_shutdown() -> None:
    """Teardown for workers whose process groups ``vidpo.training.distributed`` started (it also owns megatron-core's
    parallel state). Imported here, inside the worker, like the rest of vidpo's distributed code."""
    from vidpo.training.distributed import shutdown

    shutdown()


def record(results: dict, name: str, fn, *args) -> bool:
    """Run ``fn(*args)`` and store ``"ok"`` or its traceback under ``results[name]``; return whether it passed.

    Catching here is what lets the worker go on to the next check: every check still gets its own verdict.
    """
    try:
        fn(*args)
    except Exception:  # reported per name by the pytest side (assert_all_ranks_ok)
        results[name] = traceback.format_exc()
        return False
    results[name] = "ok"
    return True


@contextlib.contextmanager
def worker_results(rank: int, result_dir: str, teardown):
    """Yield the dict a worker fills with ``record``; on exit (also on an error between checks) write it to
    ``<result_dir>/rank<rank>.json`` and call ``teardown``.

    Writing in ``finally`` keeps the verdicts gathered before an unexpected error; whatever is missing then
    fails its pytest test by name. One intra-op thread per worker: 2 workers on a 2-core machine.
    """
    torch.set_num_threads(1)
    results = {}
    try:
        yield results
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        teardown()


def read_results(result_dir: str, world: int = WORLD) -> list:
    """The per-rank result dicts, in rank order."""
    per_rank = []
    for rank in range(world):
        with open(os.path.join(result_dir, f"rank{rank}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


def _any_verdict(result_dir: str, world: int) -> bool:
    """Whether some rank recorded at least one check (a start that died in its rendezvous records none)."""
    for rank in range(world):
        path = os.path.join(result_dir, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f):
                    return True
    return False


def spawn_workers(worker, result_dir: str, *args, world: int = WORLD) -> list:
    """Run ``worker(rank, port, result_dir, *args)`` in ``world`` fresh processes on a free port, wait for all
    of them, and return their result dicts (``read_results``).

    ``mp.spawn`` (start method ``spawn``) rather than fork: the children start clean, without the parent's
    torch threads or any process-group state. ``join=True`` re-raises in the parent if a worker died.

    ``free_port`` has a race: between its check and the workers' bind, another process (under pytest-xdist,
    often another test's gloo connections) may take the port, and the rendezvous then dies. Once in a
    clean-clone CI run a worker aborted before any check ("terminate called without an active exception"),
    most likely this. A start that died before any rank recorded
    a check is therefore retried on a new port, up to ``RENDEZVOUS_ATTEMPTS`` times; a worker that died
    after recording checks is a real failure and is re-raised at once.
    """
    for attempt in range(1, RENDEZVOUS_ATTEMPTS + 1):
        try:
            mp.spawn(worker, args=(free_port(), result_dir, *args), nprocs=world, join=True)
            break
        except ProcessException:
            if _any_verdict(result_dir, world) or attempt == RENDEZVOUS_ATTEMPTS:
                raise
            for rank in range(world):   # empty verdict files of the failed start
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(result_dir, f"rank{rank}.json"))
    return read_results(result_dir, world)


def assert_all_ranks_ok(per_rank: list, name: str, allow_skip: bool = False) -> None:
    """Assert that every rank recorded ``"ok"`` for ``name``; the failing rank's traceback is the message.

    With ``allow_skip``, an outcome ``"skip: <reason>"`` (a check the worker could not run, e.g. a kernel
    backend missing on this machine) skips the pytest test with that reason.
    """
    __tracebackhide__ = True  # a failure reads as the calling test's, with the worker traceback as message
    for rank, results in enumerate(per_rank):
        outcome = results.get(name)
        if allow_skip and isinstance(outcome, str) and outcome.startswith("skip: "):
            pytest.skip(outcome[len("skip: "):])
        assert outcome == "ok", f"rank {rank}, {name}:\n{outcome}"
