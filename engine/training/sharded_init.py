"""Building a multi-process run's initial models without a whole model on every rank (``parallel.init``).

Why: a model is split over ranks (TP / CP / FSDP) by its family's ``parallelize`` function, which takes a whole
single-device model. Loading that on every rank first costs, for a 14B Wan in bf16, 28 GB on every GPU before
the split, twice that with a frozen reference copy. ``parallel.init: rank0`` does what torchtitan's meta-device
init and accelerate's ``cpu_ram_efficient_loading`` do:

1. rank 0 loads the initial policy into host memory, exactly as one process does (``load_initial_policy``, then
   the recipe's LoRA adapters); every other rank builds the same modules on the ``meta`` device (no storage):
   the DiT's constructor, or diffusers' ``Class.from_config(config.json)`` in the adapter a model directory
   gives (no transformer weights are read there);
2. rank 0 sends a description of its model (tensor names, shapes, dtypes, train / eval and requires_grad
   flags); every rank checks its skeleton against it and takes the flags;
3. every rank (rank 0 too, on its own meta skeleton) lays the skeleton out with the family's ``parallelize``
   and allocates only its own shards with ``to_empty`` on its device;
4. the weights arrive from rank 0, one tensor at a time: torch.distributed.checkpoint's
   ``set_model_state_dict(model, full_sd, StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))``
   broadcasts each tensor and keeps this rank's FSDP chunk of it. Tensors that tensor parallel splits are held
   by megatron-core layers as plain tensors of the TP shard's shape, which that function cannot know how to
   cut, so they are broadcast here and cut with the model's own ``tp_plan`` (``TPShard``), then FSDP-chunked.
   Non-persistent buffers (Wan's rotary tables, CogVideoX's sincos table) are in no state dict: rank 0
   broadcasts its own;
5. a frozen reference copy gets the same treatment (a deepcopy of the meta skeleton costs nothing); with
   ``reference_weights`` rank 0 loads those into its host copy after the policy's weights have left it, so no
   rank ever holds a second whole model.

The result equals ``parallel.init: full`` (every rank loads and splits) bit for bit: shards, buffers, flags and
the global random generators' states. Two things make the last part work. LoRA factors are drawn from the global
generator of the device 'full' loads the policy on (``parallel.device``), so rank 0 draws them there although its
base weights are in host memory (``_apply_lora_drawn_on``). And loading draws from the generators too (diffusers'
``from_pretrained`` makes some parameters with ``torch.randn`` before loading over them): under 'full' every rank
draws alike, so when the ranks enter alike (the run seeds them with ``seed_everything``), rank 0 hands its
generators' states to the others at the end.

The 'full' path is kept beside it (``parallel.init: full``): the same function, every rank loading on its device.

Each rank's summary is gathered on rank 0 and logged, one line per rank ("init rank0: rank 1 built on meta,
received 58 tensors (1.2 MiB) for 2 models, holds 0.6 MiB of them on cpu").
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import distribute_tensor

from vidpo.config import ConfigError
from vidpo.config.cluster import ParallelInit
from vidpo.models.lora import apply_lora, lora_modules, mark_only_lora_trainable
from vidpo.training import checkpoint as ckpt

log = logging.getLogger("vidpo")
INIT_MODES = get_args(ParallelInit)
SOURCE = 0                        # the rank that loads
MiB = 2 ** 20

LayOut = Callable[[nn.Module], nn.Module]


def init_parallel_models(parallel, *, init: str, load: Callable[[str | torch.device], nn.Module],
                         skeleton: Callable[[], nn.Module], lay_out: LayOut, lora: Optional[dict] = None,
                         lay_out_reference: Optional[LayOut] = None, reference_weights=None,
                         offloaded: bool = False) -> tuple[nn.Module, Optional[nn.Module]]:
    """``(policy, frozen reference or None)``, laid out over ``parallel`` (a ``ParallelContext``), built as
    ``init`` (``parallel.init``) says: 'full' (every rank loads) or 'rank0' (module docstring).

    ``load(device)`` is the initial policy, loaded on ``device`` (``vidpo.training.modeling.load_initial_policy``);
    ``skeleton()`` the same modules on the meta device (``modeling.meta_policy``); ``lay_out(model) -> model``
    splits the policy (the family's parallelize function with the run's options); ``lora``: ``apply_lora``'s
    arguments (the recipe's lora section), after which only the adapters train; ``lay_out_reference``: also build
    a frozen copy of the policy (eval, no gradients), holding ``reference_weights`` when given, split by this
    function; ``offloaded``: the layouts use FSDP2's CPU offload, whose shards must be materialised in host
    memory. The builders are passed in, not imported, so this module sits below the one that knows the models."""
    if init not in INIT_MODES:
        raise ConfigError(f"parallel.init must be one of {list(INIT_MODES)}, got {init!r}")
    if init == "full":
        return _init_full(parallel, load, lay_out, lora, lay_out_reference, reference_weights)
    return _init_rank0(parallel, load, skeleton, lay_out, lora, lay_out_reference, reference_weights, offloaded)


def _init_full(parallel, load, lay_out, lora, lay_out_reference, reference_weights):
    full = load(parallel.device)
    if lora is not None:
        apply_lora(full, **lora)
        mark_only_lora_trainable(full)
    frozen = copy.deepcopy(full).eval().requires_grad_(False) if lay_out_reference is not None else None
    if frozen is not None and reference_weights is not None:   # whole weights, before they are split
        ckpt.load_weights(frozen, reference_weights)
    model = lay_out(full)
    return model, (lay_out_reference(frozen) if frozen is not None else None)


def _init_rank0(parallel, load, skeleton_of, lay_out, lora, lay_out_reference, reference_weights, offloaded):
    rank = dist.get_rank()
    alike = _generators_alike(parallel.device)
    source = skeleton = described = error = None
    try:
        source = load("cpu") if rank == SOURCE else None
        skeleton = skeleton_of()
        if lora is not None:
            if source is not None:
                _apply_lora_drawn_on(source, lora, parallel.device)
                mark_only_lora_trainable(source)
            apply_lora(skeleton, **lora)      # on meta: draws nothing
            mark_only_lora_trainable(skeleton)
    except Exception as exc:   # re-raised below, on every rank, so that none waits in a collective
        error = exc
    _agree(error, "build the initial policy")
    described = _broadcast_object(_describe(source) if source is not None else None)
    try:
        _match(skeleton, described)
    except ConfigError as exc:
        error = exc
    _agree(error, "match rank 0's policy")
    reference = None
    if lay_out_reference is not None:
        reference = copy.deepcopy(skeleton).eval().requires_grad_(False)   # meta: a copy of nothing

    stats = _Stats()
    model = _materialise(lay_out(skeleton), parallel, offloaded)
    _receive(model, _source_state(source), described, parallel, stats, offloaded)
    frozen = None
    if reference is not None:
        if source is not None and reference_weights is not None:
            ckpt.load_weights(source, reference_weights)   # the policy's weights have left: overwrite in place
        frozen = _materialise(lay_out_reference(reference), parallel, offloaded)
        _receive(frozen, _source_state(source), described, parallel, stats, offloaded)
    del source
    if alike:
        _set_generators(_broadcast_object(_generators(parallel.device) if rank == SOURCE else None), parallel.device)
    _report(stats, parallel, rank, models=2 if frozen is not None else 1)
    return model, frozen


# ----- random generators --------------------------------------------------------------------------------------
def _generators(device) -> list[torch.Tensor]:
    """The global generators' states: the CPU one, and the device's."""
    states = [torch.get_rng_state()]
    if torch.device(device).type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_generators(states: list[torch.Tensor], device) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


def _generators_alike(device) -> bool:
    """Whether every rank's generators are in the same state. Loading a model may draw from them (diffusers'
    ``from_pretrained`` makes some parameters with ``torch.randn`` before loading over them; the LoRA factors are
    drawn): under 'full' every rank draws the same, so a run that seeds its ranks alike (``seed_everything``) keeps
    them alike. Here rank 0 alone loads, and hands its generators' states on; ranks seeded differently keep their
    own (nothing here draws from them)."""
    digest = hashlib.sha256(b"".join(s.numpy().tobytes() for s in _generators(device))).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    return len(set(digests)) == 1


# ----- LoRA ------------------------------------------------------------------------------------------------
def _apply_lora_drawn_on(model: nn.Module, lora: dict, device) -> None:
    """``apply_lora`` with the adapters' initial values drawn on ``device`` (where 'full' loads the policy, and so
    draws them) although the base weights are in host memory: from that device's global generator, in the same
    order, so they equal one process's. A LoRALinear makes its factors on its base weight's device, so each linear
    layer's weight is swapped for a stand-in on ``device`` without storage (one element, expanded) while the
    adapters are made, then restored; the factors then move to the base weights' device."""
    real = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and isinstance(module._parameters.get("weight"), nn.Parameter):
            weight = module.weight
            stand_in = nn.Parameter(torch.empty((), device=device, dtype=weight.dtype).expand(weight.shape),
                                    requires_grad=weight.requires_grad)
            real[id(stand_in)] = (stand_in, weight)
            module.weight = stand_in
    apply_lora(model, **lora)
    for module in model.modules():
        held = module._parameters.get("weight")
        if held is not None and id(held) in real:
            module._parameters["weight"] = real[id(held)][1]
    for _, adapted in lora_modules(model):
        adapted.lora_A.to(adapted.weight.device)
        adapted.lora_B.to(adapted.weight.device)


