"""Checkpoints of multi-process runs: torch.distributed.checkpoint (DCP), loadable at any world size.

A run with more than one rank writes ``RUN_DIR/checkpoints/step_NNNNNNN/`` with
  ``dcp/``               model weights and AdamW state, one file per rank + ``.metadata`` (DCP)
  ``model.safetensors``  the consolidated single-device weights (what ``sample``/``eval``/``init_from`` read)
  ``lora.safetensors``   adapters, when the policy has LoRA
  with ``train.ema_decay``, ``dcp/`` also holds the EMA shadow (``ema/<name>``) and ``model.safetensors`` and
  ``lora.safetensors`` the consolidated EMA weights (as single-process checkpoints, ``vidpo.training.ema``)
  ``trainer_state.pt``   LR schedule, optimizer hyper-parameters, step, loop state, RNG (rank 0)
  ``config.yaml``, ``meta.json``
filled under a temporary name by all ranks and renamed by rank 0 when every rank is done, exactly like
single-process checkpoints (``vidpo.training.checkpoint``), which keep their safetensors format.

The DCP layout is the single-device model's, independent of the run's TP / CP / FSDP split, so a
checkpoint written at one world size loads at another (and by one process without any process group):
  * every tensor is keyed by its single-device parameter name (``model/blocks.3.attn.qkv.weight``,
    ``optim/blocks.3.attn.qkv.weight/exp_avg``, ``.../exp_avg_sq``, ``.../step``);
  * tensors that tensor parallel splits (``vidpo.models.dit.parallelize.tp_plan``) are stored in their
    checkpoint view ``(.., parts, rows / parts, ..)`` so that a TP shard, fused [q; k; v] included, is one
    contiguous block: each TP rank saves a DTensor Shard(dim + 1) over the TP mesh;
  * FSDP shards are gathered one parameter at a time to the TP-local tensor before saving (transient
    memory: one parameter), so DCP sees only the TP split; replicated copies (DP / CP ranks) are
    deduplicated by DCP's planner.
Loading builds the same structure for the current layout, lets DCP read the overlapping pieces, and hands
each rank its TP shard, then its FSDP chunk.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from vidpo.config import ConfigError
from vidpo.models.dit.parallelize import tp_plan
from vidpo.training import checkpoint as ckpt
from vidpo.utils import atomic

DCP_DIR = "dcp"
OPTIM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def is_distributed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").exists()


# ----- tensors between layouts ----------------------------------------------------------------------------
def _plan(model) -> dict:
    return getattr(model, "tp_plan", None) or tp_plan(model)


def _tp_size(ctx) -> int:
    return 1 if ctx is None else ctx.tp


def _tp_local(t: torch.Tensor) -> torch.Tensor:
    """The TP-local tensor behind ``t``: FSDP DTensors are all-gathered (collective over the FSDP mesh)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _saved_value(name: str, tp_local: torch.Tensor, plan: dict, ctx):
    """What DCP stores for a parameter-shaped tensor: its checkpoint view, as a TP DTensor when split."""
    spec = plan.get(name)
    if spec is None:
        return tp_local.detach()
    view = spec.checkpoint_view(tp_local.detach())
    if _tp_size(ctx) == 1:
        return view

    return DTensor.from_local(view, ctx.tp_mesh, [Shard(spec.dim + 1)], run_check=False)


def _template(name: str, tp_local_shape: torch.Size, plan: dict, ctx, device) -> object:
    return _saved_value(name, torch.empty(tp_local_shape, device=device), plan, ctx)


def _from_saved(name: str, value, plan: dict) -> torch.Tensor:
    local = value.to_local() if hasattr(value, "to_local") else value
    spec = plan.get(name)
    return local if spec is None else local.flatten(spec.dim, spec.dim + 1)


