"""One DPO training step of the video DiT, built from switchable performance levers, for benchmarking.

A step (DESIGN.md section 1, DenseDPO; Flow-DPO is one segment) on a static batch of ``B`` pairs:

    reference forward   v_ref   = ref(x_t, t, cond)          (2B, C, T, H, W), no gradient
    policy forward      v_theta = policy(x_t, t, cond)       same shape
    loss                DenseDPO(v_theta, v_ref, u = eps - x0, labels (B, S), segment_ids (T,))
    backward            d loss / d theta
    optimizer           AdamW step, gradients set to None

Model FLOPs of a step (the MFU numerator; ``DiTConfig.flops_per_forward`` counts one forward):

    step_flops = 3 * F(2B)  (policy forward + backward, backward = 2x forward)  +  F(2B)  (reference forward)

Activation checkpointing makes the hardware redo forwards; MFU still counts model FLOPs only.

``PLAIN`` is the baseline: the way the public Flow-DPO / Diffusion-DPO training code
does it: eager PyTorch, a separate frozen copy of the policy as the reference (its forward under
``torch.no_grad``), the loss in unfused torch ops (``vidpo.kernels.reference``), ``torch.optim.AdamW`` with
its default implementation, SDPA attention. Mixed precision follows the device: bf16 autocast on GPU
(public code runs accelerate with ``--mixed_precision bf16``), fp32 on CPU; activation checkpointing is
whatever the run asks for (public code enables gradient checkpointing for large models).

Levers (``Levers`` fields; ``parse_levers("compile,ac=full,attention=cudnn")``):
    compile      regional ``torch.compile``: each DiT block compiled on its own (``nn.Module.compile``)
    ac           activation checkpointing: none | full (whole block) | selective (the MLP only: its
                 (n, F) hidden is the largest activation) | selective_attn (the self-attention only)
    attention    sdpa | math | flash_attn | te | cudnn (SDPA restricted to its cuDNN kernel)
    bf16         bf16 autocast and bf16 activations/outputs; the loss accumulates in fp32
    ref_no_grad  reference forward under ``torch.inference_mode`` (off: grad mode, frozen copy)
    ref_bf16     reference copy stored in bf16 (half its memory)
    fused_loss   the fused DenseDPO kernels (``vidpo.kernels``) instead of eager torch ops
    fused_adamw  ``torch.optim.AdamW(fused=True)``
    fp8          Transformer Engine ``te.Linear`` for the blocks' linears under ``te.fp8_autocast``
    cuda_graph   the whole step captured once as a CUDA graph and replayed (static shapes)

A lever that needs a GPU or a missing package is reported by ``lever_unavailable`` (a reason string);
the benchmark turns that into a "skipped (why)" row instead of silently dropping it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import common
from vidpo.kernels import dispatch, reference
from vidpo.kernels.losses import dense_dpo_loss, dpo_epilogue
from vidpo.kernels.segment_sums import segment_sq_err_sums_autograd
from vidpo.models.dit import DiTConfig, build_dit
from vidpo.models.dit.config import TIME_FREQUENCY_DIM

AC_MODES = ("none", "full", "selective", "selective_attn")
ATTENTION_CHOICES = ("sdpa", "math", "flash_attn", "te", "cudnn")
BOOL_LEVERS = ("compile", "bf16", "ref_no_grad", "ref_bf16", "fused_loss", "fused_adamw", "fp8", "cuda_graph")


@dataclass(frozen=True)
class Levers:
    """Switches of one step configuration (meanings in the module docstring)."""

    compile: bool = False
    ac: str = "none"
    attention: str = "sdpa"
    bf16: bool = False
    ref_no_grad: bool = False
    ref_bf16: bool = False
    fused_loss: bool = False
    fused_adamw: bool = False
    fp8: bool = False
    cuda_graph: bool = False

    def __post_init__(self):
        if self.ac not in AC_MODES:
            raise ValueError(f"lever ac={self.ac!r} is not one of {list(AC_MODES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"lever attention={self.attention!r} is not one of {list(ATTENTION_CHOICES)}")

    def label(self) -> str:
        """Short text of the levers that differ from the all-off default, e.g. 'compile,ac=full'."""
        parts = []
        for spec in dataclasses.fields(self):
            value, default = getattr(self, spec.name), spec.default
            if value != default:
                parts.append(spec.name if value is True else f"{spec.name}={value}")
        return ",".join(parts) or "none"


def plain_levers(device: torch.device, ac: str = "none") -> Levers:
    """The baseline of the public Flow-DPO code (module docstring)."""
    return Levers(ac=ac, attention="sdpa", bf16=device.type == "cuda", ref_no_grad=True)


def parse_levers(text: str, base: Optional[Levers] = None) -> Levers:
    """'compile,ac=full,attention=cudnn,-fused_loss' -> Levers (a leading '-' turns a boolean lever off); the
    result has ``base``'s class (a subclass adds levers, e.g. the Wan step's ``WanLevers``)."""
    base = base if base is not None else Levers()
    bool_levers = tuple(f.name for f in dataclasses.fields(base) if isinstance(f.default, bool))
    values = dataclasses.asdict(base)
    for item in (p.strip() for p in text.split(",")):
        if not item or item == "none":
            continue
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
        else:
            key, value = item.lstrip("-"), not item.startswith("-")
        if key not in values:
            raise ValueError(f"unknown lever {key!r}; valid: {', '.join(bool_levers + ('ac', 'attention'))}")
        if key in bool_levers and isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "on", "off"):
                raise ValueError(f"lever {key} takes on/off, got {value!r}")
            value = value.lower() in ("1", "true", "on")
        values[key] = value
    return type(base)(**values)


def _importable(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken CUDA build raises OSError/RuntimeError too
        return f"{module} not importable ({type(exc).__name__})"
    return None


def lever_unavailable(levers: Levers, device: torch.device) -> Optional[str]:
    """None when this lever set can run on ``device``, else why not (for a 'skipped (why)' row)."""
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():     # a dry run of the GPU plan on a CPU machine
        return "needs a CUDA device: torch.cuda.is_available() is False"
    if levers.fused_adamw and not gpu:
        return "fused_adamw: torch's fused AdamW is benchmarked on CUDA only (the trainer uses it there)"
    if levers.cuda_graph and not gpu:
        return "cuda_graph: needs a CUDA device"
    if levers.fp8:
        if not gpu:
            return "fp8: Transformer Engine FP8 needs a CUDA device (Hopper or newer)"
        missing = _importable("transformer_engine.pytorch")
        if missing:
            return f"fp8: {missing}"
    if levers.attention in ("flash_attn", "te", "cudnn") and not gpu:
        return f"attention={levers.attention}: needs a CUDA device"
    if levers.attention == "flash_attn":
        missing = _importable("flash_attn")
        if missing:
            return f"attention=flash_attn: {missing}"
        if not levers.bf16:
            return "attention=flash_attn: needs bf16 activations (lever bf16)"
    if levers.attention == "te":
        missing = _importable("transformer_engine.pytorch")
        if missing:
            return f"attention=te: {missing}"
    if levers.fused_loss:
        ok, why = dispatch.backend_status(dispatch.resolve_backend("auto", device), device)
        if not ok:
            return f"fused_loss: {why}"
        if dispatch.resolve_backend("auto", device) == "torch":
            return "fused_loss: no fused loss backend on this device (auto resolved to torch)"
    return None


# ----- the batch and the FLOP counts ---------------------------------------------------------------------
@dataclass
class StepShape:
    """B pairs of latent videos (C, T, H, W) with cond_len condition tokens and S label segments."""

    pairs: int
    frames: int
    height: int
    width: int
    cond_len: int
    segments: int = 1

    def videos(self) -> int:
        return 2 * self.pairs


def step_flops(cfg: DiTConfig, shape: StepShape) -> int:
    """Model FLOPs of one DPO step: 3 F(2B) for the policy (forward + backward) + F(2B) for the reference."""
    forward = cfg.flops_per_forward(shape.videos(), shape.frames, shape.height, shape.width, shape.cond_len)
    return 4 * forward


def input_gradient_flops_skipped(cfg: DiTConfig, shape: StepShape) -> int:
    """Backward matmuls of ``step_flops`` that autograd never runs: the input gradients of the first layers
    whose inputs need no gradient (patch_embed on x_t: 2 N n P D; time_embed.fc1 on the sinusoidal
    features: 2 N 256 D; cond_embed.fc1 on text embeddings: 2 N L cond_dim D). A direct count of one step
    (FlopCounterMode) equals ``step_flops - input_gradient_flops_skipped`` exactly."""
    n_videos, d = shape.videos(), cfg.width
    tokens = cfg.num_tokens(shape.frames, shape.height, shape.width)
    pt, ph, pw = cfg.patch_size
    skipped = 2 * n_videos * tokens * cfg.in_channels * pt * ph * pw * d + 2 * n_videos * TIME_FREQUENCY_DIM * d
    if not cfg.uses_class_tokens:
        skipped += 2 * n_videos * shape.cond_len * cfg.cond_dim * d
    return skipped


def make_batch(cfg: DiTConfig, shape: StepShape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Static rectified-flow batch: x_t = (1 - t) x0 + t eps, u = eps - x0, with t and eps shared by the two
    videos of a pair. Returns dict(x_t (2B, C, T, H, W), target, t (2B,), cond, labels (B, S), segment_ids (T,))."""
    g = torch.Generator().manual_seed(seed)
    b, c = shape.pairs, cfg.in_channels
    size = (b, c, shape.frames, shape.height, shape.width)
    x0 = torch.randn((2,) + size, generator=g).flatten(0, 1)                    # rows [0, B) first videos
    eps = torch.randn(size, generator=g).repeat(2, 1, 1, 1, 1)
    t = torch.sigmoid(torch.randn(b, generator=g)).repeat(2)                      # logit-normal
    tb = t.view(-1, 1, 1, 1, 1)
    x_t, target = (1 - tb) * x0 + tb * eps, eps - x0
    if cfg.uses_class_tokens:
        cond = torch.randint(1, cfg.cond_vocab_size, (2 * b, shape.cond_len), generator=g)
    else:
        cond = torch.randn(2 * b, shape.cond_len, cfg.cond_dim, generator=g).to(dtype)
    labels = torch.randint(-1, 2, (b, shape.segments), generator=g)
    labels[:, 0] = 1                                                             # at least one non-tie
    segment_ids = torch.arange(shape.frames) * shape.segments // shape.frames
    out = dict(x_t=x_t.to(dtype), target=target.to(dtype), t=t, cond=cond, labels=labels, segment_ids=segment_ids)
    return {k: v.to(device) for k, v in out.items()}


