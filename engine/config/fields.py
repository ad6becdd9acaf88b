"""What every config section is made of: choice fields, problems, and the ``Section`` base class.

Kept free of other ``vidpo`` imports so every module of the package can use it.

* ``choice(default, Alias)`` declares a field whose value must be one of the values of a ``Literal`` alias
  (``vidpo.config.choices``); the field itself keeps a ``str`` annotation, which is what OmegaConf merges.
* A ``Problem`` is one thing wrong with a config: a sentence that names the key(s), plus the dotted keys it
  is about, so the loader can say where each key was set (a recipe file or ``--set KEY``).
* ``Section.problems(prefix)`` lists everything wrong with a section: values outside their choices, the
  section's own ``rules`` and those of its nested sections; a float field is never NaN or infinite. ``RunConfig`` adds the cross-section rules.
* ``check_on_construction(obj)``: sections that code builds directly (``VLMConfig``, ``LoRAConfig``) raise a
  ValueError from ``__post_init__``; while the loader builds a config (``deferred_checks``) they do not, and
  their problems are reported with all the others instead.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import math
import typing
from typing import Iterable, Iterator

_DEFERRED: contextvars.ContextVar[bool] = contextvars.ContextVar("vidpo_config_checks_deferred", default=False)


def values_of(choices) -> tuple:
    """The values of a ``Literal[...]`` alias (or of any iterable of values) as a tuple."""
    if typing.get_origin(choices) is typing.Literal:
        return typing.get_args(choices)
    return tuple(choices)


def choice(default, choices, **kwargs):
    """A field whose value must be one of ``choices``: a ``Literal[...]`` alias or a tuple of values."""
    values = values_of(choices)
    if default not in values:
        raise ValueError(f"choice default {default!r} is not one of {list(values)}")
    return dataclasses.field(default=default, metadata={"choices": values}, **kwargs)


def choices_of(f: dataclasses.Field) -> tuple:
    """The valid values of a field declared with ``choice``; () for any other field."""
    return tuple(f.metadata.get("choices", ())) if f.metadata else ()


class Problem(str):
    """One thing wrong with a config, as a sentence naming the key(s) it is about.

    ``keys`` are the dotted keys involved (the first is the main one); the loader uses them to say where
    the values came from."""

    keys: tuple[str, ...]

    def __new__(cls, text: str, keys: Iterable[str] = ()) -> "Problem":
        self = super().__new__(cls, text)
        self.keys = tuple(keys)
        return self


class Problems(list):
    """Collects the problems of one config object whose dotted place in the recipe is ``prefix``."""

    def __init__(self, prefix: str = ""):
        super().__init__()
        self.prefix = prefix

    def check(self, ok: bool, name: str, text: str, *others: str) -> None:
        """Unless ``ok``: the problem '<prefix><name> <text>' about field ``name`` (and fields ``others``)."""
        if not ok:
            self.append(Problem(f"{self.prefix}{name} {text}", [self.prefix + k for k in (name, *others)]))

    def add(self, text: str, *keys: str) -> None:
        """A problem worded in full (cross-section rules name several keys)."""
        self.append(Problem(text, [self.prefix + k for k in keys]))

    def at_least(self, obj, low, *names: str) -> None:
        for name in names:
            value = getattr(obj, name)
            self.check(value >= low, name, f"must be >= {low}, got {value!r}")

    def positive(self, obj, *names: str) -> None:
        for name in names:
            value = getattr(obj, name)
            self.check(value > 0, name, f"must be > 0, got {value!r}")

    def fraction(self, obj, *names: str, low_open: bool = False, high_open: bool = False) -> None:
        """Each field in [0, 1], ``(0`` with ``low_open``, ``1)`` with ``high_open``."""
        for name in names:
            value = getattr(obj, name)
            ok = (0.0 < value if low_open else 0.0 <= value) and (value < 1.0 if high_open else value <= 1.0)
            interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            self.check(ok, name, f"must be in {interval}, got {value!r}")


def _hint(value, choices) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def choice_problems(obj, prefix: str = "") -> list[Problem]:
    """The fields of ``obj`` (not of its nested sections) whose value is outside their choices."""
    out = []
    for f in dataclasses.fields(obj):
        choices = choices_of(f)
        value = getattr(obj, f.name)
        if choices and value not in choices:
            key = prefix + f.name
            out.append(Problem(f"'{key}' = {value!r} is not one of {list(choices)}{_hint(value, choices)}", [key]))
    return out


def finite_problems(obj, prefix: str = "") -> list[Problem]:
    """The float fields of ``obj`` that are NaN or infinite: no setting of a run means either."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            key = prefix + f.name
            out.append(Problem(f"{key} must be a finite number, got {value!r}", [key]))
    return out


class Section:
    """Base class of the config dataclasses: ``problems`` lists what is wrong with one (see the module doc).

    A subclass states its own rules in ``rules(prefix)``; choices and nested sections are checked here."""

    def rules(self, prefix: str = "") -> list[Problem]:
        """Problems of this section's own fields beyond their choices (ranges, required-when rules)."""
        return []

    def problems(self, prefix: str = "") -> list[Problem]:
        """Everything wrong with this section and its nested sections; keys are named ``prefix + field``."""
        return self.section_problems(prefix) + list(self.rules(prefix))

    def section_problems(self, prefix: str = "") -> list[Problem]:
        """Values of this section outside their choices or not finite, then the problems of its nested sections."""
        out = choice_problems(self, prefix) + finite_problems(self, prefix)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                out += value.problems(f"{prefix}{f.name}.")
        return out


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """While a config is being built by the loader, ``check_on_construction`` raises nothing."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def check_on_construction(obj: Section) -> None:
    """ValueError listing every problem of ``obj`` (named ``ClassName.field``), unless the loader is building
    it (it reports them itself, with the keys' places in the recipe)."""
    if _DEFERRED.get():
        return
    name = type(obj).__name__ + "."
    found = [f"{name}{f.name} must be one of {choices_of(f)}, got {getattr(obj, f.name)!r}"
             for f in dataclasses.fields(obj) if choices_of(f) and getattr(obj, f.name) not in choices_of(f)]
    found += obj.rules(name)
    if found:
        raise ValueError("; ".join(found))
