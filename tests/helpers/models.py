"""Tiny models and weight perturbations shared by several test modules.

vidpo (and diffusers, for the adapters) is imported inside the builders, so importing this module costs nothing
and a module that skips without diffusers (``pytest.importorskip``) can still import it first.
"""
from __future__ import annotations

import torch

# The tiny diffusers adapters' text stream: embedding size and number of text tokens.
TEXT_DIM, TEXT_LEN = 16, 3


# ----- the diffusers adapters -----------------------------------------------------------------------------------
def tiny_wan(conditioner=None, *, sampler=None, sample_shift: float = 1.0, **transformer):
    """A ``WanAdapter`` over ``tiny_wan_transformer(text_dim=TEXT_DIM, **transformer)`` (in_channels, num_layers,
    seed); ``conditioner``: a ``TextConditioner`` or None (the caller passes text embeddings)."""
    from vidpo.models.wan import WanAdapter, tiny_wan_transformer

    return WanAdapter(tiny_wan_transformer(**{"text_dim": TEXT_DIM, **transformer}), conditioner, sampler=sampler,
                      sample_shift=sample_shift)


def tiny_cogvideox(conditioner=None, *, sampler=None, **transformer):
    """A ``CogVideoXAdapter`` over ``tiny_cogvideox_transformer`` with TEXT_DIM x TEXT_LEN text, 4 latent frames of
    8 x 8 (``transformer`` overrides: in_channels, frames, size, num_layers, seed, layout)."""
    from vidpo.models.cogvideox import CogVideoXAdapter, tiny_cogvideox_transformer

    fields = {"text_dim": TEXT_DIM, "text_len": TEXT_LEN, "frames": 4, "size": 8, **transformer}
    return CogVideoXAdapter(tiny_cogvideox_transformer(**fields), conditioner, sampler=sampler)


def add_random_lora(model, *, rank: int, alpha: float, target_modules, seed: int, std: float = 0.3):
    """Apply LoRA, train only the adapters, and draw every B factor from N(0, std^2) (a zero B would make the
    policy equal its reference, adapters off): the LoRA'd model, in place."""
    from vidpo.models.lora import apply_lora, lora_modules, mark_only_lora_trainable

    apply_lora(model, rank=rank, alpha=alpha, target_modules=list(target_modules))
    mark_only_lora_trainable(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(std * torch.randn(m.lora_B.weight.shape, generator=g))
    return model


# ----- weight perturbations -------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Replace every parameter (the zero-initialised ones too, so no adaLN-zero identity hides a path) by
    N(0, std^2) noise from one generator seeded ``seed``, in the parameter's dtype. Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Add ``scale`` * N(0, 1) to every parameter, each drawn from a generator seeded with its number of elements
    (an untrained DiT outputs exactly 0: its samples, pairs and gradients would not differ). Returns ``model``."""
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


@torch.no_grad()
def perturb_seeded_(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """Add ``scale`` * N(0, 1) to every parameter, in order, from one generator seeded ``seed`` (every norm
    weight away from 1 and every bias away from 0, so that a wrongly sharded parameter shows). Returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# ----- the engine's micro policy --------------------------------------------------------------------------------
def save_perturbed_base(cfg, path):
    """The micro policy of ``cfg`` (its world's), perturbed (``perturb_``) and saved as an initial policy
    (``train.init_from``) at ``path``; returns ``path``."""
    from vidpo.training.modeling import build_policy, build_world
    from vidpo.utils import atomic

    atomic.save_safetensors(perturb_(build_policy(cfg, build_world(cfg))).state_dict(), path)
    return path
