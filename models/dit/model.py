"""Video diffusion transformer (single-device code) in the style of Wan / Open-Sora / CogVideoX.

``VideoDiT.forward(x, t, cond) -> v``:
  x    (B, C, T, H, W)  noisy video / latent x_t
  t    (B,) or ()       rectified-flow time in [0, 1] (1 = pure noise)
  cond (B, L) long      class-token ids (``cond_vocab_size > 0``; id 0 = NULL), or
       (B, L, cond_dim) text embeddings (``cond_vocab_size == 0``; an all-zero row = null)
  v    (B, C_out, T, H, W) predicted velocity, in x's dtype.

Data flow (D = width, n = (T/pt)(H/ph)(W/pw) tokens, P = C*pt*ph*pw):
  patchify      (B, C, T, H, W) -> (B, n, P), patch vector ordered (C, pt, ph, pw) like a Conv3d
                weight, so a Conv3d patch embedding loads as ``weight.reshape(D, P)``
  patch_embed   Linear P -> D (reshape + Linear shards better under tensor parallelism than Conv3d)
  time_embed    sinusoidal(1000 t, 256) -> fc1 -> SiLU -> fc2            temb (B, D)
  adaLN         Linear(SiLU(temb)) -> (B, 6, D), shared by all blocks; each block adds its own learned
                ``modulation`` table (6, D), as Wan 2.x does. Both start at zero (adaLN-zero): every
                shift, scale and gate is 0 at init, so each block starts as the identity.
  cond_embed    class tokens: Embedding(V, D);  text: fc1 (cond_dim -> D) -> GELU(tanh) -> fc2
  blocks x depth, each with (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = modulation + adaLN:
      x = x + gate_a * attn(LN(x) * (1 + scale_a) + shift_a)     full bidirectional self-attention over
                                                                  all video tokens, QK RMSNorm, 3-D RoPE
      x = x + cross(LN_affine(x), context)                       cross-attention, no modulation (Wan)
      x = x + gate_m * mlp(LN(x) * (1 + scale_m) + shift_m)      GELU(tanh) MLP
  final         LN(x) * (1 + scale) + shift with (shift, scale) = final.adaLN(SiLU(temb)); final.linear
                D -> C_out*pt*ph*pw; both zero-initialised, so an untrained model outputs exactly 0
  unpatchify    (B, n, P_out) -> (B, C_out, T, H, W)

Module names (tensor-parallel plans and LoRA target these; ``blocks.<i>.`` prefixes the per-block ones):
  patch_embed, time_embed.fc1, time_embed.fc2, adaLN, cond_embed.table | cond_embed.fc1, cond_embed.fc2,
  blocks.<i>.modulation (Parameter (6, D)), blocks.<i>.norm1, blocks.<i>.norm_cross, blocks.<i>.norm2,
  blocks.<i>.attn.qkv   fused, output rows [q; k; v], each num_heads*head_dim (head-major inside)
  blocks.<i>.attn.q_norm, attn.k_norm (RMSNorm over head_dim), blocks.<i>.attn.proj
  blocks.<i>.cross.q, blocks.<i>.cross.kv (output rows [k; v]), cross.q_norm, cross.k_norm, cross.proj
  blocks.<i>.mlp.fc1, blocks.<i>.mlp.fc2, final.adaLN, final.linear
Attention modules infer their local head count from the projection's output size (heads = out / head_dim),
so a column-parallel qkv / q / kv that keeps whole heads on each rank needs no change here.

Why one shared adaLN Linear instead of DiT's per-block one: it is Wan's layout, and a per-block D -> 6D
Linear would be 6D^2 parameters per block (a third of the tiny model).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attention, require_backend, resolve_backend
from .config import ACTIVATION_CHECKPOINTING, TIME_FREQUENCY_DIM, DiTConfig
from .rope import apply_rope, grid_positions, rope_cos_sin


# ----- tensor layout helpers -------------------------------------------------------------------------------
def patchify(x: torch.Tensor, patch_size: Tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, n, C*pt*ph*pw); tokens in (t, h, w) row-major order, patch vector (C, pt, ph, pw)."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid: Tuple[int, int, int], patch_size: Tuple[int, int, int],
               channels: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, n, C*pt*ph*pw) with n = prod(grid) -> (B, C, T, H, W)."""
    b = tokens.shape[0]
    gt, gh, gw = grid
    pt, ph, pw = patch_size
    x = tokens.reshape(b, gt, gh, gw, channels, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, gt * pt, gh * ph, gw * pw)


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 1000 t: [cos(1000 t w_i), sin(1000 t w_i)], w_i = max_period**(-i/(dim/2)).

    t (B,) in [0, 1] -> (B, dim) float32. The factor 1000 puts rectified-flow time on the scale of
    DDPM step indices, the range these frequencies were chosen for.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----- building blocks ---------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class TimestepEmbedding(nn.Module):
    """sinusoidal features (B, 256) -> fc1 -> SiLU -> fc2 -> (B, D)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(TIME_FREQUENCY_DIM, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(features)))


class ClassTokenEmbedding(nn.Module):
    """Token ids (B, L) -> (B, L, D); row 0 is the learned NULL token."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


