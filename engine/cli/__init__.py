"""``vidpo`` command line (also ``python -m vidpo`` / ``torchrun -m vidpo``).

Every verb that writes results takes ``--out DIR``; every verb that reads a recipe takes ``--set KEY=VALUE``
overrides (repeatable). Errors in recipes, files or data print one clear line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from vidpo.cli.cluster import add_launch_verb, add_scale_verb
from vidpo.cli.distill import add_distill_verbs
from vidpo.cli.ipo import add_critic_verbs, add_iterate_verb
from vidpo.cli.pipeline import add_cache_verb, add_compare_verb, add_pipeline_verbs
from vidpo.cli.train import add_train_verbs
from vidpo.config import ConfigError
from vidpo.data.decode.base import VideoDecodeError
from vidpo.data.latents import LatentDataError
from vidpo.data.manifest import ManifestError
from vidpo.data.pairs import PairDataError
from vidpo.data.prompts import PromptError
from vidpo.labeling import LabelingError
from vidpo.stages.common import setup_logging
from vidpo.training.distributed import finish
from vidpo.training.trainer import TrainingStopped
from vidpo.utils.provenance import SettingsMismatch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidpo", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    for add_verbs in (add_train_verbs, add_pipeline_verbs, add_cache_verb, add_compare_verb, add_distill_verbs,
                      add_critic_verbs, add_iterate_verb, add_launch_verb, add_scale_verb):
        add_verbs(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)

    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError, PairDataError, LabelingError, TrainingStopped, VideoDecodeError,
            LatentDataError, ManifestError, PromptError, SettingsMismatch) as exc:
        print(f"vidpo {args.verb}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"vidpo {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    finish()  # a torchrun rank leaves its process groups cleanly
    if __name__ == "__main__" or argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
