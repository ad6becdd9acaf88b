"""``vidpo train``, ``sample``, ``eval``, ``config`` and ``report``."""
from __future__ import annotations

import os
from pathlib import Path

from vidpo.cli.common import add_overrides, config_from_args, print_json
from vidpo.config import explain, load_config, to_yaml
from vidpo.evaluation.report import write_report
from vidpo.stages.jobs import eval_job, sample_job, train_job


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    result = train_job(cfg, out, resume=not args.no_resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports for all
        print_json(result)
    return 0


def cmd_sample(args) -> int:
    cfg = config_from_args(args, args.ckpt)
    print_json(sample_job(cfg, args.ckpt, args.out, num=args.num))
    return 0


def cmd_eval(args) -> int:
    cfg = config_from_args(args, args.ckpt)
    out = eval_job(cfg, args.ckpt, args.out, base=args.base, num=args.num)
    brief = {"model": out["model"]["oracle"]}
    if "delta" in out:
        brief["base"] = out["base"]["oracle"]
        brief["delta"] = out["delta"]["oracle"]
        brief["win_rate"] = out["delta"]["win_rate"]
    brief["per_component"] = {k: round(v["mean"], 4) for k, v in out["model"].items() if k.startswith("oracle/")}
    brief["mode_rates"] = {k[5:]: round(v["mean"], 4) for k, v in out["model"].items() if k.startswith("mode/")}
    print_json(brief)
    return 0


def cmd_config(args) -> int:
    if args.explain is not None:
        print(explain(args.explain))
        return 0
    print(to_yaml(load_config(args.recipe, args.overrides)), end="")
    return 0


def cmd_report(args) -> int:
    print(write_report(args.run_dir))
    return 0


def add_train_verbs(sub) -> None:
    p = sub.add_parser("train", help="train a policy from a recipe (SFT / DPO / KTO)",
                       description="Train from RECIPE into --out (resumes from its latest checkpoint).")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/shapes/pretrain.yaml")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out has checkpoints")
    add_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample clips from a checkpoint",
                       description="Sample clips (conditions cycle over the world) from --ckpt into --out.")
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or .safetensors")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", help="recipe to take the model/world from (default: the checkpoint's config.yaml)")
    p.add_argument("--num", type=int, help="number of samples (default sample.num_samples)")
    add_overrides(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="oracle scores of a checkpoint (95%% CI), optionally vs a base",
                       description="Oracle-score a checkpoint's samples on fixed seeds; --base adds the paired "
                                   "delta with its 95%% CI and the win rate.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--base", help="a second checkpoint to compare with on the same seeds")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe")
    p.add_argument("--num", type=int, help="samples (default eval.num_samples)")
    add_overrides(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config", help="print a resolved recipe, or explain config keys",
                       description="Print RECIPE resolved with overrides, or --explain PREFIX to list keys with "
                                   "their docs.")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--explain", nargs="?", const="", metavar="PREFIX")
    add_overrides(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("report", help="(re)write RUN_DIR/report.html with plots and sample grids")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
