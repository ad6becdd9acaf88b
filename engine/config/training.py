"""The training sections: the optimisation of a run (``train``), oracle evaluation (``eval``), what it
trains on (``data``) and the latent cache it can train on (``cache``, written by ``vidpo cache``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from vidpo.config.choices import (
    Autocast,
    BadInputPolicy,
    DataSource,
    Decoder,
    EvalJudge,
    Objective,
    Optimizer,
    ResizeMode,
    StorageDtype,
)
from vidpo.config.fields import Problem, Problems, Section, choice


@dataclass
class TrainConfig(Section):
    """The optimisation of a training run: objective, schedule, optimizer, checkpoints and logging."""

    objective: str = choice("sft", Objective)
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

    autocast: str = choice("auto", Autocast)
    """Mixed precision: 'auto' = bf16 autocast on GPU, off on CPU."""

    optimizer: str = choice("auto", Optimizer)
    """'auto' picks torch's fused AdamW on GPU (apex FusedAdam only if NVIDIA apex is importable and
    asked for), plain AdamW on CPU."""

    max_bad_steps: int = 5
    """Stop after this many consecutive bad steps: a non-finite loss or gradient norm (its optimizer step is
    skipped) or a diverging one (``divergence_factor``). ``checkpoints/latest`` is then rolled back to the last
    checkpoint written before the streak began (vidpo.training.trainer)."""

    divergence_factor: float = 10.0
    """A finite step whose loss or gradient norm exceeds this many times its running median (over the last
    ``divergence_window`` healthy steps) is diverging: logged, counted as a bad step, and checkpoints written
    meanwhile are marked suspect (0: off; vidpo.training.divergence)."""

    divergence_window: int = 20
    """Healthy steps the running median of the divergence guard is taken over; the guard judges no step
    before it has seen this many."""

    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights with this decay (0: off; pretraining
    uses e.g. 0.99). Evaluation, samples and the checkpoints' ``model.safetensors`` then carry the EMA
    weights, ``online.safetensors`` the optimizer's own (vidpo.training.ema). Under a parallel layout each rank
    averages its own shard and DCP checkpoints keep the average next to the weights."""

    num_threads: int = 0
    """torch intra-op threads on CPU (0: leave torch's default)."""

    progress: bool = True
    """Show a progress bar."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "max_steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints",
                   "max_bad_steps", "divergence_window")
        p.positive(self, "lr")
        p.at_least(self, 0, "warmup_steps", "weight_decay", "grad_clip", "ckpt_every", "eval_every",
                   "num_threads")
        p.check(self.divergence_factor == 0 or self.divergence_factor > 1, "divergence_factor",
                f"must be 0 (off) or > 1, got {self.divergence_factor!r}")
        p.fraction(self, "min_lr_ratio")
        p.check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
                f"must be two values in [0, 1), got {list(self.betas)}")
        p.fraction(self, "ema_decay", high_open=True)
        return p


@dataclass
class EvalConfig(Section):
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

    judge: str = choice("auto", EvalJudge)
    """Judged evaluation (``vidpo run``): base and policy sampled from the same seeds on the held-out prompts,
    decoded, and compared video against video by a labeller (``vidpo.evaluation.judge``): 'label' uses the
    run's ``label.labeler`` (the VLM asks both orders), or name one ('vlm', 'human', 'critic', 'oracle');
    'none' skips it. 'auto': 'label' for a prompt-file run, 'none' for the shapes world, whose exact oracle
    scores every sample."""

    judged_videos: int = 32
    """Videos per model in the judged evaluation (prompt-file runs): the held-out prompts in turn, each with
    its own seeds ``eval.seed_offset + i``."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "num_samples", "steps", "judged_videos")
        p.at_least(self, 0, "seed_offset", "grid_conditions", "cfg_scale")
        return p


@dataclass
class DataConfig(Section):
    """What ``vidpo train`` trains on: the procedural shapes world, or latent shards from ``vidpo cache``."""

    source: str = choice("shapes", DataSource)
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

    on_bad_input: str = choice("skip", BadInputPolicy)
    """An unreadable or inconsistent shard: skip it (counted, named in the log) or stop."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.check(self.source != "latents" or bool(self.shards), "shards",
                f"is required when {prefix}source is 'latents' (a `vidpo cache --out` directory)", "source")
        p.at_least(self, 0, "workers", "prefetch")
        return p


@dataclass
class CacheConfig(Section):
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

    decoder: str = choice("auto", Decoder)
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

    resize: str = choice("crop", ResizeMode)
    """'crop': scale the shorter side to cover (height, width), then center-crop; 'stretch': ignore aspect."""

    text_max_length: int = 512
    """Tokens per caption: embeddings are padded (with zeros past the caption, as Wan does) or truncated."""

    shard_size: int = 64
    """Clips per shard; a rerun skips complete shards, and rank r of N takes shards r, r+N, ..."""

    batch_size: int = 4
    """Clips per VAE forward batch (and per decode batch)."""

    workers: int = 2
    """Decoding threads (DALI: its pipeline threads)."""

    dtype: str = choice("bfloat16", StorageDtype)
    """Storage dtype of latents and text embeddings (the encoders run in float32 on CPU, bf16 on GPU)."""

    on_bad_input: str = choice("skip", BadInputPolicy)
    """A bad manifest line or an unusable video (missing, corrupt, truncated, too short): skip it (counted,
    named in the log and in the shard's record) or stop."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "frames", "height", "width", "text_max_length", "shard_size", "batch_size",
                   "workers")
        p.at_least(self, 0, "fps")
        return p
