"""The model registry: one entry per model family, naming what the engine needs of it.

A family is a folder ``models/<name>/`` with ``model.py`` (single-device code) and ``parallelize.py``
(TP/SP -> CP -> activation checkpointing -> compile -> FSDP, the torchtitan order). Its entry here (torchtitan's
``TrainSpec``, one per family) says how the engine builds it and lays it out over processes:

  ``adapter``          the diffusers adapter class that loads the family from a local model directory
                       (``DiffusersVideoAdapter.from_pretrained`` / ``from_pipeline``); None for the DiT, which is
                       built from a preset
  ``parallelize``      ``(model, parallel_context, *, activation_checkpointing, compile) -> model``
  ``pipelines``        the diffusers pipeline classes a release directory of this family may be (model_index.json's
                       ``_class_name``): text-to-video only
  ``text_max_length``  tokens per prompt of the family's text encoder (the pipelines' ``max_sequence_length``:
                       Wan 512, CogVideoX 226)
  ``default_sampler``  the sampler of ``model.sampler=auto`` for a directory that names no scheduler (a release
                       samples with its own scheduler's class)
  ``samplers``         every sampler the family accepts

``load_adapter(kind, path)`` loads either layout of a model directory (a release as released, or the legacy
``transformer/`` folder); ``open_pipeline(kind, path)`` opens a release for its other parts (VAE, text encoder,
scheduler: ``vidpo.models.pipeline_dir.PipelineDirectory``). Both raise ONE ``ModelDirectoryError`` (a ValueError)
naming the directory and the missing part or the family found, before anything is loaded.

To add a family: write its two files and add one ``ModelSpec`` to ``MODELS`` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vidpo.models.adapters import DiffusersVideoAdapter
from vidpo.models.cogvideox import CogVideoXAdapter
from vidpo.models.cogvideox.parallelize import parallelize_cogvideox
from vidpo.models.dit.parallelize import parallelize_dit
from vidpo.models.pipeline_dir import PipelineDirectory, is_pipeline_dir
from vidpo.models.wan import WanAdapter
from vidpo.models.wan.parallelize import parallelize_wan


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parallelize: Callable
    adapter: Optional[type] = None
    pipelines: tuple[str, ...] = ()
    text_max_length: Optional[int] = None
    default_sampler: str = "euler"

    @property
    def samplers(self) -> tuple[str, ...]:
        return self.adapter.SAMPLERS if self.adapter is not None else ("euler",)


MODELS = {
    "dit": ModelSpec("dit", parallelize_dit),
    "wan": ModelSpec("wan", parallelize_wan, WanAdapter, pipelines=("WanPipeline",), text_max_length=512,
                     default_sampler="flow_euler"),
    "cogvideox": ModelSpec("cogvideox", parallelize_cogvideox, CogVideoXAdapter, pipelines=("CogVideoXPipeline",),
                           text_max_length=226, default_sampler="ddim"),
}
ADAPTER_KINDS = tuple(name for name, spec in MODELS.items() if spec.adapter is not None)


def model_spec(kind: str) -> ModelSpec:
    """The registry entry of ``kind``; ValueError naming the known families otherwise."""
    if kind not in MODELS:
        raise ValueError(f"unknown model kind '{kind}'; expected one of {tuple(MODELS)}")
    return MODELS[kind]


def _adapter_spec(kind: str) -> ModelSpec:
    spec = model_spec(kind)
    if spec.adapter is None:
        raise ValueError(f"model kind '{kind}' is built from a preset, not loaded from a directory; expected one "
                         f"of {ADAPTER_KINDS}")
    return spec


def open_pipeline(kind: str, path: str | os.PathLike, *, require: tuple[str, ...] = ()) -> PipelineDirectory:
    """The release directory ``path`` of family ``kind``, checked (``PipelineDirectory.open``), with the parts in
    ``require`` present (e.g. ``("vae", "text_encoder", "tokenizer")`` before encoding clips)."""
    spec = _adapter_spec(kind)
    pipe = PipelineDirectory.open(path, kind, pipelines=spec.pipelines, text_max_length=spec.text_max_length)
    return pipe.require(*require)


def load_adapter(kind: str, path: str | os.PathLike, *, device: torch.device | str | None = None,
                 dtype: Optional[torch.dtype] = None, **kwargs) -> DiffusersVideoAdapter:
    """The adapter of ``kind`` ('wan' | 'cogvideox') over the model directory ``path`` (a release as released, or
    the legacy layout), its transformer(s) loaded in ``dtype`` on ``device``; ``kwargs`` go to the adapter
    (``sampler``; Wan also ``sample_shift``)."""
    spec = _adapter_spec(kind)
    if is_pipeline_dir(path):
        return spec.adapter.from_pipeline(open_pipeline(kind, path), device=device, dtype=dtype, **kwargs)
    return spec.adapter.from_pretrained(path, device=device, dtype=dtype, **kwargs)
