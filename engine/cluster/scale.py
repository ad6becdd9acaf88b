"""Scale on paper: per-GPU memory and communication of one training step, for a recipe and a world size.

    vidpo scale RECIPE --world 128 [--arch wan2.1-t2v-14b] [--set parallel.tp=2 ...] [--json]

Everything is arithmetic on the recipe (model, clip shape, batch, parallel layout, cluster link speeds): nothing
is allocated, so a 14B layout for 128 GPUs is checked on a laptop. Two kinds of model:

* ``model.kind: dit``: vidpo's own DiT of the preset (the one ``vidpo.models.dit.parallelize`` builds), over the
  shapes world's grid ``world.frames x world.height x world.width`` (the model's input grid);
* ``model.kind: wan / cogvideox``: the diffusers transformer of ``model.path`` (``vidpo.cluster.arch``: its
  config.json, or a release's published config), exact parameter counts from the class on the meta device, the
  clip of ``generate.frames x height x width`` through the release's VAE compression and patch size, the
  release's text length, and what its blocks save for backward (``arch.SAVED_WAN`` / ``SAVED_COGVIDEOX``, read
  off the diffusers blocks and checked against them); ``--arch`` names the release when model.path is not here.

Shapes. n = tokens per video, L = condition tokens, D = width, F = MLP width,
videos = 2 * pairs per DP rank for the paired objectives (policy and reference run on both videos); a consistency
student's rows are one video each, with one more forward without gradient (its stop-gradient target).
Per GPU a video holds n / cp tokens (Ulysses CP), and n / (cp * tp) inside sequence-parallel regions.

Memory (bytes per GPU; every parameter-sized row is over the FSDP shard group, dp_shard * cp ranks, and the
TP-split parameters of the family's plan / tp):
  parameters             the policy's weights in model.dtype (fp32 master weights for full fine-tuning, the
                         frozen base in bf16 under LoRA); Wan 2.2 A14B holds both experts
  lora                   the LoRA factors (model.dtype), counted on the model with the recipe's rank and targets
  gradients, optimizer   the trained parameters' gradients and AdamW m, v in their own dtype (torch keeps them
                         in the parameter's dtype): 4 + 8 B / param for fp32 master weights, 16 B in all
  reference              a frozen copy in model.dtype (pref.reference = frozen_copy); 0 with LoRA
                         (lora_disabled: the policy with its adapters off, no second copy)
  FSDP working set       two blocks' unsharded parameters in parallel.fsdp_param_dtype (current + prefetch)
                         and one block's fp32 gradients
  activations            diffusers models: the block's saved tensors (vidpo.cluster.arch) per video and text
                         token, times depth, plus what is saved outside the blocks and the step's latents; the
                         reference forward and the backward need one block's working set on top. The DiT
                         (bf16, 2 B, under autocast), per token of one block:
                           10 D in the residual / norm / modulation region (/ tp with SP)
                           13.5 D + 2 F in the TP region (q,k,v, normed and rotated q,k, attention in and
                             out, projections' inputs, MLP hidden before and after GELU) / tp
                         times depth, + 4 D per token outside the blocks (patch embedding, final layer).
                         23.5 D + 2 F is what the single-device model saves (counted with
                         torch.autograd.graph.saved_tensors_hooks; tests/test_distributed_scale.py checks it).
                         With activation checkpointing only each block's input (D, / tp with SP) per block
                         plus one block recomputed. Attention is flash-style (O(n) saved, no n x n matrix).
  reward_models,          a release student's differentiable rewards (consistency_distill with reward.models): the
  reward_activations     VAE and reward models' weights, and what their decode / image towers save for backward,
                         counted on the meta device (vidpo.cluster.reward_memory)
Communication (bytes each GPU sends per optimizer step; ring collectives: all-gather / reduce-scatter move
(g-1)/g of the full tensor, all-reduce twice that, all-to-all (g-1)/g of the local tensor):
  TP + SP   per block and pass, a = one (n/cp, videos, D) activation: forward 3 all-gathers + 3
            reduce-scatters, backward 6 all-gathers + 3 reduce-scatters; without SP 3 all-reduces each way
  CP        per block and pass 4 all-to-alls of (n/cp, videos, D/tp) (q, k, v in, attention out back)
  FSDP      per micro-step: all-gather of the parameters for forward and again for backward, reduce-scatter
            of fp32 gradients; the reference: one all-gather per forward; HSDP adds an all-reduce of
            the gradient shards over dp_replicate; unsharded DP all-reduces the gradients once per step
  The reference model and recomputation (activation checkpointing) repeat the forward collectives.
  Offload   (parallel.cpu_offload) per all-gather the fp32 parameter shard host -> GPU, per reduce-scatter the fp32
            gradient shard back, at ``cluster.host_link_gbytes_per_s``; AdamW on the host reads 4 and writes 3
            fp32 values per trainable parameter of the shard at ``cluster.host_memory_gbytes_per_s``.
A group whose ranks fit in one node (TP ranks are adjacent, then CP, then DP) uses
``cluster.intra_node_gbytes_per_s``, else ``cluster.inter_node_gbytes_per_s``. Times assume no overlap
with compute (FSDP traffic is normally hidden behind it; TP/CP traffic mostly is not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from vidpo.cluster.arch import (
    RELEASES,
    Architecture,
    ParameterCount,
    Precision,
    block_entries,
    count_parameters,
    lora_saved_bytes,
    recognise_release,
    resolve_architecture,
    saved_bytes,
)
from vidpo.cluster.reward_memory import reward_memory
from vidpo.config import RunConfig
from vidpo.models.dit import dit_config
from vidpo.training.distributed import resolve_layout

GIB = 1024 ** 3
ACT_BYTES = 2          # bf16 activations under autocast
TEXT_TOKENS = 512      # umT5 context length of the text-conditioned presets
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# fp32 latent-sized tensors a preference step holds at its peak: x0, noise, x_t and the policy output (or its
# gradient; the reference output is consumed by the loss).
STEP_LATENTS = 4


@dataclass
class ScaleEstimate:
    world: int
    layout: dict
    model: dict
    memory_gib: dict
    capacity_gib: float
    comm: list = field(default_factory=list)      # rows: group, collective, GB per step, link, seconds
    compute_s: float = 0.0
    activations_gib: dict = field(default_factory=dict)   # with and without checkpointing (not in the total)
    assumptions: list = field(default_factory=list)
    host_gib: dict = field(default_factory=dict)   # per GPU, in host memory (parallel.cpu_offload); not in the total
    startup_gib: float = 0.0   # parallel.init full: the whole model (and a frozen copy) each GPU holds before sharding
    startup_host_gib: float = 0.0   # parallel.init rank0: the whole model rank 0 holds in host memory at start-up

    @property
    def total_gib(self) -> float:
        return sum(self.memory_gib.values())

    @property
    def fits(self) -> bool:
        # 10 % stays free for the CUDA context, NCCL buffers and allocator fragmentation; the start-up peak too.
        return max(self.total_gib, self.startup_gib) <= 0.9 * self.capacity_gib

    @property
    def comm_s(self) -> float:
        return sum(r["seconds"] for r in self.comm)

    def as_dict(self) -> dict:
        return {"world": self.world, "layout": self.layout, "model": self.model, "memory_gib": self.memory_gib,
                "total_gib": self.total_gib, "capacity_gib": self.capacity_gib, "fits": self.fits,
                "activations_gib": self.activations_gib, "communication": self.comm,
                "communication_s": self.comm_s, "compute_s": self.compute_s, "assumptions": self.assumptions,
                "host_gib": self.host_gib, "startup_gib": self.startup_gib, "startup_host_gib": self.startup_host_gib}


def model_config(cfg: RunConfig):
    """The DiT of the recipe with the preset's own conditioning (text presets keep cond_dim)."""
    m = cfg.model
    return dit_config(m.preset, width=m.width, depth=m.depth, num_heads=m.num_heads,
                      patch_size=tuple(m.patch_size) if m.patch_size else None)


