"""Exponential moving average (EMA) of a model's trainable weights.

Diffusion and flow models are sampled from an EMA of their weights (DDPM, DiT, SD3, Wan all do): the
last optimizer iterate of a noisy flow-matching run jitters around the good solution, and its samples
show it (objects that flicker, drift or vanish), while the average of the last few hundred iterates
samples far more cleanly at no cost in steps. On the shapes world a 900-step pretraining run gains more
from EMA than from several hundred more steps.

``shadow <- d * shadow + (1 - d) * weights`` after every optimizer step, with the warmed-up decay
``d = min(decay, (1 + step) / (10 + step))`` (as timm / the original EMA code of DDPM): early on the
average forgets the random initialisation quickly.

Checkpoints (``vidpo.training.checkpoint``): with EMA on, ``model.safetensors`` holds the **EMA** weights -- the
policy every reader (``vidpo sample/eval --ckpt``, ``train.init_from``) should use -- and
``online.safetensors`` the optimizer's own weights, which only resume reads.

Distributed runs: the shadow of a parameter has that parameter's layout (an FSDP2 DTensor chunk, a TP slice),
so the update is elementwise on each rank with no communication. DCP checkpoints (``vidpo.training.dist_checkpoint``)
store it under ``ema/<name>`` in the single-device layout and consolidate it into ``model.safetensors``, so
an EMA run resumes at any world size, like any other.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay used for update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightEma:
    """EMA of the parameters of ``model`` that require gradients, kept in float32 on their device."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - warmed_up_decay(self.decay, self.updates)
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), weight)
        self.updates += 1

    def model_state(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged parameters in place of the current ones (buffers and
        frozen parameters as they are), each in its parameter's dtype."""
        state = dict(model.state_dict())
        for name, value in self.shadow.items():
            state[name] = value.to(state[name].dtype)
        return state

    def load_model_state(self, state: Dict[str, torch.Tensor], updates: int) -> None:
        """Restore the average from a ``model_state`` dict (the checkpoint's model.safetensors)."""
        missing = [name for name in self.shadow if name not in state]
        if missing:
            raise RuntimeError(f"EMA state lacks {missing[:5]} (was the checkpoint written with train.ema_decay?)")
        for name in self.shadow:
            self.shadow[name].copy_(state[name].float())
        self.updates = int(updates)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Put the EMA weights into ``model`` for good (the end of a run)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Within the block ``model`` carries the EMA weights; its own weights come back afterwards."""
        saved = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])
