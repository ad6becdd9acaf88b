"""Backend selection of the preference losses: torch | triton | cpp | cuda | auto.

A fused backend is a module exposing the two primitives of ``vidpo.kernels.segment_sums`` (same
names, same signatures, same outputs):

    segment_sq_err_sums(v_theta, v_ref, target, x0, noise, segment_ids, num_segments) -> (K, N, S) fp32
    segment_scaled_residual(v_theta, target, x0, noise, coef, segment_ids) -> like v_theta

and optionally ``is_available()`` returning a bool or ``(bool, reason)`` (``is_available(device_type)``
is tried first). The module is imported lazily; a failed import makes the backend unavailable with the
import error as the reason, so a checkout without the compiled extension still works.

    triton  vidpo.kernels.segment_sums   CUDA devices; CPU tensors under TRITON_INTERPRET=1 (slow)
    cpp     vidpo.kernels.cpp_backend    the OpenMP extension vidpo._C, CPU tensors
    cuda    vidpo.kernels.cuda_backend   the CUDA kernels of vidpo._C, CUDA tensors
    torch   vidpo.kernels.reference      eager reference, any device (not a primitive set)

``auto`` picks triton, then cuda, then torch on a CUDA device, and cpp, then torch on CPU. Triton is
preferred over the hand-written CUDA kernels because it is the path exercised by the CPU test-suite
(interpreter); run benchmarks/bench_dense_dpo.py on the target GPU to compare the two.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from typing import Dict, List, Tuple, Union

import torch

logger = logging.getLogger("vidpo.kernels")

BACKENDS = ("torch", "triton", "cpp", "cuda")
BACKEND_MODULES = {
    "triton": "vidpo.kernels.segment_sums",
    "cpp": "vidpo.kernels.cpp_backend",
    "cuda": "vidpo.kernels.cuda_backend",
}
# Device types each backend accepts (triton on CPU additionally needs the interpreter).
BACKEND_DEVICES = {"torch": ("cpu", "cuda"), "triton": ("cuda", "cpu"), "cpp": ("cpu",), "cuda": ("cuda",)}
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

_logged_choices = set()
_resolved: Dict[tuple, str] = {}   # (requested name, device type, TRITON_INTERPRET) -> backend


def _device_type(device: Union[str, torch.device, None]) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _load_module(name: str):
    """Import a fused backend's module; (module, '') or (None, reason)."""
    try:
        return importlib.import_module(BACKEND_MODULES[name]), ""
    except Exception as exc:  # ImportError, OSError from a broken .so, ...
        return None, f"importing {BACKEND_MODULES[name]} failed: {type(exc).__name__}: {exc}"


def _module_reports_available(module, device_type: str) -> Tuple[bool, str]:
    check = getattr(module, "is_available", None)
    if check is None:
        return True, ""
    try:
        takes_device = len(inspect.signature(check).parameters) > 0
    except (TypeError, ValueError):
        takes_device = False
    result = check(device_type) if takes_device else check()
    if isinstance(result, tuple):
        return bool(result[0]), str(result[1]) if len(result) > 1 else ""
    if result:
        return True, ""
    reason = getattr(module, "unavailable_reason", None)
    reason = reason() if callable(reason) else reason
    return False, str(reason or f"{module.__name__}.is_available() returned False")


def backend_status(name: str, device: Union[str, torch.device, None] = None) -> Tuple[bool, str]:
    """(available, reason-if-not) of backend ``name`` for tensors on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown loss backend {name!r}; valid: {', '.join(BACKENDS + ('auto',))}")
    device_type = _device_type(device)
    if device_type not in BACKEND_DEVICES[name]:
        return False, f"backend {name!r} does not run on {device_type} tensors (supports {BACKEND_DEVICES[name]})"
    if device_type == "cuda" and not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    if name == "torch":
        return True, ""
    module, reason = _load_module(name)
    if module is None:
        return False, reason
    missing = [fn for fn in ("segment_sq_err_sums", "segment_scaled_residual") if not hasattr(module, fn)]
    if missing:
        return False, f"{module.__name__} lacks {', '.join(missing)}"
    return _module_reports_available(module, device_type)


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Backends usable for tensors on ``device`` (default: CUDA when present, else CPU)."""
    return [name for name in BACKENDS if backend_status(name, device)[0]]


def backend_report(device: Union[str, torch.device, None] = None) -> Dict[str, str]:
    """{backend: 'available' | reason} for logs and ``vidpo doctor``-style listings."""
    report = {}
    for name in BACKENDS:
        ok, reason = backend_status(name, device)
        report[name] = "available" if ok else reason
    return report


def resolve_backend(name: str, device: Union[str, torch.device, None]) -> str:
    """The concrete backend for ``name`` ('auto' or one of BACKENDS) on ``device``.

    Raises ValueError for an unknown name and RuntimeError, with the reason, for an unavailable one.
    The choice is logged once per (requested name, device type).
    """
    device_type = _device_type(device)
    # Every loss call resolves its backend: a resolution that succeeded is kept (module imports and availability
    # probes cost ~25 us a call, most of a small loss's host time). TRITON_INTERPRET is part of the key, since it
    # decides whether triton runs on CPU tensors.
    cache_key = (name, device_type, os.environ.get("TRITON_INTERPRET", "0"))
    chosen = _resolved.get(cache_key)
    if chosen is None and name == "auto":
        order = AUTO_ORDER.get(device_type, ("torch",))
        chosen = next(b for b in order if backend_status(b, device_type)[0])
    elif chosen is None:
        ok, reason = backend_status(name, device_type)
        if not ok:
            raise RuntimeError(f"loss backend {name!r} is unavailable on {device_type}: {reason}")
        chosen = name
    _resolved[cache_key] = chosen
    key = (name, device_type, chosen)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("vidpo.kernels: loss backend %r on %s (requested %r)", chosen, device_type, name)
    return chosen


def primitives(name: str):
    """The module implementing the two primitives of fused backend ``name`` (not 'torch')."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"backend {name!r} has no primitive set; fused backends: {', '.join(BACKEND_MODULES)}")
    module, reason = _load_module(name)
    if module is None:
        raise RuntimeError(reason)
    return module
