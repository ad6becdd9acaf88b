"""The consistency-distillation sections (T2V-Turbo-v2): the teacher solver, preprocessing and the student
(``distill``; ``vidpo preprocess``, ``train.objective: consistency_distill``) and its reward mixture
(``reward``)."""
from __future__ import annotations

import dataclasses
import difflib
import string
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from vidpo.config.choices import DISTILL_SOURCES, Distance, RewardSubset, SamplerNoise
from vidpo.config.fields import Problem, Problems, Section, choice, deferred_checks
from vidpo.config.preference import VLMConfig

MODEL_RULES = {"clip_cosine": "image", "clip_mean_cosine": "video"}
"""Scoring rules of a local reward model (vidpo.objectives.rewards_models) -> the kind of reward it defines."""
SERVED_RULE = "served_score"
"""The rule of a served judge (vidpo.objectives.rewards_served): a score, not a gradient; it weights the CD loss."""
SERVED_OWN_KEYS = ("kind", "rule", "question", "scale", "frames")
SERVED_VLM_KEYS = tuple(f.name for f in dataclasses.fields(VLMConfig)
                        if f.name not in ("prompt", "on_error", "cache_answers", "frames_per_segment"))
"""The endpoint fields of a served judge: ``label.vlm``'s (VLMConfig) but its pairwise ``prompt``, ``on_error`` (a
judge's problems always give a neutral weight) and ``cache_answers`` (always on); ``frames`` is its
``frames_per_segment``."""
SERVED_QUESTION_FIELDS = ("caption", "low", "high", "frames")


def served_vlm_config(spec: dict) -> VLMConfig:
    """The ``VLMConfig`` of a served judge's entry (its endpoint fields; VLMConfig's defaults for the others)."""
    fields = {k: v for k, v in spec.items() if k in SERVED_VLM_KEYS}
    if "frames" in spec:
        fields["frames_per_segment"] = spec["frames"]
    return VLMConfig(**fields)


def served_scale(spec: dict) -> tuple[int, int]:
    """``(low, high)`` of a served judge's declared integer scale (default 1..10)."""
    low, high = spec.get("scale", (1, 10))
    return int(low), int(high)


def _type_ok(value, default) -> bool:
    """Whether ``value`` has the type of a VLMConfig field whose default is ``default`` (None: any, checked by it)."""
    if default is None or isinstance(default, (list, dict)):
        return default is None or isinstance(value, type(default))
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default)) and not isinstance(value, bool)


def served_problems(spec: dict, where: str) -> list[str]:
    """What is wrong with a served judge's entry ``spec`` (at ``where``, e.g. 'reward.models.judge'), one sentence
    each naming the field."""
    out = []
    for key in spec:
        if key not in SERVED_OWN_KEYS + SERVED_VLM_KEYS:
            close = difflib.get_close_matches(str(key), SERVED_OWN_KEYS + SERVED_VLM_KEYS, n=1, cutoff=0.5)
            out.append(f"{where}.{key} is not a field of a served judge" + (f" (did you mean '{close[0]}'?)" if close
                                                                              else ""))
    if spec.get("kind") not in ("image", "video"):
        out.append(f"{where}.kind must be 'image' or 'video', got {spec.get('kind')!r}")
    scale = spec.get("scale", [1, 10])
    if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and all(isinstance(v, int) and not isinstance(
            v, bool) for v in scale) and scale[0] < scale[1]):
        out.append(f"{where}.scale must be two integers [low, high] with low < high, got {scale!r}")
    question = spec.get("question")
    if question is not None:
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(str(question)) if n is not None]
        except ValueError as exc:
            names = []
            out.append(f"{where}.question is not a valid template ({exc})")
        bad = [n for n in names if n not in SERVED_QUESTION_FIELDS]
        if bad or not isinstance(question, str):
            out.append(f"{where}.question must be a text whose placeholders are {list(SERVED_QUESTION_FIELDS)}, "
                       f"got {question!r}")
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(VLMConfig)}
    defaults["frames"] = defaults["frames_per_segment"]
    typed = True
    for key, value in spec.items():
        if key in SERVED_VLM_KEYS + ("frames",) and not _type_ok(value, defaults[key]):
            kind = {bool: "boolean", int: "integer", float: "number", str: "text"}.get(type(defaults[key]),
                                                                                    type(defaults[key]).__name__)
            out.append(f"{where}.{key} must be a {kind}, got {value!r}")
            typed = False
    if typed and not any(key not in SERVED_OWN_KEYS + SERVED_VLM_KEYS for key in spec):
        with deferred_checks():
            vlm = served_vlm_config(spec)
        out += [str(problem).replace("frames_per_segment", "frames") for problem in vlm.problems(where + ".")]
    return out


