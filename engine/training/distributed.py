"""Process groups of a multi-process run and the helpers the training loop needs from them.

A run started by ``torchrun`` (``WORLD_SIZE > 1`` in the environment) gets a ``ParallelContext``:

  layout      world = dp * cp * tp, dp = dp_replicate * dp_shard; rank = tp_rank + tp * (cp_rank + cp * dp_rank)
              (megatron-core's default order "tp-cp-ep-dp-pp": TP ranks are adjacent, so they share a node)
  groups      tp / cp / dp / dp_cp from megatron-core's ``parallel_state``; a DeviceMesh
              (dp_replicate, dp_shard * cp, tp) over the same ranks for FSDP2 and for checkpoint DTensors
              (checked against megatron's groups at start-up)
  data        DP rank r takes rows [r * B / dp, (r + 1) * B / dp) of every global micro-batch; CP rank c
              holds latent frames [c * T / cp, (c + 1) * T / cp) (ParallelVideoDiT.local_frames)
  gradients   the loss each rank backpropagates is the global loss (objectives all-reduce it over DP), so
              the gradient is the SUM of the per-rank gradients over DP and CP (FSDP with divide factor 1,
              or ``sync_replicated_grads`` when parameters are not sharded); TP ranks need no reduction

CPU shim. megatron-core was written for GPUs: its sequence-parallel all-gather buffers are allocated on
``torch.cuda.current_device()`` and its RNG tracker (``model_parallel_cuda_manual_seed``) reads and writes
the CUDA generator. On a CPU-only run (the tests: gloo, 2 processes) ``install_cpu_shim`` gives megatron-core
(and only megatron-core: the name ``torch`` inside its modules is replaced by a view whose ``.cuda`` differs)
a stand-in where ``current_device()`` is the CPU and the CUDA RNG state is that of a private CPU
``torch.Generator``. Nothing else in the process changes; ``remove_cpu_shim`` undoes it. The stand-in
generator is bookkeeping only: vidpo's DiT has no dropout, so no megatron op draws from it.
"""
from __future__ import annotations

import datetime
import importlib
import logging
import os
import types
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from vidpo.parallel import mappings

log = logging.getLogger("vidpo")

MEGATRON_INSTALL = "pip install --no-deps megatron-core==0.16.1  (or: pip install -e '.[dist]')"


class DistributedSetupError(RuntimeError):
    """A parallel layout that cannot run with this world size / model, or a missing dependency."""


# ----- layout arithmetic (pure; also used by vidpo.cluster.launch and vidpo.cluster.scale) --------------------------------------
@dataclass(frozen=True)
class Layout:
    """Sizes of a parallel layout; ``world = dp_replicate * dp_shard * cp * tp``."""

    world: int
    tp: int
    cp: int
    dp: int
    dp_shard: int
    sp: bool

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.dp_shard

    @property
    def fsdp(self) -> bool:
        """Parameters are sharded (FSDP2) over dp_shard * cp ranks."""
        return self.dp_shard > 1

    @property
    def fsdp_size(self) -> int:
        return self.dp_shard * self.cp if self.fsdp else 1


def resolve_layout(world: int, parallel, *, num_heads: Optional[int] = None, frames: Optional[int] = None) -> Layout:
    """Check ``parallel`` (a ParallelConfig) against a world size (and the model's heads / latent frames
    after temporal patching when given) with the rules the recipe loader applies (``layout_problems``);
    return the sizes. Errors name the field and what would fit."""
    tp, cp = int(parallel.tp), int(parallel.cp)
    if tp < 1 or cp < 1:
        raise DistributedSetupError(f"parallel.tp={tp} and parallel.cp={cp} must be >= 1")
    problems = parallel.layout_problems(world, num_heads=num_heads, frames=frames)
    if problems:
        raise DistributedSetupError("; ".join(problems))
    dp = world // (tp * cp)
    dp_shard = dp if int(parallel.dp_shard) in (-1, 0) else int(parallel.dp_shard)
    if dp_shard < 1:
        raise DistributedSetupError(f"parallel.dp_shard={parallel.dp_shard} must divide the data-parallel size "
                                    f"{dp} (= world {world} / (tp {tp} * cp {cp})); use -1 for all of it")
    sp = bool(parallel.sp)
    if sp and tp == 1:
        log.warning("parallel.sp=true has no effect with parallel.tp=1; running without sequence parallel")
        sp = False
    return Layout(world=world, tp=tp, cp=cp, dp=dp, dp_shard=dp_shard, sp=sp)


