"""The model sections: the network trained (``model``), the shapes world it learns (``world``), the
rectified-flow training process (``flow``), sampling (``sample``) and LoRA adapters on it (``lora``).

Rules that can be read from these sections alone live here, e.g. a DiT shape the preset cannot take (width
not divisible by the heads), a sampler of another model family, a diffusers model without its directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from vidpo.config.choices import (
    MODEL_KINDS,
    PRESET_NAMES,
    SAMPLERS,
    SAMPLERS_BY_KIND,
    AttentionBackend,
    LoRAInit,
    ModelKind,
    ParamDtype,
    Preset,
    Sampler,
)
from vidpo.config.fields import Problem, Problems, Section, check_on_construction, choice
from vidpo.models.dit.config import dit_config
from vidpo.models.lora import DEFAULT_TARGET_MODULES

WORLD_CORRUPTIONS = ("wrong_colour", "reversed_direction", "local_artifact", "static")
"""The fields of ``world`` that are fractions of corrupted training clips (they sum to at most 1)."""


@dataclass
class ModelConfig(Section):
    """The policy network: the vidpo video DiT of a size preset, or a diffusers model from a local directory."""

    preset: str = choice("tiny", Preset)
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

    attention: str = choice("sdpa", AttentionBackend)
    """Attention backend: 'sdpa' (torch scaled_dot_product_attention), 'flash_attn' or 'te' when those
    packages are importable, 'math' (explicit softmax, for tests), 'auto' (fastest present)."""

    dtype: str = choice("float32", ParamDtype)
    """Parameter dtype. Training on GPU keeps fp32 master weights and uses bf16 autocast instead."""

    # Real diffusers models behind the same interface (vidpo.models.adapters).
    kind: str = choice("dit", ModelKind)
    """'dit': the vidpo video DiT built from the preset; 'wan' / 'cogvideox': a diffusers
    WanTransformer3DModel / CogVideoXTransformer3DModel loaded from ``model.path`` (the preset fields
    are then unused)."""

    path: Optional[str] = None
    """Local model directory for kind 'wan' / 'cogvideox': ``transformer/`` (diffusers format) and,
    optionally, ``text_conditioner.safetensors``. Nothing is downloaded."""

    sampler: str = choice("auto", Sampler)
    """How pairs (generate) and evaluation samples are drawn. 'auto': the model's default, i.e. the engine's
    Euler rectified-flow sampler for the DiT, 'flow_euler' for Wan, 'ddim' for CogVideoX. 'euler': the
    engine's sampler (DiT only). Wan: 'flow_euler' (FlowMatchEulerDiscreteScheduler) or 'unipc'
    (UniPCMultistepScheduler with flow sigmas, the Wan 2.1 releases' scheduler). CogVideoX: 'ddim'
    (CogVideoXDDIMScheduler, CogVideoX-2B's) or 'dpm' (CogVideoXDPMScheduler, CogVideoX-5B's)."""

    sample_shift: Optional[float] = None
    """Time shift of a flow-matching model's sampling schedule (kind 'wan': 3.0 for 480p, 5.0 for 720p in
    the Wan 2.1 releases); unset: 1.0 (no shift). Not used by CogVideoX (a DDPM)."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        for name in ("width", "depth", "num_heads"):
            value = getattr(self, name)
            p.check(value is None or value >= 1, name, f"must be >= 1 when set, got {value!r}")
        patch = self.patch_size
        patch_ok = patch is None or (len(patch) == 3 and all(size >= 1 for size in patch))
        p.check(patch_ok, "patch_size", f"must be three sizes >= 1 over (T, H, W) when set, got {patch!r}")
        if self.kind not in MODEL_KINDS:
            return p  # reported as a value outside its choices
        valid = SAMPLERS_BY_KIND[self.kind]
        p.check(self.sampler in valid or self.sampler not in SAMPLERS, "sampler",
                f"'{self.sampler}' does not apply to {prefix}kind '{self.kind}'; use one of {valid}", "kind")
        p.check(self.sample_shift is None or self.kind == "wan", "sample_shift",
                f"is the time shift of a flow-matching diffusers model (kind 'wan'); {prefix}kind '{self.kind}' "
                "does not use it: remove it", "kind")
        p.check(self.sample_shift is None or self.sample_shift > 0, "sample_shift",
                f"must be > 0 when set, got {self.sample_shift!r}")
        p.check(self.kind == "dit" or bool(self.path), "path",
                f"is required for {prefix}kind '{self.kind}' (the local model directory)", "kind")
        if self.kind == "dit" and self.preset in PRESET_NAMES and not p:
            try:
                self.dit()
            except ValueError as exc:
                p.add(f"{prefix}preset '{self.preset}' with these overrides is not a valid DiT: {exc}",
                      "preset", "width", "num_heads", "depth", "patch_size")
        return p

    def dit(self, **overrides):
        """The ``DiTConfig`` of the preset with this section's overrides (and ``overrides``); ValueError when
        the combination is not a valid DiT."""
        patch = tuple(self.patch_size) if self.patch_size else None
        return dit_config(self.preset, width=self.width, depth=self.depth, num_heads=self.num_heads,
                          patch_size=patch, **overrides)