class TextEmbedding(nn.Module):
    """Text-encoder features (B, L, cond_dim) -> fc1 -> GELU(tanh) -> fc2 -> (B, L, D), as in Wan."""

    def __init__(self, cond_dim: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(cond_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(features), approximate="tanh"))


class SelfAttention(nn.Module):
    """Full bidirectional multi-head self-attention with QK RMSNorm and 3-D RoPE; (B, n, D) -> (B, n, D)."""

    def __init__(self, width: int, head_dim: int, qk_norm: bool, eps: float, backend: str):
        super().__init__()
        self.head_dim = head_dim
        self.backend = backend
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)
        # Default-off hook: a callable(q, k) that receives the post-RoPE (B, heads, n, d) queries and keys
        # (motion guidance reads a block's temporal attention from them; vidpo.models.motion_guidance).
        self.qk_observer = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, -1, self.head_dim).unbind(2)      # each (B, n, heads, d)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))                      # (B, heads, n, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_observer is not None:
            self.qk_observer(q, k)
        out = attention(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class CrossAttention(nn.Module):
    """Video tokens (B, n, D) attend to condition tokens (B, L, D); QK RMSNorm, no RoPE, no mask."""

    def __init__(self, width: int, head_dim: int, qk_norm: bool, eps: float, backend: str):
        super().__init__()
        self.head_dim = head_dim
        self.backend = backend
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q(x).view(b, n, -1, self.head_dim))
        k, v = self.kv(context).view(b, context.shape[1], 2, -1, self.head_dim).unbind(2)
        k = self.k_norm(k)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    """fc1 (D -> F) -> GELU(tanh) -> fc2 (F -> D)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """One transformer block; see the module docstring for the update equations."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.width
        self.modulation = nn.Parameter(torch.zeros(6, d))
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.attn = SelfAttention(d, cfg.head_dim, cfg.qk_norm, cfg.eps, cfg.attention)
        self.norm_cross = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross = CrossAttention(d, cfg.head_dim, cfg.qk_norm, cfg.eps, cfg.attention)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.mlp = MLP(d, cfg.resolved_ffn_dim)

    def forward(self, x: torch.Tensor, shared_modulation: torch.Tensor, context: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, n, D), shared_modulation (B, 6, D), context (B, L, D), cos/sin (n, head_dim/2)."""
        mod = (self.modulation.unsqueeze(0) + shared_modulation).unsqueeze(2)   # (B, 6, 1, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unbind(1)
        x = x + gate_a * self.attn(self.norm1(x) * (1 + scale_a) + shift_a, cos, sin)
        x = x + self.cross(self.norm_cross(x), context)
        x = x + gate_m * self.mlp(self.norm2(x) * (1 + scale_m) + shift_m)
        return x


class FinalLayer(nn.Module):
    """LN(x) * (1 + scale) + shift, (shift, scale) = adaLN(SiLU(temb)); then linear D -> C_out*pt*ph*pw."""

    def __init__(self, width: int, out_features: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.adaLN = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


# ----- the network -------------------------------------------------------------------------------------------
class VideoDiT(nn.Module):
    """The video DiT; ``forward(x, t, cond) -> v`` (shapes in the module docstring)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        require_backend(cfg.attention)          # fail at build time, not at the first forward
        self.config = cfg
        self.activation_checkpointing = cfg.activation_checkpointing
        d, (pt, ph, pw) = cfg.width, cfg.patch_size
        self.patch_embed = nn.Linear(cfg.in_channels * pt * ph * pw, d)
        self.time_embed = TimestepEmbedding(d)
        self.adaLN = nn.Linear(d, 6 * d)
        self.cond_embed = (ClassTokenEmbedding(cfg.cond_vocab_size, d) if cfg.uses_class_tokens
                           else TextEmbedding(cfg.cond_dim, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(d, cfg.resolved_out_channels * pt * ph * pw, cfg.eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier-uniform Linear weights with zero bias; N(0, 0.02) timestep MLP and token table; zero
        adaLN, per-block modulation tables and final layer (adaLN-zero). Safe to call after
        ``to_empty`` on a model built on the meta device."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.fc1.weight, std=0.02)
        nn.init.normal_(self.time_embed.fc2.weight, std=0.02)
        if isinstance(self.cond_embed, ClassTokenEmbedding):
            nn.init.normal_(self.cond_embed.table.weight, std=0.02)
        for zero in (self.adaLN, self.final.adaLN, self.final.linear):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)

    # ----- options --------------------------------------------------------------------------------------
    @property
    def attention_backend(self) -> str:
        """The concrete attention backend this model runs (for the run's log)."""
        param = self.patch_embed.weight
        dtype = torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) \
            else param.dtype
        return resolve_backend(self.config.attention, param.device, dtype)

    def set_attention_backend(self, backend: str) -> None:
        require_backend(backend)
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.backend = backend

    def set_activation_checkpointing(self, mode: str) -> None:
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing={mode!r} is not one of {list(ACTIVATION_CHECKPOINTING)}")
        self.activation_checkpointing = mode

    # ----- conditions -----------------------------------------------------------------------------------
    def _check_condition(self, cond: torch.Tensor, batch: Optional[int] = None) -> None:
        cfg = self.config
        if cfg.uses_class_tokens:
            if cond.dim() != 2 or cond.is_floating_point() or cond.is_complex():
                raise TypeError(f"this DiT takes class-token conditions: an integer tensor (B, L), got "
                                f"{cond.dtype} of shape {tuple(cond.shape)}")
        elif cond.dim() != 3 or not cond.is_floating_point() or cond.shape[-1] != cfg.cond_dim:
            raise TypeError(f"this DiT takes text-embedding conditions: a float tensor (B, L, {cfg.cond_dim}), "
                            f"got {cond.dtype} of shape {tuple(cond.shape)}")
        if batch is not None and cond.shape[0] != batch:
            raise ValueError(f"condition batch {cond.shape[0]} does not match the video batch {batch}")

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The null condition (classifier-free guidance) shaped like ``cond``: NULL token ids (0) or
        all-zero text embeddings."""
        self._check_condition(cond)
        return torch.zeros_like(cond)

    # ----- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected x of shape (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        batch, _, frames, height, width = x.shape
        grid = cfg.patch_grid(frames, height, width)
        self._check_condition(cond, batch)
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"expected t of shape ({batch},) or a scalar, got {tuple(t.shape)}")

        param_dtype = self.patch_embed.weight.dtype
        h = self.patch_embed(patchify(x.to(param_dtype), cfg.patch_size))               # (B, n, D)
        temb = self.time_embed(timestep_features(t).to(param_dtype))                     # (B, D)
        shared_modulation = self.adaLN(F.silu(temb)).unflatten(-1, (6, cfg.width))        # (B, 6, D)
        context = self.cond_embed(cond if cfg.uses_class_tokens else cond.to(param_dtype))  # (B, L, D)
        cos, sin = rope_cos_sin(grid_positions(grid, device=x.device), cfg.head_dim, cfg.rope_theta)

        recompute = self.activation_checkpointing == "full" and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h = checkpoint(block, h, shared_modulation, context, cos, sin, use_reentrant=False)
            else:
                h = block(h, shared_modulation, context, cos, sin)
        out = self.final(h, temb)
        return unpatchify(out, grid, cfg.patch_size, cfg.resolved_out_channels).to(x.dtype)


def build_dit(cfg: DiTConfig, device: Optional[torch.device | str] = None) -> VideoDiT:
    """A freshly initialised ``VideoDiT``; ``device="meta"`` builds it without memory (for counting,
    or for ``to_empty`` + ``init_weights`` after sharding)."""
    if device is None:
        return VideoDiT(cfg)
    with torch.device(device):
        return VideoDiT(cfg)