def torchrun_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) from the torchrun environment; (1, 0, 0) outside torchrun."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


# ----- the CPU shim ----------------------------------------------------------------------------------------
class _CpuCudaStandIn:
    """What megatron-core sees as ``torch.cuda`` on a CPU-only run (see the module docstring)."""

    def __init__(self):
        self.generator = torch.Generator()
        self.random = self  # megatron also calls torch.cuda.random.get_rng_state

    def current_device(self):
        return torch.device("cpu")

    def is_available(self) -> bool:
        return False

    def synchronize(self, device=None) -> None:
        pass

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        self.generator.set_state(state)

    def manual_seed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    manual_seed_all = manual_seed

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchView(types.ModuleType):
    """``torch`` with ``.cuda`` replaced; every other attribute is the real one."""

    def __init__(self, cuda):
        super().__init__("torch")
        self.cuda = cuda

    def __getattr__(self, name):
        return getattr(torch, name)


_SHIM: Optional[dict] = None
_SHIMMED_MODULES = ("megatron.core.utils", "megatron.core.parallel_state", "megatron.core.tensor_parallel.layers",
                    "megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.random")


def install_cpu_shim() -> bool:
    """Give megatron-core a CPU stand-in for ``torch.cuda`` (only when CUDA is absent); idempotent.
    Returns True when the shim is in place."""
    global _SHIM
    if torch.cuda.is_available():
        return False
    if _SHIM is not None:
        return True

    _import_megatron()
    stand_in = _CpuCudaStandIn()
    view = _TorchView(stand_in)
    saved = {}
    for name in _SHIMMED_MODULES:
        module = importlib.import_module(name)
        saved[(module, "torch")] = module.torch
        module.torch = view
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    # These two bound torch.cuda's generator internals at import time (_lazy_call, default_generators).
    for fn_name, replacement in (
            ("_get_cuda_rng_state", lambda device="cuda", clone=False, graph_safe=False: stand_in.get_rng_state()),
            ("_set_cuda_rng_state", lambda new_state, device=-1, graph_safe=False: stand_in.set_rng_state(new_state))):
        saved[(random_mod, fn_name)] = getattr(random_mod, fn_name)
        setattr(random_mod, fn_name, replacement)
    _SHIM = {"saved": saved, "stand_in": stand_in}
    return True


def remove_cpu_shim() -> None:
    global _SHIM
    if _SHIM is None:
        return
    for (module, attr), value in _SHIM["saved"].items():
        setattr(module, attr, value)
    _SHIM = None


def cpu_shim_generator() -> Optional[torch.Generator]:
    """The stand-in CUDA generator while the shim is installed (for tests), else None."""
    return None if _SHIM is None else _SHIM["stand_in"].generator


def _import_megatron():
    try:
        with warnings.catch_warnings():
            # Import-time notices about Transformer Engine / Apex being absent and torch.cuda.amp deprecations.
            warnings.simplefilter("ignore")
            from megatron.core import parallel_state, tensor_parallel  # noqa: F401
    except ImportError as exc:
        raise DistributedSetupError(f"parallel layouts need megatron-core ({exc}); install it with "
                                    f"{MEGATRON_INSTALL}") from None
    return parallel_state


