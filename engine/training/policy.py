"""The trainable policy and its reference forward, in one process or laid out over many.

Preference objectives compare the policy with a reference model on the same inputs. The reference is either
the policy with its LoRA adapters disabled (``lora_disabled``: no second copy of the weights) or a frozen
copy (``frozen_copy``); ``pref.reference: auto`` picks the first when the recipe has a ``lora`` section.
Multi-process runs lay the policy (and a frozen reference copy) out with the model family's own
``parallelize`` from the model registry (TP/SP -> CP -> activation checkpointing -> compile -> FSDP), their
initial weights reaching the ranks as ``parallel.init`` says (``vidpo.training.sharded_init``: by default rank 0
alone loads them and the other ranks receive only their shards); in one process
``parallel.activation_checkpointing`` switches on the model's own block checkpointing
(``apply_activation_checkpointing``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from vidpo.config import ConfigError, RunConfig, resolve_path
from vidpo.models.adapters import transformer_dir
from vidpo.models.lora import apply_lora, lora_disabled, lora_modules, lora_state_dict, mark_only_lora_trainable
from vidpo.models.registry import model_spec
from vidpo.training import checkpoint as ckpt
from vidpo.training.distributed import DistributedSetupError, init_distributed
from vidpo.training.modeling import dit_config_for, load_initial_policy, loads_from_directory, meta_policy
from vidpo.training.sharded_init import init_parallel_models


def reference_mode(cfg: RunConfig) -> str:
    """'lora_disabled' or 'frozen_copy' (pref.reference with 'auto' resolved)."""
    mode = cfg.pref.reference
    if mode == "auto":
        mode = "lora_disabled" if cfg.lora is not None else "frozen_copy"
    return mode


def make_reference(cfg: RunConfig, model: torch.nn.Module, weights: Optional[Path] = None):
    """The reference forward: the policy with LoRA disabled (no weight copy), or a frozen copy of it; with
    ``weights``, a frozen copy holding those weights instead (IPO's fixed base reference for a round that
    starts from a later policy)."""
    mode = reference_mode(cfg)
    if weights is not None and mode != "frozen_copy":
        raise ConfigError(f"a reference with its own weights ({weights}) needs pref.reference=frozen_copy "
                          f"(no LoRA), not {mode}")
    if mode == "lora_disabled":
        return _adapters_off_reference(model), mode
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if weights is not None:
        ckpt.load_weights(frozen, weights)
        mode = "frozen_copy(base)"

    def reference(x, t, c):
        with torch.no_grad():
            return frozen(x, t, c)
    return reference, mode


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``parallel.activation_checkpointing`` on a single-device model: 'full' recomputes every transformer block
    in the backward pass (same loss and gradients, the activation memory of one block instead of all): a
    diffusers adapter's own checkpointing (``enable_gradient_checkpointing``, every expert of a Wan 2.2 A14B), the
    DiT's block checkpointing (``set_activation_checkpointing``). 'none' leaves the model as it is. Returns it."""
    if mode == "none":
        return model
    if callable(getattr(model, "enable_gradient_checkpointing", None)):
        model.enable_gradient_checkpointing()
    elif callable(getattr(model, "set_activation_checkpointing", None)):
        model.set_activation_checkpointing(mode)
    else:
        raise ConfigError(f"parallel.activation_checkpointing={mode}: {type(model).__name__} has no activation "
                          "checkpointing in one process")
    return model


def initial_policy_with_lora(cfg: RunConfig, world, device):
    """``(model, lora_state)``: the initial policy with the recipe's LoRA adapters, only they trainable, and the
    callable that gives the adapters' weights and settings for a checkpoint (None without a lora section)."""
    model = load_initial_policy(cfg, world, device)
    lora_state = None
    if cfg.lora is not None:
        apply_lora(model, **dataclasses.asdict(cfg.lora))
        mark_only_lora_trainable(model)

        def lora_state():
            return lora_state_dict(model), {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                                            "target_modules": json.dumps(cfg.lora.target_modules)}
    return model, lora_state


def prepare_policy(cfg: RunConfig, world, device, reference_weights: Optional[Path] = None):
    """Initial policy (+ LoRA adapters, trainable; + ``parallel.activation_checkpointing``, which only acts where
    gradients are computed) and its reference forward (``make_reference``)."""
    model, lora_state = initial_policy_with_lora(cfg, world, device)
    reference, mode = make_reference(cfg, model, reference_weights)
    apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)   # the policy, not a frozen copy
    return model, reference, mode, lora_state


def prepare_parallel_policy(cfg: RunConfig, world, parallel, reference_weights: Optional[Path] = None):
    """``prepare_policy`` for a multi-process run: the policy (and a frozen reference copy, when that is the
    reference, holding ``reference_weights`` when given) parallelized over ``parallel`` (TP/SP -> CP ->
    checkpointing -> compile -> FSDP) by the model's own parallelize function (``models/<name>/parallelize.py``),
    built as ``parallel.init`` says (``vidpo.training.sharded_init``: by default rank 0 alone loads the weights)."""
    return _parallel_policy(cfg, world, parallel, reference_weights)