# ----- what rank 0 describes and every rank checks ----------------------------------------------------------
def _source_state(source: Optional[nn.Module]) -> Optional[dict]:
    """Rank 0's tensors by name (references into its host model, no copy): the state dict and the
    non-persistent buffers."""
    if source is None:
        return None
    state = source.state_dict()
    state.update({name: buf for name, buf in source.named_buffers() if name not in state})
    return state


def _describe(source: nn.Module) -> dict:
    state = _source_state(source)
    persistent = source.state_dict().keys()
    return {"tensors": {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()},
            "buffers": [name for name in state if name not in persistent],
            "training": {name: m.training for name, m in source.named_modules()},
            "requires_grad": {name: p.requires_grad for name, p in source.named_parameters()}}


def _match(skeleton: nn.Module, described: dict) -> None:
    """Refuse a skeleton that differs from rank 0's model (names, shapes, dtypes), then give it rank 0's train /
    eval and requires_grad flags (diffusers' from_pretrained returns a model in eval mode, from_config does not)."""
    mine = skeleton.state_dict()
    mine.update({name: b for name, b in skeleton.named_buffers() if name not in mine})
    shapes = {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in mine.items()}
    theirs = {name: tuple(v) for name, v in described["tensors"].items()}
    if shapes != theirs:
        differ = sorted(set(shapes) ^ set(theirs)) or sorted(k for k in shapes if shapes[k] != theirs[k])
        raise ConfigError(f"parallel.init=rank0: the policy built on the meta device differs from the one rank 0 "
                          f"loaded ({len(differ)} tensors, e.g. {differ[:3]}); use parallel.init=full")
    modules = dict(skeleton.named_modules())
    for name, training in described["training"].items():
        if name in modules:   # modules without tensors (activations, dropout) may be named differently
            modules[name].training = training
    params = dict(skeleton.named_parameters())
    for name, grad in described["requires_grad"].items():
        params[name].requires_grad_(grad)