@dataclass
class DistillConfig(Section):
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

    distance: str = choice("huber", Distance)
    """CD distance: pseudo-Huber sqrt(d^2 + c^2) - c per element (LCM's), or squared error; mean over elements."""

    huber_c: float = 0.001
    """c of the pseudo-Huber distance."""

    sampler_noise: str = choice("fresh", SamplerNoise)
    """Student multi-step sampling: re-noise the predicted x0 with fresh noise (consistency models) or with
    the noise the student implies, eps^ = x + (1 - t) v (deterministic)."""

    phases: int = 0
    """Phased consistency targets (Phased Consistency Models, arXiv 2405.18407; TCD's multistep form). 0: plain CD,
    every point maps to t = 0. P > 0: the edges s_0 = 0 < s_1 < ... < s_P = 1 are the P-step sampler's times and a
    point of phase (s_m, s_{m+1}] maps to the phase's start, f(x, t) = x + (s_m - t) v(x, t); the loss is
    d(f(x_{t_n}, t_n), sg[f(x^_{t_{n-k}}, t_{n-k})]) with the same s_m on both sides (t_{n-k} = s_m: the target is
    x^ itself). The student samples deterministically along the edges, x <- x + (s_m - s_{m+1}) v(x, s_{m+1})
    (sampler_noise is not used). grid_steps / skip must be a multiple of P; P = eval_steps is the usual choice,
    and a release student's only one: its edges are its exported scheduler's sigmas (CogVideoX: its timesteps, the
    jump to an edge being DDIM's, vidpo.objectives.distill_process)."""

    student_steps: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Student step counts reported by the evaluation table."""

    teacher_steps: List[int] = field(default_factory=lambda: [16, 32])
    """Teacher Euler + CFG step counts reported by the evaluation table."""

    eval_steps: int = 4
    """Student steps of the evaluation during / at the end of training. For a release (model.kind wan / cogvideox)
    the student's only step count: its sampling schedule, exported as OUT/scheduler (CogVideoX: a divisor of the
    scheduler's 1000 training timesteps, so that each DDIM step lands on the next student time)."""

    student_shift: float = 1.0
    """Release students (wan): time shift of the exported FlowMatchEulerDiscreteScheduler whose eval_steps sigmas
    are the student's times; the teacher's grid refines them (vidpo.objectives.distill.refined_grid). A CogVideoX
    student samples at its DDIM scheduler's trailing timesteps: leave 1.0."""

    student_terminal: Optional[float] = None
    """Release students (wan): the last sigma before 0 (the scheduler's shift_terminal); None: 1 / eval_steps
    (CogVideoX: leave None)."""

    @property
    def student_noise(self) -> str:
        """The multistep sampler's re-noising: ``sampler_noise``, or ``predicted`` (deterministic) when phased."""
        return "predicted" if self.phases else self.sampler_noise

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "num_rows", "shard_size", "batch_size")
        p.at_least(self, 0, "phases")
        p.at_least(self, 0, "cfg_scale")
        grid_ok = self.grid_steps >= 1 and self.skip >= 1 and self.grid_steps % self.skip == 0
        p.check(grid_ok, "grid_steps",
                f"must be a positive multiple of {prefix}skip = {self.skip}, got {self.grid_steps}", "skip")
        p.positive(self, "shift", "huber_c")
        p.fraction(self, "curated_fraction")
        p.at_least(self, 0, "motion_scale")
        p.fraction(self, "motion_fraction", low_open=True)
        p.at_least(self, -1, "motion_block")
        unknown = [source for source in self.motion_sources if source not in DISTILL_SOURCES]
        p.check(not unknown, "motion_sources", f"has unknown sources {unknown}; known: {list(DISTILL_SOURCES)}")
        chain = self.grid_steps // self.skip if grid_ok else None
        p.check(not (chain and self.phases > 0 and chain % self.phases), "phases",
                f"must divide {prefix}grid_steps / {prefix}skip = {chain}, got {self.phases}", "grid_steps", "skip")
        for name, steps in (("student_steps", list(self.student_steps)), ("eval_steps", [self.eval_steps])):
            bad = [n for n in steps if not (1 <= n <= (chain or n))]
            p.check(not bad, name, f"must be in [1, {prefix}grid_steps / {prefix}skip = {chain}], got {bad}",
                    "grid_steps", "skip")
        p.positive(self, "student_shift")
        p.check(self.student_terminal is None or 0.0 < self.student_terminal < 1.0, "student_terminal",
                f"must be in (0, 1) or null, got {self.student_terminal}")
        bad = [n for n in self.teacher_steps if n < 1]
        p.check(not bad, "teacher_steps", f"must be >= 1, got {bad}")
        return p


