"""``vidpo train``, ``sample``, ``eval``, ``config`` and ``report``."""
from __future__ import annotations

import os
from pathlib import Path

from vidpo.cli.common import add_overrides, add_overwrite, check_weights, config_from_args, print_json
from vidpo.config import explain, load_config, resolve_path, to_yaml
from vidpo.evaluation.report import write_report
from vidpo.stages.generate import model_digest, weights_identity
from vidpo.stages.jobs import eval_job, sample_job, train_job
from vidpo.utils import atomic
from vidpo.utils.lock import LOCK_FILE, output_lock
from vidpo.utils.provenance import digest, record_or_check

SETTINGS_FILE = "train_settings.json"


def training_settings(cfg) -> dict:
    """What a training run's checkpoints depend on beyond its hyper-parameters (which may change on resume)."""
    return {"seed": cfg.seed, "objective": cfg.train.objective, "model": cfg.model.path or cfg.model.preset,
            "model_config": model_digest(cfg), "lora": digest(cfg.lora) if cfg.lora is not None else None,
            "init_from": weights_identity(cfg.train.init_from),
            "data": cfg.data.source, "pref.pairs": str(resolve_path(cfg.pref.pairs)) if cfg.pref.pairs else None}


def cmd_train(args) -> int:
    cfg = config_from_args(args)
    out = Path(args.out or Path("runs") / Path(args.recipe).stem)
    if cfg.train.init_from:
        check_weights(cfg.train.init_from, "train.init_from")
    main_rank = os.environ.get("RANK", "0") == "0"   # under torchrun, rank 0 keeps the records and reports
    with output_lock(out):
        if main_rank:
            if args.overwrite and ((out / SETTINGS_FILE).exists() or (out / "config.yaml").exists()):
                atomic.clear_folder(out, keep=(LOCK_FILE, "vidpo.log"))
            if args.no_resume:
                (out / SETTINGS_FILE).unlink(missing_ok=True)
            record_or_check(out / SETTINGS_FILE, training_settings(cfg), what="its training run was",
                            remedy="use another --out, --no-resume to train from scratch into it, or --overwrite "
                                   "to empty it first")
        result = train_job(cfg, out, resume=not (args.no_resume or args.overwrite))
    if main_rank:
        print_json(result)
    return 0


def cmd_sample(args) -> int:
    check_weights(args.ckpt, "--ckpt")
    cfg = config_from_args(args, args.ckpt)
    print_json(sample_job(cfg, args.ckpt, args.out, num=args.num))
    return 0


def cmd_eval(args) -> int:
    check_weights(args.ckpt, "--ckpt")
    if args.base:
        check_weights(args.base, "--base")
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
    add_overwrite(p, "--out")
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
