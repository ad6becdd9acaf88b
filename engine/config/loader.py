"""Loading recipes: YAML files merged onto the typed config, with dotted command-line overrides.

OmegaConf does the merging and type checking against the dataclasses of ``vidpo.config``; this module
adds what a user needs when something is wrong: an unknown or mistyped key names the key, the file and
the closest valid key; a value of the wrong type names the key and the file; an enum-like field lists
its valid values. A recipe may start from another one with a top-level ``base: other.yaml`` (resolved
relative to the including file), so variants of a recipe state only what differs.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vidpo.config.sections import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the file/field and what to do."""


def _dataclass_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _nested_type(cls, name: str):
    """The dataclass type of field ``name`` of ``cls`` (also through Optional[...]), or None for a leaf."""
    tp = typing.get_type_hints(cls).get(name)
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name in _dataclass_fields(cls):
        sub = _nested_type(cls, name)
        keys.append(prefix + name)
        if sub is not None:
            keys.extend(_all_keys(sub, prefix + name + "."))
    return keys


def _closest(key: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    # Match on the last component first (a typo is usually in the leaf), then on the full dotted key.
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {c: c.rsplit(".", 1)[-1] for c in candidates}
    hit = difflib.get_close_matches(leaf, list(set(by_leaf.values())), n=1, cutoff=0.6)
    if hit:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        same_parent = [c for c, l in by_leaf.items() if l == hit[0] and c.rsplit(".", 1)[0] == parent]
        return same_parent[0] if same_parent else next(c for c, l in by_leaf.items() if l == hit[0])
    hit = difflib.get_close_matches(key, candidates, n=1, cutoff=0.4)
    return hit[0] if hit else ""


def _unknown_key_error(key: str, source: str, cls=RunConfig) -> ConfigError:
    suggestion = _closest(key, _all_keys(cls))
    hint = f" (did you mean '{suggestion}'?)" if suggestion else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


def check_keys(raw: dict, source: str, cls=RunConfig, prefix: str = "") -> None:
    """Raise ConfigError for the first key of ``raw`` that ``cls`` does not have."""
    fields = _dataclass_fields(cls)
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            raise _unknown_key_error(dotted, source)
        sub = _nested_type(cls, key)
        if sub is not None:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' is a section; expected a mapping, got {value!r}")
            check_keys(value, source, sub, dotted + ".")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe, following ``base:`` chains (base first, this file's keys win)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.exists():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    check_keys(data, str(path))
    if base is None:
        return data
    base_data = _read_yaml((path.parent / base), seen + (path,))
    return _deep_merge(base_data, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, value = text.split("=", 1)
    key = key.strip()
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    cls = RunConfig
    node = raw
    for i, part in enumerate(parts):
        fields = _dataclass_fields(cls)
        if part not in fields:
            raise _unknown_key_error(".".join(parts[: i + 1]), source)
        sub = _nested_type(cls, part)
        if i == len(parts) - 1:
            if sub is not None:
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{key}' is a section; set one of its fields instead")
                check_keys(value, source, sub, key + ".")
            node[part] = value
            return
        if sub is None:
            raise ConfigError(f"{source}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = node.setdefault(part, {})
        cls = sub


def validate_choices(obj, source: str, prefix: str = "", overridden: frozenset = frozenset()) -> None:
    """Check every field declared with ``choice(...)`` (recursively). ``overridden`` keys came from
    ``--set`` and are reported as such rather than as coming from the recipe file."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        dotted = prefix + f.name
        if dataclasses.is_dataclass(value):
            validate_choices(value, source, dotted + ".", overridden)
            continue
        choices = f.metadata.get("choices") if f.metadata else None
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"--set {dotted}" if dotted in overridden else source
            raise ConfigError(f"{where}: '{dotted}' = {value!r} is not one of {list(choices)}{hint}")


def load_config(recipe: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Recipe YAML (optional) + ``KEY=VALUE`` overrides -> validated ``RunConfig``."""
    raw: dict = _read_yaml(Path(recipe)) if recipe is not None else {}
    source = str(Path(recipe).resolve()) if recipe is not None else "<defaults>"
    overridden = set()
    for text in overrides:
        key, value = _parse_override(text)
        _set_dotted(raw, key, value, f"--set {key}")
        overridden.add(key)
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(raw))
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        where = f"--set {key}" if key in overridden else source
        raise ConfigError(f"{where}: bad value for '{key}': {msg}") from None
    validate_choices(cfg, source, overridden=frozenset(overridden))
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def resolve_path(path: str | os.PathLike) -> Path:
    """A path from a recipe: absolute, else relative to the current directory if it exists there, else to
    the repository root (so recipes can name committed files like ``recipes/shapes/base``)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` read from the string literal under each field of a config dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def explain(prefix: str = "") -> str:
    """Every config key under ``prefix`` with its type, default and docstring (``vidpo config``)."""
    lines = []

    def walk(cls, instance, dotted: str):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key = dotted + f.name
            sub = _nested_type(cls, f.name)
            value = getattr(instance, f.name) if instance is not None else _field_default(f)
            if sub is not None:
                walk(sub, value, key + ".")  # an Optional section left at None shows its field defaults
                continue
            if prefix and not key.startswith(prefix):
                continue
            choices = f.metadata.get("choices") if f.metadata else None
            extra = f" one of {list(choices)}" if choices else ""
            lines.append(f"{key} = {value!r}{extra}\n    {docs.get(f.name, '')}")

    walk(RunConfig, RunConfig(), "")
    if not lines:
        raise ConfigError(f"no config key starts with '{prefix}'" + (
            f" (did you mean '{_closest(prefix, _all_keys(RunConfig))}'?)" if _closest(prefix, _all_keys(RunConfig)) else ""))
    return "\n".join(lines)