@dataclass
class WorldConfig(Section):
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

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        for name in ("colours", "shapes", "directions"):
            vocab = list(getattr(self, name))
            p.check(bool(vocab), name, "is empty")
            p.check(len(set(vocab)) == len(vocab), name, f"has duplicates: {vocab}")
        p.check(self.frames >= 2, "frames", f"must be >= 2, got {self.frames}")
        p.at_least(self, 1, "height", "width", "object_size")
        p.positive(self, "fps")
        p.check(self.speed >= 0, "speed", f"must be >= 0, got {self.speed}")
        p.fraction(self, *WORLD_CORRUPTIONS)
        total = sum(getattr(self, name) for name in WORLD_CORRUPTIONS)
        p.check(total <= 1.0 + 1e-9, "wrong_colour",
                f"+ reversed_direction + local_artifact + static: the corruption fractions sum to {total:g} > 1",
                *WORLD_CORRUPTIONS[1:])
        p.check(self.wrong_colour <= 0 or len(self.colours) >= 2, "wrong_colour",
                f"> 0 needs at least two colours in {prefix}colours", "colours")
        p.check(1 <= self.artifact_segment_frames <= self.frames, "artifact_segment_frames",
                f"must be in [1, {prefix}frames = {self.frames}], got {self.artifact_segment_frames}", "frames")
        return p


@dataclass
class FlowConfig(Section):
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

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.positive(self, "logit_std")
        p.check(0.0 <= self.t_min <= self.t_max <= 1.0, "t_min",
                f"and {prefix}t_max must satisfy 0 <= t_min <= t_max <= 1, got {self.t_min} and {self.t_max}",
                "t_max")
        p.fraction(self, "cond_dropout")
        return p


@dataclass
class SampleConfig(Section):
    """Sampling with the Euler ODE solver and classifier-free guidance."""

    steps: int = 20
    """Sampling steps from t=1 to t=0 (Euler for the DiT; the scheduler's steps for model.kind wan / cogvideox)."""

    cfg_scale: float = 3.0
    """Classifier-free guidance scale (1.0 disables guidance)."""

    num_samples: int = 32
    """Samples drawn by `vidpo sample` (and per-condition grids)."""

    batch_size: int = 64
    """Samples per forward batch while sampling."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "steps", "num_samples", "batch_size")
        p.at_least(self, 0, "cfg_scale")
        return p


@dataclass
class LoRAConfig(Section):
    """LoRA adapters on the policy's linear layers (vidpo.models.lora); ``__post_init__`` checks a directly
    built one, the loader reports the same problems with the others of a recipe."""

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

    init_lora_weights: str = choice("zero_b", LoRAInit)
    """'zero_b': A kaiming-uniform, B zeros, so the adapted model starts exactly at the base model.
    'gaussian': A ~ N(0, 1/r), B zeros (peft's 'gaussian'); also starts at the base model."""

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        check_on_construction(self)

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        rank_ok = isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1
        p.check(rank_ok, "rank", f"must be a positive integer, got {self.rank!r}")
        p.check(_number(self.alpha) and self.alpha > 0, "alpha", f"must be positive, got {self.alpha!r}")
        p.check(_number(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout",
                f"must be in [0, 1), got {self.dropout!r}")
        names = self.target_modules
        p.check(isinstance(names, list) and bool(names) and all(isinstance(n, str) and n for n in names),
                "target_modules", f"must be a non-empty list of non-empty names, got {names!r}")
        return p


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