# ----- the context -------------------------------------------------------------------------------------------
@dataclass
class ParallelContext:
    """A started multi-process run: its layout, its process groups and this rank's coordinates."""

    layout: Layout
    rank: int
    local_rank: int
    device: torch.device
    tp_group: object
    cp_group: object
    dp_group: object
    dp_cp_group: object
    mesh: object            # DeviceMesh (dp_replicate, dp_shard_cp, tp)
    fsdp_param_dtype: torch.dtype = torch.float32
    cpu_offload: bool = False   # parallel.cpu_offload: FSDP2's CPUOffloadPolicy (models' apply_fsdp)

    @property
    def world_size(self) -> int:
        return self.layout.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def cp(self) -> int:
        return self.layout.cp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def sp(self) -> bool:
        return self.layout.sp

    @property
    def tp_rank(self) -> int:
        return mappings.group_rank(self.tp_group)

    @property
    def cp_rank(self) -> int:
        return mappings.group_rank(self.cp_group)

    @property
    def dp_rank(self) -> int:
        return mappings.group_rank(self.dp_group)

    @property
    def fsdp_mesh(self):
        """The mesh FSDP2 shards over: 1-D (dp_shard_cp) or 2-D (dp_replicate, dp_shard_cp) for HSDP."""
        if not self.layout.fsdp:
            return None
        if self.layout.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard_cp"]
        return self.mesh["dp_shard_cp"]

    @property
    def tp_mesh(self):
        return self.mesh["tp"]

    def dp_rows(self, batch: int) -> slice:
        """This DP rank's rows of a global batch of ``batch`` items."""
        if batch % self.dp:
            raise DistributedSetupError(f"train.batch_size={batch} is not divisible by the data-parallel size "
                                        f"{self.dp}: every rank must take an equal share of the global batch")
        share = batch // self.dp
        return slice(self.dp_rank * share, (self.dp_rank + 1) * share)

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def _group_ranks(group) -> list[int]:
    return sorted(dist.get_process_group_ranks(group))