def _assign(target: torch.Tensor, tp_local: torch.Tensor) -> None:
    """Copy a TP-local tensor into ``target``: a plain tensor, or an FSDP DTensor (this rank's chunk)."""
    with torch.no_grad():
        if hasattr(target, "device_mesh"):
            chunk = distribute_tensor(tp_local.to(target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
            target.to_local().copy_(chunk.to_local())
        else:
            target.copy_(tp_local.to(device=target.device, dtype=target.dtype))


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _step_tensor(optimizer, param, value: float) -> torch.Tensor:
    """AdamW's ``step`` the way its lazy init makes it (on the device for fused/capturable)."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    on_device = group.get("fused") or group.get("capturable")
    device = (param.device_mesh.device_type if hasattr(param, "device_mesh") else param.device) if on_device else "cpu"
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _state_for(optimizer, param) -> dict:
    state = optimizer.state[param]
    if not state:
        state["step"] = _step_tensor(optimizer, param, 0.0)
        for key in OPTIM_STATE_KEYS:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


# ----- consolidated weights -------------------------------------------------------------------------------
def consolidated_state(model, ctx, replace: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The single-device state dict (CPU) on rank 0, {} elsewhere. Collective: every rank must call it.

    ``replace`` maps parameter names to tensors laid out like those parameters (e.g. the EMA's shadow) that
    are consolidated in their place, cast to the parameter's dtype."""
    plan = _plan(model)
    out = {}
    for name, p in model.named_parameters():
        value = p.detach() if replace is None or name not in replace else replace[name].to(p.dtype)
        tp_local = _tp_local(value)
        spec = plan.get(name)
        if spec is not None and ctx.tp > 1:
            shards = [torch.empty_like(tp_local) for _ in range(ctx.tp)]
            dist.all_gather(shards, tp_local.contiguous(), group=ctx.tp_group)
            full = spec.unshard(shards)
        else:
            full = tp_local
        if ctx.is_main:
            out[name] = full.detach().to("cpu").clone()
    return out


# ----- save ----------------------------------------------------------------------------------------------
def save_distributed_checkpoint(run_dir: str | Path, step: int, *, model, optimizer, trainer_state: dict,
                                config_yaml: str, ctx, keep: int = 2, lora_metadata: Optional[dict] = None,
                                ema=None, suspect: Optional[str] = None, keep_before: Optional[int] = None) -> Path:
    """Write a step checkpoint from every rank (collective); returns its final path on every rank.

    With ``ema`` (a ``vidpo.training.ema.WeightEma`` over ``model``) its shadow goes into DCP under ``ema/<name>``
    (same layout as the weights) and ``model.safetensors`` holds the consolidated **EMA** weights, as in a
    single-process checkpoint; the optimizer's own weights stay in ``dcp/`` (``model/<name>``). ``suspect`` and
    ``keep_before`` as in ``vidpo.training.checkpoint.save_checkpoint``. ``checksums.json`` is written last:
    once every rank's files are on disk, the ranks hash a share of them each and rank 0 writes the table."""
    root = ckpt.checkpoint_root(run_dir)
    final = root / f"{ckpt.STEP_PREFIX}{step:07d}"
    plan = _plan(model)
    manager = None
    tmp = None
    if ctx.is_main:
        atomic.clean_leftovers(root)
        manager = atomic.atomic_dir(final)
        tmp = str(manager.__enter__())
    tmp = Path(ctx.broadcast_object(tmp))
    try:
        state = {"model": {}, "optim": {}}
        if ema is not None:
            state["ema"] = {name: _saved_value(name, _tp_local(shadow), plan, ctx)
                            for name, shadow in ema.shadow.items()}
        for name, p in model.named_parameters():
            state["model"][name] = _saved_value(name, _tp_local(p.detach()), plan, ctx)
            if p in optimizer.state and optimizer.state[p]:
                st = optimizer.state[p]
                entry = {key: _saved_value(name, _tp_local(st[key]), plan, ctx) for key in OPTIM_STATE_KEYS}
                entry["step"] = st["step"].detach().to("cpu").reshape(())
                state["optim"][name] = entry
        dcp.save(state, checkpoint_id=tmp / DCP_DIR)
        weights = consolidated_state(model, ctx, replace=ema.shadow if ema is not None else None)
        if ctx.is_main:
            atomic.save_safetensors(weights, tmp / "model.safetensors")
            lora = {f"base_model.model.{k}": v for k, v in weights.items() if ".lora_" in k}
            if lora:
                atomic.save_safetensors(lora, tmp / "lora.safetensors",
                                        metadata={k: str(v) for k, v in (lora_metadata or {}).items()})
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            extra = {"ema_updates": ema.updates} if ema is not None else {}
            atomic.torch_save(dict(trainer_state, step=step, rng=ckpt.rng_state(), optimizer_param_groups=groups,
                                   world_size=ctx.world_size, layout=vars(ctx.layout), **extra),
                              tmp / "trainer_state.pt")
            atomic.write_text(tmp / "config.yaml", config_yaml)
            atomic.write_json(tmp / "meta.json", ckpt.checkpoint_meta(step, suspect, world_size=ctx.world_size,
                                                                       format="dcp"))
        ctx.barrier()  # every rank's DCP files (and rank 0's others) are on disk before they are hashed
        names = ctx.broadcast_object(ckpt.checkpoint_files(tmp) if ctx.is_main else None)
        share = ckpt.checksum_entries(tmp, names[ctx.rank::ctx.world_size])
        shares = [None] * ctx.world_size
        dist.all_gather_object(shares, share)
        if ctx.is_main:
            ckpt.write_checksums(tmp, {k: v for part in shares for k, v in part.items()})
        ctx.barrier()  # rank 0 renames the directory once it is complete
    except BaseException:
        if manager is not None:
            manager.__exit__(*sys.exc_info())
        raise
    if manager is not None:
        manager.__exit__(None, None, None)
        atomic.write_text(root / "latest", final.name + "\n")
        ckpt.prune(root, keep, keep_before=keep_before)
    ctx.barrier()
    return final


# ----- load ----------------------------------------------------------------------------------------------
def check_ema_match(path: Path, has_ema: bool, wants_ema: bool) -> None:
    """A run resumes with the ``train.ema_decay`` it was started with (on or off), whatever its format."""
    if wants_ema and not has_ema:
        raise ConfigError(f"{path} was written without train.ema_decay (it holds no EMA weights); resume it "
                          "with the same train.ema_decay it was started with")
    if has_ema and not wants_ema:
        raise ConfigError(f"{path} was written with train.ema_decay > 0; resume it with the same train.ema_decay "
                          "it was started with")


def load_distributed_checkpoint(path: str | Path, *, model, optimizer=None, ctx=None, ema=None) -> dict:
    """Load a DCP checkpoint into ``model`` (a VideoDiT, or a ParallelVideoDiT under ``ctx``) and the
    AdamW state of ``optimizer``; returns rank 0's ``trainer_state.pt`` (also restoring the optimizer's
    hyper-parameters from it). Works without a process group (``ctx=None``, one process). ``ema`` (a
    ``WeightEma`` over ``model``) receives the checkpoint's EMA shadow, which must then be there."""
    path = Path(path)
    reader = dcp.FileSystemReader(str(path / DCP_DIR))
    saved_keys = set(reader.read_metadata().state_dict_metadata)
    plan = _plan(model)
    params = dict(model.named_parameters())
    state: dict = {"model": {}, "optim": {}}
    check_ema_match(path, any(k.startswith("ema.") for k in saved_keys), ema is not None)
    if ema is not None:
        state["ema"] = {}
        for name, shadow in ema.shadow.items():
            if f"ema.{name}" not in saved_keys:
                raise RuntimeError(f"{path}: checkpoint has no EMA weights for '{name}'")
            device = shadow.device_mesh.device_type if hasattr(shadow, "device_mesh") else shadow.device
            state["ema"][name] = _template(name, params[name].shape, plan, ctx, device)
    for name, p in params.items():
        key = f"model.{name}"
        if key not in saved_keys:
            if ".lora_" in name:
                continue  # adapters absent from the checkpoint keep their init (a base checkpoint)
            raise RuntimeError(f"{path}: checkpoint has no weights for '{name}' (model preset changed?)")
        device = p.device_mesh.device_type if hasattr(p, "device_mesh") else p.device
        state["model"][name] = _template(name, p.shape, plan, ctx, device)
        if optimizer is not None and p.requires_grad and f"optim.{name}.exp_avg" in saved_keys:
            entry = {k: _template(name, p.shape, plan, ctx, device) for k in OPTIM_STATE_KEYS}
            entry["step"] = torch.zeros((), dtype=torch.float32)
            state["optim"][name] = entry
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        # DCP announces that it assumes a single-process load when there is no process group: that is the point.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / DCP_DIR), no_dist=single)
    for name, value in state["model"].items():
        _assign(params[name], _from_saved(name, value, plan))
    trainer_state = ckpt.load_trainer_state(path)
    if ema is not None:
        for name, value in state["ema"].items():
            _assign(ema.shadow[name], _from_saved(name, value, plan))
        ema.updates = int(trainer_state["ema_updates"])
    if optimizer is not None:
        for name, entry in state["optim"].items():
            p = params[name]
            st = _state_for(optimizer, p)
            for key in OPTIM_STATE_KEYS:
                _assign(st[key], _from_saved(name, entry[key], plan))
            st["step"] = _step_tensor(optimizer, p, float(entry["step"]))
        for group, saved in zip(optimizer.param_groups, trainer_state.get("optimizer_param_groups", [])):
            group.update({k: v for k, v in saved.items() if k not in ("params", "fused", "foreach")})
    return trainer_state


def load_single_process_checkpoint(path: str | Path, *, model, optimizer=None, ctx=None, ema=None) -> dict:
    """Load a single-process checkpoint (model.safetensors + index-keyed AdamW state in trainer_state.pt)
    into a parallel model: each rank takes its TP shard and FSDP chunk. Returns the trainer state. With
    ``ema``, ``online.safetensors`` holds the weights and ``model.safetensors`` the EMA (vidpo.training.ema)."""
    path = Path(path)
    online = path / ckpt.ONLINE_WEIGHTS
    check_ema_match(path, online.exists(), ema is not None)
    full = ckpt.read_weights(online if ema is not None else ckpt.find_weights(path))
    plan = _plan(model)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in full and ".lora_" not in n]
    if missing:
        raise RuntimeError(f"{path}: weights do not fit the model: missing {missing[:5]}")
    tp, rank = _tp_size(ctx), (ctx.tp_rank if ctx is not None else 0)

    def tp_local(name, tensor):
        spec = plan.get(name)
        return spec.shard(tensor, rank, tp) if spec is not None and tp > 1 else tensor

    for name, p in params.items():
        if name in full:
            _assign(p, tp_local(name, full[name]))
    trainer_state = ckpt.load_trainer_state(path)
    if ema is not None:
        averaged = ckpt.read_weights(path / "model.safetensors")
        for name, shadow in ema.shadow.items():
            _assign(shadow, tp_local(name, averaged[name]))
        ema.updates = int(trainer_state["ema_updates"])
    if optimizer is not None and "optimizer" in trainer_state:
        saved = trainer_state["optimizer"]
        # torch's optimizer state is keyed by position in the trainable-parameter list, whose order is the
        # single-device model's: ParallelVideoDiT registers its modules in the same order.
        trainable = _trainable(model)
        for index, (name, p) in enumerate(trainable):
            entry = saved["state"].get(index)
            if not entry:
                continue
            st = _state_for(optimizer, p)
            for key in OPTIM_STATE_KEYS:
                _assign(st[key], tp_local(name, entry[key]))
            st["step"] = _step_tensor(optimizer, p, float(entry["step"]))
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k not in ("params", "fused", "foreach")})
    return trainer_state


def describe(path: str | Path) -> str:
    """One line for logs: format and the world size a checkpoint was written at."""
    meta = json.loads((Path(path) / "meta.json").read_text()) if (Path(path) / "meta.json").exists() else {}
    return f"{meta.get('format', 'safetensors')} checkpoint of step {meta.get('step', '?')} " \
           f"(world size {meta.get('world_size', 1)})"