# ----- shards and their values ------------------------------------------------------------------------------
def _materialise(model: nn.Module, parallel, offloaded: bool) -> nn.Module:
    """Allocate this rank's shards (uninitialised) of a laid-out meta model. ``to_empty`` makes new Parameter
    objects: the attributes megatron-core sets on its shards (``partition_dim``, ...) are carried over. FSDP2's CPU
    offload wants its shards in host memory, and its buffers on the device (where ``fully_shard`` puts them)."""
    attributes = {name: dict(vars(p)) for name, p in model.named_parameters() if vars(p)}
    model.to_empty(device="cpu" if offloaded else parallel.device)
    for name, p in model.named_parameters():
        for key, value in attributes.get(name, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)
    return model


@dataclass
class _Stats:
    tensors: int = 0
    received: int = 0      # bytes that arrived (whole tensors)
    held: int = 0          # bytes this rank keeps of them (its shards)


def _receive(model: nn.Module, state: Optional[dict], described: dict, parallel, stats: _Stats,
             offloaded: bool) -> None:
    """Fill a materialised laid-out model with rank 0's tensors (``state`` on rank 0, None elsewhere)."""
    # Megatron-core's layers add an ``_extra_state`` entry (not a tensor) that no single-device model has.
    targets = {name: t for name, t in model.state_dict().items() if torch.is_tensor(t)}
    buffers = dict(model.named_buffers())
    expected = set(described["tensors"]) - set(described["buffers"])
    if set(targets) != expected:
        differ = sorted(set(targets) ^ expected)
        raise ConfigError(f"parallel.init=rank0: the laid-out model's tensors are not the loaded model's "
                          f"(e.g. {differ[:3]}); use parallel.init=full")
    plan = (getattr(model, "tp_plan", None) or {}) if parallel.tp > 1 else {}
    split = [name for name in described["tensors"] if name in plan]
    # Whole tensors that only FSDP may chunk: torch.distributed.checkpoint's broadcast, one tensor at a time.
    whole = {name: t for name, t in state.items() if name in targets and name not in plan} if state else {}
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=False))
    for name in expected - set(plan):
        _count(stats, described["tensors"][name], targets[name])
    # Tensor-parallel shards: this rank's TPShard of the whole tensor, then its FSDP chunk of that.
    for name in split:
        whole_tensor = _broadcast_tensor(state[name] if state else None, described["tensors"][name], parallel)
        spec = plan[name]
        _assign(targets[name], spec.shard(whole_tensor, parallel.tp_rank, parallel.tp))
        _count(stats, described["tensors"][name], targets[name])
    for name in described["buffers"]:
        if name not in buffers:
            raise ConfigError(f"parallel.init=rank0: buffer {name} of the loaded model is not in the laid-out model; "
                              "use parallel.init=full")
        _assign(buffers[name], _broadcast_tensor(state[name] if state else None, described["tensors"][name],
                                                 parallel))
        _count(stats, described["tensors"][name], buffers[name])
    if offloaded:
        # FSDP2's offload keeps parameter shards in host memory; the buffers go where the compute runs, as
        # fully_shard puts them (only now: set_model_state_dict wants the model's tensors on one device).
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(parallel.device)


