"""What every verb module of the CLI shares: the ``--set`` overrides, JSON printing, the run config."""
from __future__ import annotations

import argparse
import json

from vidpo.config import load_config
from vidpo.stages.common import config_for_checkpoint


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
