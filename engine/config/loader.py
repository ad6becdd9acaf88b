"""Loading recipes: YAML files merged onto the typed config, with dotted command-line overrides.

OmegaConf does the merging and type checking against the dataclasses of ``vidpo.config``; this module
adds what a user needs when something is wrong: an unknown or mistyped key names the key, the file and
the closest valid key; a value of the wrong type names the key and the file; an enum-like field lists
its valid values; then the sections' rules and the cross-section rules run (``RunConfig.problems``). All
of it is collected and raised as one ``ConfigError`` with a line per problem, each naming the key and where
it was set (the recipe, the ``base`` file it came from, or ``--set KEY``). A recipe may start from another
one with a top-level ``base: other.yaml`` (resolved relative to the including file), so variants of a recipe
state only what differs.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vidpo.config.fields import choice_problems, choices_of, deferred_checks
from vidpo.config.run import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the file/field and what to do.

    ``problems``: one line per problem when the loader found several (the message lists them all)."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]


def _dataclass_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _nested_type(cls, name: str):
    """The dataclass type of field ``name`` of ``cls`` (also through Optional[...]), or None for a leaf."""
    tp = _type_hints(cls).get(name)
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


def _unknown_key(key: str, source: str, cls=RunConfig) -> str:
    suggestion = _closest(key, _all_keys(cls))
    hint = f" (did you mean '{suggestion}'?)" if suggestion else ""
    return f"{source}: unknown key '{key}'{hint}"


def _message(lines: Sequence[str], what: str = "the config") -> str:
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems in {what}:\n" + "\n".join("  " + line for line in lines)


def _known_keys(raw: dict, source: str, cls, prefix: str, problems: list[str]) -> dict:
    """``raw`` without the keys ``cls`` does not have (each one a line in ``problems``), recursively."""
    fields = _dataclass_fields(cls)
    out = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in fields:
            problems.append(_unknown_key(dotted, source))
            continue
        sub = _nested_type(cls, key)
        if sub is not None and value is not None:
            if not isinstance(value, dict):
                problems.append(f"{source}: '{dotted}' is a section; expected a mapping, got {value!r}")
                continue
            value = _known_keys(value, source, sub, dotted + ".", problems)
        out[key] = value
    return out


def check_keys(raw: dict, source: str, cls=RunConfig, prefix: str = "") -> None:
    """Raise one ConfigError naming every key of ``raw`` that ``cls`` does not have."""
    problems: list[str] = []
    _known_keys(raw, source, cls, prefix, problems)
    if problems:
        raise ConfigError(_message(problems, source), problems)


def _record_origins(data: dict, source: str, origins: dict, cls=RunConfig, prefix: str = "") -> None:
    """``origins[dotted key] = source`` for every key (sections and their fields) ``data`` sets."""
    fields = _dataclass_fields(cls)
    for key, value in data.items():
        dotted = prefix + str(key)
        origins[dotted] = source
        sub = _nested_type(cls, key) if key in fields else None
        if sub is not None and isinstance(value, dict):
            _record_origins(value, source, origins, sub, dotted + ".")


def _read_yaml(path: Path, problems: list[str], origins: dict, seen: tuple[Path, ...] = ()) -> dict:
    """Read a recipe, following ``base:`` chains (base first, this file's keys win). Unknown keys are left
    out, each a line in ``problems``; ``origins`` records the file each key came from."""
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
    data = _known_keys(data, str(path), RunConfig, "", problems)
    if base is None:
        _record_origins(data, str(path), origins)
        return data
    base_data = _read_yaml((path.parent / base), problems, origins, seen + (path,))
    _record_origins(data, str(path), origins)
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
            raise ConfigError(_unknown_key(".".join(parts[: i + 1]), source))
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
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
        cls = sub


def _drop(raw: dict, key: str) -> bool:
    """Remove dotted ``key`` (list indices stripped) from ``raw``; False when it is not there."""
    parts = re.sub(r"\[[^\]]*\]", "", key).split(".")
    node = raw
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False
    if isinstance(node, dict) and parts[-1] in node:
        del node[parts[-1]]
        return True
    return False


class _Origins:
    """Where each key of a load came from: a ``--set`` override, a recipe file, or the defaults."""

    def __init__(self, files: dict, overridden: Sequence[str], default: str):
        self.files, self.overridden, self.default = files, list(overridden), default

    def of(self, keys: Sequence[str]) -> str:
        """Where the first of ``keys`` that was set came from; else where its closest enclosing section was
        set (a field left at its default in a section the recipe turned on); else the default."""
        for key in keys:
            found = self._set(key)
            if found:
                return found
        for key in keys:
            parts = key.split(".")
            for n in range(len(parts) - 1, 0, -1):
                found = self._set(".".join(parts[:n]))
                if found:
                    return found
        return self.default

    def _set(self, key: str) -> str:
        for over in reversed(self.overridden):  # the last --set of a key wins
            if over == key or key.startswith(over + ".") or over.startswith(key + "."):
                return f"--set {over}"
        if key in self.files:
            return self.files[key]
        parents = [k for k in self.files if key.startswith(k + ".")]
        children = [k for k in self.files if k.startswith(key + ".")]
        if parents or children:
            return self.files[max(parents, key=len) if parents else children[0]]
        return ""


def validate_choices(obj, source: str, prefix: str = "", overridden: frozenset = frozenset()) -> None:
    """Raise one ConfigError naming every field declared with ``choice(...)`` (recursively) whose value is
    not one of its choices. ``overridden`` keys came from ``--set`` and are reported as such."""
    where = _Origins({}, sorted(overridden), source)
    lines = []

    def walk(node, dotted: str):
        lines.extend(f"{where.of(p.keys)}: {p}" for p in choice_problems(node, dotted))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, dotted + f.name + ".")

    walk(obj, prefix)
    if lines:
        raise ConfigError(_message(lines), lines)


def validate(cfg: RunConfig, source: str = "config", *, world_size: Optional[int] = None) -> RunConfig:
    """``cfg`` if nothing is wrong with it, else one ConfigError listing every problem (``RunConfig.problems``:
    values outside their choices, each section's rules, the cross-section rules). ``load_config`` runs it;
    code that builds or changes a config itself can call it. ``world_size``: see ``load_config``."""
    lines = [f"{source}: {p}" for p in cfg.problems(world_size=world_size)]
    if lines:
        raise ConfigError(_message(lines), lines)
    return cfg


def load_config(recipe: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                world_size: Optional[int] = None) -> RunConfig:
    """Recipe YAML (optional) + ``KEY=VALUE`` overrides -> validated ``RunConfig``.

    Every problem the recipe alone decides is found here and reported at once, in one ConfigError with one
    line per problem naming the key and where it was set (the recipe file, a ``base`` file or ``--set KEY``):
    unknown keys (with the closest valid key), values of the wrong type or outside their choices, each
    section's rules and the cross-section rules (``vidpo.config.run``). ``world_size``: the processes the run
    will have when the caller knows them otherwise (``vidpo scale --world``); the parallel layout is then
    checked against it instead of the recipe's cluster."""
    lines: list[str] = []
    files: dict[str, str] = {}
    raw: dict = _read_yaml(Path(recipe), lines, files) if recipe is not None else {}
    source = str(Path(recipe).resolve()) if recipe is not None else "<defaults>"
    overridden: list[str] = []
    for text in overrides:
        try:
            key, value = _parse_override(text)
            _set_dotted(raw, key, value, f"--set {key}")
        except ConfigError as exc:
            lines.append(str(exc))
            continue
        overridden.append(key)
    where = _Origins(files, overridden, source)

    schema = OmegaConf.structured(RunConfig)
    cfg = None
    with deferred_checks():
        while cfg is None:
            try:
                merged = OmegaConf.merge(schema, OmegaConf.create(raw))
                cfg = OmegaConf.to_object(merged)
            except OmegaConfBaseException as exc:
                key = getattr(exc, "full_key", None) or "?"
                msg = str(exc).splitlines()[0]
                lines.append(f"{where.of([key.split('[')[0]])}: bad value for '{key}': {msg}")
                if not _drop(raw, key):  # nothing left to leave out: report what was found so far
                    raise ConfigError(_message(lines, source), lines) from None
    lines += [f"{where.of(p.keys)}: {p}" for p in cfg.problems(world_size=world_size)]
    if lines:
        raise ConfigError(_message(lines, source), lines)
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
            choices = choices_of(f)
            extra = f" one of {list(choices)}" if choices else ""
            lines.append(f"{key} = {value!r}{extra}\n    {docs.get(f.name, '')}")

    walk(RunConfig, RunConfig(), "")
    if not lines:
        close = _closest(prefix, _all_keys(RunConfig))
        raise ConfigError(f"no config key starts with '{prefix}'" + (f" (did you mean '{close}'?)" if close else ""))
    return "\n".join(lines)
