"""Recipes: typed loading, dotted overrides, errors that name the key, the file and the closest key, and
validation at load (every problem the recipe alone decides, all in one message)."""
import dataclasses
import re
import typing
from pathlib import Path
from typing import get_args

import pytest
import yaml

from vidpo.config import (
    ATTENTION_BACKENDS,
    DISTILL_SOURCES,
    LORA_INITS,
    MODEL_KINDS,
    OBJECTIVES,
    PREFERENCE_OBJECTIVES,
    PRESET_NAMES,
    SAMPLERS,
    SAMPLERS_BY_KIND,
    ConfigError,
    LoRAConfig,
    Objective,
    RunConfig,
    TrainConfig,
    VLMConfig,
    choice,
    explain,
    field_docs,
    load_config,
    to_yaml,
    validate,
)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_recipe_loads_and_has_a_seed():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        if "launch" in path.parts:
            continue
        raw = path.read_text()
        assert "\nseed:" in "\n" + raw or "base:" in raw, f"{path} has no top-level seed"
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 1\ntrain:\n  lr: 0.5\n"), ["train.lr=1e-4", "seed=7",
                                                                        "model.patch_size=[1,2,2]"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.seed == 7 and cfg.model.patch_size == [1, 2, 2]


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "'train.lrr'" in msg and "did you mean 'train.lr'" in msg


