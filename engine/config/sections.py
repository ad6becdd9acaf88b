"""Typed configuration of a vidpo run.

Each section is a dataclass; each field carries its docstring right below it (the Megatron-core
convention), and ``vidpo.config.field_docs`` reads those docstrings back for ``vidpo config --explain``
and for error messages. Enum-like fields list their valid values in ``metadata={"choices": ...}``;
``vidpo.config`` validates them and rejects unknown keys, naming the closest valid key.

A recipe (YAML) sets any subset of these fields; ``--set section.field=value`` overrides them.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from vidpo.config.fields import choice
from vidpo.models.lora import DEFAULT_TARGET_MODULES, INIT_CHOICES

ERROR_POLICIES = ("tie", "raise")
"""What a labeller does with a comparison it cannot make: count it as a tie (with a message) or raise."""

RESAMPLE_CHOICES = ("auto", "nearest", "bilinear", "bicubic", "lanczos")


DEFAULT_PROMPT = (
    'Two AI-generated videos were made from the same text prompt: "{caption}".\n'
    "Below are {frames} frames of segment {segment_number} of {num_segments} "
    "(seconds {start_s:.2f} to {end_s:.2f}) of Video A, then the same moments of Video B. "
    "Judge which video is better in this segment: visual quality, artifacts (distortion, flicker, "
    "objects appearing or vanishing), smooth and plausible motion, and agreement with the prompt. "
    "Say TIE unless one video is clearly better.\n"
    "Answer with exactly one of: A, B, TIE."
)
"""Default question; the placeholders are the ``PROMPT_FIELDS``."""


PROMPT_FIELDS = ("caption", "segment_number", "num_segments", "start_s", "end_s", "frames", "fps")
"""Placeholders a prompt template may use; ``segment_number`` counts from 1."""


@dataclass
class VLMConfig:
    """How to reach the VLM and what to ask it."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Root of the OpenAI-compatible API; requests go to ``{base_url}/chat/completions``."""

    model: str = ""
    """Model name the server knows (vLLM: the served model name). Required."""

    api_key_env: Optional[str] = None
    """Name of the environment variable holding the API key, sent as ``Authorization: Bearer``.
    The key itself never goes in a recipe. None: no Authorization header (a local server)."""

    timeout_s: float = 60.0
    """Socket timeout of one request in seconds (connect, and each wait for reply bytes)."""

    max_retries: int = 3
    """Retries after a timeout, a connection error or an HTTP 408/429/5xx, before the comparison fails."""

    retry_backoff_s: float = 1.0
    """Sleep before retry k (k = 0, 1, ..) is ``retry_backoff_s * 2**k`` seconds."""

    concurrency: int = 8
    """(pair, segment) comparisons in flight at once (one thread each; each sends its two orders in turn)."""

    temperature: float = 0.0
    """Sampling temperature of the VLM (0: greedy, the most repeatable verdicts)."""

    max_tokens: int = 64
    """Reply length cap; the answer is one word, a little room lets chatty models still answer."""

    frames_per_segment: int = 4
    """Frames sent per video and segment, evenly spaced over the segment (all frames if it has fewer)."""

    image_size: int = 256
    """Longer side of each image in pixels after resizing (aspect kept); 0 sends frames as they are."""

    resample: str = choice("auto", RESAMPLE_CHOICES)
    """Resize filter; 'auto' = nearest when upscaling (keeps small toy frames crisp), bicubic when shrinking."""

    on_error: str = choice("tie", ERROR_POLICIES)
    """A failed comparison: 'tie' (counted, with a message) or 'raise' (LabelingError)."""

    prompt: str = DEFAULT_PROMPT
    """Question template; placeholders: {caption} {segment_number} {num_segments} {start_s} {end_s} {frames} {fps}."""

    extra_body: dict = field(default_factory=dict)
    """Extra fields merged into the request body (server-specific, e.g. {"seed": 0} or {"top_k": 1})."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("VLMConfig.model is required: the model name the server serves")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"VLMConfig.base_url must start with http:// or https://, got {self.base_url!r}")
        for name in ("timeout_s", "concurrency", "frames_per_segment"):
            if not getattr(self, name) > 0:
                raise ValueError(f"VLMConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("max_retries", "retry_backoff_s", "image_size", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"VLMConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.resample not in RESAMPLE_CHOICES:
            raise ValueError(f"VLMConfig.resample must be one of {RESAMPLE_CHOICES}, got {self.resample!r}")
        if self.on_error not in ERROR_POLICIES:
            raise ValueError(f"VLMConfig.on_error must be one of {ERROR_POLICIES}, got {self.on_error!r}")
        for _, name, _, _ in string.Formatter().parse(self.prompt):
            if name is not None and name.split(".")[0].split("[")[0] not in PROMPT_FIELDS:
                raise ValueError(f"VLMConfig.prompt uses unknown placeholder {{{name}}}; valid: {PROMPT_FIELDS}")
        if "messages" in self.extra_body:
            raise ValueError("VLMConfig.extra_body may not replace 'messages'")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass
class LoRAConfig:
    rank: int = 8
    """Rank r of the update B @ A (A: (r, in_features), B: (out_features, r))."""

    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank (peft's ``lora_alpha``)."""

    dropout: float = 0.0
    """Dropout probability on the adapter's input (training mode only; the base path never sees it)."""

    target_modules: List[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Name patterns of the nn.Linear modules to adapt. A pattern matches the END of a dotted module name
    on a dot boundary: 'attn.qkv' matches 'blocks.3.attn.qkv', 'kv' matches 'blocks.3.cross.kv' but not
    'blocks.3.attn.qkv'. The defaults are the vidpo DiT's attention and MLP projections; for diffusers
    transformers use e.g. ['to_q', 'to_k', 'to_v', 'to_out.0']."""

    init_lora_weights: str = choice("zero_b", INIT_CHOICES)
    """'zero_b': A kaiming-uniform, B zeros, so the adapted model starts exactly at the base model.
    'gaussian': A ~ N(0, 1/r), B zeros (peft's 'gaussian'); also starts at the base model."""

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"LoRAConfig.init_lora_weights must be one of {INIT_CHOICES}, "
                             f"got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
            raise ValueError(f"LoRAConfig.target_modules must be a non-empty list of non-empty names, "
                             f"got {self.target_modules!r}")


@dataclass
class ModelConfig:
    preset: str = choice("tiny", ("tiny", "small", "base", "1.3b", "5b"))
    """Size preset of the video DiT (vidpo.models.dit.PRESETS). 'tiny' (~1 M parameters) is the CPU
    demo model; '1.3b' is Wan-1.3B-like (30 layers, width 1536, 12 heads); '5b' is Wan-2.2-5B-like."""

    width: Optional[int] = None
    """Hidden size; overrides the preset when set."""

    depth: Optional[int] = None
    """Number of transformer blocks; overrides the preset when set."""

    num_heads: Optional[int] = None
    """Attention heads; overrides the preset when set."""

    patch_size: Optional[List[int]] = None
    """Patch size over (T, H, W); overrides the preset when set."""

    attention: str = choice("sdpa", ("auto", "sdpa", "flash_attn", "te", "math"))
    """Attention backend: 'sdpa' (torch scaled_dot_product_attention), 'flash_attn' or 'te' when those
    packages are importable, 'math' (explicit softmax, for tests), 'auto' (fastest present)."""

    dtype: str = choice("float32", ("float32", "bfloat16"))
    """Parameter dtype. Training on GPU keeps fp32 master weights and uses bf16 autocast instead."""

    # Issue 8: real diffusers models behind the same interface (vidpo.models.adapters).
    kind: str = choice("dit", ("dit", "wan", "cogvideox"))
    """'dit': the vidpo video DiT built from the preset; 'wan' / 'cogvideox': a diffusers
    WanTransformer3DModel / CogVideoXTransformer3DModel loaded from ``model.path`` (the preset fields
    are then unused)."""

    path: Optional[str] = None
    """Local model directory for kind 'wan' / 'cogvideox': ``transformer/`` (diffusers format) and,
    optionally, ``text_conditioner.safetensors``. Nothing is downloaded."""

    sampler: str = choice("auto", ("auto", "euler", "flow_euler", "unipc", "ddim", "dpm"))
    """How pairs (generate) and evaluation samples are drawn. 'auto': the model's default, i.e. the engine's
    Euler rectified-flow sampler for the DiT, 'flow_euler' for Wan, 'ddim' for CogVideoX. 'euler': the
    engine's sampler (DiT only). Wan: 'flow_euler' (FlowMatchEulerDiscreteScheduler) or 'unipc'
    (UniPCMultistepScheduler with flow sigmas, the Wan 2.1 releases' scheduler). CogVideoX: 'ddim'
    (CogVideoXDDIMScheduler, CogVideoX-2B's) or 'dpm' (CogVideoXDPMScheduler, CogVideoX-5B's)."""

    sample_shift: Optional[float] = None
    """Time shift of a flow-matching model's sampling schedule (kind 'wan': 3.0 for 480p, 5.0 for 720p in
    the Wan 2.1 releases); unset: 1.0 (no shift). Not used by CogVideoX (a DDPM)."""


@dataclass
class WorldConfig:
    """The shapes world: procedural captioned clips with an exact oracle (vidpo.data.shapes)."""

    frames: int = 8
    """Frames per clip (the model's T; the toy world has no VAE, so latent frames = pixel frames)."""

    height: int = 16
    """Frame height in pixels."""

    width: int = 16
    """Frame width in pixels."""

    fps: float = 8.0
    """Frames per second of the clips; with ``label.segment_seconds`` it sets the DenseDPO segments."""

    colours: List[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    """Colour vocabulary (names from vidpo.data.shapes.PALETTE)."""

    shapes: List[str] = field(default_factory=lambda: ["square", "circle"])
    """Shape vocabulary ('square', 'circle', 'diamond')."""

    directions: List[str] = field(default_factory=lambda: ["right", "left", "up", "down"])
    """Motion directions."""

    speed: float = 1.0
    """Object speed in pixels per frame."""

    object_size: int = 5
    """Object side / diameter in pixels."""

    wrong_colour: float = 0.0
    """Fraction of training clips whose caption names a different colour than the one shown."""

    reversed_direction: float = 0.0
    """Fraction of training clips whose caption names the opposite direction of the motion shown."""

    local_artifact: float = 0.0
    """Fraction of training clips with a temporally local artifact (flicker / dropout / jitter) inside
    one segment."""

    static: float = 0.0
    """Fraction of training clips whose object does not move."""

    artifact_segment_frames: int = 2
    """Length in frames of a local artifact."""


@dataclass
class FlowConfig:
    """Rectified flow: x_t = (1 - t) x0 + t eps, target u = eps - x0 (vidpo.models.flow)."""

    logit_mean: float = 0.0
    """Mean of the logit-normal timestep distribution."""

    logit_std: float = 1.0
    """Standard deviation of the logit-normal timestep distribution."""

    t_min: float = 0.0
    """Training timesteps are drawn in [t_min, t_max] (rescaled logit-normal)."""

    t_max: float = 1.0
    """Upper end of the training timestep range."""

    cond_dropout: float = 0.1
    """Probability of replacing the condition by the null condition during training (for CFG)."""


@dataclass
class SampleConfig:
    """Sampling with the Euler ODE solver and classifier-free guidance."""

    steps: int = 20
    """Sampling steps from t=1 to t=0 (Euler for the DiT; the scheduler's steps for model.kind wan / cogvideox)."""

    cfg_scale: float = 3.0
    """Classifier-free guidance scale (1.0 disables guidance)."""

    num_samples: int = 32
    """Samples drawn by `vidpo sample` (and per-condition grids)."""

    batch_size: int = 64
    """Samples per forward batch while sampling."""


@dataclass
class TrainConfig:
    objective: str = choice("sft", ("sft", "flow_dpo", "dense_dpo", "kto", "consistency_distill"))
    """Training objective: 'sft' (flow-matching pretraining / fine-tuning), 'flow_dpo', 'dense_dpo',
    'kto' (preference objectives, DESIGN.md section 1), 'consistency_distill' (T2V-Turbo-v2 consistency
    distillation from preprocessed teacher data; sections ``distill`` and ``reward``)."""

    max_steps: int = 600
    """Optimizer steps of the run."""

    batch_size: int = 32
    """Clips (SFT) or pairs (DPO) per micro-batch."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    lr: float = 1e-3
    """Peak learning rate of AdamW."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine decay after warmup)."""

    warmup_steps: int = 50
    """Linear warmup steps."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""

    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    init_from: Optional[str] = None
    """Checkpoint directory or .safetensors file to initialise the policy from (relative paths are
    resolved against the repository root, then the current directory)."""

    log_every: int = 10
    """Write a metrics.jsonl / TensorBoard row every this many steps."""

    ckpt_every: int = 200
    """Write a checkpoint every this many steps (and always at the end; 0: only at the end)."""

    keep_checkpoints: int = 2
    """How many step checkpoints to keep (older ones are deleted after a newer one is complete)."""

    eval_every: int = 0
    """Oracle-evaluate the policy at the start of a fresh run (step 0), every this many steps and at the end
    (0: no in-training evaluation). Multi-process runs evaluate under every layout (every rank samples the
    same seeds, rank 0 logs)."""

    autocast: str = choice("auto", ("auto", "off", "bf16"))
    """Mixed precision: 'auto' = bf16 autocast on GPU, off on CPU."""

    optimizer: str = choice("auto", ("auto", "adamw", "fused_adamw", "apex"))
    """'auto' picks torch's fused AdamW on GPU (apex FusedAdam only if NVIDIA apex is importable and
    asked for), plain AdamW on CPU."""

    max_bad_steps: int = 5
    """Stop after this many consecutive non-finite losses (each one skips its step and is logged)."""

    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights with this decay (0: off; pretraining
    uses e.g. 0.99). Evaluation, samples and the checkpoints' ``model.safetensors`` then carry the EMA
    weights, ``online.safetensors`` the optimizer's own (vidpo.training.ema). Under a parallel layout each rank
    averages its own shard and DCP checkpoints keep the average next to the weights."""

    num_threads: int = 0
    """torch intra-op threads on CPU (0: leave torch's default)."""

    progress: bool = True
    """Show a progress bar."""


@dataclass
class EvalConfig:
    """Oracle evaluation of a checkpoint's samples (fixed seeds, so two checkpoints are paired)."""

    num_samples: int = 128
    """Samples scored; conditions cycle over the whole condition set."""

    steps: int = 20
    """Sampling steps for evaluation samples (Euler for the DiT; the model's scheduler for wan / cogvideox)."""

    cfg_scale: float = 3.0
    """Guidance scale for evaluation samples."""

    seed_offset: int = 1_000_000
    """Evaluation noise uses sample indices from here on, so it never overlaps training streams."""

    grid_conditions: int = 8
    """Conditions shown in the sample grid (GIF/PNG)."""


@dataclass
class GenerateConfig:
    """Pair generation from the current policy (``vidpo generate``)."""

    mode: str = choice("vanilla", ("vanilla", "structural"))
    """'vanilla': the two videos of a pair are sampled from independent noise. 'structural' (DenseDPO's
    StructuralDPO): both are SDEdit re-generations of one ground-truth clip from the same level eta with
    independent noise, so they share coarse structure and motion and differ in local details."""

    num_pairs: int = 256
    """Pairs to generate; conditions cycle over a seeded permutation of the world's condition set."""

    eta_min: float = 0.55
    """Structural mode: eta ~ Uniform[eta_min, eta_max] per pair (shared by both videos of the pair)."""

    eta_max: float = 0.75
    """Upper end of the SDEdit level range."""

    steps: int = 20
    """Sampling steps from t=1 (or eta) to 0: Euler steps for the DiT; for wan / cogvideox the size of the
    scheduler's grid, of which SDEdit runs the steps at or below eta."""

    cfg_scale: float = 3.0
    """Classifier-free guidance scale while sampling pairs."""

    shard_size: int = 64
    """Pairs per safetensors shard (a rerun skips complete shards)."""

    heldout_pairs: int = 64
    """Extra pairs (other seeds) generated and labelled for held-out implicit accuracy (0 disables)."""


@dataclass
class LabelConfig:
    """Labelling of pairs (``vidpo label``): per-segment preferences."""

    labeler: str = choice("oracle", ("oracle", "human", "vlm", "critic"))
    """Who labels: the shapes-world 'oracle', a 'human' labels file (JSONL), a 'vlm' over HTTP
    (OpenAI-compatible chat completions), or a trained 'critic' (IPO)."""

    segment_seconds: float = 1.0
    """DenseDPO segment length in seconds of video (mapped to latent frames with world.fps and
    temporal_compression)."""

    temporal_compression: int = 1
    """Pixel frames per latent frame of the VAE (1 for the pixel-space toy world, 4 for Wan's VAE)."""

    tie_margin: float = 0.0
    """Oracle: a segment is a tie when the two scores differ by at most this much."""

    granularity: str = choice("segment", ("segment", "video"))
    """Oracle: 'segment' labels each segment from its own scores (DenseDPO); 'video' gives one verdict from
    the whole-video scores, copied to every segment (what vanilla Flow-DPO's labellers see)."""

    human_file: Optional[str] = None
    """Human labels JSONL ({"pair_id": .., "labels": [..]} or {"pair_id": .., "label": ..} per line)."""

    on_error: str = choice("tie", ("tie", "raise"))
    """What an unusable label (unparseable VLM reply, missing human label) becomes: a counted tie, or a
    hard error. It overrides label.vlm.on_error."""

    vlm: Optional[VLMConfig] = None
    """The VLM labeller's endpoint, model and prompt (required when labeler is 'vlm')."""


@dataclass
class PreferenceConfig:
    """Preference objectives (flow_dpo / dense_dpo / kto) and their data."""

    beta: float = 1000.0
    """DPO / KTO inverse temperature. The flow-matching errors are per-element means (~1e-3 differences),
    so useful betas are large (DESIGN.md, Diffusion-DPO uses 2500-5000)."""

    label_smoothing: float = 0.0
    """Flow-DPO / DenseDPO: the probability eps in [0, 0.5) with which each label is taken to be wrong
    (conservative DPO): a pair's loss is (1 - eps) softplus(-m) + eps softplus(m), minimal at a bounded
    margin, so labels from a critic that is right ~85% of the time cannot push margins without end."""

    sft_weight: float = 0.0
    """Weight of the flow-matching regularizer (IPO's real-video regularization) added to the loss."""

    sft_source: str = choice("real", ("real", "winners", "both"))
    """What the regularizer trains on: ground-truth clips of the pairs' conditions ('real'), the preferred
    videos ('winners'), or both."""

    kto_lambda_desirable: float = 1.0
    """KTO weight of desirable videos."""

    kto_lambda_undesirable: float = 1.0
    """KTO weight of undesirable videos."""

    reference: str = choice("auto", ("auto", "lora_disabled", "frozen_copy"))
    """Reference model: the policy with LoRA disabled (no second copy of the weights; needs ``lora``), or a
    frozen copy of the initial policy. 'auto': lora_disabled when LoRA is on, else frozen_copy."""

    loss_backend: str = choice("auto", ("auto", "torch", "triton", "cpp", "cuda"))
    """Backend of the fused paired loss (vidpo.kernels)."""

    pairs: Optional[str] = None
    """Directory with manifest.jsonl + shards to train on (``vidpo run`` sets it to its own pairs)."""

    on_bad_pair: str = choice("skip", ("skip", "raise"))
    """A malformed manifest line or a missing shard: skip it (counted, named in the log) or stop."""


# ----- consistency distillation (issue 9; vidpo.stages.preprocess, vidpo.objectives.distill, vidpo.objectives.rewards) ------
@dataclass
class DistillConfig:
    """Reward-guided consistency distillation (T2V-Turbo-v2): a teacher ODE solver with classifier-free and
    motion guidance, precomputed by ``vidpo preprocess``; a student trained with ``train.objective:
    consistency_distill`` that maps a point of the teacher's trajectory to its origin in 1-8 steps."""

    teacher: Optional[str] = None
    """Teacher checkpoint (run dir, checkpoint dir or .safetensors; same architecture as ``model``). The
    student starts from it unless ``train.init_from`` is set. Only ``vidpo preprocess`` loads it."""

    data: Optional[str] = None
    """Directory of preprocessed shards (``vidpo preprocess --out``) the student trains on."""

    num_rows: int = 4096
    """Training rows to preprocess: one (clip, noise, timestep) triple and its teacher solver step each."""

    shard_size: int = 256
    """Rows per safetensors shard; a rerun of ``vidpo preprocess`` skips complete shards."""

    batch_size: int = 64
    """Rows per teacher forward batch while preprocessing."""

    grid_steps: int = 32
    """N: intervals of the teacher's time grid t_0 = 0 < ... < t_N = 1 (vidpo.models.flow.time_grid)."""

    skip: int = 2
    """k: the teacher solver jumps k grid intervals (t_n -> t_{n-k}); N must be a multiple of k, and
    training times are the multiples of k (so every chain of targets ends at t = 0)."""

    shift: float = 1.0
    """Time shift of the grid (1: uniform)."""

    cfg_scale: float = 3.0
    """Classifier-free guidance scale w of the teacher solver (the student is distilled for this w)."""

    curated_fraction: float = 0.5
    """Fraction of rows rendered clean ('curated' source, the high-quality-video role); the rest are
    'web' rows rendered with the world's corruptions (noisy captions: wrong colour / reversed direction)."""

    motion_scale: float = 0.0
    """Motion-guidance strength eta of the PTA energy gradient (0 disables motion guidance)."""

    motion_fraction: float = 0.5
    """tau: motion guidance acts in the first tau of the solver's steps, i.e. at times t_n > 1 - tau."""

    motion_block: int = -1
    """Transformer block whose temporal attention defines the energy (-1: depth // 2)."""

    motion_sources: List[str] = field(default_factory=lambda: ["curated"])
    """Sources whose clips are trusted motion references ('curated', 'web'); other rows get eta = 0."""

    distance: str = choice("huber", ("huber", "l2"))
    """CD distance: pseudo-Huber sqrt(d^2 + c^2) - c per element (LCM's), or squared error; mean over elements."""

    huber_c: float = 0.001
    """c of the pseudo-Huber distance."""

    sampler_noise: str = choice("fresh", ("fresh", "predicted"))
    """Student multi-step sampling: re-noise the predicted x0 with fresh noise (consistency models) or with
    the noise the student implies, eps^ = x + (1 - t) v (deterministic)."""

    student_steps: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Student step counts reported by the evaluation table."""

    teacher_steps: List[int] = field(default_factory=lambda: [16, 32])
    """Teacher Euler + CFG step counts reported by the evaluation table."""

    eval_steps: int = 4
    """Student steps of the evaluation during / at the end of training."""


@dataclass
class RewardConfig:
    """Reward mixture of consistency distillation (vidpo.objectives.rewards): R = sum beta_i R_img_i (on a few random
    frames) + sum gamma_j R_vid_j, computed on the student's one-step prediction; loss = CD - R."""

    image: Dict[str, float] = field(default_factory=dict)
    """Image-text rewards and weights beta, e.g. {shapes_appearance: 1.0}. Empty: none."""

    video: Dict[str, float] = field(default_factory=dict)
    """Video-text rewards and weights gamma, e.g. {shapes_motion: 1.0}. Empty: none."""

    image_frames: int = 2
    """Random frames per clip scored by the image-text rewards."""

    subset: str = choice("web", ("all", "curated", "web"))
    """Rows the reward loss is computed on (the paper: CD on all data, rewards on the short-caption
    WebVid part): 'all', or one source."""

    max_rows: int = 8
    """At most this many reward rows per micro-batch (the paper: 1 reward clip per 3 CD clips per GPU)."""


# ----- IPO critic and iterative rounds (issue 5; vidpo.ipo.critic, vidpo.ipo.dual, vidpo.ipo.rounds) ---------------
@dataclass
class CriticConfig:
    """The IPO critic (``vidpo.models.critic.VideoCritic``): a segment-level video scorer trained on preference
    pairs with a Bradley-Terry loss that handles ties (Davidson), used as labeller ``critic``."""

    checkpoint: Optional[str] = None
    """Critic weights (critic.safetensors or its directory) that ``label.labeler=critic`` labels with.
    ``vidpo iterate`` sets it per round."""

    width: int = 64
    """Hidden size of the critic's transformer."""

    depth: int = 2
    """Transformer blocks of the critic (the policy's DiT block with a learned, time-free modulation)."""

    num_heads: int = 4
    """Attention heads (width / num_heads must be even and >= 6)."""

    patch_size: List[int] = field(default_factory=lambda: [1, 4, 4])
    """Patch size over (T, H, W); pt = 1 keeps one score per frame."""

    frame_differences: bool = False
    """Feed the clip's temporal differences x[t] - x[t-1] next to the clip (C more input channels), so every
    patch token sees the motion the oracle judges (``vidpo.models.critic``)."""

    dropout: float = 0.1
    """Dropout after every block and in the head (also the source of Monte-Carlo dropout votes)."""

    steps: int = 300
    """Optimizer steps of one critic training."""

    batch_size: int = 32
    """Pairs per critic step."""

    lr: float = 1.0e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""

    warmup_steps: int = 20
    """Linear warmup steps."""

    weight_decay: float = 0.01
    """AdamW weight decay."""

    segment_weight: float = 0.0
    """Weight of the per-segment Bradley-Terry term next to the whole-video term (useful when the labels
    differ per segment, i.e. DenseDPO-style labels)."""

    tie_init: float = -2.0
    """Initial log nu of the Davidson tie model; nu = 0 would be plain Bradley-Terry."""

    learn_ties: bool = True
    """Learn log nu from the labels' ties (otherwise it stays at tie_init)."""

    augment: bool = True
    """Train on label-preserving symmetries of the world: horizontal / vertical flips and time reversal,
    each with the caption's direction mapped accordingly (left <-> right, up <-> down, reversed)."""

    tie_margin: Optional[float] = None
    """Labelling: a score difference |d| <= tie_margin is a tie. None: the Davidson rule, tie where the tie
    is the most likely outcome, |d| < 2 max(log nu, 0)."""

    min_confidence: float = 0.0
    """Labelling: a pair (or segment) is a tie unless the critic's Davidson probability of its winner is at
    least this (0: no such rule). It trades labels for accuracy: on the shapes base, 0.85 ties ~40% of the
    pairs and lifts the agreement with the oracle of the rest from ~0.78 to ~0.88."""

    granularity: str = choice("video", ("segment", "video"))
    """Pairwise labels: 'segment' labels each segment from its own scores (whole-video label = their
    majority), 'video' gives one verdict from the whole-video scores copied to every segment."""

    pointwise: str = choice("quantile", ("quantile", "threshold"))
    """KTO labels from single-video scores: 'quantile' marks the top / bottom fractions of the scored set,
    'threshold' compares the scores with absolute values."""

    desirable: float = 0.7
    """Quantile mode: videos scoring at or above this quantile are desirable; threshold mode: the score."""

    undesirable: float = 0.3
    """Quantile mode: videos scoring at or below this quantile are undesirable; threshold mode: the score."""

    heldout_fraction: float = 0.2
    """``vidpo critic train`` without --heldout: the fraction of the labelled pairs held out to report
    accuracy on (``vidpo iterate`` measures on fresh oracle pairs instead and trains on all seed pairs)."""

    batch_size_eval: int = 128
    """Videos per forward pass when scoring."""


@dataclass
class IterateConfig:
    """Rounds of IPO (``vidpo iterate``): generate -> label with the critic -> train -> evaluate, and, for
    Dual-IPO, refine the critic between rounds on pseudo-labels filtered by the Preference Certainty
    Estimate (``vidpo.ipo.dual``)."""

    rounds: int = 3
    """Number of rounds R."""

    reference: str = choice("previous", ("previous", "base"))
    """Reference model of round r: 'previous' = the policy round r starts from (round r-1's result),
    'base' = the initial policy in every round."""

    seed_pairs: int = 384
    """Pairs sampled from the initial policy and labelled by the oracle (the stand-in for the paper's human
    labels) to train the first critic. No oracle label is used for training after these."""

    seed_granularity: str = choice("video", ("segment", "video"))
    """Oracle labelling of the seed pairs (see label.granularity)."""

    seed_tie_margin: float = 0.01
    """Oracle score difference up to which a seed pair is labelled a tie (people call near-equal videos
    ties too; the critic's Bradley-Terry loss models them)."""

    eval_pairs: int = 192
    """Fresh pairs per round from the current policy, labelled by the oracle with no tie margin, to measure
    the critic's accuracy only (never trained on)."""

    pairing: str = choice("given", ("given", "ranked"))
    """How a DPO round (flow_dpo / dense_dpo) gets its pairs from the critic: 'given' labels each generated
    pair as it is; 'ranked' scores all the round's videos and pairs each prompt's best-scored with its
    worst-scored (``rank_fraction``; ``vidpo.ipo.pairing.ranked_pairs``). KTO rounds always use pointwise labels."""

    round_labeler: str = choice("critic", ("critic", "oracle"))
    """Who labels the rounds' pairs: 'critic' (IPO) or 'oracle' -- the ceiling a perfect critic would reach,
    an ablation for the report only (it trains on oracle labels, which the IPO recipe must not)."""

    rank_fraction: float = 0.25
    """'ranked' pairing: each prompt's top and bottom fractions of its videos by critic score are paired
    (every top video with every bottom one)."""

    margin_fraction: float = 1.0
    """'ranked' pairing: of all the round's best-versus-worst pairs, keep this fraction with the largest critic
    score gap (1: keep them all). The gap ranks pairs *across* prompts, so the prompts the critic cannot tell
    apart drop out (``vidpo.ipo.pairing.widest_pairs``). Measured on the shapes world: the widest half of a round-3
    pool agrees with the oracle ~97% against ~87% for the whole pool, yet the rounds gained no more, since the
    widest pairs have hopeless losers the policy already avoids (README, IPO); hence the default keeps all."""

    refine: bool = True
    """Dual-IPO: refine the critic between rounds (pseudo-labels, majority vote, PCE filter, weighted loss)."""

    refine_pairs: str = choice("generated", ("generated", "within_prompt"))
    """Which pairs of the round's videos the critic pseudo-labels: 'generated', the round's N generated pairs
    (as Dual-IPO does), or 'within_prompt', every pair of two videos of one prompt (~2N^2 / prompts pairs of the
    same 2N videos: each video is scored once per vote, so the votes cost the same; vidpo.ipo.dual). On the
    shapes world the generated pairs' few hundred pseudo-labels move the critic less than its retraining noise;
    within-prompt pairs (with refine_steps 1500) raise the critic's fresh-pair accuracy in round 2 on 7 of 7
    seeds (+0.0065) and round 3 of the policy by +0.004 (README, IPO)."""

    refine_steps: int = 0
    """AdamW steps of the refined critic's training; 0: critic.steps. Thousands of pseudo-labels need more
    steps than the seed labels alone, on which long training overfits."""

    votes: int = 5
    """Critic passes K per pseudo-label."""

    vote_dropout: bool = True
    """Monte-Carlo dropout in the voting passes."""

    vote_augment: bool = True
    """Each voting pass sees a different label-preserving symmetry of the pair (flips, time reversal)."""

    vote_min_confidence: float = 0.0
    """A voting pass calls a tie unless its Davidson probability of the winner reaches this (see
    critic.min_confidence), so the majority vote keeps only pairs the critic is consistently sure of."""

    vote_keep_fraction: float = 0.0
    """With f > 0, each voting pass votes only on its fraction f of the pairs with the largest critic score gap
    (the rest are its ties), on top of vote_min_confidence: a critic trained longer is sharper, and a fixed
    confidence would let more of its votes through (benchmarks/ipo_cpu_202611.md, 0d: at 0.5 round 3's
    pseudo-labels are right 0.89-0.95 instead of 0.82-0.87, and its refinement raises the critic's fresh-pair
    accuracy on 6 of 7 seeds; the policy gains no more than without it). 0: off."""

    pce_threshold: float = 0.5
    """Pseudo-labels are kept when PCE > this."""

    pce_timesteps: int = 4
    """(t, noise) draws averaged into the implicit reward of each video."""

    pce_temperature: float = 0.0
    """tau of the PCE (see vidpo.ipo.dual); 0: the standard deviation of the rewards over the dataset."""

    accumulate_pseudo: bool = True
    """Refinements train on the kept pseudo-labels of every earlier round, not only the latest."""


# ----- distributed training (issue 6; vidpo.training.distributed, vidpo.cluster.launch, vidpo.cluster.scale) ------------------------
@dataclass
class ParallelConfig:
    """How one training run is split over processes (``torchrun`` ranks). The data-parallel size is what
    remains of the world: ``dp = world_size / (tp * cp)``. A single process ignores this section unless it
    asks for more than one rank (an error then says to start the run with torchrun)."""

    tp: int = 1
    """Tensor-parallel size: attention heads and MLP columns are split over this many ranks (Megatron
    ColumnParallelLinear / RowParallelLinear). Keep it within one node (NVLink)."""

    sp: bool = False
    """Sequence parallel (an option of tensor parallel): the norm / modulation / residual regions hold
    1/tp of the tokens, all-gathers and reduce-scatters replace TP's all-reduces. Ignored when tp = 1."""

    cp: int = 1
    """Context-parallel size (Ulysses): each rank holds 1/cp of the latent frames; self-attention swaps the
    sequence split for a head split with two all-to-alls. Needs heads % (tp * cp) == 0 and latent
    frames (after temporal patching) % cp == 0."""

    dp_shard: int = -1
    """Ranks of a data-parallel group over which parameters, gradients and optimizer state are sharded
    (FSDP2 ``fully_shard``; context-parallel ranks join the shard group, as in torchtitan). -1: all of the
    data-parallel ranks; 1: no sharding (replicated data parallel, gradients all-reduced); between: hybrid
    sharding (shard within groups of dp_shard, replicate across them)."""

    fsdp_param_dtype: str = choice("float32", ("float32", "bfloat16"))
    """Dtype FSDP all-gathers parameters in for compute (gradients are always reduced in float32)."""

    activation_checkpointing: str = choice("none", ("none", "full"))
    """'full' recomputes every transformer block in the backward pass of the parallel model."""

    compile: bool = False
    """torch.compile each transformer block of the parallel model (GPU runs; slow to start on CPU)."""

    backend: str = choice("auto", ("auto", "nccl", "gloo"))
    """Process-group backend: 'auto' is nccl on CUDA, gloo on CPU."""

    timeout_minutes: int = 30
    """Collective timeout of the process groups."""


@dataclass
class ClusterConfig:
    """Where ``vidpo launch`` starts the run: node count, GPUs, SLURM settings, and the link speeds
    ``vidpo scale`` uses to estimate communication time."""

    nodes: int = 1
    """Nodes of the job; world size = nodes * gpus_per_node."""

    gpus_per_node: int = 8
    """GPUs (= torchrun processes) per node."""

    launcher: str = choice("torchrun", ("torchrun", "slurm"))
    """'torchrun': a torchrun command / shell script for this machine (or several, with a rendezvous
    endpoint); 'slurm': an sbatch script that runs torchrun once per node with srun."""

    partition: Optional[str] = None
    """SLURM partition (#SBATCH --partition)."""

    account: Optional[str] = None
    """SLURM account (#SBATCH --account)."""

    qos: Optional[str] = None
    """SLURM quality of service (#SBATCH --qos)."""

    time_limit: str = "24:00:00"
    """SLURM wall-clock limit (#SBATCH --time)."""

    job_name: Optional[str] = None
    """Job name; default: the recipe's file name."""

    cpus_per_gpu: int = 12
    """CPU cores reserved per GPU (data loading, decode)."""

    container_image: Optional[str] = None
    """Container image for srun (pyxis/enroot ``--container-image``); None runs on the host."""

    container_mounts: List[str] = field(default_factory=list)
    """``--container-mounts`` entries (``/host/path:/container/path``)."""

    setup: List[str] = field(default_factory=list)
    """Shell lines run before the launch on every node (module load, conda activate, cd ...)."""

    env: List[str] = field(default_factory=list)
    """``KEY=VALUE`` environment variables exported for the run (NCCL settings, cache directories)."""

    rdzv_endpoint: Optional[str] = None
    """torchrun launcher on several nodes: ``host:port`` of the rendezvous (node 0). SLURM jobs use the
    first node of the allocation."""

    master_port: int = 29500
    """Rendezvous port."""

    gpu_memory_gib: float = 80.0
    """Memory per GPU (H100 SXM: 80, H200: 141); ``vidpo scale`` checks the estimate against it."""

    gpu_tflops: float = 989.0
    """Dense bf16 peak TFLOP/s per GPU (H100 SXM: 989), for the compute-time estimate."""

    mfu: float = 0.4
    """Model-FLOPs utilisation assumed for the compute-time estimate."""

    intra_node_gbytes_per_s: float = 450.0
    """Per-GPU unidirectional bandwidth inside a node (NVLink 4 on H100: ~450 GB/s)."""

    inter_node_gbytes_per_s: float = 50.0
    """Per-GPU unidirectional bandwidth between nodes (one 400 Gb/s InfiniBand NIC per GPU: 50 GB/s)."""


# ----- data path (issue 7; vidpo.data.decode, vidpo.stages.cache, vidpo.data.latents) ----------------------
@dataclass
class DataConfig:
    """What ``vidpo train`` trains on: the procedural shapes world, or latent shards from ``vidpo cache``."""

    source: str = choice("shapes", ("shapes", "latents"))
    """'shapes': clips rendered by the shapes world (section ``world``). 'latents': VAE latents and text
    embeddings cached by ``vidpo cache`` in ``data.shards`` (the DiT's in_channels and text-embedding
    width are read from the cache's index)."""

    shards: Optional[str] = None
    """Directory written by ``vidpo cache`` (index.json + shards/); required when source is 'latents'."""

    shuffle: bool = True
    """Visit the samples in a fresh seeded permutation each epoch (else in cache order)."""

    workers: int = 2
    """Threads reading shard rows in the background."""

    prefetch: int = 4
    """Batches read ahead of the training step (per rank)."""

    on_bad_input: str = choice("skip", ("skip", "raise"))
    """An unreadable or inconsistent shard: skip it (counted, named in the log) or stop."""


@dataclass
class CacheConfig:
    """``vidpo cache``: decode the clips of a manifest, encode them with a VAE and their captions with a text
    encoder, and write safetensors shards + an index that ``data.source: latents`` trains on."""

    manifest: Optional[str] = None
    """Clip manifest (.jsonl or .parquet; vidpo.data.manifest): path, caption, optional fps/start/end; or a
    folder of videos with same-named .txt caption files."""

    vae: Optional[str] = None
    """Local diffusers VAE directory (AutoencoderKLWan or AutoencoderKLCogVideoX; config.json names it)."""

    text_encoder: Optional[str] = None
    """Local transformers text-encoder directory (T5 / UMT5 encoder; config.json names the class)."""

    tokenizer: Optional[str] = None
    """Local tokenizer directory (default: the text encoder's directory)."""

    decoder: str = choice("auto", ("auto", "dali", "dali_cpu", "torchcodec", "pyav"))
    """Video decoder: 'dali' (GPU/NVDEC), 'dali_cpu' (VP8/VP9 only), 'torchcodec', 'pyav', or 'auto'
    (per codec, the first installed of: DALI on a GPU; on CPU PyAV, torchcodec, DALI CPU — see
    vidpo.data.decode.loader for the measurements behind the order)."""

    fps: float = 16.0
    """Frame rate clips are sampled at (0: each clip's native rate)."""

    frames: int = 17
    """Frames per clip (1 + 4k for the Wan / CogVideoX VAEs' 4x temporal compression)."""

    height: int = 480
    """Frame height after resize / center crop."""

    width: int = 832
    """Frame width after resize / center crop."""

    resize: str = choice("crop", ("crop", "stretch"))
    """'crop': scale the shorter side to cover (height, width), then center-crop; 'stretch': ignore aspect."""

    text_max_length: int = 512
    """Tokens per caption: embeddings are padded (with zeros past the caption, as Wan does) or truncated."""

    shard_size: int = 64
    """Clips per shard; a rerun skips complete shards, and rank r of N takes shards r, r+N, ..."""

    batch_size: int = 4
    """Clips per VAE forward batch (and per decode batch)."""

    workers: int = 2
    """Decoding threads (DALI: its pipeline threads)."""

    dtype: str = choice("bfloat16", ("float32", "bfloat16", "float16"))
    """Storage dtype of latents and text embeddings (the encoders run in float32 on CPU, bf16 on GPU)."""

    on_bad_input: str = choice("skip", ("skip", "raise"))
    """A bad manifest line or an unusable video (missing, corrupt, truncated, too short): skip it (counted,
    named in the log and in the shard's record) or stop."""


@dataclass
class RunConfig:
    """A whole recipe."""

    seed: int = 0
    """Root of every random stream of the run (vidpo.utils.seeding): data, noise, timesteps, init, sampling."""

    model: ModelConfig = field(default_factory=ModelConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    lora: Optional[LoRAConfig] = None
    """LoRA adapters on the policy (None: full fine-tuning). Setting any lora.* key turns LoRA on."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distributed layout (tensor / sequence / context / data parallel); used when started by torchrun."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Cluster the run is launched on (``vidpo launch``) and its link speeds (``vidpo scale``)."""

    critic: CriticConfig = field(default_factory=CriticConfig)
    """The IPO critic (issue 5): its network, training and labelling rules."""

    iterate: IterateConfig = field(default_factory=IterateConfig)
    """Rounds of iterative preference optimisation with critic refinement (``vidpo iterate``)."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    """Consistency distillation (``vidpo preprocess``, ``train.objective: consistency_distill``)."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward mixture of consistency distillation."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training data source (shapes world or cached latents)."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    """Latent / text-embedding caching (``vidpo cache``)."""
