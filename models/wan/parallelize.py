"""Parallelize diffusers' Wan 2.1 / 2.2 transformer(s): TP/SP -> CP -> activation checkpointing -> compile -> FSDP.

The mechanism is the video DiT's (``vidpo.models.dit.parallelize``), reused rather than repeated: megatron-core
Column/RowParallelLinear layers holding this rank's shard (``megatron_linear``, ``TPShard``), the named autograd
collectives of ``vidpo.parallel.mappings`` with their backward duals, and FSDP2 with summed gradients (``apply_fsdp``).
What this module adds is the map of ``WanTransformer3DModel`` onto it. ``parallelize_wan(adapter, ctx)``
returns a ``ParallelWanAdapter``: the same engine interface as ``WanAdapter`` (engine time, conditions, the
rectified-flow hooks) whose ``transformer`` is a ``ParallelWanTransformer`` with the diffusers model's
parameter names (``transformer.blocks.3.attn1.to_q.weight``), so checkpoints, LoRA patterns and optimizers
address parameters the same way at every world size.

Tensor parallel (Megatron-LM's split of a transformer layer, arXiv:1909.08053), per block:
  column-parallel (output features = heads split):  attn1.to_q / to_k / to_v, attn2.to_q / to_k / to_v,
                                                    ffn.net.0.proj
  row-parallel (input features split):              attn1.to_out.0, attn2.to_out.0, ffn.net.2
  split with the heads (dim 0):                     attn{1,2}.norm_q.weight, attn{1,2}.norm_k.weight
  Wan's QK norm is an RMSNorm across ALL heads ("rms_norm_across_heads"): rank r holds heads r h/tp .. and its
  slice of the norm weight, and the mean of squares is the SUM over TP ranks of the per-rank sums of squares.
  That sum enters through ``reduce_from_group`` then ``copy_to_group``: all-reduce forward and, because each
  rank's consumer (its own heads) is rank-partial, all-reduce backward too. Everything else is replicated.
Sequence parallel (arXiv:2205.05198): between the linear layers the residual stream (n, B, D) holds n/tp
  tokens per rank; column layers all-gather tokens, row layers reduce-scatter them. The replicated tensors
  used on local tokens (each block's modulation ``scale_shift_table + temb``, the cross-attention norm's
  affine, the row biases) enter through ``copy_to_group``, whose backward sums the per-rank partials.
Context parallel (Ulysses, arXiv:2309.14509): rank c holds latent frames [c T/cp, (c+1) T/cp) with the RoPE
  frequencies of those frames; self-attention swaps tokens for heads with an all-to-all around the kernel;
  cross-attention needs nothing (every rank has the whole text). The model returns this rank's frames; the
  objectives reduce per-segment sums over the CP group (``local_frames``); samplers gather the whole clip at
  every step (``whole_clip_forward``). Heads must divide by tp * cp.

Wan 2.2 A14B's two experts (``transformer`` for t >= ``boundary_ratio``, ``transformer_2`` below): each is laid out
  the same way and FSDP-wraps its own units, so a step gathers only the experts in use. Under data parallelism the
  ranks hold other rows, maybe other experts' timesteps, yet every expert's forward and backward is a collective:
  ``ParallelWanAdapter.forward`` agrees on the experts any rank needs and runs an expert its rows do not use on a
  stand-in clip of a few tokens whose output is dropped (its gradient contribution is exactly zero).

Not supported, with a clear error: image-to-video variants (``added_kv_proj_dim`` / image embeddings), Wan 2.2's
per-token timesteps (a 2-D ``timestep``), fused projections (call ``unfuse_projections`` first), and LoRA under
tensor parallel (the DiT's rule: LoRA works with CP / DP / FSDP, tp = 1).

Layout in the blocks: (n, B, D), sequence first, as megatron-core's layers expect.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vidpo.models.adapters import FeedForwardProjection, ParallelAdapterMixin
from vidpo.models.dit.attention import attention
from vidpo.models.dit.parallelize import (
    ShardSpec,
    TPShard,
    apply_fsdp,
    column_parallel,
    cp_local_frames,
    megatron_linear,
    row_parallel,
)
from vidpo.models.wan.model import WanAdapter
from vidpo.parallel.mappings import (
    copy_to_group,
    gather_from_group,
    group_rank,
    group_size,
    heads_to_sequence,
    reduce_from_group,
    scatter_to_group,
    sequence_to_heads,
)

# Module-name suffixes (inside a block) of the split layers; the QK norms are split with the heads.
WAN_COLUMN_PARALLEL = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                       "ffn.net.0.proj")
WAN_ROW_PARALLEL = ("attn1.to_out.0", "attn2.to_out.0", "ffn.net.2")
WAN_HEAD_NORMS = ("attn1.norm_q", "attn1.norm_k", "attn2.norm_q", "attn2.norm_k")


def wan_tp_plan(model: nn.Module) -> Dict[str, TPShard]:
    """Parameter name -> TPShard for every parameter tensor parallel splits in a Wan transformer (or an adapter
    holding one: the names then carry its ``transformer.`` prefix). Row-parallel biases are replicated."""
    plan = {}
    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if leaf in ("weight", "bias") and module.endswith(WAN_COLUMN_PARALLEL):
            plan[name] = TPShard(0, 1)
        elif leaf == "weight" and module.endswith(WAN_ROW_PARALLEL + WAN_HEAD_NORMS):
            plan[name] = TPShard(1, 1) if module.endswith(WAN_ROW_PARALLEL) else TPShard(0, 1)
    return plan


# ----- pieces ---------------------------------------------------------------------------------------------
class HeadShardedRMSNorm(nn.Module):
    """``torch.nn.RMSNorm`` over all heads' features, of which this TP rank holds ``1/tp`` (its heads)."""

    def __init__(self, norm: nn.RMSNorm, spec: ShardSpec):
        super().__init__()
        self.spec, self.eps = spec, norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        shard = TPShard(0, 1).shard(norm.weight.detach(), group_rank(spec.tp_group), spec.tp)
        self.weight = nn.Parameter(shard, requires_grad=norm.weight.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        squares = x32.pow(2).sum(dim=-1, keepdim=True)
        # Sum over ranks forward; the backward sums the ranks' partial gradients of the total (module docstring).
        squares = copy_to_group(reduce_from_group(squares, self.spec.tp_group), self.spec.tp_group)
        mean = squares / (x.shape[-1] * self.spec.tp)
        return (x32 * torch.rsqrt(mean + self.eps) * self.weight.float()).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (diffusers' ``WanAttnProcessor``), x (n, B, h, d), cos/sin
    (n, 1, 1, d)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class ParallelWanAttention(nn.Module):
    """WanAttention (self: ``cross=False``, text cross-attention: ``cross=True``) on (n_local, B, D)."""

    def __init__(self, attn: nn.Module, spec: ShardSpec, *, cross: bool, backend: str = "sdpa"):
        super().__init__()
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("parallelize_wan needs unfused q/k/v projections: call "
                                      "transformer.unfuse_qkv_projections() (or attn.unfuse_projections()) first")
        if attn.add_k_proj is not None:
            raise NotImplementedError("parallelize_wan supports text-to-video Wan only; the image-to-video "
                                      "variant's added key/value projections (added_kv_proj_dim) are not parallelized")
        self.spec, self.cross, self.backend = spec, cross, backend
        if attn.heads % spec.tp:
            raise ValueError(f"{attn.heads} heads are not divisible by tp = {spec.tp}")
        self.local_heads = attn.heads // spec.tp
        tp, sp = spec.tp > 1, spec.sp
        self.to_q = megatron_linear(attn.to_q, "column", 1, spec, sp) if tp else attn.to_q
        # Cross-attention keys / values come from the replicated text, never sequence-sharded.
        kv_sp = sp and not cross
        self.to_k = megatron_linear(attn.to_k, "column", 1, spec, kv_sp) if tp else attn.to_k
        self.to_v = megatron_linear(attn.to_v, "column", 1, spec, kv_sp) if tp else attn.to_v
        out = megatron_linear(attn.to_out[0], "row", 1, spec, sp) if tp else attn.to_out[0]
        self.to_out = nn.ModuleList([out, attn.to_out[1]])
        self.norm_q = HeadShardedRMSNorm(attn.norm_q, spec) if tp else attn.norm_q
        self.norm_k = HeadShardedRMSNorm(attn.norm_k, spec) if tp else attn.norm_k

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x (n_local, B, D); context (L, B, D_text) for cross-attention; rope (cos, sin) each (n_cp, 1, 1, d)."""
        kv_in = x if context is None else context
        q, k, v = column_parallel(self.to_q, x), column_parallel(self.to_k, kv_in), column_parallel(self.to_v, kv_in)   # (n_cp | L, B, h_tp d)
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (z.unflatten(-1, (self.local_heads, -1)) for z in (q, k, v))                 # (., B, h_tp, d)
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        q, k, v = (z.permute(1, 2, 0, 3) for z in (q, k, v))                                   # (B, h_tp, ., d)
        ulysses = self.spec.cp > 1 and not self.cross
        if ulysses:
            q, k, v = (sequence_to_heads(z, self.spec.cp_group) for z in (q, k, v))            # (B, h_tp/cp, n, d)
        out = attention(q, k, v, self.backend)
        if ulysses:
            out = heads_to_sequence(out, self.spec.cp_group)                                    # (B, h_tp, n_cp, d)
        out = out.permute(2, 0, 1, 3).flatten(2).type_as(q)                                    # (n_cp, B, h_tp d)
        return self.to_out[1](row_parallel(self.to_out[0], out, self.spec))


class ParallelWanFeedForward(nn.Module):
    """diffusers' FeedForward (GELU-tanh): column ``net.0.proj`` -> GELU -> row ``net.2``."""

    def __init__(self, ffn: nn.Module, spec: ShardSpec):
        super().__init__()
        act = ffn.net[0]
        if getattr(act, "approximate", None) != "tanh" or len(ffn.net) != 3:
            raise NotImplementedError(f"parallelize_wan expects Wan's GELU-tanh feed-forward, got {ffn.net}")
        self.spec = spec
        tp = spec.tp > 1
        fc1 = megatron_linear(act.proj, "column", 1, spec, spec.sp) if tp else act.proj
        fc2 = megatron_linear(ffn.net[2], "row", 1, spec, spec.sp) if tp else ffn.net[2]
        self.net = nn.ModuleList([FeedForwardProjection(fc1), ffn.net[1], fc2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(column_parallel(self.net[0].proj, x), approximate="tanh")
        return row_parallel(self.net[2], self.net[1](h), self.spec)


class ParallelWanBlock(nn.Module):
    """WanTransformerBlock on the sequence-first residual stream (n_local, B, D); diffusers' update equations,
    with its fp32 norms and modulation."""

    def __init__(self, block: nn.Module, spec: ShardSpec, backend: str = "sdpa"):
        super().__init__()
        self.spec = spec
        # Registered in diffusers' order, so parameters enumerate as in the single-device model (the index-keyed
        # optimizer state of a checkpoint relies on it).
        self.norm1 = block.norm1
        self.attn1 = ParallelWanAttention(block.attn1, spec, cross=False, backend=backend)
        self.attn2 = ParallelWanAttention(block.attn2, spec, cross=True, backend=backend)
        self.norm2 = block.norm2
        self.ffn = ParallelWanFeedForward(block.ffn, spec)
        self.norm3 = block.norm3
        self.scale_shift_table = block.scale_shift_table

    def _cross_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm2
        if not self.spec.sp or getattr(norm, "weight", None) is None:
            return norm(x)
        # FP32LayerNorm with its replicated affine entering the sequence-parallel region.
        weight = copy_to_group(norm.weight, self.spec.tp_group).float()
        bias = None if norm.bias is None else copy_to_group(norm.bias, self.spec.tp_group).float()
        return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (n_local, B, D), context (L, B, D), temb (B, 6, D), rope (cos, sin) each (n_cp, 1, 1, d)."""
        mod = self.scale_shift_table + temb.float()                                        # (B, 6, D) fp32
        if self.spec.sp:
            mod = copy_to_group(mod, self.spec.tp_group)
        shift, scale, gate, c_shift, c_scale, c_gate = mod.unsqueeze(0).unbind(2)          # each (1, B, D)
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, None, rope) * gate).type_as(x)
        h = self._cross_norm(x.float()).type_as(x)
        x = x + self.attn2(h, context, None)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class ParallelWanTransformer(nn.Module):
    """``WanTransformer3DModel``'s forward (text-to-video) over parallel blocks, same call signature; returns
    ``(B, C_out, T/cp, H, W)``, this CP rank's latent frames (``local_frames(T)``)."""

    def __init__(self, model: nn.Module, spec: ShardSpec, *, activation_checkpointing: str = "none",
                 attention_backend: str = "sdpa"):
        super().__init__()
        if model.condition_embedder.image_embedder is not None:
            raise NotImplementedError("parallelize_wan supports text-to-video Wan only (this model has an image "
                                      "embedder: an image-to-video variant)")
        self.config = model.config
        self.spec = spec
        self.activation_checkpointing = activation_checkpointing
        self.rope = model.rope
        self.patch_embedding = model.patch_embedding
        self.condition_embedder = model.condition_embedder
        self.blocks = nn.ModuleList(ParallelWanBlock(b, spec, attention_backend) for b in model.blocks)
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        self.scale_shift_table = model.scale_shift_table

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def local_frames(self, frames: int) -> slice:
        """This CP rank's latent frames of a clip of ``frames`` frames (whole temporal patches)."""
        return cp_local_frames(frames, self.config.patch_size[0], self.spec)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: Optional[torch.Tensor] = None, return_dict: bool = True,
                attention_kwargs: Optional[dict] = None):
        if encoder_hidden_states_image is not None:
            raise NotImplementedError("parallelize_wan supports text-to-video Wan only (got image embeddings)")
        if timestep.ndim == 2:
            raise NotImplementedError("per-token timesteps (Wan 2.2 TI2V) are not supported by parallelize_wan")
        spec = self.spec
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        here = self.local_frames(frames)
        grid = ((here.stop - here.start) // p_t, height // p_h, width // p_w)
        per_frame = grid[1] * grid[2]
        tokens = grid[0] * per_frame
        if spec.sp and tokens % spec.tp:
            raise ValueError(f"sequence parallel splits this rank's {tokens} tokens over tp={spec.tp} ranks: "
                             "they must divide")
        # RoPE of the whole clip, cut to this rank's frames (tokens are frame-major), sequence-first.
        cos, sin = self.rope(hidden_states)                                               # (1, n, 1, d)
        first = here.start // p_t * per_frame
        rope = tuple(f[0, first:first + tokens].unsqueeze(1) for f in (cos, sin))          # (n_cp, 1, 1, d)

        h = self.patch_embedding(hidden_states[:, :, here]).flatten(2).transpose(1, 2)    # (B, n_cp, D)
        temb, timestep_proj, context, _ = self.condition_embedder(timestep, encoder_hidden_states, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))                                # (B, 6, D)
        context = context.transpose(0, 1)                                                 # (L, B, D)

        h = h.transpose(0, 1).contiguous()                                                # (n_cp, B, D)
        if spec.sp:
            h = scatter_to_group(h, 0, spec.tp_group)                                     # (n_cp/tp, B, D)
        recompute = self.activation_checkpointing == "full" and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h = checkpoint(block, h, context, timestep_proj, rope, use_reentrant=False)
            else:
                h = block(h, context, timestep_proj, rope)
        if spec.sp:
            h = gather_from_group(h, 0, spec.tp_group)
        h = h.transpose(0, 1)                                                             # (B, n_cp, D)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        h = (self.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
        h = self.proj_out(h)
        h = h.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = h.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return (out,) if not return_dict else {"sample": out}


class ParallelWanAdapter(ParallelAdapterMixin, WanAdapter):
    """A ``WanAdapter`` over a ``ParallelWanTransformer`` (and, for Wan 2.2 A14B, a second one with the same
    layout as ``transformer_2``): the engine interface, plus ``local_frames`` (what the objectives ask a
    context-parallel model) and ``tp_plan`` (what gradient clipping and DCP checkpoints ask).

    Two experts over data-parallel ranks: every expert's forward is a collective (FSDP all-gathers its weights
    and reduce-scatters its gradients; replicated data parallel all-reduces every gradient), so all ranks of
    ``route_group`` (the data x context-parallel ranks, which hold other rows) must run the same experts in
    the same order, whatever their own rows' timesteps. ``forward`` agrees on the experts any rank needs (one
    small all-reduce) and runs an expert this rank's rows do not use on a stand-in, a clip of a few tokens whose
    output is then dropped: its gradient contribution is exactly zero, and only experts some rank uses are
    gathered."""

    def __init__(self, adapter: WanAdapter, transformer: ParallelWanTransformer,
                 transformer_2: Optional[ParallelWanTransformer] = None, *, route_group=None):
        super().__init__(transformer, adapter.conditioner, transformer_2=transformer_2,
                         boundary_ratio=adapter.boundary_ratio if transformer_2 is not None else None,
                         scheduler_config=adapter.release_scheduler, sample_shift=adapter.sample_shift,
                         sampler=adapter.sampler_name)
        self.pipeline_source = adapter.pipeline_source
        self.route_group = route_group
        self.tp_plan = wan_tp_plan(self) if transformer.spec.tp > 1 else {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.transformer_2 is None or group_size(self.route_group) == 1:
            return super().forward(x, t, cond)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        high = self.high_noise(t)
        used_here = torch.stack([high.any(), (~high).any()]).to(torch.int32)   # (transformer, transformer_2)
        used_anywhere = used_here.clone()
        dist.all_reduce(used_anywhere, op=dist.ReduceOp.MAX, group=self.route_group)
        idle_high, idle_low = (bool(a) and not bool(h) for h, a in zip(used_here.tolist(), used_anywhere.tolist()))
        # Experts run in one order on every rank (transformer, then transformer_2): an idle high-noise expert's
        # stand-in before this rank's own rows, an idle low-noise one's after them.
        stand_ins = []
        if idle_high:
            stand_ins.append(self._stand_in(self.transformer, x, t, cond))
        out = super().forward(x, t, cond)
        if idle_low:
            stand_ins.append(self._stand_in(self.transformer_2, x, t, cond))
        if not stand_ins:
            return out
        # Appended, then sliced off: the backward feeds the stand-ins exact zeros (no NaN can leak in, unlike a
        # multiplication by 0), so the expert's backward, and its FSDP reduce-scatter, runs here too, adding nothing.
        joined = torch.cat([out.flatten(), *(s.flatten().to(out.dtype) for s in stand_ins)])
        return joined[:out.numel()].view_as(out)

    def _stand_in(self, expert: ParallelWanTransformer, x: torch.Tensor, t: torch.Tensor,
                  cond: torch.Tensor) -> torch.Tensor:
        """``expert`` on the smallest clip its layout can split (one temporal patch per CP rank, one token per TP
        rank) and one prompt: its collectives run at almost no compute."""
        p_t, p_h, p_w = expert.config.patch_size
        clip = x.new_zeros(1, x.shape[1], p_t * expert.spec.cp, p_h * expert.spec.tp, p_w)
        return self._expert_forward(expert, clip, t[:1], self.encode_condition(cond[:1]))


# ----- the parallelize function ---------------------------------------------------------------------------
def _lay_out(transformer: nn.Module, spec: ShardSpec, ctx, *, activation_checkpointing: str, compile: bool,
             fsdp: bool, attention_backend: str) -> ParallelWanTransformer:
    """One expert: TP/SP -> CP -> activation checkpointing -> compile -> FSDP (its own FSDP units, so only an
    expert in use is gathered)."""
    heads = transformer.config.num_attention_heads
    if heads % (ctx.tp * ctx.cp):
        raise ValueError(f"{heads} heads are not divisible by tp * cp = {ctx.tp * ctx.cp}")
    parallel = ParallelWanTransformer(transformer, spec, activation_checkpointing=activation_checkpointing,
                                      attention_backend=attention_backend)                  # TP/SP, CP
    if compile:
        for block in parallel.blocks:
            block.compile()
    if fsdp and ctx.layout.fsdp:
        apply_fsdp(parallel, ctx.fsdp_mesh, param_dtype=ctx.fsdp_param_dtype, cpu_offload=ctx.cpu_offload)
    return parallel


def parallelize_wan(adapter: WanAdapter, ctx, *, activation_checkpointing: str = "none", compile: bool = False,
                    fsdp: bool = True, attention_backend: str = "sdpa") -> ParallelWanAdapter:
    """TP/SP -> CP -> activation checkpointing -> compile -> FSDP over ``ctx`` (a
    ``vidpo.training.distributed.ParallelContext``), for each expert (Wan 2.2 A14B: ``transformer`` and
    ``transformer_2``, the same layout). The adapter's weights are the starting point and its modules are
    reused (non-TP parameters keep their storage): do not use ``adapter`` afterwards."""
    if not isinstance(adapter, WanAdapter):
        raise TypeError(f"parallelize_wan takes a WanAdapter, got {type(adapter).__name__}")
    spec = ShardSpec(tp_group=ctx.tp_group if ctx.tp > 1 else None, cp_group=ctx.cp_group if ctx.cp > 1 else None,
                     sp=ctx.sp and ctx.tp > 1)
    experts = [_lay_out(expert, spec, ctx, activation_checkpointing=activation_checkpointing, compile=compile,
                        fsdp=fsdp, attention_backend=attention_backend)
               for expert in (adapter.transformer, adapter.transformer_2) if expert is not None]
    return ParallelWanAdapter(adapter, *experts, route_group=ctx.dp_cp_group if len(experts) > 1 else None)
