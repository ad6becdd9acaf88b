"""The model registry: one entry per model family, naming what the engine needs of it.

A family is a folder ``models/<name>/`` with ``model.py`` (single-device code) and ``parallelize.py``
(TP/SP -> CP -> activation checkpointing -> compile -> FSDP, the torchtitan order). Its entry here says how
the engine builds it and lays it out over processes:

  ``adapter``      the diffusers adapter class that loads the family from a local model directory
                   (``DiffusersVideoAdapter.from_pretrained``); None for the DiT, which is built from a preset
  ``parallelize``  ``(model, parallel_context, *, activation_checkpointing, compile) -> model``

To add a family: write its two files and add one ``ModelSpec`` to ``MODELS`` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from vidpo.models.adapters import DiffusersVideoAdapter
from vidpo.models.cogvideox import CogVideoXAdapter
from vidpo.models.cogvideox.parallelize import parallelize_cogvideox
from vidpo.models.dit.parallelize import parallelize_dit
from vidpo.models.wan import WanAdapter
from vidpo.models.wan.parallelize import parallelize_wan


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parallelize: Callable
    adapter: Optional[type] = None


MODELS = {
    "dit": ModelSpec("dit", parallelize_dit),
    "wan": ModelSpec("wan", parallelize_wan, WanAdapter),
    "cogvideox": ModelSpec("cogvideox", parallelize_cogvideox, CogVideoXAdapter),
}
ADAPTER_KINDS = tuple(name for name, spec in MODELS.items() if spec.adapter is not None)


def model_spec(kind: str) -> ModelSpec:
    """The registry entry of ``kind``; ValueError naming the known families otherwise."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind '{kind}'; expected one of {tuple(MODELS)}")
    return MODELS[kind]


def load_adapter(kind: str, path: str | os.PathLike, **kwargs) -> DiffusersVideoAdapter:
    """The adapter of ``kind`` ('wan' | 'cogvideox') over the model directory ``path``; ``kwargs`` go to the
    adapter (``sampler``; Wan also ``sample_shift``)."""
    spec = model_spec(kind)
    if spec.adapter is None:
        raise ValueError(f"model kind '{kind}' is built from a preset, not loaded from a directory; expected one "
                         f"of {ADAPTER_KINDS}")
    return spec.adapter.from_pretrained(path, **kwargs)
