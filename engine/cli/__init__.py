"""``vidpo`` command line (also ``python -m vidpo`` / ``torchrun -m vidpo``).

Every verb that writes results takes ``--out DIR``; every verb that reads a recipe takes ``--set KEY=VALUE``
overrides (repeatable). Errors in recipes, files, data and the file system (a missing or unreadable file, an
output that is a file or read-only, a full disk, a folder another run is writing) print one clear line and
exit with status 2; ``--debug`` adds the traceback.

Every verb that writes a folder holds its lock (vidpo.utils.lock) while it runs: ``--out``, and the pairs
folder of ``vidpo label``.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import pickle
import sys
import traceback
from pathlib import Path

from safetensors import SafetensorError

from vidpo.cli.cluster import add_launch_verb, add_scale_verb
from vidpo.cli.common import WeightsError
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
from vidpo.training.checkpoint import CheckpointError
from vidpo.training.distributed import finish
from vidpo.training.trainer import TrainingStopped
from vidpo.utils import preemption
from vidpo.utils.atomic import is_disk_full
from vidpo.utils.lock import FolderLocked, output_lock, set_command_line
from vidpo.utils.provenance import SettingsMismatch

USER_ERRORS = (ConfigError, PairDataError, LabelingError, TrainingStopped, VideoDecodeError, LatentDataError,
               ManifestError, PromptError, SettingsMismatch, FolderLocked, WeightsError, CheckpointError)
"""Errors whose message is the whole story: printed as one line, exit status 2."""

NOT_WRITTEN = {"launch", "report", "config", "scale"}
"""Verbs whose ``--out`` is written by processes they start (launch), or that write no folder."""

STOPPABLE_VERBS = ("train", "generate", "label", "run", "iterate")
"""Verbs that stop at a safe point on SIGUSR1 / SIGTERM and exit with status 75 (vidpo.utils.preemption)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidpo", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    for add_verbs in (add_train_verbs, add_pipeline_verbs, add_cache_verb, add_compare_verb, add_distill_verbs,
                      add_critic_verbs, add_iterate_verb, add_launch_verb, add_scale_verb):
        add_verbs(sub)
    return parser


def written_folders(args) -> list[Path]:
    """The folders the verb of ``args`` writes, whose locks it holds: ``--out`` (and ``vidpo label``'s pairs)."""
    if args.verb in NOT_WRITTEN:
        return []
    folders = [getattr(args, "out", None)]
    if args.verb == "label":
        folders.append(args.pairs)
    return [Path(f) for f in folders if f]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    set_command_line(" ".join(["vidpo", *map(str, sys.argv[1:] if argv is None else argv)]))
    logging.raiseExceptions = False   # a log line that cannot be written (full disk) is dropped, not a traceback

    try:
        with contextlib.ExitStack() as held:
            for folder in written_folders(args):
                if folder.exists() and not folder.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(folder))
                # `vidpo cache --rank N` processes share one folder: rank 0 holds it for them
                held.enter_context(output_lock(folder, rank=getattr(args, "rank", None)))
            held.enter_context(preemption.handling_signals(args.verb in STOPPABLE_VERBS))
            code = args.func(args)
    except preemption.Preempted as exc:
        print(f"vidpo {args.verb}: {exc}; rerun the same command to resume", file=sys.stderr)
        code = preemption.EXIT_CODE
    except KeyboardInterrupt:
        print(f"vidpo {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    except Exception as exc:
        message = user_error(exc, args)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"vidpo {args.verb}: error: {message}", file=sys.stderr)
        code = 2
    finish()  # a torchrun rank leaves its process groups cleanly
    if __name__ == "__main__" or argv is None:
        sys.exit(code)
    return code


def user_error(exc: BaseException, args) -> str | None:
    """The one line that tells the user what went wrong, or None for an error that is a bug (a traceback)."""
    out = getattr(args, "out", None)
    if is_disk_full(exc):
        where = getattr(exc, "filename", None) or out or os.getcwd()
        return f"the disk is full: no space left on the device of {where}; free some space and rerun the same " \
               "command to resume"
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    if isinstance(exc, (SafetensorError, pickle.UnpicklingError)):
        return f"not a readable checkpoint / safetensors file: {exc}"
    if isinstance(exc, OSError):
        return os_error(exc)
    return None


def os_error(exc: OSError) -> str:
    if exc.filename is None:
        return str(exc)
    path = exc.filename
    if exc.errno == errno.EROFS:
        return f"cannot write to {path}: read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot access {path}: permission denied"
    reason = (exc.strerror or str(exc)).lower()
    return f"{path}: {reason}"


if __name__ == "__main__":
    main()
