"""The typed configuration of a vidpo run: one dataclass per recipe section, loaded and checked at once.

A recipe (YAML, optionally starting from a ``base:`` recipe) sets any subset of the fields of ``RunConfig``;
``--set section.field=value`` overrides them. ``load_config`` merges both onto the dataclasses (OmegaConf)
and checks the result before anything runs: unknown keys, values of the wrong type or outside their
choices, each section's own rules and the rules that span sections. Every problem found goes into one
``ConfigError``, a line per problem naming the key and the file (or ``--set KEY``) it came from, so a recipe
with several mistakes is fixed in one round. ``validate(cfg)`` runs the same checks on a config that code
built or changed.

Modules, one concern each:

  fields.py      ``choice``, ``Problem``, the ``Section`` base class (``problems`` / ``rules``)
  choices.py     the enum-like value sets, each a ``Literal`` alias (``Objective``, ``LabelerKind``, ...)
                 with its tuple of values (``OBJECTIVES``, ...) for engine code to compare against
  model.py       ``model``, ``world``, ``flow``, ``sample``, ``lora``
  training.py    ``train``, ``eval``, ``data``, ``cache``
  preference.py  ``generate``, ``label`` (and ``label.vlm``), ``pref``
  prompts.py     ``prompts``
  ipo.py         ``critic``, ``iterate``
  distill.py     ``distill``, ``reward``
  cluster.py     ``parallel``, ``cluster`` (and the layout arithmetic against a world size)
  run.py         ``RunConfig``, the whole recipe, and the cross-section rules
  loader.py      reading recipes and overrides, the single error message, ``explain`` / ``field_docs``

Each field carries its docstring right below it (the Megatron-core convention); ``field_docs`` reads them
back for ``vidpo config --explain``. Fields of an enum-like set are declared ``choice(default, Alias)``
and keep a ``str`` annotation, which is what OmegaConf merges. ``VLMConfig`` and ``LoRAConfig`` are also
built directly by code (the VLM labeller, LoRA helpers): their ``__post_init__`` raises a ValueError then,
while the loader reports the same problems with the others of the recipe.
"""
from vidpo.config.choices import *  # noqa: F401,F403
from vidpo.config.cluster import ClusterConfig, ParallelConfig
from vidpo.config.distill import DistillConfig, RewardConfig
from vidpo.config.fields import Problem, Section, choice
from vidpo.config.ipo import CriticConfig, IterateConfig
from vidpo.config.loader import (
    REPO_ROOT,
    ConfigError,
    check_keys,
    explain,
    field_docs,
    load_config,
    resolve_path,
    to_dict,
    to_yaml,
    validate,
    validate_choices,
)
from vidpo.config.model import FlowConfig, LoRAConfig, ModelConfig, SampleConfig, WorldConfig
from vidpo.config.preference import (
    DEFAULT_PROMPT,
    PROMPT_FIELDS,
    GenerateConfig,
    LabelConfig,
    PreferenceConfig,
    VLMConfig,
)
from vidpo.config.prompts import PromptsConfig
from vidpo.config.run import RunConfig
from vidpo.config.training import CacheConfig, DataConfig, EvalConfig, TrainConfig