@dataclass
class RewardConfig(Section):
    """Reward mixture of consistency distillation (vidpo.objectives.rewards): R = sum beta_i R_img_i (on a few random
    frames) + sum gamma_j R_vid_j, computed on the student's one-step prediction; loss = CD - R."""

    image: Dict[str, float] = field(default_factory=dict)
    """Image-text rewards and weights beta, e.g. {shapes_appearance: 1.0}. Empty: none."""

    video: Dict[str, float] = field(default_factory=dict)
    """Video-text rewards and weights gamma, e.g. {shapes_motion: 1.0}. Empty: none."""

    image_frames: int = 2
    """Random frames per clip scored by the image-text rewards."""

    subset: str = choice("web", RewardSubset)
    """Rows the reward loss is computed on (the paper: CD on all data, rewards on the short-caption
    WebVid part): 'all', or one source."""

    max_rows: int = 8
    """At most this many reward rows per micro-batch (the paper: 1 reward clip per 3 CD clips per GPU)."""

    decode_latent_frames: Optional[int] = None
    """A release's differentiable rewards: decode only the first K latent frames of the student's one-step prediction
    (pixel frames 1 + k (K - 1) of a k-times temporal VAE; the image rewards pick among them, the video rewards see
    them); None: the whole clip. Why: the reward's gradient goes back through the VAE decoder, whose activations for
    a whole 81-frame 480p clip are far beyond a GPU's memory; the Wan and CogVideoX VAEs are causal in time, so a
    prefix decodes as the whole clip's first frames do (CogVideoX: an odd K >= 3, its decoder takes latent frames in
    pairs after the first three)."""

    decode_checkpoint: bool = True
    """A release's differentiable rewards: decode the student's sample in the VAE's own spatial tiles (diffusers'
    tiled decode), each tile under activation checkpointing (vidpo.models.vae_grad), so the backward holds one tile's
    decoder activations instead of the whole clip's (Wan 2.1's VAE, 2 latent frames at 480 x 832: 5.6 instead of
    33.5 GiB); a clip no larger than one tile decodes whole either way. False: the whole clip decodes at once and keeps
    every activation (the untiled decode, which differs from the tiled one slightly at the seams)."""

    decode_tile: Optional[List[int]] = None
    """[height, width] in pixels of the checkpointed decode's tiles (decode_checkpoint); None: the VAE's own (Wan
    256 x 256, CogVideoX 240 x 360 at 480 x 720). The backward's peak is one tile's activations, so smaller tiles use
    less memory and recompute more overlap. Wan: multiples of 4 x its spatial compression (32; Wan 2.2 TI2V-5B 64);
    CogVideoX: a multiple of 48 high and of 40 wide (its overlaps)."""

    models: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Reward models of a release's distillation, by name; weighted by name in ``image`` / ``video``. A local
    transformers model (vidpo.objectives.rewards_models, a differentiable reward): {path: DIR, kind: image, rule:
    clip_cosine} or {path: DIR, kind: video, rule: clip_mean_cosine}. A served judge (vidpo.objectives.rewards_served,
    a score that weights the CD loss of the routed rows): {kind: image | video, rule: served_score, base_url: URL,
    model: NAME, question?: TEMPLATE with {caption} {low} {high} {frames}, scale?: [1, 10], frames?: 4, and any
    endpoint field of label.vlm: answer_format, format, concurrency, max_retries, timeout_s, api_key_env, ...}."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "image_frames", "max_rows")
        p.check(self.decode_latent_frames is None or self.decode_latent_frames >= 1, "decode_latent_frames",
                f"must be None or >= 1, got {self.decode_latent_frames!r}")
        tile = self.decode_tile
        p.check(tile is None or (isinstance(tile, (list, tuple)) and len(tile) == 2
                                 and all(isinstance(v, int) and v > 0 for v in tile)), "decode_tile",
                f"must be None or [height, width] in pixels, got {tile!r}")
        for name, spec in (self.models or {}).items():
            if isinstance(spec, dict) and spec.get("rule") == SERVED_RULE:
                for problem in served_problems(dict(spec), f"{prefix}models.{name}"):
                    p.add(problem, f"models.{name}")
                continue
            ok = isinstance(spec, dict) and bool(spec.get("path")) and spec.get("rule") in MODEL_RULES \
                and spec.get("kind") == MODEL_RULES.get(spec.get("rule"))
            p.check(ok, "models", f"{name}: expected {{path: DIR, kind: image, rule: clip_cosine}}, {{path: DIR, "
                                  f"kind: video, rule: clip_mean_cosine}} or {{kind: image | video, rule: "
                                  f"{SERVED_RULE}, base_url: URL, model: NAME}}, got {spec!r}")
        return p
