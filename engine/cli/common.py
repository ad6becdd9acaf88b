"""What every verb module of the CLI shares: the ``--set`` overrides, JSON printing, the run config, the check of
a weights file the user names."""
from __future__ import annotations

import argparse
import json

from safetensors import SafetensorError, safe_open

from vidpo.config import load_config, resolve_path
from vidpo.stages.common import config_for_checkpoint
from vidpo.training.checkpoint import find_weights


class WeightsError(ValueError):
    """A weights file the user named (``train.init_from``, ``--ckpt``) is not a readable safetensors file."""


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def config_from_args(args, checkpoint=None):
    """The recipe of ``args`` with its overrides, else the config saved beside ``checkpoint``, else defaults."""
    if getattr(args, "recipe", None):
        return load_config(args.recipe, args.overrides)
    if checkpoint is not None:
        return config_for_checkpoint(checkpoint, args.overrides)
    return load_config(None, args.overrides)


def check_weights(path, what: str) -> None:
    """Fail with one line naming the file when the weights ``path`` refers to (a .safetensors file, a checkpoint or
    a run directory) cannot be read: missing, garbage, truncated (its header is read, not its tensors)."""
    weights = find_weights(resolve_path(path))
    try:
        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{what}: {weights} is not a readable checkpoint / safetensors file: {exc}") from None


def add_overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"start {what} over when it holds results made with other settings (removes them)")
