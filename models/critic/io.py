"""Critic files: one ``critic.safetensors`` per critic, whatever its kind, told apart by its metadata ``format``.

    save_critic(critic, path)     a ``VideoCritic`` (the toy network) or any ``Critic`` (its own ``save``), atomic
    load_critic(path, device)     the critic in a file or a directory holding critic.safetensors: a ``VideoCritic``
                                  ('vidpo-critic-1'; the shapes world's adapter wraps it with the world) or a
                                  ``VLMCritic`` ('vidpo-vlm-critic-1', rebuilt on its backbone directory)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from vidpo.models.critic.model import (
    VIDEO_CRITIC_FORMAT,
    Critic,
    VideoCritic,
    load_video_critic,
    save_video_critic,
)
from vidpo.models.critic.vlm import VLM_FORMAT, load_vlm_critic

CRITIC_FILE = "critic.safetensors"


def critic_file(path) -> Path:
    """``path`` itself, or ``path/critic.safetensors`` for a directory; FileNotFoundError when absent."""
    path = Path(path)
    if path.is_dir():
        path = path / CRITIC_FILE
    if not path.exists():
        raise FileNotFoundError(f"no critic weights at {path} (train one with `vidpo critic train`)")
    return path


def critic_format(path) -> str:
    """The metadata ``format`` of a critic file (or directory)."""
    with safe_open(str(critic_file(path)), framework="pt") as fh:
        return (fh.metadata() or {}).get("format", "")


def save_critic(model: VideoCritic | Critic, path, extra: Optional[dict] = None) -> None:
    """Weights and rebuild settings of ``model`` in one safetensors file, written atomically."""
    if isinstance(model, VideoCritic):
        save_video_critic(model, path, extra)
    elif isinstance(model, Critic):
        model.save(path, extra)
    else:
        raise TypeError(f"save_critic: not a critic: {type(model).__name__}")


def load_critic(path, device: torch.device | str = "cpu", *, backbone: Optional[str] = None) -> VideoCritic | Critic:
    """The critic saved at ``path`` (module docstring); ``backbone`` overrides a VLM critic's saved backbone path."""
    path = critic_file(path)
    kind = critic_format(path)
    if kind == VIDEO_CRITIC_FORMAT:
        return load_video_critic(path, device)
    if kind == VLM_FORMAT:
        return load_vlm_critic(path, device, backbone=backbone)
    raise ValueError(f"{path}: not a vidpo critic file (metadata format {kind!r})")