def _broadcast_tensor(tensor: Optional[torch.Tensor], info, parallel) -> torch.Tensor:
    """Rank 0's whole ``tensor`` on every rank, on the device the process group communicates on."""
    shape, dtype = info
    if tensor is not None:
        out = tensor.detach().to(parallel.device).contiguous()
    else:
        out = torch.empty(shape, dtype=getattr(torch, dtype), device=parallel.device)
    dist.broadcast(out, src=SOURCE)
    return out


@torch.no_grad()
def _assign(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``target``: a plain tensor, or an FSDP DTensor (this rank's chunk of ``value``)."""
    if hasattr(target, "device_mesh"):
        chunk = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(chunk.to_local())
    else:
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def _count(stats: _Stats, info, target: torch.Tensor) -> None:
    shape, dtype = info
    size = getattr(torch, dtype).itemsize
    stats.tensors += 1
    stats.received += size * int(torch.Size(shape).numel())
    local = target.to_local() if hasattr(target, "to_local") else target
    stats.held += local.numel() * local.element_size()


def _report(stats: _Stats, parallel, rank: int, models: int) -> None:
    """One line per rank, logged by rank 0 (the other ranks log warnings only)."""
    how = "loaded on cpu, sent" if rank == SOURCE else "built on meta, received"
    line = (f"init rank0: rank {rank} {how} {stats.tensors} tensors ({stats.received / MiB:.1f} MiB) for {models} "
            f"model{'s' if models > 1 else ''}, holds {stats.held / MiB:.1f} MiB of them on {parallel.device}")
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if rank == SOURCE:
        for each in lines:
            log.info(each)


def _agree(error: Optional[Exception], what: str) -> None:
    """Raise on every rank when any rank failed (its own error where it failed), rather than leave the others
    waiting for it in the next collective until the process group's timeout."""
    failed = [None] * dist.get_world_size()
    dist.all_gather_object(failed, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, message in enumerate(failed):
        if message is not None:
            raise ConfigError(f"parallel.init=rank0: rank {rank} could not {what}: {message}")


def _broadcast_object(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=SOURCE)
    return box[0]