def tp_split_params(dcfg) -> int:
    """Parameters tensor parallel splits (parallelize.tp_plan): per block qkv and cross.kv / cross.q (weights
    and biases), fc1 (weight and bias), and the weights of attn.proj, cross.proj, fc2."""
    d, f = dcfg.width, dcfg.resolved_ffn_dim
    per_block = (3 * d * d + 3 * d) + d * d + (d * d + d) + (2 * d * d + 2 * d) + d * d + (d * f + f) + f * d
    return dcfg.depth * per_block


SP_REGION, TP_REGION_D, OUTSIDE_BLOCKS = 10.0, 13.5, 4.0   # activation elements per token, in units of D


def activation_elements_per_token_block(width: int, ffn: int, *, tp: int = 1, sp: bool = False) -> float:
    """Elements one DiT block saves for backward per token on one GPU (see the module docstring)."""
    return SP_REGION * width / (tp if sp else 1) + (TP_REGION_D * width + 2 * ffn) / tp


def _ring(world: int) -> float:
    return (world - 1) / world if world > 1 else 0.0


# ----- the two kinds of model, one interface -----------------------------------------------------------------
@dataclass
class _Shape:
    """What the estimate needs of a model: sizes, exact counts, and the activation bytes per token."""

    name: str
    source: str
    params: int               # one expert
    experts: int
    tp_split: int
    block_params: int
    depth: int
    width: int
    heads: int
    ffn: int
    tokens: int               # per video
    cond_tokens: int
    latent_frames: int        # after temporal patching (what context parallel splits)
    lora_params: int = 0      # one expert
    latent_per_token: int = 0 # latent elements per token (channels x patch volume)
    arch: Optional[Architecture] = None
    count: Optional[ParameterCount] = None

    def flops_per_video(self) -> float:
        """Forward FLOPs of one video: 2 per weight and token in the blocks, attention's QK^T and AV."""
        n, L, d = self.tokens, self.cond_tokens, self.width
        if self.arch is not None and self.arch.joint_text:
            seq = n + L
            return self.depth * (2 * seq * self.block_params + 4 * seq * seq * d)
        return self.depth * (2 * n * self.block_params + 4 * n * n * d + 4 * n * L * d)


