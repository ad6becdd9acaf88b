"""Parallelize the video DiT: TP/SP -> CP -> activation checkpointing -> compile -> FSDP, in that order.

``parallelize_dit(model, ctx)`` turns a single-device ``VideoDiT`` (weights loaded) into a
``ParallelVideoDiT`` with the same parameter names (``blocks.3.attn.qkv.weight``), so checkpoints, LoRA
patterns and optimizers address parameters the same way at every world size.

Tensor parallel (tp ranks, megatron-core layers; Megatron-LM's transformer layer, arXiv:1909.08053):
  column-parallel (output features split):  attn.qkv [q; k; v], cross.q, cross.kv [k; v], mlp.fc1
  row-parallel (input features split):      attn.proj, cross.proj, mlp.fc2
  Fused projections are split per part, so rank r holds [q_r; k_r; v_r] = whole heads r*h/tp .. (r+1)*h/tp
  and the attention code's "heads = out / head_dim" sees h/tp heads. Everything else is replicated.
Sequence parallel (option of TP, arXiv:2205.05198): the residual stream (n, B, D) holds n/tp tokens per
  rank between blocks' linear layers; column layers all-gather tokens, row layers reduce-scatter them. The
  replicated tensors used inside that region (each block's modulation + the shared adaLN output, the
  cross-attention LayerNorm's affine parameters, the row layers' biases) enter through ``CopyToGroup``,
  whose backward sums their per-rank partial gradients over the TP group.
Context parallel (cp ranks, Ulysses, arXiv:2309.14509): rank c holds latent frames [c T/cp, (c+1) T/cp)
  (whole temporal patches, so its tokens are a contiguous slice of the row-major token order) with the
  RoPE positions of those frames. Self-attention all-to-alls (B, h, n/cp, d) -> (B, h/cp, n, d) before
  the attention kernel and back after it; cross-attention needs nothing (every rank has the whole
  condition). The model returns the local frames ``(B, C, T/cp, H, W)``: the loss reduces its per-segment
  sums over the CP group with the local segment ids (``vidpo.kernels`` ``group=``). Composes with TP:
  heads must divide by tp * cp.

Gradients: TP-replicated parameters end with identical, complete gradients on every TP rank; every
parameter's gradient on a CP or DP rank is that rank's partial sum, so the training loop SUMs them over
the data x context-parallel ranks (FSDP with gradient divide factor 1, or an all-reduce).

Layout in the blocks: (n, B, D), sequence first, as megatron-core's layers expect (they gather along dim 0).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from vidpo.parallel.mappings import (
    all_gather_to_group,
    copy_to_group,
    gather_from_group,
    group_rank,
    group_size,
    heads_to_sequence,
    scatter_to_group,
    sequence_to_heads,
)

from .attention import attention
from .model import (
    MLP,
    CrossAttention,
    DiTBlock,
    RMSNorm,
    SelfAttention,
    VideoDiT,
    patchify,
    timestep_features,
    unpatchify,
)
from .rope import apply_rope, grid_positions, rope_cos_sin

# Module-name suffix -> number of fused parts along the output dim (column) ; row-parallel modules.
COLUMN_PARALLEL: Dict[str, int] = {"attn.qkv": 3, "cross.q": 1, "cross.kv": 2, "mlp.fc1": 1}
ROW_PARALLEL = ("attn.proj", "cross.proj", "mlp.fc2")


@dataclass(frozen=True)
class TPShard:
    """How a canonical parameter is split over TP ranks: along ``dim``, per each of ``parts`` fused parts.
    Rank r's shard = concat over parts p of chunk r (of tp) of part p."""

    dim: int
    parts: int = 1

    def shard(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        parts = full.unflatten(self.dim, (self.parts, -1))
        return parts.chunk(world, dim=self.dim + 1)[rank].flatten(self.dim, self.dim + 1).contiguous()

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        views = [s.unflatten(self.dim, (self.parts, -1)) for s in shards]
        return torch.cat(views, dim=self.dim + 1).flatten(self.dim, self.dim + 1)

    def checkpoint_view(self, t: torch.Tensor) -> torch.Tensor:
        """The (.., parts, rows / parts, ..) view checkpoints store, in which a TP shard is a plain
        contiguous block along ``dim + 1`` (the fused [q; k; v] split is not one along ``dim``)."""
        return t.unflatten(self.dim, (self.parts, -1))


def tp_plan(model: nn.Module) -> Dict[str, TPShard]:
    """Canonical parameter name -> TPShard for every parameter tensor parallel splits (of a VideoDiT or a
    ParallelVideoDiT: the names are the same). Row-parallel biases are replicated, so absent."""
    plan = {}
    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        for suffix, parts in COLUMN_PARALLEL.items():
            if module.endswith(suffix) and leaf in ("weight", "bias"):
                plan[name] = TPShard(0, parts)
        if any(module.endswith(s) for s in ROW_PARALLEL) and leaf == "weight":
            plan[name] = TPShard(1, 1)
    return plan


@dataclass
class ShardSpec:
    """The groups a parallel module talks to (plain attributes, not modules)."""

    tp_group: object = None
    cp_group: object = None
    sp: bool = False

    @property
    def tp(self) -> int:
        return group_size(self.tp_group)

    @property
    def cp(self) -> int:
        return group_size(self.cp_group)


# ----- megatron-core layers ------------------------------------------------------------------------------
def megatron_linear(linear: nn.Linear, kind: str, parts: int, spec: ShardSpec, sequence_parallel: bool) -> nn.Module:
    """A megatron-core Column/RowParallelLinear holding this rank's shard of ``linear``'s weights."""
    if not isinstance(linear, nn.Linear) or type(linear) is not nn.Linear:
        raise NotImplementedError(f"tensor parallel needs plain nn.Linear layers, got {type(linear).__name__} "
                                  "(LoRA adapters are supported with parallel.tp=1 only)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    weight = linear.weight
    config = ModelParallelConfig(tensor_model_parallel_size=spec.tp, sequence_parallel=sequence_parallel,
                                 use_cpu_initialization=True, perform_initialization=False,
                                 params_dtype=weight.dtype)
    common = dict(config=config, init_method=lambda w: w, bias=linear.bias is not None, tp_group=spec.tp_group)
    rank, world = group_rank(spec.tp_group), spec.tp
    # Made on the weight's device (megatron's CPU initialisation takes the default device): on the meta device of a
    # model whose weights arrive later (vidpo.training.sharded_init) no host copy is made, and no move to another
    # device replaces the parameters megatron has set its attributes on.
    with warnings.catch_warnings(), torch.device(weight.device):
        warnings.simplefilter("ignore")
        if kind == "column":
            layer = ColumnParallelLinear(linear.in_features, linear.out_features, gather_output=False,
                                         skip_bias_add=False, **common)
            weight_spec = TPShard(0, parts)
        else:
            # The bias is added by the caller, through CopyToGroup under sequence parallel.
            layer = RowParallelLinear(linear.in_features, linear.out_features, input_is_parallel=True,
                                      skip_bias_add=True, **common)
            weight_spec = TPShard(1, 1)
    layer = layer.to(weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight_spec.shard(weight.detach(), rank, world))
        set_tensor_model_parallel_attributes(layer.weight, True, weight_spec.dim, 1)
        if linear.bias is not None:
            bias = linear.bias.detach()
            layer.bias.copy_(TPShard(0, parts).shard(bias, rank, world) if kind == "column" else bias)
    layer.weight.requires_grad_(weight.requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(linear.bias.requires_grad)
    return layer


def cp_local_frames(frames: int, patch_t: int, spec: ShardSpec) -> slice:
    """The latent frames a context-parallel rank holds: whole temporal patches, the same count per rank."""
    patches = frames // patch_t
    if frames % patch_t or patches % spec.cp:
        raise ValueError(f"{frames} latent frames ({patches} temporal patches of {patch_t}) cannot be split over "
                         f"{spec.cp} context-parallel ranks")
    per = patches // spec.cp * patch_t
    rank = group_rank(spec.cp_group)
    return slice(rank * per, (rank + 1) * per)


@torch.no_grad()
def whole_clip(local: torch.Tensor, spec: ShardSpec, frame_dim: int = 2) -> torch.Tensor:
    """The whole clip from every CP rank's frames of it (all-gather along ``frame_dim``; the identity without
    CP). For sampling and evaluation, which integrate the whole clip: no gradient flows through it, and every
    CP rank must call it with the same inputs (it is a collective)."""
    if spec.cp == 1:
        return local
    return all_gather_to_group(local.contiguous(), frame_dim, spec.cp_group)


def _is_megatron(layer: nn.Module) -> bool:
    return hasattr(layer, "tp_group") and type(layer).__module__.startswith("megatron.")


def column_parallel(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a plain or a column-parallel linear (megatron's returns ``(out, bias)``)."""
    return layer(x)[0] if _is_megatron(layer) else layer(x)


def row_parallel(layer: nn.Module, x: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """``layer(x)`` for a plain or a row-parallel linear, its bias added after the reduction."""
    if not _is_megatron(layer):
        return layer(x)
    out, bias = layer(x)
    if bias is None:
        return out
    return out + (copy_to_group(bias, spec.tp_group) if spec.sp else bias)


def _head_norm(norm: nn.Module, x: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """QK RMSNorm over head_dim; its weight is shared by all heads, and each TP rank holds other heads."""
    if not isinstance(norm, RMSNorm) or spec.tp == 1:
        return norm(x)
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    return (y * copy_to_group(norm.weight, spec.tp_group).float()).to(x.dtype)


# ----- parallel modules (same attribute names as the single-device ones) ------------------------------------
class ParallelSelfAttention(nn.Module):
    """SelfAttention over (n_local, B, D) with TP heads, SP token shards and Ulysses CP."""

    def __init__(self, attn: SelfAttention, spec: ShardSpec):
        super().__init__()
        self.head_dim, self.backend, self.spec = attn.head_dim, attn.backend, spec
        tp = spec.tp > 1
        self.qkv = megatron_linear(attn.qkv, "column", 3, spec, spec.sp) if tp else attn.qkv
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.proj = megatron_linear(attn.proj, "row", 1, spec, spec.sp) if tp else attn.proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = column_parallel(self.qkv, x)                                     # (n_cp, B, 3 * h_tp * d)
        n, b = qkv.shape[:2]
        q, k, v = qkv.view(n, b, 3, -1, self.head_dim).unbind(2)        # each (n_cp, B, h_tp, d)
        q, k = _head_norm(self.q_norm, q, self.spec), _head_norm(self.k_norm, k, self.spec)
        q, k, v = (z.permute(1, 2, 0, 3) for z in (q, k, v))            # (B, h_tp, n_cp, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.spec.cp > 1:
            q, k, v = (sequence_to_heads(z, self.spec.cp_group) for z in (q, k, v))   # (B, h_tp/cp, n, d)
        out = attention(q, k, v, self.backend)
        if self.spec.cp > 1:
            out = heads_to_sequence(out, self.spec.cp_group)                # (B, h_tp, n_cp, d)
        out = out.permute(2, 0, 1, 3).reshape(n, b, -1)                  # (n_cp, B, h_tp * d)
        return row_parallel(self.proj, out, self.spec)


class ParallelCrossAttention(nn.Module):
    """CrossAttention: local video tokens attend to the whole (replicated) condition; TP splits heads."""

    def __init__(self, cross: CrossAttention, spec: ShardSpec):
        super().__init__()
        self.head_dim, self.backend, self.spec = cross.head_dim, cross.backend, spec
        tp = spec.tp > 1
        self.q = megatron_linear(cross.q, "column", 1, spec, spec.sp) if tp else cross.q
        # The condition is replicated, never sequence-sharded: this layer's input gradient is all-reduced.
        self.kv = megatron_linear(cross.kv, "column", 2, spec, False) if tp else cross.kv
        self.q_norm, self.k_norm = cross.q_norm, cross.k_norm
        self.proj = megatron_linear(cross.proj, "row", 1, spec, spec.sp) if tp else cross.proj

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = column_parallel(self.q, x)                                          # (n_cp, B, h_tp * d)
        n, b = q.shape[:2]
        q = _head_norm(self.q_norm, q.view(n, b, -1, self.head_dim), self.spec)
        kv = column_parallel(self.kv, context.transpose(0, 1))                   # (L, B, 2 * h_tp * d)
        k, v = kv.view(kv.shape[0], b, 2, -1, self.head_dim).unbind(2)
        k = _head_norm(self.k_norm, k, self.spec)
        out = attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), self.backend)
        return row_parallel(self.proj, out.permute(2, 0, 1, 3).reshape(n, b, -1), self.spec)


class ParallelMLP(nn.Module):
    def __init__(self, mlp: MLP, spec: ShardSpec):
        super().__init__()
        self.spec = spec
        tp = spec.tp > 1
        self.fc1 = megatron_linear(mlp.fc1, "column", 1, spec, spec.sp) if tp else mlp.fc1
        self.fc2 = megatron_linear(mlp.fc2, "row", 1, spec, spec.sp) if tp else mlp.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_parallel(self.fc2, F.gelu(column_parallel(self.fc1, x), approximate="tanh"), self.spec)


class ParallelDiTBlock(nn.Module):
    """DiTBlock on the sequence-first residual stream (n_local, B, D); same update equations."""

    def __init__(self, block: DiTBlock, spec: ShardSpec):
        super().__init__()
        self.spec = spec
        self.modulation = block.modulation
        self.norm1 = block.norm1
        self.attn = ParallelSelfAttention(block.attn, spec)
        self.norm_cross = block.norm_cross
        self.cross = ParallelCrossAttention(block.cross, spec)
        self.norm2 = block.norm2
        self.mlp = ParallelMLP(block.mlp, spec)

    def _norm_cross(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm_cross
        if not self.spec.sp:
            return norm(x)
        return F.layer_norm(x, norm.normalized_shape, copy_to_group(norm.weight, self.spec.tp_group),
                            copy_to_group(norm.bias, self.spec.tp_group), norm.eps)

    def forward(self, x: torch.Tensor, shared_modulation: torch.Tensor, context: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (n_local, B, D), shared_modulation (B, 6, D), context (B, L, D), cos/sin (n_cp, head_dim/2)."""
        mod = self.modulation.unsqueeze(0) + shared_modulation                  # (B, 6, D)
        if self.spec.sp:
            mod = copy_to_group(mod, self.spec.tp_group)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unsqueeze(0).unbind(2)   # each (1, B, D)
        x = x + gate_a * self.attn(self.norm1(x) * (1 + scale_a) + shift_a, cos, sin)
        x = x + self.cross(self._norm_cross(x), context)
        x = x + gate_m * self.mlp(self.norm2(x) * (1 + scale_m) + shift_m)
        return x


class ParallelVideoDiT(nn.Module):
    """``forward(x, t, cond) -> v``: x (B, C, T, H, W) whole clips on every rank; v (B, C, T/cp, H, W), this
    CP rank's frames (``local_frames(T)``).

    Holds the single-device model's embedding / final modules and parallel blocks under the same names.
    """

    def __init__(self, model: VideoDiT, spec: ShardSpec, *, activation_checkpointing: str = "none"):
        super().__init__()
        self.config = model.config
        self.spec = spec
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = model.patch_embed
        self.time_embed = model.time_embed
        self.adaLN = model.adaLN
        self.cond_embed = model.cond_embed
        self.blocks = nn.ModuleList(ParallelDiTBlock(b, spec) for b in model.blocks)
        self.final = model.final
        self.tp_plan = tp_plan(self)

    # ----- what callers need from a VideoDiT ------------------------------------------------------------
    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        VideoDiT._check_condition(self, cond)
        return torch.zeros_like(cond)

    def local_frames(self, frames: int) -> slice:
        """This CP rank's latent frames of a clip of ``frames`` frames."""
        return cp_local_frames(frames, self.config.patch_size[0], self.spec)

    def whole_clip_forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``forward`` with every CP rank's frames gathered: the velocity of the whole clip (what samplers
        integrate; no gradient). A collective: every rank of the CP group calls it with the same inputs."""
        return whole_clip(self(x, t, cond), self.spec)

    # ----- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg, spec = self.config, self.spec
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected x of shape (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        batch, _, frames, height, width = x.shape
        cfg.patch_grid(frames, height, width)
        VideoDiT._check_condition(self, cond, batch)
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"expected t of shape ({batch},) or a scalar, got {tuple(t.shape)}")

        frames_here = self.local_frames(frames)
        x_local = x[:, :, frames_here]
        grid = cfg.patch_grid(x_local.shape[2], height, width)
        tokens = grid[0] * grid[1] * grid[2]
        if spec.sp and tokens % spec.tp:
            raise ValueError(f"sequence parallel splits this rank's {tokens} tokens over tp={spec.tp} ranks: "
                             "they must divide")
        param_dtype = self.patch_embed.weight.dtype
        h = self.patch_embed(patchify(x_local.to(param_dtype), cfg.patch_size))            # (B, n_cp, D)
        temb = self.time_embed(timestep_features(t).to(param_dtype))                      # (B, D)
        shared_modulation = self.adaLN(F.silu(temb)).unflatten(-1, (6, cfg.width))         # (B, 6, D)
        context = self.cond_embed(cond if cfg.uses_class_tokens else cond.to(param_dtype))  # (B, L, D)
        positions = grid_positions(grid, device=x.device)
        positions[:, 0] += frames_here.start // cfg.patch_size[0]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        h = h.transpose(0, 1)                                                              # (n_cp, B, D)
        if spec.sp:
            h = scatter_to_group(h, 0, spec.tp_group)                                      # (n_cp/tp, B, D)
        recompute = self.activation_checkpointing == "full" and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h = checkpoint(block, h, shared_modulation, context, cos, sin, use_reentrant=False)
            else:
                h = block(h, shared_modulation, context, cos, sin)
        if spec.sp:
            h = gather_from_group(h, 0, spec.tp_group)
        out = self.final(h.transpose(0, 1), temb)
        v = unpatchify(out, grid, cfg.patch_size, cfg.resolved_out_channels).to(x.dtype)
        return v


# ----- the parallelize function ---------------------------------------------------------------------------
def apply_fsdp(model: ParallelVideoDiT, mesh, *, param_dtype: Optional[torch.dtype] = None,
               reshard_after_forward: bool = True, cpu_offload: bool = False) -> ParallelVideoDiT:
    """FSDP2 ``fully_shard`` per block, then the root (embeddings, final layer). Gradients are SUMMED over
    the mesh (divide factor 1): every rank backpropagates the global loss (module docstring). ``cpu_offload``
    (``parallel.cpu_offload``): FSDP2's ``CPUOffloadPolicy``, the sharded parameters, gradients and optimizer
    state live in host memory and each unit is copied to the device for its forward / backward (pinned
    buffers on CUDA)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype if param_dtype not in (None, torch.float32) else None,
                              reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, offload_policy=offload)
    for module in [model, *model.blocks]:
        module.set_gradient_divide_factor(1.0)
        if mesh.device_type == "cpu":
            # Gloo has no PREMUL_SUM (how FSDP applies a custom divide factor): plain SUM, then x 1/1.
            module.set_force_sum_reduction_for_comms(True)
    return model


def parallelize_dit(model: VideoDiT, ctx, *, activation_checkpointing: str = "none", compile: bool = False,
                    fsdp: bool = True) -> ParallelVideoDiT:
    """TP/SP -> CP -> activation checkpointing -> compile -> FSDP over ``ctx`` (a
    ``vidpo.training.distributed.ParallelContext``). The input model's weights are the starting point; its modules
    are reused (non-TP parameters keep their storage), so do not use ``model`` afterwards."""
    if not isinstance(model, VideoDiT):
        raise TypeError(f"parallelize_dit takes a VideoDiT, got {type(model).__name__}")
    heads = model.config.num_heads
    if heads % (ctx.tp * ctx.cp):
        raise ValueError(f"{heads} heads are not divisible by tp * cp = {ctx.tp * ctx.cp}")
    spec = ShardSpec(tp_group=ctx.tp_group if ctx.tp > 1 else None, cp_group=ctx.cp_group if ctx.cp > 1 else None,
                     sp=ctx.sp and ctx.tp > 1)
    parallel = ParallelVideoDiT(model, spec, activation_checkpointing=activation_checkpointing)   # TP/SP, CP
    if compile:
        for block in parallel.blocks:
            block.compile()
    if fsdp and ctx.layout.fsdp:
        apply_fsdp(parallel, ctx.fsdp_mesh, param_dtype=ctx.fsdp_param_dtype, cpu_offload=ctx.cpu_offload)
    return parallel
