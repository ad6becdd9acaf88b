"""Scale on paper: per-GPU memory and communication of one training step, for a recipe and a world size.

    vidpo scale RECIPE --world 128 [--set parallel.tp=2 ...] [--json]

Everything is arithmetic on the recipe (model preset, clip shape, batch, parallel layout, cluster link
speeds): nothing is built or allocated, so a 5B layout for 128 GPUs is checked on a laptop. The model is
the one ``vidpo.models.dit.parallelize`` builds, and the collectives are the ones it issues.

Shapes. The clip is ``world.frames x world.height x world.width`` in the model's input grid (latent frames
and latent pixels for a VAE model); n = tokens per video, L = condition tokens, D = width, F = MLP width,
videos = 2 * pairs per DP rank for the paired objectives (policy and reference run on both videos).
Per GPU a video holds n / cp tokens (Ulysses CP), and n / (cp * tp) inside sequence-parallel regions.

Memory (bytes per GPU):
  trainable parameters   16 B / param (fp32 weight, fp32 grad, AdamW m and v) over the FSDP shard group
                         (dp_shard * cp ranks); TP-split parameters (the plan of parallelize.tp_plan) / tp
  frozen reference       4 B / param likewise (pref.reference = frozen_copy), 0 with LoRA (lora_disabled)
  FSDP working set       two blocks' unsharded parameters in parallel.fsdp_param_dtype (current + prefetch)
                         and one block's fp32 gradients
  activations            saved for backward, bf16 (2 B) under autocast, per token of one block:
                           10 D in the residual / norm / modulation region (/ tp with SP)
                           13.5 D + 2 F in the TP region (q,k,v, normed and rotated q,k, attention in and
                             out, projections' inputs, MLP hidden before and after GELU) / tp
                         times depth, + 4 D per token outside the blocks (patch embedding, final layer).
                         23.5 D + 2 F is what the single-device model saves (counted with
                         torch.autograd.graph.saved_tensors_hooks; tests/test_distributed_scale.py checks it).
                         With activation checkpointing only each block's input (D, / tp with SP) per block
                         plus one block recomputed. Attention is flash-style (O(n) saved, no n x n matrix).
Communication (bytes each GPU sends per optimizer step; ring collectives: all-gather / reduce-scatter move
(g-1)/g of the full tensor, all-reduce twice that, all-to-all (g-1)/g of the local tensor):
  TP + SP   per block and pass, a = one (n/cp, videos, D) activation: forward 3 all-gathers + 3
            reduce-scatters, backward 6 all-gathers + 3 reduce-scatters; without SP 3 all-reduces each way
  CP        per block and pass 4 all-to-alls of (n/cp, videos, D/tp) (q, k, v in, attention out back)
  FSDP      per micro-step: all-gather of the parameters for forward and again for backward, reduce-scatter
            of fp32 gradients; the reference: one all-gather per forward; HSDP adds an all-reduce of
            the gradient shards over dp_replicate; unsharded DP all-reduces the gradients once per step
  The reference model and recomputation (activation checkpointing) repeat the forward collectives.
A group whose ranks fit in one node (TP ranks are adjacent, then CP, then DP) uses
``cluster.intra_node_gbytes_per_s``, else ``cluster.inter_node_gbytes_per_s``. Times assume no overlap
with compute (FSDP traffic is normally hidden behind it; TP/CP traffic mostly is not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from vidpo.config import RunConfig
from vidpo.models.dit import dit_config
from vidpo.training.distributed import resolve_layout

GIB = 1024 ** 3
ACT_BYTES = 2          # bf16 activations under autocast
TEXT_TOKENS = 512      # umT5 context length of the text-conditioned presets


@dataclass
class ScaleEstimate:
    world: int
    layout: dict
    model: dict
    memory_gib: dict
    capacity_gib: float
    comm: list = field(default_factory=list)      # rows: group, collective, GB per step, link, seconds
    compute_s: float = 0.0

    @property
    def total_gib(self) -> float:
        return sum(self.memory_gib.values())

    @property
    def fits(self) -> bool:
        # 10 % stays free for the CUDA context, NCCL buffers and allocator fragmentation.
        return self.total_gib <= 0.9 * self.capacity_gib

    @property
    def comm_s(self) -> float:
        return sum(r["seconds"] for r in self.comm)

    def as_dict(self) -> dict:
        return {"world": self.world, "layout": self.layout, "model": self.model, "memory_gib": self.memory_gib,
                "total_gib": self.total_gib, "capacity_gib": self.capacity_gib, "fits": self.fits,
                "communication": self.comm, "communication_s": self.comm_s, "compute_s": self.compute_s}


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
    """Elements one transformer block saves for backward per token on one GPU (see the module docstring)."""
    return SP_REGION * width / (tp if sp else 1) + (TP_REGION_D * width + 2 * ffn) / tp


def _ring(world: int) -> float:
    return (world - 1) / world if world > 1 else 0.0


def estimate(cfg: RunConfig, world: int, *, cond_len: int | None = None) -> ScaleEstimate:
    dcfg = model_config(cfg)
    frames, height, width = cfg.world.frames, cfg.world.height, cfg.world.width
    layout = resolve_layout(world, cfg.parallel, num_heads=dcfg.num_heads, frames=frames // dcfg.patch_size[0])
    tp, cp, dp, sp = layout.tp, layout.cp, layout.dp, layout.sp
    fsdp = layout.fsdp_size
    n = dcfg.num_tokens(frames, height, width)
    L = cond_len if cond_len is not None else (TEXT_TOKENS if not dcfg.uses_class_tokens else 3)
    d, f, depth = dcfg.width, dcfg.resolved_ffn_dim, dcfg.depth
    params = dcfg.num_params()
    split = tp_split_params(dcfg)
    local_params = split / tp + (params - split)          # one TP rank's share, before FSDP
    block_local = local_params / depth                       # (the embeddings are small next to the blocks)
    paired = cfg.train.objective in ("flow_dpo", "dense_dpo", "kto")
    pairs = cfg.train.batch_size / dp
    videos = 2 * pairs if paired else pairs                  # per DP rank and micro-batch, with gradient
    sft_videos = 0.0
    if paired and cfg.pref.sft_weight > 0:
        sft_videos = pairs * (2 if cfg.pref.sft_source == "both" else 1)
    grad_videos = videos + sft_videos
    ref_videos = videos if paired else 0.0
    ac = cfg.parallel.activation_checkpointing == "full"
    param_bytes = 2 if cfg.parallel.fsdp_param_dtype == "bfloat16" else 4

    # ----- memory ------------------------------------------------------------------------------------
    if cfg.lora is not None:
        r = cfg.lora.rank
        trainable = depth * r * ((d + 3 * d) + (d + d) + (d + d) + (d + 2 * d) + (d + d) + (d + f) + (f + d))
        frozen_policy, reference = local_params / fsdp * 4, 0.0
        states = trainable * 16.0
        grad_params = trainable
    else:
        frozen_policy = 0.0
        states = local_params / fsdp * 16
        grad_params = local_params
        reference = local_params / fsdp * 4 if paired and cfg.pref.reference != "lora_disabled" else 0.0
    working = block_local * (2 * param_bytes + 4) if layout.fsdp else 0.0
    tokens_gpu = n / cp
    sp_div = tp if sp else 1
    per_token_block = activation_elements_per_token_block(d, f, tp=tp, sp=sp)
    if ac:
        act_elems = tokens_gpu * grad_videos * (depth * d / sp_div + per_token_block + OUTSIDE_BLOCKS * d)
    else:
        act_elems = tokens_gpu * grad_videos * (depth * per_token_block + OUTSIDE_BLOCKS * d)
    memory = {"weights+grads+adam": (states + frozen_policy) / GIB, "reference": reference / GIB,
              "fsdp_buffers": working / GIB, "activations": act_elems * ACT_BYTES / GIB}

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
    fwd_passes = grad_videos * (2 if ac else 1) + ref_videos        # video-forwards with collectives
    bwd_passes = grad_videos
    if tp > 1:
        act = tokens_gpu * ACT_BYTES * d                             # one video's (n/cp, D) activation
        if sp:
            ag = act * _ring(tp) * depth * accum * (3 * fwd_passes + 6 * bwd_passes)
            rs = act * _ring(tp) * depth * accum * (3 * fwd_passes + 3 * bwd_passes)
            add("tp", "all-gather (SP)", ag, tp)
            add("tp", "reduce-scatter (SP)", rs, tp)
        else:
            ar = 2 * act * _ring(tp) * depth * accum * 3 * (fwd_passes + bwd_passes)
            add("tp", "all-reduce", ar, tp)
        kv = 2 * L * ACT_BYTES * d * _ring(tp) * depth * accum * bwd_passes   # cross.kv input gradient
        add("tp", "all-reduce (condition grad)", kv, tp)
    if cp > 1:
        a2a = tokens_gpu * ACT_BYTES * d / tp * _ring(cp) * depth * accum * 4 * (fwd_passes + bwd_passes)
        add("cp", "all-to-all (Ulysses)", a2a, tp * cp)
    if layout.fsdp:
        span = tp * cp * layout.dp_shard
        # Policy forward and backward; the reference forward gathers a frozen copy or the policy again (LoRA).
        gathers = 2 + (1 if paired else 0)
        add("dp_shard x cp", "all-gather params", local_params * param_bytes * _ring(fsdp) * gathers * accum, span)
        add("dp_shard x cp", "reduce-scatter grads", grad_params * 4 * _ring(fsdp) * accum, span)
        if layout.dp_replicate > 1:
            add("dp_replicate", "all-reduce grad shards",
                2 * grad_params / fsdp * 4 * _ring(layout.dp_replicate) * accum, world)
    elif dp * cp > 1:
        add("dp x cp", "all-reduce grads", 2 * grad_params * 4 * _ring(dp * cp), world)

    # ----- compute -----------------------------------------------------------------------------------
    fwd = dcfg.flops_per_forward(1, frames, height, width, L) / (tp * cp)       # per video, per GPU
    flops = accum * fwd * (3 * grad_videos + (grad_videos if ac else 0) + ref_videos)
    compute_s = flops / (cfg.cluster.gpu_tflops * 1e12 * cfg.cluster.mfu)
    return ScaleEstimate(
        world=world,
        layout={"tp": tp, "sp": sp, "cp": cp, "dp": dp, "dp_shard": layout.dp_shard,
                "dp_replicate": layout.dp_replicate, "fsdp_group": fsdp, "nodes": math.ceil(world / gpn),
                "activation_checkpointing": cfg.parallel.activation_checkpointing},
        model={"preset": cfg.model.preset, "params": params, "tp_split_params": split, "tokens": n,
               "cond_tokens": L, "videos_per_gpu": grad_videos, "pairs_per_dp_rank": pairs},
        memory_gib=memory, capacity_gib=cfg.cluster.gpu_memory_gib, comm=rows, compute_s=compute_s)


def format_report(est: ScaleEstimate) -> str:
    lay, mod = est.layout, est.model
    lines = [f"# {mod['preset']} ({mod['params'] / 1e9:.2f} B params), {mod['tokens']} tokens/video, "
             f"world {est.world} = dp {lay['dp']} (shard {lay['dp_shard']} x replicate {lay['dp_replicate']}) "
             f"x cp {lay['cp']} x tp {lay['tp']}{' + sp' if lay['sp'] else ''}, "
             f"checkpointing {lay['activation_checkpointing']}",
             "", "| memory per GPU | GiB |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in est.memory_gib.items()]
    verdict = "fits" if est.fits else "DOES NOT FIT"
    lines += [f"| **total** | **{est.total_gib:.2f}** of {est.capacity_gib:.0f} ({verdict}; 10% kept free) |", "",
              "| group | collective | GB sent / GPU / step | link | seconds |", "|---|---|---:|---|---:|"]
    lines += [f"| {r['group']} | {r['collective']} | {r['GB']:.2f} | {r['link']} | {r['seconds']:.3f} |"
              for r in est.comm]
    lines += ["", f"communication {est.comm_s:.2f} s (if not overlapped), compute {est.compute_s:.2f} s per step "
                  f"(at the cluster's peak x MFU)"]
    return "\n".join(lines)

