"""The preference-data sections: pair generation (``generate``), labelling (``label``, with the VLM
labeller's ``label.vlm``) and the preference objectives (``pref``)."""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal, Optional

from vidpo.config.choices import (
    BadInputPolicy,
    ErrorPolicy,
    GenerateMode,
    Granularity,
    LabelerKind,
    LossBackend,
    ReferenceMode,
    Resample,
    SftSource,
)
from vidpo.config.fields import Problem, Problems, Section, check_on_construction, choice

VLMFormat = Literal["images", "video"]
"""How the VLM labeller shows a segment: one image per frame, or the frames as one mp4 video."""

VLMImageFormat = Literal["png", "jpeg"]
"""Encoding of the images of ``label.vlm.format: images``."""

VLMAnswerFormat = Literal["text", "json_schema", "guided_choice", "structured_outputs"]
"""How the VLM is asked to answer: free text, OpenAI's JSON-schema ``response_format``, or vLLM's structured
outputs (``guided_choice``; ``structured_outputs: {choice: ..}`` in newer vLLM)."""

VLMTokenLimitField = Literal["max_tokens", "max_completion_tokens"]
"""The request field that carries the reply length limit (OpenAI's reasoning models take only the second)."""

REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
"""Values of OpenAI's ``reasoning_effort``."""

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
class GenerateConfig(Section):
    """Pair generation from the current policy (``vidpo generate``)."""

    mode: str = choice("vanilla", GenerateMode)
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

    frames: Optional[int] = None
    """Pixel frames of each generated video of a prompt-set run (a latent model samples 1 + (frames - 1) / k
    latent frames, k its VAE's temporal compression: 1 + 4n for Wan and CogVideoX). Unset: the shapes
    world's ``world.frames``."""

    height: Optional[int] = None
    """Pixel height of each generated video (a multiple of the VAE's spatial compression); unset: world.height."""

    width: Optional[int] = None
    """Pixel width of each generated video; unset: world.width."""

    fps: Optional[float] = None
    """Frames per second of the generated videos (the mp4s, and the seconds DenseDPO's segments are measured
    in); unset: world.fps. Wan 2.1 writes 16 fps, CogVideoX 8 fps."""

    decode_batch_size: int = 4
    """Videos the VAE decodes at once (``vidpo generate`` decodes every pair to mp4s and frames)."""

    vae_tiling: bool = False
    """Decode with the VAE's spatial tiling (diffusers' enable_tiling): less memory for large frames."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "num_pairs", "steps", "shard_size", "decode_batch_size")
        p.at_least(self, 0, "heldout_pairs", "cfg_scale")
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            p.check(value is None or value >= 1, name, f"must be >= 1 when set, got {value!r}")
        p.check(self.fps is None or self.fps > 0, "fps", f"must be > 0 when set, got {self.fps!r}")
        p.check(self.mode != "structural" or 0.0 <= self.eta_min <= self.eta_max <= 1.0, "eta_min",
                f"and {prefix}eta_max must satisfy 0 <= eta_min <= eta_max <= 1 in structural mode, got "
                f"{self.eta_min} and {self.eta_max}", "eta_max", "mode")
        return p


@dataclass
class VLMConfig(Section):
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
    """Requests in flight at once: (pair, segment) comparisons run on this many threads, each sending its two
    orders in turn (a server batches concurrent requests; ``label.json`` reports the throughput)."""

    temperature: float = 0.0
    """Sampling temperature of the VLM (0: greedy, the most repeatable verdicts)."""

    max_tokens: int = 1024
    """Reply length cap in tokens, sent as ``token_limit_field``. The answer is one word and a plain VLM stops
    after it, so a high cap costs nothing; a reasoning model thinks first and a low cap cuts its ``<think>``
    block (every answer then fails and is a tie: 64 did that). Keep prompt + cap within the server's context
    length (vLLM rejects a request whose prompt plus ``max_tokens`` exceeds ``--max-model-len``)."""

    token_limit_field: str = choice("max_tokens", VLMTokenLimitField)
    """Request field of the cap: 'max_tokens' (every server) or 'max_completion_tokens' (OpenAI's reasoning
    models reject 'max_tokens'; vLLM, SGLang and ``transformers serve`` read both)."""

    reasoning_effort: Optional[str] = None
    """OpenAI's ``reasoning_effort`` ('none', 'minimal', 'low', 'medium', 'high') for reasoning models; None:
    not sent."""

    thinking_budget: Optional[int] = None
    """Tokens a reasoning model may think before it must answer, sent as vLLM's ``thinking_token_budget``
    (servers that name it otherwise: ``extra_body``); must leave room under ``max_tokens``. None: not sent."""

    enable_thinking: Optional[bool] = None
    """Turn a hybrid reasoning model's thinking on or off through ``chat_template_kwargs: {enable_thinking}``
    (Qwen3-style chat templates; vLLM, SGLang and ``transformers serve`` pass it on). None: not sent."""

    format: str = choice("images", VLMFormat)
    """How a segment is shown: 'images' (each picked frame an ``image_url`` part, what every VLM server reads)
    or 'video' (the picked frames as one H.264 mp4 per video in a ``video_url`` part, vLLM's documented video
    input for Qwen2-VL-style models; it plays for the segment's duration)."""

    image_format: str = choice("png", VLMImageFormat)
    """Image encoding of format 'images': 'png' (lossless) or 'jpeg' (quality 95, smaller requests)."""

    answer_format: str = choice("text", VLMAnswerFormat)
    """How the VLM answers: 'text' (A, B or TIE in words, parsed leniently), 'json_schema' (OpenAI's
    ``response_format`` with a schema: {"verdict": "A" | "B" | "TIE"}), 'guided_choice' (vLLM's
    ``guided_choice``) or 'structured_outputs' (newer vLLM's ``structured_outputs: {choice: [..]}``). A server
    that lacks the chosen form rejects the request (a counted failure naming the HTTP error) or ignores it."""

    drop_fields: list = field(default_factory=list)
    """Request fields removed after everything else is set (dotted paths reach into objects), e.g.
    ['temperature'] for a model that rejects it; ``extra_body`` adds fields."""

    cache_answers: bool = True
    """Keep every reply in ``vlm_answers.jsonl`` of the pairs directory, keyed by (pair, segment, order,
    request hash): a rerun, or a changed rule on top of the answers, asks the server nothing it answered."""

    frames_per_segment: int = 4
    """Frames sent per video and segment, evenly spaced over the segment (all frames if it has fewer)."""

    image_size: int = 256
    """Longer side of each image in pixels after resizing (aspect kept); 0 sends frames as they are."""

    resample: str = choice("auto", Resample)
    """Resize filter; 'auto' = nearest when upscaling (keeps small toy frames crisp), bicubic when shrinking."""

    on_error: str = choice("tie", ErrorPolicy)
    """An unparseable answer or a failed comparison: 'tie' (an unparseable answer is a counted tie, a failed
    comparison is stored as failed and asked again by the next run; both reported) or 'raise' (LabelingError)."""

    prompt: str = DEFAULT_PROMPT
    """Question template; placeholders: {caption} {segment_number} {num_segments} {start_s} {end_s} {frames} {fps}."""

    extra_body: dict = field(default_factory=dict)
    """Extra fields merged into the request body (server-specific, e.g. {"seed": 0} or {"top_k": 1})."""

    def __post_init__(self) -> None:
        check_on_construction(self)

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.check(bool(self.model), "model", "is required: the model name the server serves")
        p.check(self.base_url.startswith(("http://", "https://")), "base_url",
                f"must start with http:// or https://, got {self.base_url!r}")
        for name in ("timeout_s", "concurrency", "frames_per_segment", "max_tokens"):
            p.check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)!r}")
        for name in ("max_retries", "retry_backoff_s", "image_size", "temperature"):
            p.check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)!r}")
        p.check(self.reasoning_effort is None or self.reasoning_effort in REASONING_EFFORTS, "reasoning_effort",
                f"must be one of {REASONING_EFFORTS} or null, got {self.reasoning_effort!r}")
        budget = self.thinking_budget
        p.check(budget is None or (isinstance(budget, int) and 0 <= budget < self.max_tokens), "thinking_budget",
                f"must be an integer in [0, max_tokens = {self.max_tokens}) or null (the answer needs room after the "
                f"thinking), got {budget!r}", "max_tokens")
        for index, path in enumerate(self.drop_fields):
            ok = isinstance(path, str) and bool(path) and path.split(".")[0] not in ("model", "messages")
            p.check(ok, "drop_fields", f"[{index}] must name a request field other than 'model' and 'messages', "
                                       f"got {path!r}")
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.prompt) if name is not None]
        except ValueError as exc:
            p.check(False, "prompt", f"is not a valid template ({exc})")
            names = []
        for name in names:
            p.check(name.split(".")[0].split("[")[0] in PROMPT_FIELDS, "prompt",
                    f"uses unknown placeholder {{{name}}}; valid: {PROMPT_FIELDS}")
        p.check("messages" not in self.extra_body, "extra_body", "may not replace 'messages'")
        return p

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass
class LabelConfig(Section):
    """Labelling of pairs (``vidpo label``): per-segment preferences."""

    labeler: str = choice("oracle", LabelerKind)
    """Who labels: the shapes-world 'oracle', a 'human' labels file (JSONL), a 'vlm' over HTTP
    (OpenAI-compatible chat completions), or a trained 'critic' (IPO)."""

    segment_seconds: float = 1.0
    """DenseDPO segment length in seconds of video (mapped to latent frames with world.fps and
    temporal_compression)."""

    temporal_compression: int = 1
    """Pixel frames per latent frame of the VAE (1 for the pixel-space toy world, 4 for Wan's VAE)."""

    tie_margin: float = 0.0
    """Oracle: a segment is a tie when the two scores differ by at most this much."""

    granularity: str = choice("segment", Granularity)
    """Oracle: 'segment' labels each segment from its own scores (DenseDPO); 'video' gives one verdict from
    the whole-video scores, copied to every segment (what vanilla Flow-DPO's labellers see)."""

    human_file: Optional[str] = None
    """Human labels JSONL ({"pair_id": .., "labels": [..]} or {"pair_id": .., "label": ..} per line)."""

    on_error: str = choice("tie", ErrorPolicy)
    """What an unusable label becomes. 'tie': a VLM answer that does not parse is a counted tie (status
    'unparseable'), and a comparison that could not be made (no reply, HTTP error, missing human label) is
    stored as 'failed' (label 0 but no tie: asked again by the next `vidpo label`, masked in training);
    'raise': either stops the run. It overrides label.vlm.on_error."""

    vlm: Optional[VLMConfig] = None
    """The VLM labeller's endpoint, model and prompt (required when labeler is 'vlm')."""

    min_non_tie_fraction: Optional[float] = 0.2
    """DenseDPO's data rule: a pair trains (objective dense_dpo) only when more than this fraction of its
    segments are not ties, because the loss averages over non-tie tokens and a nearly all-tie pair makes the
    effective batch small (the paper keeps pairs with more than 20%). Null: every labelled pair trains. The
    number of pairs it drops is in the training summary."""

    max_failed_fraction: float = 0.5
    """`vidpo label` ends with an error (naming the count, the fraction and the first failure) when more than
    this fraction of the (pair, segment) comparisons are still failed at its end; the labels made are kept
    in labels.partial.jsonl, no manifest.jsonl is written, and a rerun asks again only the failed ones.
    1.0 never errors; 0.0 errors on any failure."""

    batch_size: int = 64
    """Pairs per labelling batch: the frames read ahead together, and under torchrun the unit of work a rank
    takes (batch i goes to rank i mod world size). It does not change a label."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.positive(self, "segment_seconds")
        p.at_least(self, 1, "batch_size")
        p.check(0.0 <= self.max_failed_fraction <= 1.0, "max_failed_fraction",
                f"must be in [0, 1], got {self.max_failed_fraction!r}")
        p.check(self.min_non_tie_fraction is None or 0.0 <= self.min_non_tie_fraction < 1.0, "min_non_tie_fraction",
                f"must be in [0, 1) or null, got {self.min_non_tie_fraction!r}")
        p.at_least(self, 1, "temporal_compression")
        p.at_least(self, 0, "tie_margin")
        p.check(self.labeler != "human" or bool(self.human_file), "labeler",
                f"= 'human' needs {prefix}human_file (a JSONL of per-pair labels)", "human_file")
        p.check(self.labeler != "vlm" or self.vlm is not None, "labeler",
                f"= 'vlm' needs a {prefix}vlm section (base_url, model, ...)", "vlm")
        return p


@dataclass
class PreferenceConfig(Section):
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

    sft_source: str = choice("real", SftSource)
    """What the regularizer trains on: ground-truth clips of the pairs' conditions ('real'), the preferred
    videos ('winners'), or both."""

    kto_lambda_desirable: float = 1.0
    """KTO weight of desirable videos."""

    kto_lambda_undesirable: float = 1.0
    """KTO weight of undesirable videos."""

    reference: str = choice("auto", ReferenceMode)
    """Reference model: the policy with LoRA disabled (no second copy of the weights; needs ``lora``), or a
    frozen copy of the initial policy. 'auto': lora_disabled when LoRA is on, else frozen_copy."""

    loss_backend: str = choice("auto", LossBackend)
    """Backend of the fused paired loss (vidpo.kernels)."""

    pairs: Optional[str] = None
    """Directory with manifest.jsonl + shards to train on (``vidpo run`` sets it to its own pairs)."""

    on_bad_pair: str = choice("skip", BadInputPolicy)
    """A malformed manifest line or a missing shard: skip it (counted, named in the log) or stop."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.positive(self, "beta")
        p.check(0.0 <= self.label_smoothing < 0.5, "label_smoothing",
                f"must be in [0, 0.5), got {self.label_smoothing}")
        p.at_least(self, 0, "sft_weight", "kto_lambda_desirable", "kto_lambda_undesirable")
        return p
