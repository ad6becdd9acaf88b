"""The enum-like value sets of the config, each declared once as a ``Literal`` alias.

A field takes one with ``choice(default, Alias)`` (``vidpo.config.fields``) and keeps a ``str`` annotation:
OmegaConf, which merges recipes onto the dataclasses, accepts no ``Literal`` annotations, and Enum member
names could not be values like '1.3b'. The tuples below (``typing.get_args`` of the aliases) are what
engine code compares against instead of repeating the literals.
"""
from __future__ import annotations

from typing import Literal, get_args

# ----- shared ----------------------------------------------------------------------------------------------
ParamDtype = Literal["float32", "bfloat16"]
"""Dtype of model parameters (``model.dtype``) and of FSDP's all-gathered parameters."""

ErrorPolicy = Literal["tie", "raise"]
"""What a labeller does with a comparison it cannot make: count it as a tie (with a message) or raise."""

BadInputPolicy = Literal["skip", "raise"]
"""What a reader does with a bad input (pair, shard, clip): skip it (counted, named in the log) or stop."""

Granularity = Literal["segment", "video"]
"""Labels per segment, or one whole-video verdict copied to every segment."""

# ----- model -----------------------------------------------------------------------------------------------
Preset = Literal["tiny", "small", "base", "1.3b", "5b"]
"""Size presets of the video DiT (``vidpo.models.dit.PRESETS``)."""

AttentionBackend = Literal["auto", "sdpa", "flash_attn", "te", "math"]
"""Attention backends of the DiT (``vidpo.models.dit.attention``)."""

ModelKind = Literal["dit", "wan", "cogvideox"]
"""Model families of the registry (``vidpo.models.registry.MODELS``)."""

Sampler = Literal["auto", "euler", "flow_euler", "unipc", "ddim", "dpm"]
"""Samplers of pairs and evaluation samples; which apply to which kind: ``SAMPLERS_BY_KIND``."""

LoRAInit = Literal["zero_b", "gaussian"]
"""LoRA initialisations (``vidpo.models.lora.INIT_CHOICES``)."""

# ----- training --------------------------------------------------------------------------------------------
PreferenceObjective = Literal["flow_dpo", "dense_dpo", "kto"]
"""Objectives trained on labelled pairs; also the ones distributed training covers."""

Objective = Literal["sft", PreferenceObjective, "consistency_distill"]
"""Training objectives (``train.objective``)."""

Autocast = Literal["auto", "off", "bf16"]
Optimizer = Literal["auto", "adamw", "fused_adamw", "apex"]
DataSource = Literal["shapes", "latents"]
Decoder = Literal["auto", "dali", "dali_cpu", "torchcodec", "pyav"]
ResizeMode = Literal["crop", "stretch"]
StorageDtype = Literal["float32", "bfloat16", "float16"]

# ----- preference data -------------------------------------------------------------------------------------
GenerateMode = Literal["vanilla", "structural"]
LabelerKind = Literal["oracle", "human", "vlm", "critic"]
Resample = Literal["auto", "nearest", "bilinear", "bicubic", "lanczos"]
SftSource = Literal["real", "winners", "both"]
ReferenceMode = Literal["auto", "lora_disabled", "frozen_copy"]
LossBackend = Literal["auto", "torch", "triton", "cpp", "cuda"]

EvalJudge = Literal["auto", "none", "label", "oracle", "human", "vlm", "critic"]
"""Who judges base against policy in the judged evaluation: a labeller kind, the run's own ('label'), none."""

# ----- IPO ---------------------------------------------------------------------------------------------------
PointwiseMode = Literal["quantile", "threshold"]
IterateReference = Literal["previous", "base"]
Pairing = Literal["given", "ranked"]
RoundLabeler = Literal["critic", "oracle"]
RefinePairs = Literal["generated", "within_prompt"]
VoteSource = Literal["critic", "judge"]

# ----- consistency distillation -----------------------------------------------------------------------------
DistillSource = Literal["curated", "web"]
"""Sources of distillation rows (``vidpo.stages.preprocess.SOURCES``)."""

Distance = Literal["huber", "l2"]
SamplerNoise = Literal["fresh", "predicted"]
RewardSubset = Literal["all", DistillSource]

# ----- distributed -----------------------------------------------------------------------------------------
ActivationCheckpointing = Literal["none", "full"]
ProcessGroupBackend = Literal["auto", "nccl", "gloo"]
Launcher = Literal["torchrun", "slurm"]
LaunchMode = Literal["single", "chain"]
"""How ``vidpo launch`` runs a whole job: one allocation running the stages in order, or a chain of jobs."""

# ----- the value tuples -------------------------------------------------------------------------------------
ERROR_POLICIES = get_args(ErrorPolicy)
BAD_INPUT_POLICIES = get_args(BadInputPolicy)
GRANULARITIES = get_args(Granularity)
PRESET_NAMES = get_args(Preset)
ATTENTION_BACKENDS = get_args(AttentionBackend)
MODEL_KINDS = get_args(ModelKind)
SAMPLERS = get_args(Sampler)
LORA_INITS = get_args(LoRAInit)
OBJECTIVES = get_args(Objective)
PREFERENCE_OBJECTIVES = get_args(PreferenceObjective)
LABELER_KINDS = get_args(LabelerKind)
RESAMPLE_CHOICES = get_args(Resample)
REFERENCE_MODES = get_args(ReferenceMode)
LOSS_BACKENDS = get_args(LossBackend)
DISTILL_SOURCES = get_args(DistillSource)
DATA_SOURCES = get_args(DataSource)

SAMPLERS_BY_KIND: dict[str, tuple[str, ...]] = {
    "dit": ("auto", "euler"),
    "wan": ("auto", "flow_euler", "unipc"),
    "cogvideox": ("auto", "ddim", "dpm"),
}
"""``model.sampler`` values each ``model.kind`` accepts ('auto': the model's own default)."""

__all__ = [name for name in list(globals())
           if not name.startswith("_") and name not in ("annotations", "Literal", "get_args")]
"""The aliases, the value tuples and ``SAMPLERS_BY_KIND`` (what ``vidpo.config`` re-exports)."""
