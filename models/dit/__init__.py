"""The video diffusion transformer (Wan / Open-Sora / CogVideoX style) used as the policy and reference.

    from vidpo.models.dit import dit_config, build_dit
    model = build_dit(dit_config("tiny"))
    v = model(x_t, t, cond)            # x_t (B, C, T, H, W), t (B,), cond (B, L) ids or (B, L, cond_dim)

config.py     DiTConfig, PRESETS, dit_config, analytic num_params / flops_per_forward
rope.py       3-D rotary position embedding (Wan's head-dim split)
attention.py  attention backends (sdpa, math, flash_attn, te, auto)
model.py      VideoDiT and its modules (module names listed in its docstring)
"""
from .attention import AttentionBackendUnavailable, attention, available_backends, require_backend, resolve_backend
from .config import PRESETS, DiTConfig, dit_config
from .model import VideoDiT, build_dit, patchify, unpatchify

__all__ = [
    "AttentionBackendUnavailable", "DiTConfig", "PRESETS", "VideoDiT", "attention", "available_backends",
    "build_dit", "dit_config", "patchify", "require_backend", "resolve_backend", "unpatchify",
]