def init_distributed(parallel, *, num_heads: Optional[int] = None, frames: Optional[int] = None,
                     seed: int = 0) -> Optional[ParallelContext]:
    """Start (or re-layout) the process groups of a torchrun run; None for a single process.

    Reads WORLD_SIZE / RANK / LOCAL_RANK, initialises torch.distributed (nccl on CUDA, gloo on CPU, or
    ``parallel.backend``), megatron-core's ``parallel_state`` (re-initialised when called again with another
    layout), the FSDP/checkpoint DeviceMesh, and megatron's model-parallel RNG tracker.
    """
    world, rank, local_rank = torchrun_env()
    if world == 1:
        if parallel.tp * parallel.cp > 1:
            raise DistributedSetupError(
                f"parallel.tp={parallel.tp}, parallel.cp={parallel.cp} need {parallel.tp * parallel.cp} processes; "
                f"start the run with torchrun --nproc-per-node {parallel.tp * parallel.cp} -m vidpo ...")
        if parallel.cpu_offload:
            raise DistributedSetupError("parallel.cpu_offload offloads FSDP's parameter shards and needs more than "
                                        "one process: start the run with torchrun (or set it to false)")
        return None
    layout = resolve_layout(world, parallel, num_heads=num_heads, frames=frames)
    use_cuda = torch.cuda.is_available() and os.environ.get("VIDPO_DEVICE", "") != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=parallel.timeout_minutes))
    if not use_cuda:
        install_cpu_shim()
        # megatron-core asks for this to order its async TP collectives on CUDA streams; meaningless on CPU.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    ps = _import_megatron()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, context_parallel_size=layout.cp,
                                 distributed_timeout_minutes=parallel.timeout_minutes,
                                 create_gloo_process_groups=False)

    mesh = init_device_mesh(device.type, (layout.dp_replicate, layout.dp_shard * layout.cp, layout.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard_cp", "tp"))
    ctx = ParallelContext(layout=layout, rank=rank, local_rank=local_rank, device=device,
                          tp_group=ps.get_tensor_model_parallel_group(), cp_group=ps.get_context_parallel_group(),
                          dp_group=ps.get_data_parallel_group(),
                          dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True), mesh=mesh,
                          fsdp_param_dtype={"float32": torch.float32,
                                            "bfloat16": torch.bfloat16}[parallel.fsdp_param_dtype],
                          cpu_offload=parallel.cpu_offload)
    # The mesh is built from rank arithmetic, megatron's groups from its rank generator: they must agree.
    if _group_ranks(mesh.get_group("tp")) != _group_ranks(ctx.tp_group):
        raise DistributedSetupError("DeviceMesh and megatron-core disagree on the tensor-parallel ranks")
    shard_cp = _group_ranks(mesh.get_group("dp_shard_cp"))
    if not set(shard_cp) <= set(_group_ranks(ctx.dp_cp_group)):
        raise DistributedSetupError("DeviceMesh and megatron-core disagree on the data/context-parallel ranks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    if rank != 0:
        log.setLevel(logging.WARNING)  # one rank reports progress; warnings and errors still show everywhere
    log.info("distributed: world %d = dp %d (shard %d x replicate %d) x cp %d x tp %d%s, backend %s, device %s",
             world, layout.dp, layout.dp_shard, layout.dp_replicate, layout.cp, layout.tp,
             " + sp" if layout.sp else "", backend, device.type)
    return ctx


def shutdown() -> None:
    """Tear down megatron's groups and the default process group (end of a torchrun run)."""
    if dist.is_available() and dist.is_initialized():
        ps = _import_megatron()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def finish() -> None:
    """``shutdown`` when this process started distributed work (end of a CLI command), else nothing."""
    if dist.is_available() and dist.is_initialized():
        shutdown()


# ----- gradients ------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def sync_replicated_grads(params: Iterable[torch.nn.Parameter], ctx: ParallelContext) -> None:
    """Sum gradients over the data x context-parallel ranks when parameters are not FSDP-sharded (FSDP
    reduce-scatters them itself during backward). One flat all-reduce per dtype."""
    if ctx.layout.fsdp or mappings.group_size(ctx.dp_cp_group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.dp_cp_group)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """Global gradient 2-norm of the whole (unsharded, single-device) model, and clipping by it, as
    ``torch.nn.utils.clip_grad_norm_`` does on one process.

    norm^2 = sum over FSDP shards (all-reduced over dp_shard_cp; replicate ranks hold copies) of
             [ TP-sharded parameters: summed over TP ranks  +  TP-replicated parameters: counted once ].
    The TP-sharded parameters are those named in ``model.tp_plan`` (FSDP replaces parameter objects, so
    megatron-core's per-parameter attributes do not survive it; names do).
    """
    plan = getattr(model, "tp_plan", {}) if ctx.tp > 1 else {}
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    params = [p for _, p in named]
    sharded = torch.zeros((), dtype=torch.float64, device=ctx.device)
    replicated = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for name, p in named:
        sq = _local(p.grad).detach().double().pow(2).sum()
        if name in plan:
            sharded += sq
        else:
            replicated += sq
    both = torch.stack([sharded, replicated])
    if ctx.layout.fsdp:
        dist.all_reduce(both, group=ctx.mesh.get_group("dp_shard_cp"))
    if ctx.tp > 1:
        tp_part = both[0].clone()
        dist.all_reduce(tp_part, group=ctx.tp_group)
        both[0] = tp_part
    total = both.sum().sqrt().to(torch.float32)
    clip_coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if torch.isfinite(total):
        for p in params:
            # device too: under parallel.cpu_offload the gradient shards live in host memory.
            _local(p.grad).mul_(clip_coef.to(device=_local(p.grad).device, dtype=p.grad.dtype))
    return total


# ----- metrics -------------------------------------------------------------------------------------------------
def weighted_means(values: dict[str, tuple[float, float]], group, device=None) -> dict[str, float]:
    """``{name: sum_r value_r * weight_r / sum_r weight_r}`` over ``group`` in one all-reduce (float64,
    on ``device``: NCCL reduces CUDA tensors only); a name whose total weight is 0 gets 0.0."""
    if not values:
        return {}
    names = sorted(values)
    packed = torch.tensor([[values[n][0] * values[n][1], values[n][1]] for n in names], dtype=torch.float64,
                          device=device)
    if mappings.group_size(group) > 1:
        dist.all_reduce(packed, group=group)
    packed = packed.cpu()
    row = {n: i for i, n in enumerate(names)}
    return {n: float(packed[row[n], 0] / packed[row[n], 1]) if packed[row[n], 1] != 0 else 0.0 for n in values}

