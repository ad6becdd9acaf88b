"""A trained run exported where its users load it, from the policy in memory (one process) or from the latest
checkpoint's consolidated single-device weights (a multi-process run, whose ranks hold only shards):

  LoRA, a diffusers model   ``RUN_DIR/lora/`` in diffusers' layout: ``pipe.load_lora_weights(RUN_DIR/lora)``; a
                            two-expert Wan 2.2 adds ``lora/transformer_2/`` (``vidpo.models.adapters``, the layout)
  LoRA, the DiT             ``RUN_DIR/lora.safetensors`` (peft key names, ``vidpo.models.lora.load_lora``)
  full, a diffusers model   ``RUN_DIR/transformer/`` (and ``RUN_DIR/transformer_2/`` for Wan 2.2's second expert),
                            written by the transformer's own ``save_pretrained`` (``config.json`` +
                            ``diffusion_pytorch_model.safetensors``)::

                                transformer = WanTransformer3DModel.from_pretrained(RUN_DIR / "transformer")
                                pipe = WanPipeline.from_pretrained(RELEASE, transformer=transformer)  # or swap it in

                            ``RUN_DIR`` is then also a model directory in vidpo's legacy layout (``model.path``)
  full, the DiT             nothing more: a checkpoint's ``model.safetensors`` is the DiT's own format

With ``train.ema_decay`` every export holds the EMA weights, as the checkpoints' ``model.safetensors`` do. Each
folder is written under a temporary name and renamed (``vidpo.utils.atomic``), so a rerun replaces it whole.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import load_file

from vidpo.config import RunConfig, resolve_path
from vidpo.models.adapters import EXPERTS, export_lora_state, transformer_dir
from vidpo.models.lora import save_lora
from vidpo.models.registry import model_spec
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import loads_from_directory
from vidpo.utils import atomic


def export_run(cfg: RunConfig, run_dir: str | os.PathLike, model, *, from_checkpoint: bool,
               checkpoints: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The run's trained policy in its users' format (module docstring): the LoRA export when the recipe has a
    ``lora`` section, else a diffusers model's transformer folder(s). ``model``: the trained policy (one process);
    with ``from_checkpoint`` (a multi-process run, on its main rank after training) the latest checkpoint's
    consolidated weights are exported instead, from ``checkpoints`` (default ``run_dir``: the training run's own).
    Returns the LoRA path or ``RUN_DIR/transformer`` (None: a fully fine-tuned DiT, whose checkpoints already are its
    export)."""
    if cfg.lora is not None:
        return export_run_lora(cfg, run_dir, model, from_checkpoint=from_checkpoint, checkpoints=checkpoints)
    if not loads_from_directory(cfg):
        return None
    if from_checkpoint:
        state = load_file(str(_latest(checkpoints or run_dir) / "model.safetensors"))
        return export_transformer_state(cfg.model.kind, resolve_path(cfg.model.path), state, run_dir)["transformer"]
    return export_transformers(model, run_dir)["transformer"]


def export_run_lora(cfg: RunConfig, run_dir: str | os.PathLike, model, *, from_checkpoint: bool,
                    checkpoints: Optional[str | os.PathLike] = None) -> Path:
    """The trained adapters: ``RUN_DIR/lora/`` in diffusers' layout for a diffusers model, else
    ``RUN_DIR/lora.safetensors``; ``from_checkpoint``: what the latest checkpoint (of ``checkpoints``, default
    ``run_dir``) consolidated."""
    run_dir = Path(run_dir)
    diffusers_model = loads_from_directory(cfg)
    if from_checkpoint:
        latest = _latest(checkpoints or run_dir) / "lora.safetensors"
        if not diffusers_model:
            atomic.write_bytes(run_dir / "lora.safetensors", latest.read_bytes())
            return run_dir / "lora.safetensors"
        return Path(export_lora_state(load_file(str(latest)), run_dir / "lora", alpha=cfg.lora.alpha,
                                      dropout=cfg.lora.dropout))
    if diffusers_model:
        return Path(model.export_lora(run_dir / "lora"))
    save_lora(model, str(run_dir / "lora.safetensors"))
    return run_dir / "lora.safetensors"


def export_transformers(model, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every expert of a single-device diffusers adapter (``model.experts()``) saved by its own
    ``save_pretrained`` as ``OUT/transformer/`` (and ``OUT/transformer_2/``); returns ``{expert: folder}``."""
    experts = getattr(model, "experts", None)
    if experts is None:
        raise TypeError(f"{type(model).__name__} is not a diffusers adapter: it has no transformer to export")
    return {name: _save(expert, Path(out_dir) / name) for name, expert in experts()}


def export_transformer_state(kind: str, model_dir: str | os.PathLike, state: Mapping[str, torch.Tensor],
                             out_dir: str | os.PathLike) -> dict[str, Path]:
    """The transformer(s) of a consolidated single-device state dict (keys ``transformer.<param>`` /
    ``transformer_2.<param>``, what a multi-process checkpoint's ``model.safetensors`` holds) saved like
    ``export_transformers``, each with the config of its folder in the model directory ``model_dir``. The modules
    are built on the meta device and take the tensors themselves: no copy of the base weights is loaded."""
    cls = model_spec(kind).adapter._diffusers_transformer_class()
    written = {}
    for name in EXPERTS:
        prefix = f"{name}."
        part = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if not part:
            continue
        folder = Path(model_dir) / name if name != "transformer" else transformer_dir(model_dir)
        with torch.device("meta"):
            transformer = cls.from_config(cls.load_config(str(folder)))
        missing, unexpected = transformer.load_state_dict(part, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"the weights do not fit {folder}'s {cls.__name__}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        written[name] = _save(transformer, Path(out_dir) / name)
    if "transformer" not in written:
        raise ValueError("export: no 'transformer.*' weights in the state dict (is it a diffusers model's?)")
    return written


def _save(transformer, folder: Path) -> Path:
    with atomic.atomic_dir(folder) as tmp:
        transformer.save_pretrained(str(tmp))
    return folder


def _latest(run_dir: str | os.PathLike) -> Path:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export (checkpoints/latest is missing)")
    return latest
