"""``vidpo`` command line (also ``python -m vidpo`` / ``torchrun -m vidpo``).

Every verb that writes results takes ``--out DIR``; every verb that reads a recipe takes ``--set KEY=VALUE``
overrides (repeatable). Errors in recipes, files or data print one clear line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
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
    result = train_job(cfg, out, resume=not args.no_resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports for all
        _print(result)
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
    brief["per_component"] = {k: round(v["mean"], 4) for k, v in out["model"].items() if k.startswith("oracle/")}
    brief["mode_rates"] = {k[5:]: round(v["mean"], 4) for k, v in out["model"].items() if k.startswith("mode/")}
    _print(brief)
    return 0


def cmd_preprocess(args) -> int:
    from vidpo.preprocess import preprocess_job

    _print(preprocess_job(_cfg(args), args.out))
    return 0


def cmd_distill(args) -> int:
    from vidpo.objectives.distill import distill_job

    _print(distill_job(_cfg(args), args.out, resume=not args.no_resume))
    return 0


def cmd_distill_eval(args) -> int:
    from vidpo.distill_eval import distill_eval_job

    students = {}
    for text in args.student:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--student '{text}': expected NAME=CHECKPOINT, e.g. --student cd=runs/distill/student")
        students[name] = path
    _print(distill_eval_job(_cfg(args), args.out, students, teacher=args.teacher, num=args.num,
                            repeats=args.repeats))
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

    # Consistency distillation (issue 9): preprocess -> train (objective consistency_distill) -> distill-eval.
    p = sub.add_parser("preprocess", help="teacher ODE steps (+ CFG, motion guidance, inversion) into shards",
                       description="Precompute the teacher's guided solver steps of consistency distillation "
                                   "into --out (resumable: complete shards are skipped).")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="data directory (set distill.data to it for training)")
    _add_set(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("distill", help="preprocess -> train the consistency student -> teacher-vs-student table",
                       description="The whole consistency distillation into --out (data/, student/, eval/); "
                                   "resumable.")
    p.add_argument("recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--no-resume", action="store_true")
    _add_set(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("distill-eval", help="teacher vs students: oracle (95%% CI), motion, ms per clip",
                       description="Score the teacher at distill.teacher_steps and each --student at "
                                   "distill.student_steps on the same seeds; writes a JSON and a Markdown table.")
    p.add_argument("recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--student", action="append", default=[], metavar="NAME=CKPT", help="repeatable")
    p.add_argument("--teacher", help="teacher checkpoint (default distill.teacher)")
    p.add_argument("--num", type=int, help="samples per row (default eval.num_samples)")
    p.add_argument("--repeats", type=int, default=1, help="timing runs per row (best is kept)")
    _add_set(p)
    p.set_defaults(func=cmd_distill_eval)

    from vidpo.pipeline import add_pipeline_verbs

    add_pipeline_verbs(sub, _add_set)
    # Distributed runs (issue 6): `launch` builds the torchrun / sbatch command, `scale` sizes a layout.
    from vidpo.launch import add_launch_verb
    from vidpo.scale import add_scale_verb

    add_launch_verb(sub, _add_set)
    add_scale_verb(sub, _add_set)
    from vidpo.data.cache import add_cache_verb  # issue 7: the data path's `vidpo cache`

    add_cache_verb(sub, _add_set)
    from vidpo.compare import add_compare_verb

    add_compare_verb(sub, _add_set)
    # Issue 5: the IPO critic and iterative rounds (importing vidpo.critic also registers the "critic" labeller,
    # so `vidpo label --set label.labeler=critic` works).
    from vidpo.critic import add_critic_verbs
    from vidpo.iterate import add_iterate_verb

    add_critic_verbs(sub, _add_set)
    add_iterate_verb(sub, _add_set)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from vidpo.jobs import setup_logging

    setup_logging(verbose=args.verbose)
    from vidpo.data.pairs import PairDataError
    from vidpo.labeling import LabelingError
    from vidpo.trainer import TrainingStopped
    from vidpo.data.decode.base import VideoDecodeError  # issue 7: bad videos, manifests, latent shards
    from vidpo.data.latents import LatentDataError
    from vidpo.data.manifest import ManifestError

    try:
        code = args.func(args)
    except (ConfigError, FileNotFoundError, PairDataError, LabelingError, TrainingStopped, VideoDecodeError,
            LatentDataError, ManifestError) as exc:
        print(f"vidpo {args.verb}: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"vidpo {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        code = 130
    from vidpo.distributed import finish  # a torchrun rank leaves its process groups cleanly

    finish()
    if __name__ == "__main__" or argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