# ----- model surgery for the levers ----------------------------------------------------------------------
def _checkpoint_forward(module: nn.Module) -> None:
    """Recompute ``module`` in the backward pass (instance-level forward override keeps parameter names)."""
    inner = module.forward

    def forward(*args):
        if torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False)
        return inner(*args)

    module.forward = forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    if mode in ("none", "full"):
        model.set_activation_checkpointing(mode)
        return
    for block in model.blocks:
        _checkpoint_forward(block.mlp if mode == "selective" else block.attn)


def convert_to_fp8_linears(model: nn.Module) -> int:
    """Replace every nn.Linear inside the blocks by a Transformer Engine te.Linear with the same weights
    (FP8 GEMMs under ``te.fp8_autocast``); returns how many were replaced."""
    import transformer_engine.pytorch as te

    count = 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or module.in_features % 16 or module.out_features % 16:
                continue
            layer = te.Linear(module.in_features, module.out_features, bias=True,
                              params_dtype=module.weight.dtype, device=module.weight.device)
            with torch.no_grad():
                layer.weight.copy_(module.weight)
                layer.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, child, layer)
            count += 1
    return count


# ----- the step --------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DPOStep:
    """A policy, its reference copy, an optimizer and a static batch, wired according to ``levers``.

    ``run()`` performs one full step and returns the loss tensor; ``run_phases()`` performs one step with a
    device synchronisation between phases and returns their wall times in ms (policy_fwd, bwd, ref_fwd,
    loss, optimizer).
    """

    PHASES = ("ref_fwd", "policy_fwd", "loss", "bwd", "optimizer")

    def __init__(self, cfg: DiTConfig, shape: StepShape, levers: Levers, device: torch.device, *,
                 beta: float = 500.0, lr: float = 1e-6, seed: int = 0):
        why = lever_unavailable(levers, device)
        if why:
            raise RuntimeError(f"levers {levers.label()} cannot run here: {why}")
        self.levers, self.device, self.beta, self.shape = levers, device, beta, shape
        attention = "sdpa" if levers.attention == "cudnn" else levers.attention
        cfg = dataclasses.replace(cfg, attention=attention, activation_checkpointing="none")
        self.config = cfg
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.policy = build_dit(cfg).to(device)
            # adaLN-zero makes an untrained model output exactly 0 (loss log 2, gradients only into the final
            # layer); small random modulation gives the step the gradient flow of a trained model.
            with torch.no_grad():
                for param in (self.policy.adaLN.weight, self.policy.final.adaLN.weight,
                              self.policy.final.linear.weight, *(blk.modulation for blk in self.policy.blocks)):
                    param.normal_(std=0.02)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        if levers.ref_bf16:
            self.reference.to(torch.bfloat16)
        apply_activation_checkpointing(self.policy, levers.ac)
        if levers.fp8:
            convert_to_fp8_linears(self.policy)
        if levers.compile:
            for block in list(self.policy.blocks) + list(self.reference.blocks):
                block.compile()
        self._finish(cfg, lr, seed)

    def _finish(self, cfg, lr: float, seed: int) -> None:
        """The batch, the fused loss's per-segment token counts and the optimizer over the trainable parameters
        (shared with the Wan step, ``step_bench_wan``). ``cfg`` needs in_channels, uses_class_tokens, cond_dim,
        cond_vocab_size (``make_batch``)."""
        levers, device, shape, beta = self.levers, self.device, self.shape, self.beta
        self.act_dtype = torch.bfloat16 if levers.bf16 else torch.float32
        self.batch = make_batch(cfg, shape, device, self.act_dtype, seed)
        if levers.fused_loss:
            self.loss_backend = dispatch.resolve_backend("auto", device)
            # Validate the batch once through the public API; the step then calls the sync-free pieces.
            dense_dpo_loss(self.batch["target"], self.batch["target"], self.batch["target"], self.batch["labels"],
                           self.batch["segment_ids"], beta, backend=self.loss_backend)
            _, channels, _, height, width = self.batch["x_t"].shape
            self.tokens = reference.segment_token_counts(self.batch["segment_ids"], shape.segments, height, width,
                                                         None, device, torch.float32)
            self.channels = channels
        fused = True if levers.fused_adamw else None
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, fused=fused, capturable=levers.cuda_graph)
        self.graph = None
        self.static_loss = None

    # ----- phases ----------------------------------------------------------------------------------------
    def _autocast(self):
        if not self.levers.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _attention_context(self):
        if self.levers.attention != "cudnn":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)

    def _fp8_context(self):
        if not self.levers.fp8:
            return contextlib.nullcontext()
        import transformer_engine.pytorch as te

        return te.fp8_autocast(enabled=True)

    def reference_forward(self) -> torch.Tensor:
        b = self.batch
        grad_mode = torch.inference_mode() if self.levers.ref_no_grad else contextlib.nullcontext()
        with grad_mode, self._autocast(), self._attention_context():
            v_ref = self.reference(b["x_t"], b["t"], b["cond"])
        if self.levers.ref_no_grad:
            v_ref = v_ref.clone()  # an inference tensor cannot enter the loss's autograd graph
        return v_ref

    def policy_forward(self) -> torch.Tensor:
        b = self.batch
        with self._autocast(), self._attention_context(), self._fp8_context():
            return self.policy(b["x_t"], b["t"], b["cond"])

    def loss(self, v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
        b = self.batch
        v_ref = v_ref.detach().to(v_theta.dtype)
        if not self.levers.fused_loss:
            return reference.dense_dpo_loss_reference(v_theta, v_ref, b["target"], b["labels"], b["segment_ids"],
                                                      self.beta).loss
        sums = segment_sq_err_sums_autograd(dispatch.primitives(self.loss_backend), v_theta.contiguous(),
                                            v_ref.contiguous(), b["target"], None, None, b["segment_ids"],
                                            self.shape.segments)
        return dpo_epilogue(sums, self.tokens, self.channels, b["labels"], self.beta).loss

    def _eager_step(self) -> torch.Tensor:
        v_ref = self.reference_forward()
        loss = self.loss(self.policy_forward(), v_ref)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.levers.cuda_graph)
        return loss.detach()

    # ----- whole steps -----------------------------------------------------------------------------------
    def _capture(self) -> None:
        """Warm up on a side stream, then capture one whole step (forward, backward, AdamW) in a graph."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._eager_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._eager_step()

    def run(self) -> torch.Tensor:
        if not self.levers.cuda_graph:
            return self._eager_step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.static_loss

    def run_phases(self) -> Dict[str, float]:
        """One eager step with a sync after each phase: {phase: ms}. Not available with cuda_graph."""
        if self.levers.cuda_graph:
            raise RuntimeError("the phase breakdown needs eager steps; a CUDA graph runs the step as one launch")
        times: Dict[str, float] = {}

        def timed(name, fn):
            synchronize(self.device)
            start = time.perf_counter()
            out = fn()
            synchronize(self.device)
            times[name] = (time.perf_counter() - start) * 1e3
            return out

        v_ref = timed("ref_fwd", self.reference_forward)
        v_theta = timed("policy_fwd", self.policy_forward)
        loss = timed("loss", lambda: self.loss(v_theta, v_ref))
        timed("bwd", loss.backward)
        del v_theta, v_ref

        def optimizer_step():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        timed("optimizer", optimizer_step)
        return times

    # ----- memory ---------------------------------------------------------------------------------------
    def reference_parameter_bytes(self) -> int:
        """Parameter bytes the reference holds beyond the policy's own storage: a whole model for a separate copy,
        0 for a reference that is the policy itself (the LoRA-off reference of ``step_bench_wan``)."""
        module = getattr(self, "reference_module", self.reference)
        if not isinstance(module, nn.Module):
            return 0
        own = {t.untyped_storage().data_ptr() for t in self.policy.parameters()}
        extra = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.parameters()}
        return sum(nbytes for ptr, nbytes in extra.items() if ptr not in own)

    def activation_memory(self) -> Tuple[Optional[float], Optional[float]]:
        """(MiB the policy forward + loss keep for the backward, peak MiB of forward + loss + backward above the
        state before the policy forward); None where the device gives no memory figures (common.memory_of_call).
        The optimizer does not step, so the measured step leaves the weights as they were."""
        v_ref = self.reference_forward()

        def forward():
            return self.loss(self.policy_forward(), v_ref)

        def whole():
            forward().backward()

        loss, _, held = common.memory_of_call(forward, self.device)
        loss.backward()
        del loss
        self.optimizer.zero_grad(set_to_none=True)
        _, peak, _ = common.memory_of_call(whole, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        return held, peak


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Wall time (ms) of ``repeats`` calls of ``step`` after ``warmup`` untimed ones; synchronised per step."""
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def measure_peak_memory(step: Callable[[], torch.Tensor], device: torch.device) -> Optional[float]:
    """Peak allocated device memory (MiB) during one step, model and optimizer state included (GPU only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def matmul_rate_tflops(device: torch.device, size: int, dtype: torch.dtype,
                       repeats: int = 10) -> Tuple[float, float, float]:
    """Measured dense matmul rate (TFLOP/s; median, 20th, 80th percentile) of (size x size) @ (size x size)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    samples = time_steps(lambda: torch.mm(a, b), device, warmup=3, repeats=repeats)
    flops = 2 * size ** 3
    rates = sorted(flops / (ms * 1e-3) / 1e12 for ms in samples)
    ms_sorted = sorted(samples)
    q = lambda xs, p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return flops / (q(ms_sorted, 0.5) * 1e-3) / 1e12, q(rates, 0.2), q(rates, 0.8)
