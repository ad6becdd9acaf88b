"""Communication primitives (vidpo.parallel.mappings) with 2 real gloo processes.

One check per autograd Function: its forward against the collective computed from the global tensor, and
its backward against the dual collective, in float64 (each rank builds the global tensors from a shared
seed and takes its part). The two processes are spawned once; one pytest test per check asserts both
ranks passed. (The megatron-core CPU shim is checked in test_distributed_training.py, whose workers start
megatron-core anyway.)
"""
import pytest
import torch
import torch.distributed as dist

from helpers.distributed import (WORLD, assert_all_ranks_ok, destroy_gloo, init_gloo, record, set_torchrun_env,
                                 spawn_workers, worker_results)
from helpers.tolerances import FLOAT64_REARRANGED, assert_close
from vidpo.parallel import mappings


def tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes]


def close(actual, expected, what):
    assert_close(actual, expected, FLOAT64_REARRANGED, what)


# ----------------------------------------------------------------------------------- checks (per rank)
def check_copy_to_group(rank, group):
    x, = tensors((3, 4))
    w = tensors((2, 3, 4), seed=1)[0]          # each rank's consumer weights differently
    x = x.clone().requires_grad_(True)
    y = mappings.copy_to_group(x, group)
    close(y.detach(), x.detach(), "forward is the identity")
    (y * w[rank]).sum().backward()
    close(x.grad, w.sum(0), "backward all-reduces the partial gradients")


def check_reduce_from_group(rank, group):
    parts, w = tensors((2, 3, 4), (3, 4))
    x = parts[rank].clone().requires_grad_(True)
    y = mappings.reduce_from_group(x, group)
    close(y.detach(), parts.sum(0), "forward sums over ranks")
    (y * w).sum().backward()
    close(x.grad, w, "backward is the identity")


def check_scatter_to_group(rank, group):
    x, w = tensors((3, 6, 2), (3, 6, 2))
    x = x.clone().requires_grad_(True)
    y = mappings.scatter_to_group(x, 1, group)
    close(y.detach(), x.detach()[:, 3 * rank:3 * rank + 3], "forward keeps this rank's chunk")
    (y * w[:, 3 * rank:3 * rank + 3]).sum().backward()
    close(x.grad, w, "backward all-gathers the chunk gradients")


def check_gather_from_group(rank, group):
    full, w = tensors((3, 6, 2), (3, 6, 2))
    x = full[:, 3 * rank:3 * rank + 3].clone().requires_grad_(True)
    y = mappings.gather_from_group(x, 1, group)
    close(y.detach(), full, "forward all-gathers in rank order")
    (y * w).sum().backward()                    # a replicated consumer
    close(x.grad, w[:, 3 * rank:3 * rank + 3], "backward keeps this rank's chunk")


def check_reduce_scatter_to_group(rank, group):
    parts, w = tensors((2, 2, 4, 3), (2, 4, 3))
    x = parts[rank].clone().requires_grad_(True)
    y = mappings.reduce_scatter_to_group(x, 1, group)
    close(y.detach(), parts.sum(0)[:, 2 * rank:2 * rank + 2], "forward: chunk of the sum")
    (y * w[:, 2 * rank:2 * rank + 2]).sum().backward()
    close(x.grad, w, "backward all-gathers")


def check_all_gather_to_group(rank, group):
    full, w = tensors((4, 3), (2, 4, 3))
    x = full[2 * rank:2 * rank + 2].clone().requires_grad_(True)
    y = mappings.all_gather_to_group(x, 0, group)
    close(y.detach(), full, "forward all-gathers")
    (y * w[rank]).sum().backward()              # a rank-partial consumer (its own columns)
    close(x.grad, w.sum(0)[2 * rank:2 * rank + 2], "backward reduce-scatters")


def check_all_to_all_group(rank, group):
    full, w = tensors((2, 4, 6, 3), (2, 4, 6, 3))     # (B, heads, n, d)
    x = full[:, :, 3 * rank:3 * rank + 3].clone().requires_grad_(True)   # sequence-sharded
    y = mappings.sequence_to_heads(x, group)
    close(y.detach(), full[:, 2 * rank:2 * rank + 2], "forward: head chunk, whole sequence")
    close(mappings.heads_to_sequence(y.detach(), group), x.detach(), "heads_to_sequence inverts it")
    (y * w[:, 2 * rank:2 * rank + 2]).sum().backward()
    close(x.grad, w[:, :, 3 * rank:3 * rank + 3], "backward: the inverse all-to-all")


CHECKS = {
    "CopyToGroup": check_copy_to_group,
    "ReduceFromGroup": check_reduce_from_group,
    "ScatterToGroup": check_scatter_to_group,
    "GatherFromGroup": check_gather_from_group,
    "ReduceScatterToGroup": check_reduce_scatter_to_group,
    "AllGatherToGroup": check_all_gather_to_group,
    "AllToAllGroup": check_all_to_all_group,
}


def check_uneven_split_error(rank, group):
    """A size that does not divide is refused on every rank before any collective starts."""
    with pytest.raises(ValueError, match="not divisible by the group size 2"):
        mappings.reduce_scatter_to_group(torch.zeros(2, 3, 4), 1, group)


CHECKS["uneven_split_error"] = check_uneven_split_error


def worker(rank, port, result_dir):
    set_torchrun_env(rank, port)
    with worker_results(rank, result_dir, teardown=destroy_gloo) as results:
        init_gloo(rank, port)
        group = dist.new_group(list(range(WORLD)))
        for name, fn in CHECKS.items():
            record(results, name, fn, rank, group)
            dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_workers(worker, str(tmp_path_factory.mktemp("mappings")))


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_process_gloo(results, name):
    assert_all_ranks_ok(results, name)


def test_single_rank_is_identity():
    """Without a process group every primitive returns its input (single-process runs pay nothing)."""
    x = torch.randn(2, 4, 6, 3)
    for out in (mappings.copy_to_group(x, None), mappings.reduce_from_group(x, None),
                mappings.scatter_to_group(x, 1, None), mappings.gather_from_group(x, 1, None),
                mappings.reduce_scatter_to_group(x, 1, None), mappings.all_gather_to_group(x, 1, None),
                mappings.all_to_all(x, 1, 2, None)):
        assert out is x
