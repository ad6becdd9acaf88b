"""Low-rank adaptation (LoRA) of the policy's linear layers, with the reference model for free.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) replaces a frozen linear map ``W`` of shape
``(out, in)`` by ``W + (alpha / r) * B @ A`` with ``A: (r, in)`` and ``B: (out, r)``. Only ``A`` and ``B``
train. Preference objectives (DESIGN.md section 1) need a frozen reference ``ref``; with LoRA the reference
is exactly the policy with its adapters switched off, so no second copy of the base weights exists:
``with lora_disabled(model): err_ref = ...`` is the reference forward, bitwise equal to the base model.

Wrapped modules keep the SAME ``weight`` / ``bias`` Parameter objects and the same attribute names, so the
base part of the model's ``state_dict`` keeps its keys (``blocks.3.attn.qkv.weight``) and base checkpoints
stay loadable; the adapters add ``blocks.3.attn.qkv.lora_A.weight`` and ``...lora_B.weight``.

Saved adapters use the peft / diffusers naming, so a file trained here loads in those libraries and back:
``base_model.model.<module>.lora_A.weight`` (peft), ``transformer.<module>.lora_A.weight`` (diffusers) or
``<module>.lora_A.weight`` (plain); rank, alpha and target modules go in the safetensors metadata.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

DEFAULT_TARGET_MODULES = ("attn.qkv", "attn.proj", "cross.q", "cross.kv", "cross.proj", "mlp.fc1", "mlp.fc2")
INIT_CHOICES = ("zero_b", "gaussian")
PREFIX_STYLES = {"peft": "base_model.model.", "diffusers": "transformer.", "none": ""}
# diffusers' own name for the JSON blob of LoraConfig kwargs it stores in the safetensors metadata.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update.

    ``y = x @ W^T + b + (dropout(x) @ A^T @ B^T) * (alpha / rank)``, x: (..., in_features), y: (..., out).

    ``weight`` and ``bias`` are the wrapped layer's own Parameter objects (no copy: same storage).
    ``enabled = False`` gives exactly ``F.linear(x, weight, bias)``, i.e. the base layer bitwise.
    After ``merge()`` the update lives inside ``weight`` and the adapter branch is skipped.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 init_lora_weights: str = "zero_b", target_pattern: Optional[str] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.target_pattern = target_pattern
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, **factory)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: str = "zero_b") -> None:
        if init_lora_weights == "zero_b":
            # nn.Linear's own init (kaiming-uniform, a=sqrt(5)), as in peft's default.
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.rank)
        else:
            raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}")
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        if not self.enabled or self.merged:
            return base
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return base + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / rank) * B @ A``, shape (out_features, in_features), in the weight's dtype.

        The product is formed in at least float32 so merging into bf16 weights rounds only once.
        """
        compute = torch.promote_types(self.lora_B.weight.dtype, torch.float32)
        delta = self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute)
        return (delta * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, enabled={self.enabled}, merged={self.merged}")


def _matching_pattern(name: str, patterns: List[str]) -> Optional[str]:
    for pattern in patterns:
        if name == pattern or name.endswith("." + pattern):
            return pattern
    return None


def lora_modules(model: nn.Module) -> Iterator[tuple]:
    """``(name, LoRALinear)`` for every adapted layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def apply_lora(model: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, init_lora_weights: str = "zero_b") -> List[str]:
    """Replace every nn.Linear whose name matches a pattern of ``target_modules`` by a LoRALinear, in place.

    The settings are those of a recipe's ``lora`` section (``vidpo.config.LoRAConfig``: pass
    ``**dataclasses.asdict(cfg.lora)``); a pattern matches the end of a dotted module name on a dot boundary.

    Returns the replaced module names. A layer reachable under two names (shared module) gets one
    adapter shared by both. Raises ValueError naming the patterns when nothing matched, or when a
    matched layer already carries an adapter; TypeError when a pattern matches a module that is not an
    nn.Linear (e.g. a tensor-parallel layer: apply LoRA before parallelizing).
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    target_modules = list(target_modules)
    if not target_modules or not all(isinstance(p, str) and p for p in target_modules):
        raise ValueError(f"apply_lora: target_modules must be a non-empty list of non-empty names, got {target_modules!r}")
    targets = []
    inside_lora = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, LoRALinear):
            inside_lora.append(name)
        pattern = _matching_pattern(name, target_modules)
        if pattern is None:
            continue
        if isinstance(module, LoRALinear):
            raise ValueError(f"apply_lora: module '{name}' already has a LoRA adapter "
                             f"(pattern '{pattern}'); call apply_lora once per model")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"apply_lora: pattern '{pattern}' matched '{name}', a {type(module).__name__}; "
                            f"only nn.Linear layers can be adapted")
        targets.append((name, module, pattern))
    if not targets:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ", ".join(linear_names[:8]) + (" ..." if len(linear_names) > 8 else "")
        raise ValueError(f"apply_lora: no nn.Linear module matched target_modules {target_modules}; "
                         f"the model's linear layers are: {shown or '(none)'}")
    wrapped: Dict[int, LoRALinear] = {}
    replaced = []
    for name, module, pattern in targets:
        if id(module) not in wrapped:
            wrapped[id(module)] = LoRALinear(module, rank, alpha, dropout, init_lora_weights,
                                             target_pattern=pattern)
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, wrapped[id(module)])
        replaced.append(name)
    return replaced


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The A and B factors of every adapter (the only parameters preference training updates)."""
    params = []
    for _, module in lora_modules(model):
        params.extend([module.lora_A.weight, module.lora_B.weight])
    return params


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze every parameter except the LoRA factors; returns the number of trainable elements."""
    lora_ids = {id(p) for p in lora_parameters(model)}
    if not lora_ids:
        raise ValueError("mark_only_lora_trainable: the model has no LoRA adapters (call apply_lora first)")
    trainable = 0
    for param in model.parameters():
        param.requires_grad_(id(param) in lora_ids)
        trainable += param.numel() if id(param) in lora_ids else 0
    return trainable


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the reference model: every adapter off inside the block, previous state restored after.

    Inside, each adapted layer computes ``F.linear(x, W, b)`` with the base weights, so the forward is
    bitwise the base model's. Merged adapters cannot be switched off exactly (W + BA - BA != W in
    floating point), so a merged model is an error here.
    """
    modules = [module for _, module in lora_modules(model)]
    merged = [name for name, module in lora_modules(model) if module.merged]
    if merged:
        raise RuntimeError(f"lora_disabled: {len(merged)} adapters are merged into the base weights "
                           f"(first: '{merged[0]}'); call unmerge_lora(model) first")
    previous = [module.enabled for module in modules]
    for module in modules:
        module.enabled = False
    try:
        yield model
    finally:
        for module, was_enabled in zip(modules, previous):
            module.enabled = was_enabled


def merge_lora(model: nn.Module) -> int:
    """Add every adapter's ``(alpha/r) B A`` into its base weight (fast inference); returns the count."""
    count = 0
    for _, module in lora_modules(model):
        if not module.merged:
            module.merge()
            count += 1
    return count


