"""Configuration of the video DiT: the ``DiTConfig`` dataclass, size presets, parameter and FLOP counts.

``num_params()`` and ``flops_per_forward()`` are analytic (no model is built), so a launcher can size a
run or compute model-FLOPs utilisation (MFU) for a 5B model on a laptop. Both follow the module layout
of ``vidpo.models.dit.model`` exactly; tests compare them with the built model and with
``torch.utils.flop_counter.FlopCounterMode``.

FLOP convention: every matmul ``(m x k) @ (k x n)`` costs ``2*m*n*k``; elementwise work (norms, RoPE,
softmax, modulation, activations, residual adds) and embedding-table lookups are not counted. A training
step costs ``3 * flops_per_forward`` (backward = 2x forward: one matmul for the input gradient and one for
the weight gradient per forward matmul). Activation checkpointing re-runs the forward, so the hardware does
4x, but MFU counts model FLOPs and stays at 3x.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

ATTENTION_BACKENDS = ("auto", "sdpa", "math", "flash_attn", "te")
ACTIVATION_CHECKPOINTING = ("none", "full")
TIME_FREQUENCY_DIM = 256
"""Width of the sinusoidal timestep features fed to the timestep MLP (as in DiT and Wan)."""


def choice(default, choices, **kwargs):
    """A field whose value must be one of ``choices`` (checked in ``DiTConfig.__post_init__``)."""
    return field(default=default, metadata={"choices": tuple(choices)}, **kwargs)


@dataclass
class DiTConfig:
    """Shape and options of a ``VideoDiT`` (see ``vidpo.models.dit.model`` for the layout)."""

    in_channels: int = 3
    """Channels C of the input video / latent ``(B, C, T, H, W)``: 3 for the pixel toy world, 16 for the
    Wan-2.1 VAE, 48 for the Wan-2.2 VAE."""

    out_channels: Optional[int] = None
    """Channels of the predicted velocity; None means ``in_channels``."""

    patch_size: Tuple[int, int, int] = (1, 2, 2)
    """Patch size (pt, ph, pw) over (T, H, W); the input's T, H, W must be divisible by it."""

    width: int = 128
    """Hidden size D of the transformer."""

    depth: int = 4
    """Number of transformer blocks."""

    num_heads: int = 4
    """Attention heads of self- and cross-attention; ``width / num_heads`` is the head dim (even, >= 6)."""

    ffn_dim: Optional[int] = None
    """Hidden size of the MLP; None means ``4 * width``."""

    cond_vocab_size: int = 0
    """> 0: the condition is a LongTensor ``(B, L)`` of token ids from a vocabulary of this size (the toy
    world's class tokens; id 0 is the NULL token). 0: the condition is a float tensor ``(B, L, cond_dim)``
    of text embeddings (an all-zero row is the null token)."""

    cond_dim: int = 0
    """Feature size of text-embedding conditions (4096 for umT5-XXL); used when ``cond_vocab_size == 0``."""

    qk_norm: bool = True
    """RMSNorm (per head, learned scale) on queries and keys of self- and cross-attention."""

    rope_theta: float = 10000.0
    """Base of the 3-D rotary position embedding's frequencies."""

    attention: str = choice("sdpa", ATTENTION_BACKENDS)
    """Attention backend: 'sdpa', 'math', 'flash_attn', 'te' or 'auto' (vidpo.models.dit.attention)."""

    activation_checkpointing: str = choice("none", ACTIVATION_CHECKPOINTING)
    """'full' recomputes each block in the backward pass (torch.utils.checkpoint, non-reentrant)."""

    eps: float = 1e-6
    """Epsilon of every LayerNorm / RMSNorm."""

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"DiTConfig.patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        for name in ("in_channels", "width", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        for spec in dataclasses.fields(self):
            choices = spec.metadata.get("choices")
            if choices and getattr(self, spec.name) not in choices:
                raise ValueError(f"DiTConfig.{spec.name}={getattr(self, spec.name)!r} is not one of {list(choices)}")
        if self.width % self.num_heads:
            raise ValueError(f"DiTConfig.width={self.width} is not divisible by num_heads={self.num_heads}")
        head_dim = self.width // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head dim width/num_heads={head_dim} must be even and >= 6 for the 3-D RoPE split")
        if self.cond_vocab_size < 0 or self.cond_dim < 0:
            raise ValueError("DiTConfig.cond_vocab_size and cond_dim must be >= 0")
        if self.cond_vocab_size == 0 and self.cond_dim == 0:
            raise ValueError("DiTConfig needs a condition: set cond_vocab_size > 0 (class tokens) "
                             "or cond_dim > 0 (text embeddings)")

    # ----- derived sizes -------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def resolved_out_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def resolved_ffn_dim(self) -> int:
        return 4 * self.width if self.ffn_dim is None else self.ffn_dim

    @property
    def uses_class_tokens(self) -> bool:
        return self.cond_vocab_size > 0

    def patch_grid(self, frames: int, height: int, width: int) -> Tuple[int, int, int]:
        """(T/pt, H/ph, W/pw); a clear ValueError when a size is not divisible by its patch size."""
        sizes = (frames, height, width)
        for axis, size, patch in zip("THW", sizes, self.patch_size):
            if size % patch:
                raise ValueError(f"input {axis}={size} is not divisible by the patch size {patch} along {axis} "
                                 f"(patch_size={self.patch_size}, input T,H,W={sizes})")
        return tuple(s // p for s, p in zip(sizes, self.patch_size))

    def num_tokens(self, frames: int, height: int, width: int) -> int:
        """Video tokens per sample: (T/pt) * (H/ph) * (W/pw)."""
        gt, gh, gw = self.patch_grid(frames, height, width)
        return gt * gh * gw

    # ----- analytic counts -----------------------------------------------------------------------------
    def num_params(self) -> int:
        """Parameter count of ``VideoDiT(self)``, from the layout (every Linear has a bias).

        Per block: modulation table 6D; attn.qkv D*3D+3D; attn.proj D*D+D; cross.q D*D+D; cross.kv D*2D+2D;
        cross.proj D*D+D; norm_cross (LayerNorm, affine) 2D; mlp 2*D*F+F+D; q/k RMSNorms 2*head_dim for
        each of the two attentions when qk_norm. Outside the blocks: patch_embed P*D+D (P = C*pt*ph*pw),
        time_embed 256*D+D + D*D+D, adaLN D*6D+6D, condition embedding (V*D or cond_dim*D+D + D*D+D),
        final.adaLN D*2D+2D, final.linear D*P_out+P_out.
        """
        d, f, dh = self.width, self.resolved_ffn_dim, self.head_dim
        pt, ph, pw = self.patch_size
        p_in, p_out = self.in_channels * pt * ph * pw, self.resolved_out_channels * pt * ph * pw
        qk = 2 * dh if self.qk_norm else 0
        block = (6 * d
                 + (d * 3 * d + 3 * d) + (d * d + d) + qk
                 + 2 * d
                 + (d * d + d) + (d * 2 * d + 2 * d) + (d * d + d) + qk
                 + (d * f + f) + (f * d + d))
        cond = self.cond_vocab_size * d if self.uses_class_tokens else (self.cond_dim * d + d) + (d * d + d)
        outside = ((p_in * d + d)
                   + (TIME_FREQUENCY_DIM * d + d) + (d * d + d)
                   + (d * 6 * d + 6 * d)
                   + cond
                   + (d * 2 * d + 2 * d) + (d * p_out + p_out))
        return self.depth * block + outside

    def flops_per_forward(self, batch: int, frames: int, height: int, width: int, cond_len: int) -> int:
        """Matmul FLOPs of one forward pass on ``(batch, C, frames, height, width)`` with ``cond_len`` tokens.

        With n = video tokens per sample, L = cond_len, D = width, F = ffn dim, B = batch:
          patch embed        2*B*n*P_in*D
          timestep MLP       2*B*(256*D + D*D)
          adaLN (shared)     2*B*D*6D            final.adaLN  2*B*D*2D
          text cond MLP      2*B*L*(cond_dim*D + D*D)        (class tokens: table lookup, 0)
          per block          2*B*n*D*(3D + D)                 self-attn qkv + proj
                             2*2*B*n*n*D                      self-attn Q K^T and A V (all heads)
                             2*B*n*D*2D + 2*B*L*D*2D          cross q + proj, cross kv
                             2*2*B*n*L*D                      cross-attn Q K^T and A V
                             2*2*B*n*D*F                      mlp fc1 + fc2
          final linear       2*B*n*D*P_out
        A training step is 3x this (see the module docstring).
        """
        b, n, L = batch, self.num_tokens(frames, height, width), cond_len
        d, f = self.width, self.resolved_ffn_dim
        pt, ph, pw = self.patch_size
        p_in, p_out = self.in_channels * pt * ph * pw, self.resolved_out_channels * pt * ph * pw
        per_block = (2 * b * n * d * 4 * d
                     + 4 * b * n * n * d
                     + 2 * b * n * d * 2 * d + 2 * b * L * d * 2 * d
                     + 4 * b * n * L * d
                     + 4 * b * n * d * f)
        cond = 0 if self.uses_class_tokens else 2 * b * L * (self.cond_dim * d + d * d)
        outside = (2 * b * n * p_in * d
                   + 2 * b * (TIME_FREQUENCY_DIM * d + d * d)
                   + 2 * b * d * 6 * d + 2 * b * d * 2 * d
                   + cond
                   + 2 * b * n * d * p_out)
        return int(self.depth * per_block + outside)


PRESETS: Dict[str, DiTConfig] = {
    # The CPU demo model of the shapes world: 16x16 RGB clips, 4x4 patches, class-token conditions.
    "tiny": DiTConfig(in_channels=3, patch_size=(1, 4, 4), width=128, depth=4, num_heads=4,
                      cond_vocab_size=32),
    # DiT-S / DiT-B shaped models of the same world, for single-GPU experiments and scaling checks.
    "small": DiTConfig(in_channels=3, patch_size=(1, 2, 2), width=384, depth=12, num_heads=6,
                       cond_vocab_size=32),
    "base": DiTConfig(in_channels=3, patch_size=(1, 2, 2), width=768, depth=12, num_heads=12,
                      cond_vocab_size=32),
    # Wan-2.1-T2V-1.3B-like: Wan-2.1 VAE latents (16 ch), umT5-XXL text embeddings (4096).
    "1.3b": DiTConfig(in_channels=16, patch_size=(1, 2, 2), width=1536, depth=30, num_heads=12,
                      ffn_dim=8960, cond_dim=4096),
    # Wan-2.2-TI2V-5B-like: Wan-2.2 VAE latents (48 ch).
    "5b": DiTConfig(in_channels=48, patch_size=(1, 2, 2), width=3072, depth=30, num_heads=24,
                    ffn_dim=14336, cond_dim=4096),
}


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(str(name), list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def dit_config(preset: str, **overrides) -> DiTConfig:
    """The preset ``preset`` with ``overrides`` applied; overrides whose value is None are ignored.

    Unknown presets and unknown field names raise ValueError naming the closest valid one.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}{_closest(preset, PRESETS)}; valid: {list(PRESETS)}")
    names = [f.name for f in dataclasses.fields(DiTConfig)]
    for key in overrides:
        if key not in names:
            raise ValueError(f"unknown DiTConfig field {key!r}{_closest(key, names)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "patch_size" in given:
        given["patch_size"] = tuple(given["patch_size"])
    return dataclasses.replace(PRESETS[preset], **given)
