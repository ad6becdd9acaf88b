"""Attention backends behind one function: ``attention(q, k, v, backend)``.

q: (B, heads, Nq, d), k and v: (B, heads, Nk, d); returns (B, heads, Nq, d) =
softmax(q k^T / sqrt(d)) v, full (non-causal, unmasked) attention.

Backends:
  "sdpa"        torch.nn.functional.scaled_dot_product_attention (default; picks flash / memory-efficient /
                cuDNN kernels on GPU, a fused kernel on CPU).
  "math"        explicit q k^T -> float32 softmax -> A v; the reference, and what FlopCounterMode can count.
  "flash_attn"  flash_attn.flash_attn_func (layout (B, N, heads, d)); needs the package, CUDA tensors and
                fp16/bf16 inputs.
  "te"          transformer_engine.pytorch.DotProductAttention (layout "bshd"); needs the package and CUDA.
  "auto"        flash_attn when the package is importable and the inputs are CUDA fp16/bf16, else sdpa.

Optional packages are detected at run time; asking for one that is missing raises
``AttentionBackendUnavailable`` naming the package and its install command. ``resolve_backend`` turns a
configured name into the concrete backend a run uses, for its log.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math", "flash_attn", "te")

_OPTIONAL_PACKAGES = {
    # backend: (module to import, pip install command)
    "flash_attn": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "te": ("transformer_engine.pytorch", "pip install transformer-engine[pytorch]"),
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendUnavailable(ImportError):
    """An attention backend was asked for whose package is not importable (or cannot run these inputs)."""


@functools.lru_cache(maxsize=None)
def _import_error(backend: str) -> Optional[str]:
    """None when the optional package of ``backend`` imports, else the import error's text."""
    module, _ = _OPTIONAL_PACKAGES[backend]
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken CUDA build raises OSError/RuntimeError, not only ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def backend_importable(backend: str) -> bool:
    """True for the built-in backends, and for optional ones whose package imports."""
    _check_name(backend)
    return backend not in _OPTIONAL_PACKAGES or _import_error(backend) is None


def available_backends() -> List[str]:
    """Concrete backends usable in this environment (package present; device checks happen per call)."""
    return [b for b in ("sdpa", "math", "flash_attn", "te") if backend_importable(b)]


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        match = difflib.get_close_matches(str(backend), BACKENDS, n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ValueError(f"unknown attention backend {backend!r}{hint}; valid: {list(BACKENDS)}")


def require_backend(backend: str) -> None:
    """Raise ``AttentionBackendUnavailable`` when ``backend`` needs a package that does not import."""
    _check_name(backend)
    if backend in _OPTIONAL_PACKAGES and _import_error(backend) is not None:
        module, install = _OPTIONAL_PACKAGES[backend]
        raise AttentionBackendUnavailable(
            f"attention backend {backend!r} needs the package '{module.split('.')[0]}', which is not importable "
            f"here ({_import_error(backend)}). Install it with `{install}`, or choose attention='sdpa'.")


def _flash_usable(device: Optional[torch.device], dtype: Optional[torch.dtype]) -> bool:
    if not backend_importable("flash_attn"):
        return False
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return on_cuda and (dtype is None or dtype in _HALF_DTYPES)


def resolve_backend(name: str, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend ``name`` means here: 'auto' becomes 'flash_attn' or 'sdpa' (judged for
    ``device``/``dtype`` when given, else for "CUDA if present, half precision"); other names are returned
    after checking that their package imports."""
    _check_name(name)
    if name == "auto":
        return "flash_attn" if _flash_usable(device, dtype) else "sdpa"
    require_backend(name)
    return name


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    # Softmax in float32 at least: bf16 exponentials of large logits lose the small probabilities.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return torch.matmul(probs, v)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.device.type != "cuda" or q.dtype not in _HALF_DTYPES:
        raise AttentionBackendUnavailable(
            f"attention backend 'flash_attn' runs on CUDA fp16/bf16 tensors only, got {q.device.type} {q.dtype}; "
            "use bf16 autocast on a GPU, or attention='sdpa' / 'auto'")
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
    return out.transpose(1, 2)


_TE_MODULES: Dict[Tuple[int, int, str], torch.nn.Module] = {}


def _te_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.device.type != "cuda":
        raise AttentionBackendUnavailable(f"attention backend 'te' runs on CUDA tensors only, got {q.device.type}")
    import transformer_engine.pytorch as te

    batch, heads, n_q, head_dim = q.shape
    kind = "self" if k.shape[2] == n_q else "cross"
    key = (heads, head_dim, kind)
    if key not in _TE_MODULES:
        # The module holds no parameters, only kernel-selection state: one per shape family is enough.
        _TE_MODULES[key] = te.DotProductAttention(heads, head_dim, qkv_format="bshd", attn_mask_type="no_mask",
                                                  attention_type=kind)
    out = _TE_MODULES[key](q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                           v.transpose(1, 2).contiguous())
    return out.reshape(batch, n_q, heads, head_dim).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Full softmax attention, (B, heads, Nq, d) x (B, heads, Nk, d) x (B, heads, Nk, d) -> (B, heads, Nq, d)."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return _math_attention(q, k, v)
    if backend == "auto":
        backend = "flash_attn" if _flash_usable(q.device, q.dtype) else "sdpa"
        return attention(q, k, v, backend)
    require_backend(backend)
    if backend == "flash_attn":
        return _flash_attention(q, k, v)
    return _te_attention(q, k, v)
