"""What a resumed run may change: every setting that differs from its checkpoint's ``config.yaml`` is applied
with a message or refused with the reason; none is silently ignored.

* ``APPLIED``: hyper-parameters the resumed run takes over. The trainer (vidpo.training.trainer) resets the
  optimizer's learning rate and rebuilds the schedule (``train.lr``, ``train.warmup_steps``,
  ``train.min_lr_ratio``, ``train.max_steps``), writes ``train.weight_decay`` / ``train.betas`` into the
  optimizer; the others are read at every step. Each change is logged with what it does.
* ``NO_EFFECT``: settings that do not enter the trained weights (logging, checkpoints, evaluation, sampling,
  the parallel layout, which resumes at any world size) or only what made the data files (``generate``,
  ``label`` but the segment keys, ``critic``, ``iterate``, ``cache``: those files carry their own settings
  record, vidpo.utils.provenance). Logged as taking effect.
* Everything else is refused, naming each key with its old and new value and why: the seed, the model, the
  data and its order (``train.batch_size``, ``train.grad_accum``), the objective and its loss settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from vidpo.config import RunConfig, to_yaml

SCHEDULE_KEYS = ("train.lr", "train.warmup_steps", "train.min_lr_ratio", "train.max_steps")

APPLIED: dict[str, str] = {
    "train.lr": "the optimizer's learning rate is reset to it and the schedule rebuilt",
    "train.warmup_steps": "the learning-rate schedule is rebuilt",
    "train.min_lr_ratio": "the learning-rate schedule is rebuilt",
    "train.max_steps": "the run ends at the new step count; the learning-rate schedule is rebuilt for it",
    "train.weight_decay": "set in the optimizer",
    "train.betas": "set in the optimizer",
    "train.grad_clip": "clips from the next step",
    "train.max_bad_steps": "the guard uses it from the next step",
    "train.divergence_factor": "the guard uses it from the next step",
    "train.divergence_window": "the guard uses it from the next step",
    "train.ema_decay": "the average continues with the new decay",
    "train.autocast": "the forward passes use it from the next step",
    "pref.beta": "the loss uses it from the next step",
    "pref.label_smoothing": "the loss uses it from the next step",
    "pref.kto_lambda_desirable": "the loss uses it from the next step",
    "pref.kto_lambda_undesirable": "the loss uses it from the next step",
}

NO_EFFECT = ("train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.eval_every", "train.progress",
             "train.num_threads", "eval.", "sample.", "parallel.", "cluster.", "cache.", "iterate.", "critic.",
             "generate.", "label.")

# label keys that decide the segments the loss is computed over, and which pairs train
TRAINING_LABEL_KEYS = ("label.segment_seconds", "label.temporal_compression", "label.granularity",
                       "label.min_non_tie_fraction")

REASONS = {
    "seed": "every random stream of the run (data order, noise, timesteps) derives from it",
    "train.batch_size": "the data stream is indexed by (step, micro-batch, batch size): the rest of the run would "
                        "see other samples than the checkpoint's run",
    "train.grad_accum": "the data stream is indexed by (step, micro-batch, batch size): the rest of the run would "
                        "see other samples than the checkpoint's run",
    "train.objective": "it is another training objective",
    "train.init_from": "it only sets the weights a run starts from, and this one starts from the checkpoint",
    "train.optimizer": "the optimizer state was made by the other implementation",
}
_SECTION_REASONS = (
    (("model.", "lora.", "world.", "flow."), "the model or its training process would differ from the checkpoint's"),
    (("data.", "pref.", "prompts.", "label."), "it changes the training data or the loss"),
    (("distill.", "reward."), "it changes the distillation"),
)


@dataclass
class Changes:
    """Settings that differ between a checkpoint and the resumed run: (key, old, new[, reason])."""

    applied: list[tuple[str, Any, Any]] = field(default_factory=list)
    no_effect: list[tuple[str, Any, Any]] = field(default_factory=list)
    refused: list[tuple[str, Any, Any, str]] = field(default_factory=list)

    def keys(self, which: str) -> set[str]:
        return {entry[0] for entry in getattr(self, which)}


def _differences(old: Any, new: Any, prefix: str = ""):
    """(dotted key, old, new) of every leaf (or whole section, when one side has none) that differs; keys the
    old side does not have (fields added since) are skipped."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key, value in new.items():
            if key in old:
                yield from _differences(old[key], value, f"{prefix}{key}.")
    elif old != new:
        yield prefix[:-1], old, new


def _under(key: str, prefixes) -> bool:
    """Whether ``key`` is one of ``prefixes`` or inside one (a prefix ending in '.' names a section)."""
    return any((key + ".").startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def _reason(key: str) -> str:
    if key in REASONS:
        return REASONS[key]
    for prefixes, reason in _SECTION_REASONS:
        if _under(key, prefixes):
            return reason
    return "it changes what the run trains"


def compare(saved_yaml: str, cfg: RunConfig) -> Changes:
    """Classify every key whose value in ``cfg`` differs from the checkpoint's ``config.yaml`` text (a section
    turned on or off, e.g. ``lora``, is one key). Keys the checkpoint does not have (a field added since) are not
    compared."""
    saved = yaml.safe_load(saved_yaml) or {}
    now = yaml.safe_load(to_yaml(cfg))   # the same serialisation on both sides
    changes = Changes()
    for key, old, new in sorted(_differences(saved, now), key=lambda entry: entry[0]):
        if key in APPLIED:
            changes.applied.append((key, old, new))
        elif _under(key, NO_EFFECT) and not _under(key, TRAINING_LABEL_KEYS) and key != "label":
            changes.no_effect.append((key, old, new))
        else:
            changes.refused.append((key, old, new, _reason(key)))
    return changes


def show(value: Any, width: int = 60) -> str:
    """A value for a one-line message (a whole section is cut short)."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def refusal(checkpoint: str, changes: Changes) -> str:
    """One message naming every refused key with its old and new value and the reason."""
    items = "; ".join(f"{key}: {show(old)} -> {show(new)} ({why})" for key, old, new, why in changes.refused)
    return (f"{checkpoint} cannot be resumed with these settings changed: {items}. Resume with the checkpoint's "
            "values (its config.yaml) or start over with --no-resume")