def unmerge_lora(model: nn.Module) -> int:
    """Subtract the merged updates again (exact up to floating-point rounding); returns the count."""
    count = 0
    for _, module in lora_modules(model):
        if module.merged:
            module.unmerge()
            count += 1
    return count


def unload_lora(model: nn.Module, merge: bool = True) -> List[str]:
    """Turn every LoRALinear back into a plain nn.Linear on the same weight (merged first if asked),
    e.g. to export a merged checkpoint whose state_dict has only base keys. Returns the module names."""
    names = []
    for name, module in list(lora_modules(model)):
        if merge:
            module.merge()
        elif module.merged:
            module.unmerge()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = module.weight
        linear.bias = module.bias
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, linear)
        names.append(name)
    return names


def parameter_storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind all parameters and buffers (shared storage counted once)."""
    seen = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        seen[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def count_extra_parameter_bytes(model: nn.Module) -> int:
    """Parameter memory LoRA adds to the model: the A and B factors, ``r * (in + out) * itemsize`` per
    layer. The reference model (``lora_disabled``) costs nothing more because the adapted layers hold
    the base Parameters themselves; ``parameter_storage_bytes(after) - parameter_storage_bytes(before)``
    equals this number (tests/test_lora.py checks it)."""
    return sum(p.numel() * p.element_size() for p in lora_parameters(model))


def _config_metadata(model: nn.Module) -> Dict[str, object]:
    """rank / alpha / targets of the adapters; peft's rank_pattern / alpha_pattern for layers that differ."""
    modules = list(lora_modules(model))
    ranks = Counter(m.rank for _, m in modules)
    alphas = Counter(m.alpha for _, m in modules)
    rank = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    dropout = max((m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0) for _, m in modules)
    targets = sorted({m.target_pattern or name for name, m in modules})
    return {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "rank_pattern": {name: m.rank for name, m in modules if m.rank != rank},
        "alpha_pattern": {name: m.alpha for name, m in modules if m.alpha != alpha},
    }


