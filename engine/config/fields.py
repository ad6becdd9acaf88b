"""Field helpers shared by every config dataclass (kept import-free so any module can use them)."""
from dataclasses import field


def choice(default, choices, **kwargs):
    """A field whose value must be one of ``choices`` (validated by ``vidpo.config.validate_choices``)."""
    return field(default=default, metadata={"choices": tuple(choices)}, **kwargs)
