"""Recipes: typed loading, dotted overrides, and errors that name the key, the file and the closest key."""
from pathlib import Path

import pytest

from vidpo.config import RunConfig
from vidpo.config import ConfigError, explain, field_docs, load_config, to_yaml

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
    from vidpo.config import TrainConfig

    docs = field_docs(TrainConfig)
    assert "learning rate" in docs["lr"].lower()
    text = explain("train.max_steps")
    assert text.startswith("train.max_steps = 600") and "Optimizer steps" in text
    with pytest.raises(ConfigError, match="did you mean"):
        explain("trian.lr")