def _dit_shape(cfg: RunConfig, cond_len: Optional[int]) -> tuple[_Shape, object]:
    dcfg = model_config(cfg)
    frames, height, width = cfg.world.frames, cfg.world.height, cfg.world.width
    L = cond_len if cond_len is not None else (TEXT_TOKENS if not dcfg.uses_class_tokens else 3)
    shape = _Shape(cfg.model.preset, "vidpo DiT preset", dcfg.num_params(), 1, tp_split_params(dcfg),
                   0, dcfg.depth, dcfg.width, dcfg.num_heads, dcfg.resolved_ffn_dim,
                   dcfg.num_tokens(frames, height, width), L, frames // dcfg.patch_size[0])
    if cfg.lora is not None:
        d, f, r = dcfg.width, dcfg.resolved_ffn_dim, cfg.lora.rank
        shape.lora_params = dcfg.depth * r * ((d + 3 * d) + (d + d) + (d + d) + (d + 2 * d) + (d + d) + (d + f) + (f + d))
    return shape, dcfg


def _release_shape(cfg: RunConfig, arch_name: Optional[str], cond_len: Optional[int]) -> _Shape:
    arch = resolve_architecture(cfg.model.kind, cfg.model.path, arch_name)
    lora = cfg.lora
    count = count_parameters(arch, lora.rank if lora else None, tuple(lora.target_modules) if lora else ())
    g = cfg.generate
    pt, ph, pw = arch.patch
    return _Shape(arch.name, arch.source, count.total, arch.experts, count.tp_split, count.block, arch.depth,
                  arch.width, arch.heads, arch.ffn, arch.tokens(g.frames, g.height, g.width),
                  cond_len if cond_len is not None else arch.text_tokens,
                  arch.latent_grid(g.frames, g.height, g.width)[0] // pt, count.lora,
                  arch.in_channels * pt * ph * pw, arch, count)


def precision_of(cfg: RunConfig) -> Precision:
    """The compute dtype on a GPU: bf16 under train.autocast auto / bf16 or with bf16 weights."""
    autocast = cfg.train.autocast != "off"
    compute = 2 if autocast or cfg.model.dtype != "float32" else 4
    return Precision(compute=compute, autocast=4 if autocast else compute)


def release_activation_bytes(shape: _Shape, precision: Precision, *, full: bool, videos: float, tp: int = 1,
                             sp: bool = False, cp: int = 1, checkpointing: bool = False,
                             lora_rank: Optional[int] = None) -> dict:
    """Activation bytes of a diffusers model on one GPU for ``videos`` videos with gradient (``full``: the base
    weights train), as parts: ``blocks`` (saved by the blocks: all of them, or under checkpointing each block's
    inputs), ``outside`` (saved outside the blocks, and the step's latents) and ``working`` (one block's
    transient tensors in the reference forward and the backward; under checkpointing, or the block recomputed
    in the backward with its first gradients, whichever is larger)."""
    arch = shape.arch
    video_entries, text_entries = block_entries(arch)
    n, L = shape.tokens / cp, shape.cond_tokens
    video = saved_bytes(video_entries, arch, precision, full=full, tp=tp, sp=sp)
    # CogVideoX's text stream stays whole on every TP rank under sequence parallel (models/cogvideox/parallelize.py)
    text = saved_bytes(text_entries, arch, precision, full=full, tp=tp, sp=sp and not arch.joint_text)
    if lora_rank:
        lora_video, lora_text = lora_saved_bytes(arch, shape.count, lora_rank, precision)
        video += lora_video
        text += lora_video if arch.joint_text else lora_text
    one_block = n * video + L * text
    d, c = arch.width, precision.compute
    seq_div = tp if sp else 1
    if checkpointing:
        # torch.utils.checkpoint keeps each block's tensor inputs: the residual stream (and CogVideoX's text
        # stream); the condition, temb and RoPE tables are shared by all blocks.
        inputs = (n / seq_div + (L if arch.joint_text else 0)) * d * c
        blocks = shape.depth * inputs
    else:
        blocks = shape.depth * one_block
    # Outside the blocks: the output norm's input (fp32), RoPE tables, and for full fine-tuning the patch
    # embedding's input, the output modulation and projection input; then the step's latent-sized tensors.
    outside = n * (d * 4 + arch.head_dim * c)
    if full:
        outside += n * (shape.latent_per_token * c + d * 4 + d * c)
    outside += n * shape.latent_per_token * 4 * STEP_LATENTS
    # One block's transient tensors: in the reference forward the FFN's hidden before and after GELU and a few
    # fp32 residual-width temporaries (upcast residual, normalised input, q / k norms); in the backward their
    # gradients. Per token.
    joint_text = L if arch.joint_text else 0
    working = (n + joint_text) * 2 * shape.ffn * c / tp + (n / seq_div + joint_text) * 4 * d * 4
    if checkpointing:
        # The backward recomputes one block; as it enters it, all of the block's saved tensors are alive with the
        # first gradients (the residual stream's and the FFN hidden's), and it frees them as it walks back through
        # the block. The reference forward's transient comes at another time: the larger counts.
        # The residual stream's gradients are fp32 whatever the compute dtype (diffusers' blocks add their branches to
        # an upcast residual, ``hidden_states.float() + ...``): two fp32 residual-width tensors are alive at that
        # point (seen in the profiler's live allocations at the peak of a bf16 step of a tiny Wan).
        first_grads = 2 * (n / seq_div + (L if arch.joint_text else 0)) * d * 4 + n * shape.ffn / tp * c
        working = max(working, one_block + first_grads)
    return {"blocks": videos * blocks, "outside": videos * outside, "working": videos * working}


def _dit_activation_bytes(shape: _Shape, *, videos: float, tp: int, sp: bool, cp: int, checkpointing: bool) -> dict:
    d, depth, tokens_gpu = shape.width, shape.depth, shape.tokens / cp
    per_token_block = activation_elements_per_token_block(d, shape.ffn, tp=tp, sp=sp)
    if checkpointing:
        elems = tokens_gpu * videos * (depth * d / (tp if sp else 1) + per_token_block)
    else:
        elems = tokens_gpu * videos * depth * per_token_block
    return {"blocks": elems * ACT_BYTES, "outside": tokens_gpu * videos * OUTSIDE_BLOCKS * d * ACT_BYTES,
            "working": 0.0}


def default_world(cfg: RunConfig) -> tuple[int, str]:
    """The world size to size a recipe for, and why: its cluster's (cluster.nodes * cluster.gpus_per_node) when
    the recipe asks for several processes or its batch divides over them, else one process (a single-GPU
    recipe whose cluster section is the default)."""
    world = cfg.cluster.world_size
    dp = world // max(cfg.parallel.model_parallel, 1)
    if cfg.multi_process() or (dp and cfg.train.batch_size % dp == 0):
        return world, f"the recipe's cluster: {cfg.cluster.nodes} x {cfg.cluster.gpus_per_node} GPUs"
    return 1, (f"one process: train.batch_size {cfg.train.batch_size} does not divide over the cluster's {dp} "
               "data-parallel ranks (pass --world to size another layout)")


def estimate(cfg: RunConfig, world: int, *, cond_len: Optional[int] = None, arch: Optional[str] = None) -> ScaleEstimate:
    """Per-GPU memory, communication and compute of one optimizer step of ``cfg`` on ``world`` ranks (module
    docstring); ``arch`` names a release (``vidpo.cluster.arch.RELEASES``) for a diffusers model whose
    model.path is not on this machine."""
    if cfg.model.kind == "dit":
        shape, dcfg = _dit_shape(cfg, cond_len)
    else:
        shape, dcfg = _release_shape(cfg, arch, cond_len), None
    layout = resolve_layout(world, cfg.parallel, num_heads=shape.heads, frames=shape.latent_frames)
    tp, cp, dp, sp = layout.tp, layout.cp, layout.dp, layout.sp
    fsdp = layout.fsdp_size
    n, L, d, depth = shape.tokens, shape.cond_tokens, shape.width, shape.depth
    experts = shape.experts
    params, split = shape.params, shape.tp_split
    local_params = split / tp + (params - split)          # one TP rank's share of one expert, before FSDP
    block_local = local_params / depth                       # (the embeddings are small next to the blocks)
    paired = cfg.train.objective in ("flow_dpo", "dense_dpo", "kto")
    pairs = cfg.train.batch_size / dp
    videos = 2 * pairs if paired else pairs                  # per DP rank and micro-batch, with gradient
    sft_videos = 0.0
    if paired and cfg.pref.sft_weight > 0:
        sft_videos = pairs * (2 if cfg.pref.sft_source == "both" else 1)
    grad_videos = videos + sft_videos
    # The reference's forward (paired objectives) or the consistency target's (the student under stop-gradient at
    # the teacher's next point): one no-grad forward per video with gradient.
    ref_videos = videos if paired or cfg.train.objective == "consistency_distill" else 0.0
    ac = cfg.parallel.activation_checkpointing == "full"
    param_bytes = 2 if cfg.parallel.fsdp_param_dtype == "bfloat16" else 4
    weight_bytes = DTYPE_BYTES[cfg.model.dtype]
    lora = cfg.lora is not None
    full = not lora

    # ----- memory ------------------------------------------------------------------------------------
    weights = experts * local_params / fsdp * weight_bytes
    if lora:
        trainable = experts * shape.lora_params / fsdp
        memory = {"parameters": weights, "lora": trainable * weight_bytes, "gradients": trainable * weight_bytes,
                  "optimizer": 2 * trainable * weight_bytes, "reference": 0.0}
        grad_params = shape.lora_params
    else:
        memory = {"parameters": weights, "lora": 0.0, "gradients": weights, "optimizer": 2 * weights}
        copy = paired and cfg.pref.reference != "lora_disabled"
        memory["reference"] = experts * local_params / fsdp * weight_bytes if copy else 0.0
        grad_params = local_params
    memory["fsdp_buffers"] = block_local * 2 * param_bytes + (block_local * 4 if full else 0) if layout.fsdp else 0.0
    # Start-up (vidpo.training.sharded_init). parallel.init 'full': every rank loads the whole model on its GPU (and
    # copies it for a frozen reference) before the parallelize function slices and shards it. 'rank0': rank 0 loads
    # it once into host memory (a frozen reference's own weights only after the policy's have left) and every GPU
    # receives its shards alone, so no GPU holds more than it does in training.
    reference_copies = 2 if full and paired and cfg.pref.reference != "lora_disabled" else 1
    one_model = experts * (params + (shape.lora_params if lora else 0)) * weight_bytes / GIB
    startup_host = one_model if cfg.parallel.init == "rank0" else 0.0
    startup = 0.0 if startup_host else one_model + experts * params * (reference_copies - 1) * weight_bytes / GIB
    host = {}
    if cfg.parallel.cpu_offload and layout.fsdp:
        # FSDP2's CPUOffloadPolicy keeps the sharded parameters, their gradients and the optimizer states in host
        # memory (AdamW steps there); the GPU holds a unit's gathered parameters and gradients (fsdp_buffers).
        for key in ("parameters", "lora", "gradients", "optimizer", "reference"):
            host[key], memory[key] = memory[key] / GIB, 0.0

    def activations(checkpointing: bool) -> dict:
        if dcfg is not None:
            return _dit_activation_bytes(shape, videos=grad_videos, tp=tp, sp=sp, cp=cp, checkpointing=checkpointing)
        return release_activation_bytes(shape, precision_of(cfg), full=full, videos=grad_videos, tp=tp, sp=sp,
                                        cp=cp, checkpointing=checkpointing,
                                        lora_rank=cfg.lora.rank if lora else None)
    parts = activations(ac)
    memory["activations"] = sum(parts.values())
    rewards = None
    if dcfg is None and cfg.train.objective == "consistency_distill":
        g = cfg.generate
        release = shape.arch.name if shape.arch.name in RELEASES else recognise_release(cfg.model.path or "")
        rewards = reward_memory(cfg, shape.arch.latent_grid(g.frames, g.height, g.width), release, pairs)
        if rewards is not None:
            memory["reward_models"], memory["reward_activations"] = rewards.weights, rewards.activations
    memory = {k: v / GIB for k, v in memory.items()}
    act_both = {"checkpointing full": sum(activations(True).values()) / GIB,
                "checkpointing none": sum(activations(False).values()) / GIB,
                "parts": {k: v / GIB for k, v in parts.items()}}

    # ----- communication -----------------------------------------------------------------------------
    gpn = cfg.cluster.gpus_per_node
    intra, inter = cfg.cluster.intra_node_gbytes_per_s, cfg.cluster.inter_node_gbytes_per_s
    rows = []

    def add(group, collective, nbytes, span):
        link = "intra-node" if span <= gpn else "inter-node"
        bandwidth = intra if span <= gpn else inter
        if nbytes > 0:
            rows.append({"group": group, "collective": collective, "GB": nbytes / 1e9, "link": link,
                         "seconds": nbytes / (bandwidth * 1e9)})

    accum = cfg.train.grad_accum
    joint = shape.arch is not None and shape.arch.joint_text
    tokens_gpu = n / cp + (L if joint else 0)                    # CogVideoX's text stream runs through the blocks
    row_layers = 2 if joint else 3                               # row-parallel layers per block (attention(s), FFN)
    fwd_passes = grad_videos * (2 if ac else 1) + ref_videos        # video-forwards with collectives
    bwd_passes = grad_videos
    if tp > 1:
        act = tokens_gpu * ACT_BYTES * d                             # one video's (n/cp, D) activation
        k = row_layers
        if sp and joint:
            # CogVideoX: the video stream's regions gather once (shared by q / k / v) and reduce-scatter; the
            # gathered input is saved, so the backward only runs the duals; the replicated text stream all-reduces.
            video_act, text_act = n / cp * ACT_BYTES * d, L * ACT_BYTES * d
            add("tp", "all-gather (SP)", video_act * _ring(tp) * depth * accum * k * (fwd_passes + bwd_passes), tp)
            add("tp", "reduce-scatter (SP)", video_act * _ring(tp) * depth * accum * k * (fwd_passes + bwd_passes),
                tp)
            add("tp", "all-reduce (text stream)", 2 * text_act * _ring(tp) * depth * accum * k
                * (fwd_passes + bwd_passes), tp)
        elif sp:
            ag = act * _ring(tp) * depth * accum * (k * fwd_passes + 2 * k * bwd_passes)
            rs = act * _ring(tp) * depth * accum * (k * fwd_passes + k * bwd_passes)
            add("tp", "all-gather (SP)", ag, tp)
            add("tp", "reduce-scatter (SP)", rs, tp)
        else:
            ar = 2 * act * _ring(tp) * depth * accum * k * (fwd_passes + bwd_passes)
            add("tp", "all-reduce", ar, tp)
        if not joint:
            kv = 2 * L * ACT_BYTES * d * _ring(tp) * depth * accum * bwd_passes   # cross-attention k/v input gradient
            add("tp", "all-reduce (condition grad)", kv, tp)
    if cp > 1:
        a2a = tokens_gpu * ACT_BYTES * d / tp * _ring(cp) * depth * accum * 4 * (fwd_passes + bwd_passes)
        add("cp", "all-to-all (Ulysses)", a2a, tp * cp)
    if layout.fsdp:
        span = tp * cp * layout.dp_shard
        # Policy forward and backward; the reference forward gathers a frozen copy or the policy again (LoRA).
        # Two experts: a micro-batch's pairs share t, so one expert runs (and is gathered) per micro-step.
        gathers = 2 + (1 if paired else 0)
        add("dp_shard x cp", "all-gather params", local_params * param_bytes * _ring(fsdp) * gathers * accum, span)
        add("dp_shard x cp", "reduce-scatter grads", grad_params * 4 * _ring(fsdp) * accum, span)
        if layout.dp_replicate > 1:
            add("dp_replicate", "all-reduce grad shards",
                2 * experts * grad_params / fsdp * 4 * _ring(layout.dp_replicate) * accum, world)
    elif dp * cp > 1:
        add("dp x cp", "all-reduce grads", 2 * experts * grad_params * 4 * _ring(dp * cp), world)
    if host:
        # CPU offload: every all-gather first copies the unit's parameter shard host -> GPU, every reduce-scatter
        # hands its gradient shard back GPU -> host, and AdamW runs on the host over the trainable shard (reads
        # parameter, gradient and both moments, writes parameter and moments: 7 x 4 bytes a parameter).
        link = cfg.cluster.host_link_gbytes_per_s
        shard_params = local_params / fsdp
        trainable_shard = experts * (shape.lora_params if lora else local_params) / fsdp
        copies = [("H2D parameter shards (offload)", shard_params * weight_bytes * gathers * accum),
                  ("D2H gradient shards (offload)", grad_params / fsdp * 4 * accum)]
        for collective, nbytes in copies:
            rows.append({"group": "host", "collective": collective, "GB": nbytes / 1e9, "link": "PCIe",
                         "seconds": nbytes / (link * 1e9)})
        adamw = trainable_shard * 7 * 4
        rows.append({"group": "host", "collective": "AdamW on the CPU (offload)", "GB": adamw / 1e9,
                     "link": "host memory", "seconds": adamw / (cfg.cluster.host_memory_gbytes_per_s * 1e9)})

    # ----- compute -----------------------------------------------------------------------------------
    if dcfg is not None:
        fwd = dcfg.flops_per_forward(1, cfg.world.frames, cfg.world.height, cfg.world.width, L) / (tp * cp)
    else:
        fwd = shape.flops_per_video() / (tp * cp)
    flops = accum * fwd * (3 * grad_videos + (grad_videos if ac else 0) + ref_videos)
    compute_s = flops / (cfg.cluster.gpu_tflops * 1e12 * cfg.cluster.mfu)
    assumptions = [
        f"links: {intra:g} GB/s per GPU inside a node of {gpn} (NVLink), {inter:g} GB/s between nodes (InfiniBand); "
        "ring collectives, no overlap with compute",
        f"compute: {cfg.cluster.gpu_tflops:g} TFLOP/s peak x {cfg.cluster.mfu:g} MFU; backward = 2 x forward; "
        "checkpointing recomputes the forward",
        "activations: flash / memory-efficient attention (no n x n matrix); 10% of the GPU kept free"]
    if rewards is not None:
        assumptions += rewards.notes
    if host:
        assumptions.append(f"cpu offload: {sum(host.values()):.2f} GiB per GPU in host memory (parameter, gradient "
                           f"and optimizer shards); copies at {cfg.cluster.host_link_gbytes_per_s:g} GB/s per GPU "
                           f"(PCIe), AdamW at {cfg.cluster.host_memory_gbytes_per_s:g} GB/s of host memory per GPU, "
                           "no overlap")
    model = {"name": shape.name, "source": shape.source, "kind": cfg.model.kind, "params": params,
             "experts": experts, "tp_split_params": split, "lora_params": shape.lora_params, "tokens": n,
             "cond_tokens": L, "width": d, "depth": depth, "heads": shape.heads, "ffn": shape.ffn,
             "videos_per_gpu": grad_videos, "pairs_per_dp_rank": pairs, "reference_copies": reference_copies}
    if dcfg is not None:
        model["preset"] = cfg.model.preset
    return ScaleEstimate(
        world=world,
        layout={"tp": tp, "sp": sp, "cp": cp, "dp": dp, "dp_shard": layout.dp_shard,
                "dp_replicate": layout.dp_replicate, "fsdp_group": fsdp, "nodes": math.ceil(world / gpn),
                "activation_checkpointing": cfg.parallel.activation_checkpointing},
        model=model, memory_gib=memory, capacity_gib=cfg.cluster.gpu_memory_gib, comm=rows, compute_s=compute_s,
        activations_gib=act_both, assumptions=assumptions, host_gib=host, startup_gib=startup,
        startup_host_gib=startup_host)


def format_report(est: ScaleEstimate) -> str:
    lay, mod = est.layout, est.model
    experts = f"{mod['experts']} experts x " if mod["experts"] > 1 else ""
    lines = [f"# {mod['name']} ({experts}{mod['params'] / 1e9:.2f} B params; {mod['source']}), "
             f"{mod['tokens']} tokens/video + {mod['cond_tokens']} text, "
             f"world {est.world} = dp {lay['dp']} (shard {lay['dp_shard']} x replicate {lay['dp_replicate']}) "
             f"x cp {lay['cp']} x tp {lay['tp']}{' + sp' if lay['sp'] else ''}, "
             f"checkpointing {lay['activation_checkpointing']}",
             "", "| memory per GPU | GiB |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in est.memory_gib.items()]
    verdict = "fits" if est.fits else "DOES NOT FIT"
    act = est.activations_gib
    if est.startup_host_gib:
        startup = (f"start-up (parallel.init rank0): rank 0 loads the whole model into host memory "
                   f"({est.startup_host_gib:.2f} GiB) and every GPU receives only its own shards")
    else:
        copy = " and its frozen reference copy" if mod["reference_copies"] > 1 else ""
        fits = "fits" if est.startup_gib <= 0.9 * est.capacity_gib else "DOES NOT FIT"
        startup = (f"start-up (parallel.init full): each rank loads the whole model{copy} on its GPU before "
                   f"slicing and sharding it: {est.startup_gib:.2f} GiB ({fits})")
    lines += [f"| **total** | **{est.total_gib:.2f}** of {est.capacity_gib:.0f} ({verdict}; 10% kept free) |", "",
              startup, "",
              f"activations with full checkpointing {act['checkpointing full']:.2f} GiB, without "
              f"{act['checkpointing none']:.2f} GiB ({mod['videos_per_gpu']:g} videos with gradient per GPU)", "",
              "| group | collective | GB sent / GPU / step | link | seconds |", "|---|---|---:|---|---:|"]
    lines += [f"| {r['group']} | {r['collective']} | {r['GB']:.2f} | {r['link']} | {r['seconds']:.3f} |"
              for r in est.comm]
    lines += ["", f"communication {est.comm_s:.2f} s (if not overlapped), compute {est.compute_s:.2f} s per step "
                  f"(at the cluster's peak x MFU)", ""]
    lines += [f"assumes {a}" for a in est.assumptions]
    return "\n".join(lines)
