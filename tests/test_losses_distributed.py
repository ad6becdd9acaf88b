"""The losses' process-group paths with 2 real gloo processes on CPU.

Sequence parallel (``group``): each rank holds half of the latent frames of the same videos, split
inside a segment and at a segment boundary; loss, margins and the concatenated v_theta gradients must
equal the single-process result. Data parallel (``dp_group``): KTO's reference point must equal the
global-batch computation when ranks hold different numbers of videos. The all-reduce Function is
checked on its own (forward sum, backward identity).

The two processes are spawned once per module; each check runs in both and reports ``"ok"`` or its
traceback, and one pytest test per check asserts both ranks passed.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the spawned workers

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from helpers.distributed import (assert_all_ranks_ok, destroy_gloo, init_gloo, record, spawn_workers,  # noqa: E402
                                 worker_results)
from helpers.tolerances import SHARDED_LOSSES, assert_close_to_float64  # noqa: E402
from vidpo.kernels import dense_dpo_loss, dispatch, flow_matching_loss, kto_loss, reference  # noqa: E402
from vidpo.parallel import mappings  # noqa: E402

SEGMENT_IDS = [0, 0, 1, 1, 1, 2, 2]
SPLITS = {"inside_segment": 3, "segment_boundary": 2}  # rank 0 holds frames [0, split)
CPU_BACKENDS = ("torch", "triton", "cpp")


def assert_close(actual, expected, what, scale=1.0):
    """fp32 over 2 ranks against fp32 in one process (or the float64 reference): ``helpers.tolerances``."""
    assert_close_to_float64(actual, expected, torch.float32, SHARDED_LOSSES, scale=scale, what=what)


def frame_slice(rank, split, frames):
    return slice(0, split) if rank == 0 else slice(split, frames)


def inputs(seed, rows=4, shape=(3, 7, 5, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((rows,) + shape, generator=g) for _ in range(5)]


# ------------------------------------------------------------------------------------ checks (per rank)


def check_all_reduce_sum_forward_sum_backward_identity(rank, group):
    x = torch.tensor([rank + 1.0, 2.0 * rank], requires_grad=True)
    y = mappings.reduce_from_group(x, group)
    assert torch.equal(y.detach(), torch.tensor([3.0, 2.0])), y
    (y * torch.tensor([5.0, 7.0])).sum().backward()
    # Identity backward: the loss built from y is replicated, so each rank's x gets dL/dy once.
    assert torch.equal(x.grad, torch.tensor([5.0, 7.0])), x.grad


def check_dense_dpo_sequence_parallel(rank, group, backend, split_name, noise_form):
    v_theta, v_ref, target, x0, noise = inputs(seed=21)
    labels = torch.tensor([[1, 0, -1], [-1, 1, 1]])
    segment_ids = torch.tensor(SEGMENT_IDS)
    kwargs = dict(target=target) if noise_form is None else dict(target=None, x0=x0, noise=noise[:2])

    def run(t_slice, grp):
        v = v_theta[:, :, t_slice].clone().requires_grad_(True)
        local = {k: (None if t is None else t[:, :, t_slice].contiguous()) for k, t in kwargs.items()}
        out = dense_dpo_loss(v, v_ref[:, :, t_slice].contiguous(), local.pop("target"), labels,
                             segment_ids[t_slice], 30.0, group=grp, backend=backend, **local)
        out.loss.backward()
        return out, v.grad

    full, full_grad = run(slice(None), None)
    part = frame_slice(rank, SPLITS[split_name], v_theta.shape[2])
    sharded, grad = run(part, group)
    # Collectives first, assertions after: a failing rank must not leave the other in a collective.
    # Concatenate the shards along T (gloo's all_gather wants equal sizes: place and sum instead).
    concatenated = torch.zeros_like(full_grad)
    concatenated[:, :, part] = grad
    dist.all_reduce(concatenated, group=group)
    assert_close(sharded.loss, full.loss, "loss")
    assert_close(sharded.margin, full.margin, "margin", scale=30.0 * float(full.err_theta.max()))
    assert_close(sharded.err_theta, full.err_theta, "err_theta")
    assert_close(sharded.err_ref, full.err_ref, "err_ref")
    assert float(sharded.accuracy) == float(full.accuracy)
    assert_close(grad, full_grad[:, :, part], "grad shard", scale=float(full_grad.abs().max()))
    assert_close(concatenated, full_grad, "concatenated grad", scale=float(full_grad.abs().max()))


def check_kto_data_parallel_reference_point(rank, group, backend):
    """Rank 0 holds videos [0, 2), rank 1 videos [2, 5): z must be the 5-video batch's."""
    v_theta, v_ref, target, _, _ = inputs(seed=5, rows=5)
    v_ref = v_ref * 1.05  # makes the global mean reward positive, so the clamp at 0 is not trivial
    desirable = torch.tensor([True, False, True, True, False])
    beta, lambda_d, lambda_u = 15.0, 1.0, 1.5
    full = reference.kto_loss_reference(v_theta.double(), v_ref.double(), target.double(), desirable, beta,
                                        lambda_d=lambda_d, lambda_u=lambda_u)
    rows = slice(0, 2) if rank == 0 else slice(2, 5)
    v = v_theta[rows].clone().requires_grad_(True)
    out = kto_loss(v, v_ref[rows].contiguous(), target[rows].contiguous(), desirable[rows], beta,
                   lambda_d=lambda_d, lambda_u=lambda_u, dp_group=group, backend=backend)
    out.loss.backward()
    assert float(full.ref_point) > 0
    assert_close(out.ref_point, full.ref_point.float(), "global reference point")
    assert_close(out.reward, full.reward[rows].float(), "rewards")
    # Local loss: this rank's videos against the global reference point.
    g, z = full.reward[rows], full.ref_point
    expected = torch.where(desirable[rows], lambda_d * (1 - torch.sigmoid(beta * (g - z))),
                           lambda_u * (1 - torch.sigmoid(beta * (z - g)))).mean()
    assert_close(out.loss, expected.float(), "local loss with the global reference point")


