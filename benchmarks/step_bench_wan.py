"""One DPO training step of diffusers' ``WanTransformer3DModel`` (what users train), for ``bench_step.py --model wan``.

The same step as ``step_bench.DPOStep`` (reference forward, policy forward, DenseDPO loss, backward, AdamW) on the
model the engine trains, ``vidpo.models.wan.WanAdapter`` around a randomly initialised diffusers transformer:

    preset 'tiny'   a 2-block, 32-wide model for CPU tests (milliseconds a step)
    preset 'small'  4 blocks, width 512 (4 x 128 heads, Wan's head size): about a second a CPU step at
                    --frames 4 --height 16 --width 16 with 512 text tokens, for CPU figures
    preset '1.3b'   Wan 2.1 T2V 1.3B (the release's config: 30 blocks, 12 x 128 heads, ffn 8960, text 4096)

``train='lora'`` adapts the attention projections (``ATTENTION_LORA_TARGETS``, the Wan recipes' targets) and
trains only the adapters; ``train='full'`` trains every weight. The levers are the DiT step's plus
``ref_lora_off``: the reference is the policy with its adapters switched off (``vidpo.models.lora.lora_disabled``,
how ``vidpo.training.policy`` builds it) instead of a separate frozen copy of the base model, so it holds no
parameter bytes of its own. ``ac='full'`` is the diffusers transformer's own block checkpointing
(``enable_gradient_checkpointing``, what ``parallel.activation_checkpointing: full`` turns on); the DiT's selective
modes, its attention backends other than SDPA / cuDNN, fp8 and CUDA graphs are not wired for this model and are
reported as skipped.

    plain      separate frozen copy of the base model, eager loss, no activation checkpointing
    optimized  the LoRA-off reference (LoRA only), the fused loss, activation checkpointing (+ bf16 autocast
               where bf16 measured faster, always on a GPU; fused AdamW on a GPU; a bf16 reference copy with bf16
               under full fine-tuning)

Weights are fp32 masters with bf16 autocast where it is on (the DiT step's convention); the step FLOPs are
``4 F(2B)`` with ``wan_flops_per_forward`` (matmuls only, like ``DiTConfig.flops_per_forward``).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from step_bench import DPOStep, Levers, StepShape, lever_unavailable

from vidpo.models.adapters import ATTENTION_LORA_TARGETS
from vidpo.models.lora import apply_lora, lora_disabled, mark_only_lora_trainable
from vidpo.models.wan import WanAdapter

WAN_PRESETS = {
    "tiny": dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                 text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64),
    "small": dict(patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=256, freq_dim=256, ffn_dim=2048, num_layers=4, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6),
    # transformer/config.json of the Wan2.1-T2V-1.3B-Diffusers release (the same numbers as `vidpo scale`'s table).
    "1.3b": dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6),
}
WAN_AC_MODES = ("none", "full")
TRAIN_MODES = ("lora", "full")


@dataclass(frozen=True)
class WanLevers(Levers):
    """The DiT step's levers plus ``ref_lora_off`` (module docstring)."""

    ref_lora_off: bool = False


def wan_config(preset: str) -> dict:
    if preset not in WAN_PRESETS:
        raise ValueError(f"unknown Wan preset {preset!r}; valid: {', '.join(WAN_PRESETS)}")
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in WAN_PRESETS[preset].items()}


