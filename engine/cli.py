"""``vidpo`` command line (also ``python -m vidpo`` / ``torchrun -m vidpo``).

Every verb that writes results takes ``--out DIR``; every verb that reads a recipe takes ``--set KEY=VALUE``
overrides (repeatable). Errors in recipes, files or data print one clear line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vidpo.recipe import ConfigError


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)")


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _cfg(args, checkpoint=None):
    from vidpo.jobs import config_for_checkpoint
    from vidpo.recipe import load_config

    if getattr(args, "recipe", None):
        return load_config(args.recipe, args.overrides)
    if checkpoint is not None:
        return config_for_checkpoint(checkpoint, args.overrides)
    return load_config(None, args.overrides)


def cmd_train(args) -> int:
    from vidpo.jobs import train_job

    cfg = _cfg(args)
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    _print(train_job(cfg, out, resume=not args.no_resume))
    return 0


def cmd_sample(args) -> int:
    from vidpo.jobs import sample_job

    cfg = _cfg(args, args.ckpt)
    _print(sample_job(cfg, args.ckpt, args.out, num=args.num))
    return 0


def cmd_eval(args) -> int:
    from vidpo.jobs import eval_job

    cfg = _cfg(args, args.ckpt)
    out = eval_job(cfg, args.ckpt, args.out, base=args.base, num=args.num)
    brief = {"model": out["model"]["oracle"]}
    if "delta" in out:
        brief["base"] = out["base"]["oracle"]
        brief["delta"] = out["delta"]["oracle"]
        brief["win_rate"] = out["delta"]["win_rate"]
    brief["per_component"] = {k: round(v["mean"], 4) for k, v in out["model"].items() if k != "oracle"}
    _print(brief)
    return 0


def cmd_config(args) -> int:
    from vidpo.recipe import explain, load_config, to_yaml

    if args.explain is not None:
        print(explain(args.explain))
        return 0
    print(to_yaml(load_config(args.recipe, args.overrides)), end="")
    return 0


def cmd_report(args) -> int:
    from vidpo.report import write_report

    print(write_report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidpo", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("train", help="train a policy from a recipe (SFT / DPO / KTO)",
                       description="Train from RECIPE into --out (resumes from its latest checkpoint).")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/shapes/pretrain.yaml")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out has checkpoints")
    _add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample clips from a checkpoint",
                       description="Sample clips (conditions cycle over the world) from --ckpt into --out.")
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or .safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", help="recipe to take the model/world from (default: the checkpoint's config.yaml)")
    p.add_argument("--num", type=int, help="number of samples (default sample.num_samples)")
    _add_set(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="oracle scores of a checkpoint (95%% CI), optionally vs a base",
                       description="Oracle-score a checkpoint's samples on fixed seeds; --base adds the paired "
                                   "delta with its 95%% CI and the win rate.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--base", help="a second checkpoint to compare with on the same seeds")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe")
    p.add_argument("--num", type=int, help="samples (default eval.num_samples)")
    _add_set(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config", help="print a resolved recipe, or explain config keys",
                       description="Print RECIPE resolved with overrides, or --explain PREFIX to list keys with "
                                   "their docs.")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--explain", nargs="?", const="", metavar="PREFIX")
    _add_set(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("report", help="(re)write RUN_DIR/report.html with plots and sample grids")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    from vidpo.pipeline import add_pipeline_verbs

    add_pipeline_verbs(sub, _add_set)
    from vidpo.compare import add_compare_verb

    add_compare_verb(sub, _add_set)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from vidpo.jobs import setup_logging

    setup_logging(verbose=args.verbose)
    from vidpo.data.pairs import PairDataError
    from vidpo.labeling import LabelingError
    from vidpo.trainer import TrainingStopped

    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError, PairDataError, LabelingError, TrainingStopped) as exc:
        print(f"vidpo {args.verb}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"vidpo {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    if __name__ == "__main__" or argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