def _parallel_policy(cfg: RunConfig, world, parallel, reference_weights: Optional[Path] = None, *,
                     with_reference: bool = True):
    parallelize = model_spec(cfg.model.kind).parallelize
    mode = reference_mode(cfg) if with_reference else "none"
    if reference_weights is not None and mode != "frozen_copy":
        raise ConfigError(f"a reference with its own weights ({reference_weights}) needs pref.reference=frozen_copy "
                          f"(no LoRA), not {mode}")
    lora_state = None
    if cfg.lora is not None:
        meta = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": json.dumps(cfg.lora.target_modules)}

        def lora_state():
            return {}, meta  # the distributed checkpoint writes the adapters from the consolidated weights

    def lay_out_reference(frozen):
        return parallelize(frozen, parallel, compile=cfg.parallel.compile).eval()

    def lay_out(full):
        return parallelize(full, parallel, activation_checkpointing=cfg.parallel.activation_checkpointing,
                           compile=cfg.parallel.compile)

    model, frozen_parallel = init_parallel_models(
        parallel, **_builders(cfg, world), lay_out=lay_out,
        lora=dataclasses.asdict(cfg.lora) if cfg.lora is not None else None,
        lay_out_reference=lay_out_reference if mode == "frozen_copy" else None, reference_weights=reference_weights,
        offloaded=parallel.cpu_offload and parallel.layout.fsdp)
    if not with_reference:
        return model, None, mode, lora_state
    if frozen_parallel is not None:
        if reference_weights is not None:
            mode = "frozen_copy(base)"

        def reference(x, t, c):
            with torch.no_grad():
                return frozen_parallel(x, t, c)
    else:
        reference = _adapters_off_reference(model)
    return model, reference, mode, lora_state


def prepare_parallel_student(cfg: RunConfig, parallel):
    """A consistency student for a multi-process run: the initial policy (+ LoRA) parallelized over ``parallel`` as
    ``prepare_parallel_policy`` lays out a policy, with no reference (its target is itself under stop-gradient).
    Returns ``(model, lora_state)``."""
    model, _, _, lora_state = _parallel_policy(cfg, None, parallel, with_reference=False)
    return model, lora_state


def prepare_sampling_policy(cfg: RunConfig, world, parallel) -> Optional[torch.nn.Module]:
    """The initial policy laid out for sampling over a model-parallel layout (``parallel.tp`` or ``parallel.cp`` >
    1), or None when there is none (each rank then samples whole clips alone). The model's own parallelize function
    splits it over TP / SP / CP as for training but without FSDP: every data-parallel group holds its TP slice
    whole and samples its shards on its own, so long clips split their tokens (CP) and weights (TP) over the
    group, and groups need not step together. Built as ``parallel.init`` says (``vidpo.training.sharded_init``)."""
    if parallel is None or (parallel.tp == 1 and parallel.cp == 1):
        return None
    parallelize = model_spec(cfg.model.kind).parallelize
    model, _ = init_parallel_models(parallel, **_builders(cfg, world),
                                    lay_out=lambda full: parallelize(full, parallel, fsdp=False).eval())
    return model


def _builders(cfg: RunConfig, world) -> dict:
    """What ``init_parallel_models`` builds the initial policy with (``parallel.init``, the loader and the meta
    skeleton)."""
    return {"init": cfg.parallel.init, "load": lambda device: load_initial_policy(cfg, world, device),
            "skeleton": lambda: meta_policy(cfg, world)}


def _adapters_off_reference(model: torch.nn.Module):
    """The policy itself with its LoRA adapters switched off. The recipe loader already refuses
    ``lora_disabled`` without a ``lora`` section; this catches a config built in code, which would otherwise
    compare the policy with itself."""
    if next(lora_modules(model), None) is None:
        raise ConfigError("pref.reference=lora_disabled needs a policy with LoRA adapters (a lora section)")

    def reference(x, t, c):
        with torch.no_grad(), lora_disabled(model):
            return model(x, t, c)
    return reference


def _heads_and_temporal_patch(cfg: RunConfig, world) -> tuple[int, int]:
    """Attention heads and temporal patch size of the run's model (what a parallel layout must divide)."""
    if not loads_from_directory(cfg):
        dcfg = dit_config_for(cfg, world)
        return dcfg.num_heads, dcfg.patch_size[0]
    info = json.loads((transformer_dir(resolve_path(cfg.model.path)) / "config.json").read_text())
    patch = info.get("patch_size")
    temporal = patch[0] if isinstance(patch, (list, tuple)) else (info.get("patch_size_t") or 1)
    return int(info["num_attention_heads"]), int(temporal)


def start_distributed(cfg: RunConfig, world, latent_frames: Optional[int] = None):
    """The run's ParallelContext under torchrun (None for one process), checked against the model: its heads,
    and its ``latent_frames`` (default: the shapes world's frames) after temporal patching."""
    heads, temporal_patch = _heads_and_temporal_patch(cfg, world)
    frames = cfg.world.frames if latent_frames is None else latent_frames
    try:
        return init_distributed(cfg.parallel, num_heads=heads, seed=cfg.seed, frames=frames // temporal_patch)
    except DistributedSetupError as exc:
        raise ConfigError(f"parallel: {exc}") from None