def check_kto_and_flow_matching_sequence_parallel(rank, group, backend):
    v_theta, v_ref, target, _, _ = inputs(seed=9, rows=3)
    desirable = torch.tensor([True, False, True])
    weights = torch.tensor([0.5, 2.0, 1.0])
    part = frame_slice(rank, SPLITS["inside_segment"], v_theta.shape[2])

    def run(t_slice, grp):
        v = v_theta[:, :, t_slice].clone().requires_grad_(True)
        kto = kto_loss(v, v_ref[:, :, t_slice].contiguous(), target[:, :, t_slice].contiguous(), desirable, 10.0,
                       group=grp, backend=backend)
        fm = flow_matching_loss(v, target[:, :, t_slice].contiguous(), group=grp, backend=backend, row_weights=weights)
        (kto.loss + fm).backward()
        return kto.loss, fm, v.grad

    kto_full, fm_full, grad_full = run(slice(None), None)
    kto_part, fm_part, grad_part = run(part, group)
    assert_close(kto_part, kto_full, "kto loss")
    assert_close(fm_part, fm_full, "flow matching loss")
    assert_close(grad_part, grad_full[:, :, part], "grad shard", scale=float(grad_full.abs().max()))


def checks():
    """{name: (function, extra args)} of every check; backends filtered per process."""
    out = {"all_reduce_sum": (check_all_reduce_sum_forward_sum_backward_identity, ())}
    for backend in CPU_BACKENDS:
        for split in SPLITS:
            out[f"dense_dpo[{backend}-{split}]"] = (check_dense_dpo_sequence_parallel, (backend, split, None))
        out[f"dense_dpo[{backend}-x0_noise]"] = (
            check_dense_dpo_sequence_parallel, (backend, "inside_segment", "shared"))
        out[f"kto_dp[{backend}]"] = (check_kto_data_parallel_reference_point, (backend,))
        out[f"kto_fm_sp[{backend}]"] = (check_kto_and_flow_matching_sequence_parallel, (backend,))
    return out


def worker(rank, port, result_dir):
    os.environ.setdefault("VIDPO_POISON_OUTPUTS", "1")
    with worker_results(rank, result_dir, teardown=destroy_gloo) as results:
        init_gloo(rank, port)
        group = dist.group.WORLD
        for name, (fn, args) in checks().items():
            backend = args[0] if args else "torch"
            ok, reason = dispatch.backend_status(backend, "cpu")
            if not ok:   # the same on both ranks, so neither waits at the barrier below
                results[name] = "skip: " + reason
                continue
            record(results, name, fn, rank, group, *args)
            dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_workers(worker, str(tmp_path_factory.mktemp("dist")))


@pytest.mark.parametrize("name", list(checks()))
def test_two_process_gloo(results, name):
    assert_all_ranks_ok(results, name, allow_skip=True)