def wan_tokens(config: dict, frames: int, height: int, width: int) -> int:
    pt, ph, pw = config["patch_size"]
    return (frames // pt) * (height // ph) * (width // pw)


def wan_flops_per_forward(config: dict, batch: int, frames: int, height: int, width: int, cond_len: int) -> int:
    """Matmul FLOPs of one forward of ``WanTransformer3DModel`` on ``batch`` latents (C, frames, height, width) with
    ``cond_len`` text tokens. n video tokens, L text tokens, D = heads x head_dim, F = ffn_dim, P = C x patch volume:
      patch embedding      2 n P D                 proj_out             2 n D P
      time embedder        2 (freq D + D D)        time projection      2 D 6D       (per video)
      text embedder        2 L (text_dim D + D D)
      per block            2 n 4D^2 (self q k v o) + 4 n^2 D (QK^T, AV) + 2 n 2D^2 (cross q o) + 2 L 2D^2 (cross
                           k v) + 4 n L D (cross QK^T, AV) + 4 n D F (FFN)
    """
    n, L = wan_tokens(config, frames, height, width), cond_len
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f = config["ffn_dim"]
    pt, ph, pw = config["patch_size"]
    p_in, p_out = config["in_channels"] * pt * ph * pw, config["out_channels"] * pt * ph * pw
    block = 2 * n * 4 * d * d + 4 * n * n * d + 2 * n * 2 * d * d + 2 * L * 2 * d * d + 4 * n * L * d + 4 * n * d * f
    outside = (2 * n * p_in * d + 2 * n * d * p_out + 2 * (config["freq_dim"] * d + d * d) + 2 * d * 6 * d
               + 2 * L * (config["text_dim"] * d + d * d))
    return batch * (config["num_layers"] * block + outside)


def wan_step_flops(config: dict, shape: StepShape) -> int:
    """Policy forward + backward (3 F) and the reference forward (F) of the 2B videos."""
    return 4 * wan_flops_per_forward(config, shape.videos(), shape.frames, shape.height, shape.width, shape.cond_len)


def wan_plain_levers(device: torch.device, ac: str = "none") -> WanLevers:
    return WanLevers(ac=ac, bf16=device.type == "cuda", ref_no_grad=True)


def wan_default_levers(device: torch.device, train: str, bf16: Optional[bool] = None) -> WanLevers:
    """``bf16``: whether bf16 compute wins on ``device`` (``bench_step.fast_bf16``; default: on a GPU only)."""
    gpu = device.type == "cuda"
    bf16 = gpu if bf16 is None else bf16
    lora_off = train == "lora"
    levers = WanLevers(ac="full", bf16=bf16, ref_no_grad=True, ref_bf16=bf16 and not lora_off, fused_loss=True,
                       fused_adamw=gpu, ref_lora_off=lora_off)
    if (wan_lever_unavailable(levers, device, train) or "").startswith("fused_loss"):
        levers = dataclasses.replace(levers, fused_loss=False)
    return levers


def wan_lever_unavailable(levers: Levers, device: torch.device, train: str) -> Optional[str]:
    """None when this lever set can run the Wan step on ``device``, else why not."""
    if levers.ac not in WAN_AC_MODES:
        return f"ac={levers.ac}: the Wan step has the diffusers transformer's own full-block checkpointing only"
    if levers.attention not in ("sdpa", "cudnn"):
        return f"attention={levers.attention}: the Wan step runs diffusers' SDPA attention (sdpa, cudnn)"
    if levers.fp8:
        return "fp8: the te.Linear swap is wired for the DiT step only"
    if levers.cuda_graph:
        return "cuda_graph: the Wan step is not captured (diffusers' forward is not graph-safe as written)"
    if getattr(levers, "ref_lora_off", False):
        if train != "lora":
            return "ref_lora_off: full fine-tuning has no adapters to switch off (the reference is a frozen copy)"
        if levers.ref_bf16:
            return "ref_bf16: the LoRA-off reference is the policy's own weights (nothing to store in bf16)"
    return lever_unavailable(levers, device)


def build_wan(config: dict, seed: int, device: torch.device = torch.device("cpu")) -> WanAdapter:
    """Random weights, initialised on ``device`` (1.4 B parameters take seconds on a CPU, milliseconds on a GPU)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return WanAdapter(WanTransformer3DModel(**config))


class WanDPOStep(DPOStep):
    """``DPOStep`` on a ``WanAdapter``: the phases, timing and memory methods are the DiT step's."""

    def __init__(self, config: dict, shape: StepShape, levers: WanLevers, device: torch.device, *,
                 train: str = "lora", lora_rank: int = 64, beta: float = 500.0, lr: float = 1e-6, seed: int = 0):
        if train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
        why = wan_lever_unavailable(levers, device, train)
        if why:
            raise RuntimeError(f"levers {levers.label()} cannot run the Wan step here: {why}")
        self.levers, self.device, self.beta, self.shape, self.train = levers, device, beta, shape, train
        self.config = config
        self.policy = build_wan(config, seed, device)
        self.reference_module = None
        if not levers.ref_lora_off:
            # The public code's way: a second model holding the base weights (adapters are not part of it).
            self.reference_module = copy.deepcopy(self.policy).requires_grad_(False).eval()
            if levers.ref_bf16:
                self.reference_module.to(torch.bfloat16)
        if train == "lora":
            apply_lora(self.policy, rank=lora_rank, alpha=float(lora_rank), target_modules=ATTENTION_LORA_TARGETS)
            mark_only_lora_trainable(self.policy)
        if levers.ac == "full":
            self.policy.enable_gradient_checkpointing()
        if levers.compile:
            for model in (self.policy, self.reference_module):
                for block in (model.transformer.blocks if model is not None else ()):
                    block.compile()
        self.reference = self.reference_module if self.reference_module is not None else self._adapters_off
        batch_cfg = SimpleNamespace(in_channels=config["in_channels"], uses_class_tokens=False,
                                    cond_dim=config["text_dim"], cond_vocab_size=0)
        self._finish(batch_cfg, lr, seed)

    def policy_forward(self) -> torch.Tensor:
        # Under bf16 autocast Wan's fp32 output norm can hand back fp32; the loss takes the batch's dtype.
        return super().policy_forward().to(self.act_dtype)

    def _adapters_off(self, x, t, cond):
        with lora_disabled(self.policy):
            return self.policy(x, t, cond)