def test_unknown_section_and_override(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"--set train.max_step.*did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])


def test_bad_type_and_bad_choice(tmp_path):
    with pytest.raises(ConfigError, match=r"train.lr"):
        load_config(write(tmp_path, "train:\n  lr: fast\n"))
    with pytest.raises(ConfigError, match=r"'train.objective' = 'dpo' is not one of .*did you mean"):
        load_config(None, ["train.objective=dpo"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_base_chain_and_cycle(tmp_path):
    write(tmp_path, "seed: 3\ntrain:\n  lr: 0.5\n  max_steps: 9\n", "a.yaml")
    cfg = load_config(write(tmp_path, "base: a.yaml\ntrain:\n  lr: 0.25\n", "b.yaml"))
    assert (cfg.seed, cfg.train.lr, cfg.train.max_steps) == (3, 0.25, 9)
    write(tmp_path, "base: d.yaml\n", "c.yaml")
    write(tmp_path, "base: c.yaml\n", "d.yaml")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "c.yaml")


def test_optional_sections_turn_on_when_set():
    assert load_config(None).lora is None
    cfg = load_config(None, ["lora.rank=4"])
    assert cfg.lora.rank == 4
    with pytest.raises(ConfigError, match="did you mean 'lora.rank'"):
        load_config(None, ["lora.rnak=4"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=0.125", "lora.rank=2"])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg


def test_field_docs_and_explain():
    docs = field_docs(TrainConfig)
    assert "learning rate" in docs["lr"].lower()
    text = explain("train.max_steps")
    assert text.startswith("train.max_steps = 600") and "Optimizer steps" in text
    with pytest.raises(ConfigError, match="did you mean"):
        explain("trian.lr")


# ----- validation at load: every problem of a recipe in one error ------------------------------------------
def test_a_recipe_with_several_mistakes_fails_at_load_with_all_of_them(tmp_path):
    path = write(tmp_path, """\
seed: 0
train:
  objective: dense_dpo
  batch_size: 12          # 16 ranks / tp 2 = 8 data-parallel ranks: 12 pairs do not split evenly
  lrr: 1.0e-4             # unknown key
pref:
  reference: lora_disabled   # no lora section
  loss_backend: tritn        # not one of the backends
parallel:
  tp: 2
cluster:
  nodes: 2
  gpus_per_node: 8
""")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"4 problems in {path}:")
    assert len(err.value.problems) == 4 and all(line.startswith(f"{path}: ") for line in err.value.problems)
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in msg
    assert "'pref.loss_backend' = 'tritn' is not one of" in msg and "did you mean 'triton'" in msg
    assert "pref.reference=lora_disabled needs LoRA" in msg
    assert "train.batch_size=12 is not divisible by the data-parallel size 8" in msg
    assert "cluster.nodes 2 * cluster.gpus_per_node 8" in msg


def test_each_line_names_where_its_key_was_set(tmp_path):
    write(tmp_path, "seed: 0\niterate:\n  rounds: 0\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\ncritic:\n  steps: 0\n  widht: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["pref.label_smoothing=0.5", "train.lr=fast", "train.batch_size=many", "bogus=1"])
    lines = err.value.problems
    assert len(lines) == 7, lines
    expect = {f"{tmp_path / 'base.yaml'}: iterate.rounds must be >= 1, got 0",
              f"{path}: critic.steps must be >= 1, got 0",
              "--set pref.label_smoothing: pref.label_smoothing must be in [0, 0.5), got 0.5",
              "--set bogus: unknown key 'bogus'"}
    assert expect <= set(lines), lines
    assert any(line.startswith(f"{path}: unknown key 'critic.widht'") and "did you mean 'critic.width'" in line
               for line in lines)
    assert sum(line.startswith(f"--set train.{key}: bad value for 'train.{key}'") for line in lines
               for key in ("lr", "batch_size")) == 2


@pytest.mark.parametrize("overrides, message", [
    # cross-section rules (were raised where the value was used: after generation and labelling, in a round)
    (["pref.reference=lora_disabled"], r"pref.reference=lora_disabled needs LoRA \(set a lora section"),
    (["lora.rank=4", "parallel.tp=2", "train.objective=dense_dpo"], "LoRA adapters are not tensor-parallel"),
    (["data.source=latents", "data.shards=cache", "train.objective=kto"], "trains train.objective 'sft' only"),
    (["train.objective=consistency_distill"], "the student needs initial weights: set distill.teacher"),
    (["world.height=18"], "world.height = 18 is not divisible by the model's patch size 4 along H"),
    # parallel layout against the recipe's own cluster (nodes * gpus_per_node), as `vidpo launch` checks it
    (["train.objective=dense_dpo", "parallel.tp=3"],
     r"world size 8 is not divisible by parallel.tp \* parallel.cp = 3 \(the recipe's world size 8"),
    (["train.objective=dense_dpo", "cluster.nodes=2", "parallel.dp_shard=3"],
     "parallel.dp_shard=3 must divide the data-parallel size 16"),
    (["train.objective=dense_dpo", "cluster.nodes=2", "train.batch_size=24"],
     "train.batch_size=24 is not divisible by the data-parallel size 16"),
    (["train.objective=dense_dpo", "parallel.tp=8"], "the model's 4 attention heads are not divisible by parallel.tp"),
    (["train.objective=dense_dpo", "parallel.cp=2", "world.frames=7"],
     r"7 latent frames \(after temporal patching\) are not divisible by parallel.cp = 2"),
    (["train.objective=dense_dpo", "cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.tp=4",
      "train.batch_size=4"], r"parallel.tp=4 spans nodes \(cluster.gpus_per_node=2\)"),
    (["cluster.nodes=2"], "train.objective=sft runs in one process"),
    # within a section
    (["label.labeler=vlm"], "label.labeler = 'vlm' needs a label.vlm section"),
    (["label.labeler=human"], "label.labeler = 'human' needs label.human_file"),
    (["data.source=latents"], "data.shards is required when data.source is 'latents'"),
    (["model.sampler=ddim"], "model.sampler 'ddim' does not apply to model.kind 'dit'"),
    (["model.sample_shift=3.0"], "model.sample_shift is the time shift of a flow-matching diffusers model"),
    (["model.kind=wan"], "model.path is required for model.kind 'wan'"),
    (["model.num_heads=3"], "model.preset 'tiny' with these overrides is not a valid DiT"),
    (["distill.grid_steps=30", "distill.skip=4"], "distill.grid_steps must be a positive multiple of distill.skip"),
    (["distill.motion_sources=[curated,webb]"], r"distill.motion_sources has unknown sources \['webb'\]"),
    (["distill.num_rows=0"], "distill.num_rows must be >= 1"),
    (["distill.motion_fraction=0"], r"distill.motion_fraction must be in \(0, 1\]"),
    (["distill.student_steps=[1,32]"], r"distill.student_steps must be in \[1, .* = 16\], got \[32\]"),
    (["cache.shard_size=0"], "cache.shard_size must be >= 1"),
    (["pref.label_smoothing=0.5"], r"pref.label_smoothing must be in \[0, 0.5\)"),
    (["iterate.rounds=0"], "iterate.rounds must be >= 1"),
    (["iterate.eval_pairs=1"], "iterate.eval_pairs must be >= 2"),
    (["iterate.refine_steps=-1"], r"iterate.refine_steps must be >= 0 \(0: critic.steps\)"),
    (["iterate.vote_keep_fraction=1.5"], r"iterate.vote_keep_fraction must be in \[0, 1\] \(0: off\)"),
    (["iterate.rank_fraction=0.75"], r"iterate.rank_fraction must be in \(0, 0.5\]"),
    (["iterate.votes=0"], "iterate.votes must be >= 1"),
    (["critic.min_confidence=1.0"], r"critic.min_confidence must be in \[0, 1\)"),
    (["critic.desirable=0.2"], "undesirable < desirable"),
    (["critic.num_heads=3"], "not a valid critic network"),
    (["cluster.env=[NOEQUALS]"], "cluster.env entry 'NOEQUALS' is not KEY=VALUE"),
    (["lora.rank=0"], "lora.rank must be a positive integer"),
    (["label.vlm.model=m", "label.vlm.prompt=which {video} is better?"], r"unknown placeholder \{video\}"),
    (["world.wrong_colour=0.6", "world.static=0.6"], "the corruption fractions sum to 1.2 > 1"),
    (["generate.mode=structural", "generate.eta_min=0.9", "generate.eta_max=0.5"], "0 <= eta_min <= eta_max <= 1"),
    (["train.ema_decay=1.0"], r"train.ema_decay must be in \[0, 1\)"),
])
def test_rules_the_recipe_decides_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    line = next(line for line in err.value.problems if re.search(message, line))
    assert line.startswith("--set "), line   # the key it is about came from an override
    config = RunConfig()                     # validate() finds the same problem in a config built in code
    for text in overrides:
        key, value = text.split("=", 1)
        if key.startswith(("lora.", "label.vlm.")):
            return
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = getattr(node, name)
        setattr(node, leaf, yaml.safe_load(value))
    with pytest.raises(ConfigError, match=message):
        validate(config)


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")))
def test_each_committed_recipe_loads_without_a_problem(recipe):
    cfg = load_config(REPO / recipe)
    assert cfg.problems() == [] and validate(cfg) is cfg


def test_configs_built_in_code_are_not_checked_until_validated():
    cfg = RunConfig()
    cfg.pref.reference = "lora_disabled"     # an intermediate state is allowed...
    assert cfg.problems() == ["pref.reference=lora_disabled needs LoRA (set a lora section, e.g. --set lora.rank=8)"]
    with pytest.raises(ConfigError, match="needs LoRA"):
        validate(cfg)                        # ...until the config is checked
    cfg.lora = LoRAConfig(rank=2)
    assert validate(cfg) is cfg


def test_vlm_and_lora_sections_check_direct_construction_and_report_at_load():
    with pytest.raises(ValueError, match="VLMConfig.model is required.*VLMConfig.concurrency must be positive"):
        VLMConfig(concurrency=0)
    with pytest.raises(ValueError, match="LoRAConfig.init_lora_weights must be one of"):
        LoRAConfig(init_lora_weights="kaiming")
    assert LoRAConfig(target_modules="to_q").target_modules == ["to_q"]
    with pytest.raises(ConfigError) as err:
        load_config(None, ["label.labeler=vlm", "label.vlm.concurrency=0", "lora.dropout=1.0",
                           "lora.init_lora_weights=kaiming"])
    assert sorted(err.value.problems) == sorted([
        "--set label.vlm.concurrency: label.vlm.model is required: the model name the server serves",
        "--set label.vlm.concurrency: label.vlm.concurrency must be positive, got 0",
        "--set lora.init_lora_weights: 'lora.init_lora_weights' = 'kaiming' is not one of ['zero_b', 'gaussian']",
        "--set lora.dropout: lora.dropout must be in [0, 1), got 1.0"])


def test_scale_checks_the_layout_against_the_world_it_is_given():
    over = ["model.preset=1.3b", "world.frames=8", "world.height=64", "world.width=64",
            "train.objective=dense_dpo", "train.batch_size=16"]
    assert load_config(None, over, world_size=16).train.batch_size == 16
    with pytest.raises(ConfigError, match=r"data-parallel size 64 \(world 64 / \(tp 1 \* cp 1\)\).*\(world size 64\)"):
        load_config(None, over, world_size=64)


# ----- enum-like value sets ------------------------------------------------------------------------------
def test_choices_come_from_literal_aliases_and_match_the_layers_below():
    from vidpo.models.dit import PRESETS
    from vidpo.models.dit.config import ATTENTION_BACKENDS as DIT_ATTENTION
    from vidpo.models.lora import INIT_CHOICES
    from vidpo.models.registry import MODELS
    from vidpo.stages.preprocess import SOURCES

    assert OBJECTIVES == get_args(Objective) == ("sft", "flow_dpo", "dense_dpo", "kto", "consistency_distill")
    assert PREFERENCE_OBJECTIVES == ("flow_dpo", "dense_dpo", "kto")
    assert dataclasses.fields(TrainConfig)[0].metadata["choices"] == OBJECTIVES
    assert PRESET_NAMES == tuple(PRESETS) and MODEL_KINDS == tuple(MODELS) and LORA_INITS == INIT_CHOICES
    assert set(ATTENTION_BACKENDS) == set(DIT_ATTENTION) and DISTILL_SOURCES == SOURCES
    assert set(SAMPLERS_BY_KIND) == set(MODEL_KINDS)
    assert all(set(valid) <= set(SAMPLERS) for valid in SAMPLERS_BY_KIND.values())
    with pytest.raises(ValueError, match="not one of"):
        choice("dpo", Objective)

    def sections(cls):
        yield cls
        for f in dataclasses.fields(cls):
            sub = typing.get_type_hints(cls)[f.name]
            sub = next((a for a in typing.get_args(sub) if dataclasses.is_dataclass(a)), sub)
            if dataclasses.is_dataclass(sub):
                yield from sections(sub)

    for cls in sections(RunConfig):
        for f in dataclasses.fields(cls):
            if f.metadata.get("choices"):
                assert typing.get_type_hints(cls)[f.name] is str, (cls.__name__, f.name)
                assert f.default in f.metadata["choices"], (cls.__name__, f.name)


def test_every_key_has_a_docstring():
    text = explain().split("\n")
    keys = text[0::2]
    assert len(keys) > 200 and all(doc.strip() for doc in text[1::2]), [k for k, d in zip(keys, text[1::2])
                                                                        if not d.strip()]


# ----- ranges of numeric fields ----------------------------------------------------------------------------
def _numeric_fields(cls=RunConfig, prefix=""):
    """(dotted key, int or float) of every numeric leaf field, through nested (and Optional) sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield f"{prefix}{f.name}", tp


# Numeric fields where a negative value means something: a real-valued mean or log, or -1 as "automatic"
# (those refuse anything below -1), or a range checked only where it is used.
NEGATIVE_ALLOWED = {
    "flow.logit_mean": None,             # mean of the logit-normal timestep law: any real number
    "critic.tie_init": None,             # initial log nu of the tie model: any real number
    "parallel.dp_shard": -2,             # -1: all data-parallel ranks
    "distill.motion_block": -2,          # -1: depth // 2
    "generate.eta_min": "structural",    # checked (0 <= eta_min <= eta_max <= 1) in generate.mode=structural
    "generate.eta_max": "structural",
}

# One or more out-of-range values per section, beyond negatives: zeros where a count or a scale must be
# positive, fractions above 1, values that break a rule.
OUT_OF_RANGE = [
    ("seed", -1), ("model.depth", 0), ("model.num_heads", 0), ("world.frames", 0), ("world.fps", 0),
    ("world.wrong_colour", 1.5), ("flow.logit_std", 0), ("flow.t_max", 1.5), ("sample.steps", 0),
    ("sample.cfg_scale", -0.5),
    ("train.max_steps", 0), ("train.batch_size", 0), ("train.grad_accum", 0), ("train.lr", 0),
    ("train.min_lr_ratio", 1.5), ("train.keep_checkpoints", 0), ("train.max_bad_steps", 0),
    ("train.ema_decay", 1.0), ("train.divergence_factor", 0.5), ("train.divergence_window", 0),
    ("eval.num_samples", 0), ("eval.cfg_scale", -1), ("data.prefetch", -1), ("cache.frames", 0),
    ("cache.fps", -1), ("generate.num_pairs", 0), ("generate.cfg_scale", -1), ("generate.shard_size", 0),
    ("label.segment_seconds", 0), ("label.tie_margin", -0.1), ("label.min_non_tie_fraction", 1.5),
    ("label.vlm.concurrency", 0), ("label.vlm.timeout_s", 0),
    ("pref.beta", 0), ("pref.beta", -5), ("pref.label_smoothing", 0.9),
    ("lora.rank", 0), ("lora.dropout", 1.5), ("parallel.tp", 0), ("parallel.timeout_minutes", 0),
    ("cluster.nodes", 0), ("cluster.mfu", 1.5), ("critic.steps", 0), ("critic.heldout_fraction", 1.0),
    ("iterate.rounds", 0), ("iterate.votes", 0), ("iterate.rank_fraction", 0), ("distill.huber_c", 0),
    ("distill.skip", 0), ("distill.cfg_scale", -1), ("reward.max_rows", 0), ("prompts.batch_size", 0),
    ("prompts.heldout_fraction", 1.5),
    *[(key, value) for key, value in NEGATIVE_ALLOWED.items() if isinstance(value, int)],
]


def _refused(key, value, *extra):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*extra, f"{key}={value}"])
    # the line about the key says where it was set: --set KEY
    assert re.search(rf"--set {re.escape(key)}: [^\n]*{re.escape(key)}", str(err.value)), str(err.value)


def _each_refused(pairs, *extra):
    """Every (key, value) at once: the one error has a line naming each key (one load instead of hundreds); a key
    that only appears in a rule about several keys must then be refused, and named, on its own."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [*extra, *(f"{key}={value}" for key, value in pairs)])
    for key, value in pairs:
        if not any(re.match(rf"--set {re.escape(key)}: [^\n]*{re.escape(key)}", line) for line in err.value.problems):
            _refused(key, value, *extra)


def test_the_range_table_covers_every_section():
    sections = {f.name for f in dataclasses.fields(RunConfig)} - {"seed"}
    covered = {key.split(".")[0] for key, _ in OUT_OF_RANGE}
    assert sections - covered == set(), "add out-of-range values for these sections"


@pytest.mark.parametrize("key, value", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_naming_the_field(key, value):
    _refused(key, value)


def test_every_numeric_field_refuses_negative_values_and_non_finite_floats():
    fields = list(_numeric_fields())
    assert len(fields) > 100 and ("train.lr", float) in fields and ("label.vlm.max_tokens", int) in fields
    assert set(NEGATIVE_ALLOWED) <= {key for key, _ in fields}
    _each_refused([(key, -1) for key, _ in fields if key not in NEGATIVE_ALLOWED])
    _each_refused([(key, -1) for key, _ in fields if NEGATIVE_ALLOWED.get(key) == "structural"],
                  "generate.mode=structural")
    for value in ("nan", "inf", "-inf"):
        _each_refused([(key, value) for key, tp in fields if tp is float])