def lora_state_dict(model: nn.Module, prefix_style: str = "peft") -> Dict[str, torch.Tensor]:
    """Adapter tensors keyed ``<prefix><module>.lora_A.weight`` / ``.lora_B.weight``.

    prefix_style: 'peft' -> 'base_model.model.', 'diffusers' -> 'transformer.', 'none' -> ''.
    Tensors are detached (they alias the live parameters; clone before modifying).
    """
    if prefix_style not in PREFIX_STYLES:
        raise ValueError(f"prefix_style must be one of {sorted(PREFIX_STYLES)}, got {prefix_style!r}")
    prefix = PREFIX_STYLES[prefix_style]
    state = {}
    for name, module in lora_modules(model):
        state[f"{prefix}{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{prefix}{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return state


def save_lora(model: nn.Module, path: str, prefix_style: str = "peft",
              extra_metadata: Optional[Dict[str, str]] = None) -> str:
    """Write the adapters as one safetensors file, atomically (temporary name + os.replace).

    Metadata (all strings): 'rank', 'alpha', 'dropout', 'target_modules' (JSON list), 'prefix_style', and
    diffusers' 'lora_adapter_metadata' (JSON of peft LoraConfig kwargs, keys prefixed 'transformer.' in
    the diffusers style). Returns the path.
    """
    if not any(True for _ in lora_modules(model)):
        raise ValueError("save_lora: the model has no LoRA adapters")
    config = _config_metadata(model)
    adapter_meta = config if prefix_style != "diffusers" else {f"transformer.{k}": v for k, v in config.items()}
    metadata = {
        "format": "pt",
        "rank": str(config["r"]),
        "alpha": repr(float(config["lora_alpha"])),
        "dropout": repr(float(config["lora_dropout"])),
        "target_modules": json.dumps(config["target_modules"]),
        "prefix_style": prefix_style,
        DIFFUSERS_METADATA_KEY: json.dumps(adapter_meta, sort_keys=True),
    }
    metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model, prefix_style).items()}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_lora_file(path: str):
    """``(tensors keyed '<module>.lora_A.weight', metadata dict)`` with any peft/diffusers prefix and
    peft's adapter-name infix ('lora_A.default.weight') removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_lora: no such LoRA file: {path}")
    tensors = {}
    with safe_open(path, framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensors[_normalize_key(key)] = handle.get_tensor(key)
    return tensors, metadata


def _normalize_key(key: str) -> str:
    for prefix in PREFIX_STYLES.values():
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
            break
    for factor in ("lora_A", "lora_B"):
        head, sep, tail = key.partition(f".{factor}.")
        if sep and tail != "weight" and tail.endswith(".weight"):
            key = f"{head}.{factor}.weight"  # drop peft's adapter name: 'lora_A.default.weight'
    return key


def settings_from_metadata(metadata: Dict[str, str], path: str = "<metadata>") -> dict:
    """The ``apply_lora`` settings recorded by save_lora (or by diffusers' 'lora_adapter_metadata'):
    ``{"rank", "alpha", "dropout", "target_modules"}``."""
    try:
        if "rank" in metadata:
            return dict(rank=int(metadata["rank"]), alpha=float(metadata["alpha"]),
                              dropout=float(metadata.get("dropout", 0.0)),
                              target_modules=json.loads(metadata["target_modules"]))
        if DIFFUSERS_METADATA_KEY in metadata:
            blob = {k.rpartition("transformer.")[2]: v
                    for k, v in json.loads(metadata[DIFFUSERS_METADATA_KEY]).items()}
            return dict(rank=int(blob["r"]), alpha=float(blob["lora_alpha"]),
                              dropout=float(blob.get("lora_dropout", 0.0)),
                              target_modules=list(blob["target_modules"]))
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: unreadable LoRA metadata ({err!r})") from err
    raise ValueError(f"{path}: no LoRA metadata (rank/alpha/target_modules); apply_lora yourself and "
                     f"load the weights into the adapted model")


def load_lora(model: nn.Module, path: str, strict: bool = True) -> List[str]:
    """Load adapters saved by save_lora (or by peft / diffusers) into ``model``.

    If the model has no adapters yet, they are first created with the config stored in the file.
    With ``strict``, adapters missing from the file and file keys without an adapter are errors naming
    them; a shape mismatch is always an error. Returns the loaded module names.
    """
    tensors, metadata = read_lora_file(path)
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, **settings_from_metadata(metadata, os.fspath(path)))
    modules = dict(lora_modules(model))
    expected = {f"{name}.{factor}.weight" for name in modules for factor in ("lora_A", "lora_B")}
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"load_lora: {path} does not fit the model's adapters; missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
    loaded = []
    with torch.no_grad():
        for name, module in modules.items():
            was_merged = module.merged
            module.unmerge()
            for factor in ("lora_A", "lora_B"):
                key = f"{name}.{factor}.weight"
                if key not in tensors:
                    continue
                target = getattr(module, factor).weight
                if tensors[key].shape != target.shape:
                    raise ValueError(f"load_lora: {path}: '{key}' has shape {tuple(tensors[key].shape)}, "
                                     f"the model's adapter has {tuple(target.shape)}")
                target.copy_(tensors[key])
            if was_merged:
                module.merge()
            loaded.append(name)
    return loaded
