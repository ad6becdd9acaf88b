"""Parallelize diffusers' CogVideoX transformer: TP -> CP -> activation checkpointing -> compile -> FSDP.

The mechanism is the video DiT's and Wan's (``vidpo.models.dit.parallelize``, ``vidpo.models.wan.parallelize``):
megatron-core Column/RowParallelLinear layers holding this rank's shard, the named autograd collectives of
``vidpo.parallel.mappings`` with their backward duals, FSDP2 with summed gradients. What this module adds is the map of
``CogVideoXTransformer3DModel`` onto it. ``parallelize_cogvideox(adapter, ctx)`` returns a
``ParallelCogVideoXAdapter`` (the ``CogVideoXAdapter`` interface: engine time, the v-prediction DDPM hooks, the
pipeline's RoPE) whose ``transformer`` keeps diffusers' parameter names (``transformer.transformer_blocks.3.attn1.
to_q.weight``), so checkpoints, LoRA patterns and optimizer state address parameters alike at every world size.

What differs from Wan: CogVideoX attends **jointly** over ``[text; video]`` tokens (an MM-DiT with "expert"
adaptive LayerNorms: one residual stream per modality, one attention and one feed-forward over both), its QK
norm is a LayerNorm over ``head_dim`` shared by all heads, and its RoPE (5B / 1.5) covers the video tokens only.

Tensor parallel (Megatron-LM, arXiv:1909.08053), per block, on the joint sequence:
  column-parallel (heads / hidden split):  attn1.to_q / to_k / to_v, ff.net.0.proj
  row-parallel (input split):              attn1.to_out.0, ff.net.2
  attn1.norm_q / norm_k are replicated but each rank applies them to its own heads only, so their weights
  enter through ``copy_to_group`` (the backward sums the ranks' partial gradients). Without sequence parallel
  both residual streams are replicated over TP.
Sequence parallel (Megatron-LM SP, arXiv:2205.05198), ``parallel.sp`` with tp > 1: the VIDEO stream is split by
  tokens over the TP ranks between the tensor-parallel regions (its residual stream, the expert LayerNorms,
  modulation and gates: 1/tp of the activations there); the text stream (a few hundred tokens; 226 does not
  divide by 4 or 8) stays replicated. A region's entry builds the joint ``[text; video]`` once for its
  column-parallel projections: the video all-gathered (reduce-scatter backward), the text through
  ``copy_to_group`` (all-reduce backward); its row-parallel exit reduce-scatters the video's partial sums and
  all-reduces the text's. That is Megatron SP's communication volume for the video and plain TP's for the text.
  The projections then run as ``F.linear`` on the megatron layers' own shards (the layers' forward would add a
  second entry collective); the row-parallel bias is added to the video through ``copy_to_group``, to the text
  directly, so its gradient sums the video's partial parts once and the replicated text's once. The modulation
  and LayerNorm affine of the video enter through ``copy_to_group`` too (each rank normalises its own tokens).
  The video's tokens (this CP rank's) must divide by tp.
Context parallel (Ulysses, arXiv:2309.14509): rank c holds latent frames [c T/cp, (c+1) T/cp) of the video stream;
  the text stream (a few hundred tokens) is replicated. In attention, the video q / k / v swap tokens for heads
  with an all-to-all; the text q / k / v, computed for all heads on every rank, are cut to this rank's heads;
  the joint attention then sees every token for its heads. The video output swaps back; the text output of
  this rank's heads is all-gathered over the CP group with a reduce-scatter backward (``all_gather_to_group``):
  each rank's loss covers its own frames, so the gradients arriving at the replicated text stream are partial
  and must be summed, not copied. Position information (2B's sincos table, 5B / 1.5's RoPE) is computed for the
  whole clip and cut to this rank's tokens. The model returns this rank's frames; the objectives reduce their
  per-segment sums over the CP group (``local_frames``); samplers gather the whole clip at every step
  (``whole_clip_forward``). Heads must divide by tp * cp.

Not supported, with a clear error: CogVideoX 1.5's image-to-video ``ofs`` embedding, fused projections, LoRA under
tensor parallel (LoRA works with CP / DP / FSDP at tp = 1, as for the other models).

Layout in the blocks: sequence first, text (L, B, D) and video (n_local, B, D), as megatron-core's layers expect.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vidpo.models.adapters import FeedForwardProjection, ParallelAdapterMixin
from vidpo.models.cogvideox.model import CogVideoXAdapter
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
from vidpo.parallel.mappings import (
    all_gather_to_group,
    copy_to_group,
    gather_from_group,
    group_rank,
    heads_to_sequence,
    reduce_from_group,
    reduce_scatter_to_group,
    scatter_to_group,
    sequence_to_heads,
)

COGVIDEOX_COLUMN_PARALLEL = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "ff.net.0.proj")
COGVIDEOX_ROW_PARALLEL = ("attn1.to_out.0", "ff.net.2")


def cogvideox_tp_plan(model: nn.Module) -> Dict[str, TPShard]:
    """Parameter name -> TPShard for every parameter tensor parallel splits in a CogVideoX transformer (or an
    adapter holding one). Row-parallel biases and the QK norms are replicated."""
    plan = {}
    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if leaf in ("weight", "bias") and module.endswith(COGVIDEOX_COLUMN_PARALLEL):
            plan[name] = TPShard(0, 1)
        elif leaf == "weight" and module.endswith(COGVIDEOX_ROW_PARALLEL):
            plan[name] = TPShard(1, 1)
    return plan


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """CogVideoX's RoPE on interleaved pairs (diffusers' ``apply_rotary_emb`` with ``use_real_unbind_dim=-1``):
    x (n, B, h, d), cos / sin (n, 1, 1, d)."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _sp_entry(text: torch.Tensor, video: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """The joint ``[text; video]`` (L + n, B, D) a tensor-parallel region's column projections read: under sequence
    parallel the video (n / tp, B, D) all-gathered (reduce-scatter backward) and the text through copy_to_group
    (all-reduce backward: each rank's columns give a partial gradient); else the plain concatenation."""
    if not spec.sp:
        return torch.cat([text, video])
    return torch.cat([copy_to_group(text, spec.tp_group), all_gather_to_group(video, 0, spec.tp_group)])


def _column(layer: nn.Module, x: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """A column projection: under sequence parallel on the layer's own shard, its entry collective done once by
    ``_sp_entry`` for every projection of the region."""
    return F.linear(x, layer.weight, layer.bias) if spec.sp else column_parallel(layer, x)


def _row_exit(layer: nn.Module, x: torch.Tensor, length: int,
              spec: ShardSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A row projection of the joint (L + n, B, in / tp) -> text (L, B, D), video (n or n / tp under SP, B, D). Under
    sequence parallel: the text's partial sums all-reduced, the video's reduce-scattered to this rank's tokens; the
    bias reaches the video through copy_to_group (its tokens differ per rank), the replicated text directly."""
    if not spec.sp:
        out = row_parallel(layer, x, spec)
        return out[:length], out[length:]
    partial = F.linear(x, layer.weight)
    text = reduce_from_group(partial[:length], spec.tp_group)
    video = reduce_scatter_to_group(partial[length:].contiguous(), 0, spec.tp_group)
    if layer.bias is not None:
        text, video = text + layer.bias, video + copy_to_group(layer.bias, spec.tp_group)
    return text, video


class ParallelCogVideoXAttention(nn.Module):
    """diffusers' ``Attention`` with ``CogVideoXAttnProcessor2_0``: joint attention over [text; video]."""

    def __init__(self, attn: nn.Module, spec: ShardSpec, backend: str = "sdpa"):
        super().__init__()
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("parallelize_cogvideox needs unfused q/k/v projections: call "
                                      "transformer.unfuse_qkv_projections() first")
        if attn.heads % spec.tp:
            raise ValueError(f"{attn.heads} heads are not divisible by tp = {spec.tp}")
        self.spec, self.backend = spec, backend
        self.local_heads = attn.heads // spec.tp
        tp = spec.tp > 1
        self.norm_q, self.norm_k = attn.norm_q, attn.norm_k      # diffusers registers the QK norms first
        self.to_q = megatron_linear(attn.to_q, "column", 1, spec, False) if tp else attn.to_q
        self.to_k = megatron_linear(attn.to_k, "column", 1, spec, False) if tp else attn.to_k
        self.to_v = megatron_linear(attn.to_v, "column", 1, spec, False) if tp else attn.to_v
        out = megatron_linear(attn.to_out[0], "row", 1, spec, False) if tp else attn.to_out[0]
        self.to_out = nn.ModuleList([out, attn.to_out[1]])

    def _head_norm(self, norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """The QK LayerNorm over head_dim, shared by all heads; under TP each rank normalises its own heads, so
        the shared affine enters through copy_to_group (its gradient is the sum of the ranks' parts)."""
        if norm is None:
            return x
        if self.spec.tp == 1 or norm.weight is None:
            return norm(x)
        weight = copy_to_group(norm.weight, self.spec.tp_group)
        bias = None if norm.bias is None else copy_to_group(norm.bias, self.spec.tp_group)
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)

    def forward(self, text: torch.Tensor, video: torch.Tensor,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """text (L, B, D), video (n_local, B, D) (this rank's tokens under SP), rope (cos, sin) each (n_cp, 1, 1, d)
        (this CP rank's tokens) or None; returns the attention outputs of both streams, same shapes."""
        spec, length = self.spec, text.shape[0]
        joint = _sp_entry(text, video, spec)                                                  # (L + n, B, D)
        q, k, v = (_column(layer, joint, spec).unflatten(-1, (self.local_heads, -1))          # (L + n, B, h_tp, d)
                   for layer in (self.to_q, self.to_k, self.to_v))
        q, k = self._head_norm(self.norm_q, q), self._head_norm(self.norm_k, k)
        if rope is not None:   # video tokens only, after the norms (CogVideoXAttnProcessor2_0)
            q = torch.cat([q[:length], _rotary(q[length:], *rope)])
            k = torch.cat([k[:length], _rotary(k[length:], *rope)])
        q, k, v = (z.permute(1, 2, 0, 3) for z in (q, k, v))                                   # (B, h_tp, L + n, d)
        if spec.cp > 1:
            heads = self.local_heads // spec.cp
            mine = slice(group_rank(spec.cp_group) * heads, (group_rank(spec.cp_group) + 1) * heads)
            q, k, v = (torch.cat([z[:, mine, :length],                                          # text: my heads
                                  sequence_to_heads(z[:, :, length:].contiguous(), spec.cp_group)], dim=2)
                       for z in (q, k, v))                                                    # (B, h_tp/cp, L + N, d)
        out = attention(q, k, v, self.backend)
        text_out, video_out = out[:, :, :length], out[:, :, length:]
        if spec.cp > 1:
            video_out = heads_to_sequence(video_out.contiguous(), spec.cp_group)              # (B, h_tp, n, d)
            text_out = all_gather_to_group(text_out.contiguous(), 1, spec.cp_group)          # (B, h_tp, L, d)
        out = torch.cat([text_out, video_out], dim=2).permute(2, 0, 1, 3).flatten(2).type_as(joint)
        text_out, video_out = _row_exit(self.to_out[0], out, length, spec)              # (L, B, D), (n_local, B, D)
        return self.to_out[1](text_out), self.to_out[1](video_out)


class ParallelCogVideoXFeedForward(nn.Module):
    """diffusers' FeedForward (GELU-tanh, dropouts): column ``net.0.proj`` -> GELU -> dropout -> row ``net.2``
    (-> final dropout)."""

    def __init__(self, ff: nn.Module, spec: ShardSpec):
        super().__init__()
        act = ff.net[0]
        if getattr(act, "approximate", None) != "tanh" or len(ff.net) not in (3, 4):
            raise NotImplementedError(f"parallelize_cogvideox expects CogVideoX's GELU-tanh feed-forward, got {ff.net}")
        self.spec = spec
        tp = spec.tp > 1
        fc1 = megatron_linear(act.proj, "column", 1, spec, False) if tp else act.proj
        fc2 = megatron_linear(ff.net[2], "row", 1, spec, False) if tp else ff.net[2]
        self.net = nn.ModuleList([FeedForwardProjection(fc1), ff.net[1], fc2, *ff.net[3:]])

    def forward(self, text: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One feed-forward over the joint [text; video], as ``CogVideoXBlock`` runs it; returns both streams."""
        spec = self.spec
        h = self.net[1](F.gelu(_column(self.net[0].proj, _sp_entry(text, video, spec), spec), approximate="tanh"))
        text, video = _row_exit(self.net[2], h, text.shape[0], spec)
        return (self.net[3](text), self.net[3](video)) if len(self.net) > 3 else (text, video)


def _expert_norm(norm: nn.Module, text: torch.Tensor, video: torch.Tensor, temb: torch.Tensor, spec: ShardSpec):
    """``CogVideoXLayerNormZero`` in sequence-first layout: one LayerNorm, a modulation per modality. Under sequence
    parallel the video's modulation and LayerNorm affine are used on this rank's tokens only: copy_to_group."""
    modulation = norm.linear(norm.silu(temb)).unsqueeze(0)
    enc_shift, enc_scale, enc_gate = modulation[..., 3 * modulation.shape[-1] // 6:].chunk(3, dim=-1)
    text = norm.norm(text) * (1 + enc_scale) + enc_shift
    video_mod, layer = modulation[..., :3 * modulation.shape[-1] // 6], norm.norm
    if spec.sp:
        video_mod = copy_to_group(video_mod, spec.tp_group)
        weight, bias = (None if w is None else copy_to_group(w, spec.tp_group) for w in (layer.weight, layer.bias))
        normed = F.layer_norm(video, layer.normalized_shape, weight, bias, layer.eps)
    else:
        normed = layer(video)
    shift, scale, gate = video_mod.chunk(3, dim=-1)
    return text, normed * (1 + scale) + shift, enc_gate, gate


class ParallelCogVideoXBlock(nn.Module):
    """``CogVideoXBlock`` on the sequence-first streams: text (L, B, D), video (n_local, B, D)."""

    def __init__(self, block: nn.Module, spec: ShardSpec, backend: str = "sdpa"):
        super().__init__()
        self.spec = spec
        # Registered in diffusers' order: parameters enumerate as in the single-device model (the index-keyed
        # optimizer state of a single-process checkpoint relies on it).
        self.norm1 = block.norm1
        self.attn1 = ParallelCogVideoXAttention(block.attn1, spec, backend)
        self.norm2 = block.norm2
        self.ff = ParallelCogVideoXFeedForward(block.ff, spec)

    def forward(self, text: torch.Tensor, video: torch.Tensor, temb: torch.Tensor,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        norm_text, norm_video, text_gate, video_gate = _expert_norm(self.norm1, text, video, temb, self.spec)
        attn_text, attn_video = self.attn1(norm_text, norm_video, rope)
        video = video + video_gate * attn_video
        text = text + text_gate * attn_text
        norm_text, norm_video, text_gate, video_gate = _expert_norm(self.norm2, text, video, temb, self.spec)
        ff_text, ff_video = self.ff(norm_text, norm_video)
        return text + text_gate * ff_text, video + video_gate * ff_video


class ParallelCogVideoXTransformer(nn.Module):
    """``CogVideoXTransformer3DModel``'s forward over parallel blocks, same call signature; returns
    ``(B, T/cp, C, H, W)``, this CP rank's latent frames (``local_frames(T)``), in diffusers' layout."""

    def __init__(self, model: nn.Module, spec: ShardSpec, *, activation_checkpointing: str = "none",
                 attention_backend: str = "sdpa"):
        super().__init__()
        if getattr(model, "ofs_embedding", None) is not None:
            raise NotImplementedError("parallelize_cogvideox supports text-to-video CogVideoX only (this model has "
                                      "CogVideoX 1.5 image-to-video's ofs embedding)")
        self.config = model.config
        self.spec = spec
        self.activation_checkpointing = activation_checkpointing
        # diffusers' registration order (parameter order = the single-device model's).
        self.patch_embed = model.patch_embed
        self.embedding_dropout = model.embedding_dropout
        self.time_proj = model.time_proj
        self.time_embedding = model.time_embedding
        self.transformer_blocks = nn.ModuleList(ParallelCogVideoXBlock(b, spec, attention_backend)
                                                for b in model.transformer_blocks)
        self.norm_final = model.norm_final
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (what ``apply_fsdp`` and ``compile`` wrap one by one)."""
        return self.transformer_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def local_frames(self, frames: int) -> slice:
        """This CP rank's latent frames of a clip of ``frames`` frames (whole temporal patches)."""
        return cp_local_frames(frames, self.config.patch_size_t or 1, self.spec)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                timestep_cond: Optional[torch.Tensor] = None, ofs=None,
                image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                attention_kwargs: Optional[dict] = None, return_dict: bool = True):
        if ofs is not None:
            raise NotImplementedError("parallelize_cogvideox supports text-to-video CogVideoX only (got ofs)")
        batch, frames, _, height, width = hidden_states.shape
        p, p_t = self.config.patch_size, self.config.patch_size_t or 1
        here = self.local_frames(frames)
        per_patch_time = (height // p) * (width // p)
        first, count = here.start // p_t * per_patch_time, (here.stop - here.start) // p_t * per_patch_time

        emb = self.time_embedding(self.time_proj(timestep).to(dtype=hidden_states.dtype), timestep_cond)
        # The whole clip's embedding (2B's sincos table depends on the clip's size), cut to this rank's tokens:
        # the patch embedding is a small share of the compute, and the table is then exactly the one-device one.
        joint = self.embedding_dropout(self.patch_embed(encoder_hidden_states, hidden_states))
        length = encoder_hidden_states.shape[1]
        text = joint[:, :length].transpose(0, 1)                                                # (L, B, D)
        video = joint[:, length + first:length + first + count].transpose(0, 1).contiguous()     # (n_cp, B, D)
        rope = None
        if image_rotary_emb is not None:   # (n, d) each, the whole clip's video tokens
            rope = tuple(f[first:first + count].to(video.device)[:, None, None, :] for f in image_rotary_emb)
        if self.spec.sp:
            if count % self.spec.tp:
                raise ValueError(f"sequence parallel splits this rank's {count} video tokens over tp={self.spec.tp} "
                                 "ranks: they must divide")
            video = scatter_to_group(video, 0, self.spec.tp_group)                              # (n_cp/tp, B, D)

        recompute = self.activation_checkpointing == "full" and torch.is_grad_enabled()
        for block in self.transformer_blocks:
            if recompute:
                text, video = checkpoint(block, text, video, emb, rope, use_reentrant=False)
            else:
                text, video = block(text, video, emb, rope)

        if self.spec.sp:
            video = gather_from_group(video, 0, self.spec.tp_group)                             # (n_cp, B, D)
        h = self.norm_final(video.transpose(0, 1))                                               # (B, n_cp, D)
        h = self.proj_out(self.norm_out(h, temb=emb))
        local = here.stop - here.start
        if self.config.patch_size_t is None:
            out = h.reshape(batch, local, height // p, width // p, -1, p, p)
            out = out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        else:
            out = h.reshape(batch, local // p_t, height // p, width // p, -1, p_t, p, p)
            out = out.permute(0, 1, 5, 4, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(1, 2)
        return (out,) if not return_dict else {"sample": out}


class ParallelCogVideoXAdapter(ParallelAdapterMixin, CogVideoXAdapter):
    """A ``CogVideoXAdapter`` over a ``ParallelCogVideoXTransformer``: the engine interface, plus ``local_frames``
    (what the objectives ask a context-parallel model) and ``tp_plan`` (what clipping and DCP checkpoints ask)."""

    def __init__(self, adapter: CogVideoXAdapter, transformer: ParallelCogVideoXTransformer):
        super().__init__(transformer, adapter.conditioner, scheduler=adapter.scheduler, sampler=adapter.sampler_name)
        self.tp_plan = cogvideox_tp_plan(self) if transformer.spec.tp > 1 else {}


# ----- the parallelize function ---------------------------------------------------------------------------
def parallelize_cogvideox(adapter: CogVideoXAdapter, ctx, *, activation_checkpointing: str = "none",
                          compile: bool = False, fsdp: bool = True,
                          attention_backend: str = "sdpa") -> ParallelCogVideoXAdapter:
    """TP -> CP -> activation checkpointing -> compile -> FSDP over ``ctx`` (a ``vidpo.training.distributed.ParallelContext``).
    The adapter's weights are the starting point and its modules are reused (non-TP parameters keep their
    storage): do not use ``adapter`` afterwards."""
    if not isinstance(adapter, CogVideoXAdapter):
        raise TypeError(f"parallelize_cogvideox takes a CogVideoXAdapter, got {type(adapter).__name__}")
    heads = adapter.transformer.config.num_attention_heads
    if heads % (ctx.tp * ctx.cp):
        raise ValueError(f"{heads} heads are not divisible by tp * cp = {ctx.tp * ctx.cp}")
    spec = ShardSpec(tp_group=ctx.tp_group if ctx.tp > 1 else None, cp_group=ctx.cp_group if ctx.cp > 1 else None,
                     sp=bool(ctx.sp) and ctx.tp > 1)
    transformer = ParallelCogVideoXTransformer(adapter.transformer, spec,
                                               activation_checkpointing=activation_checkpointing,
                                               attention_backend=attention_backend)                  # TP, CP
    if compile:
        for block in transformer.transformer_blocks:
            block.compile()
    if fsdp and ctx.layout.fsdp:
        apply_fsdp(transformer, ctx.fsdp_mesh, param_dtype=ctx.fsdp_param_dtype, cpu_offload=ctx.cpu_offload)
    return ParallelCogVideoXAdapter(adapter, transformer)
