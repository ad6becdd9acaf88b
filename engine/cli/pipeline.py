"""``vidpo generate``, ``label``, ``judge-eval``, ``run``, ``cache`` and ``compare``: the preference pipeline's verbs."""
from __future__ import annotations

import json
import os
from pathlib import Path

from vidpo.cli.common import add_overrides, add_overwrite
from vidpo.config import load_config
from vidpo.stages.cache import run_cache
from vidpo.stages.common import setup_logging
from vidpo.stages.compare import compare, markdown_table
from vidpo.stages.label import judge_eval_pairs
from vidpo.stages.pipeline import generate_stage, label_stage, run_pipeline


# ----- CLI verbs --------------------------------------------------------------------------------------
def _load(args):
    return load_config(args.recipe, args.overrides)


def cmd_generate(args) -> int:
    cfg = _load(args)
    out = Path(args.out)
    generate_stage(cfg, out, split=args.split, overwrite=args.overwrite)   # sliced over torchrun's ranks
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(json.loads((out / "generate.json").read_text()), indent=2))
    return 0


def cmd_label(args) -> int:
    cfg = _load(args)
    stats = label_stage(cfg, args.pairs, overwrite=args.overwrite)   # sliced over torchrun's ranks
    if stats is not None:   # rank 0 (or the one process)
        print(json.dumps({k: v for k, v in stats.items() if k != "problems"}, indent=2))
    return 0


def cmd_judge_eval(args) -> int:
    cfg = _load(args)
    report = judge_eval_pairs(cfg, args.pairs, args.human, args.out, from_manifest=args.from_manifest,
                              resamples=args.resamples)
    brief = {"judge": report["judge"], "pairs": report["pairs"],
             **{f"segment_{k}": report["segment"][k] for k in ("agreement", "decisive_agreement", "judge_tie_rate")},
             "video_agreement": report["video"]["agreement"],
             "first_shown_rate": (report["position_bias"] or {}).get("first_shown_rate"),
             "failed_comparisons": report["failed_comparisons"], "report": str(Path(args.out) / "judge_eval.md")}
    print(json.dumps(brief, indent=2))
    return 0


def cmd_run(args) -> int:
    cfg = _load(args)
    setup_logging(Path(args.out))
    summary = run_pipeline(cfg, args.out, resume=not args.no_resume, overwrite=args.overwrite)
    brief = {k: summary[k] for k in ("oracle", "win_rate") if k in summary}
    if "judged" in summary:
        brief["judged"] = {k: summary["judged"][k] for k in ("judge", "win_rate", "wins", "ties", "losses", "failed")}
    print(json.dumps({**brief, "timings": summary["timings"]}, indent=2))
    return 0


def add_pipeline_verbs(sub) -> None:
    p = sub.add_parser("generate", help="sample preference pairs from the policy into shards + pairs.jsonl",
                       description="Sample pairs (generate.mode vanilla | structural) from train.init_from into --out.")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="pairs directory")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    add_overwrite(p, "--out")
    add_overrides(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("label", help="label the pairs of a pairs directory per segment (manifest.jsonl)",
                       description="Label --pairs DIR with label.labeler (oracle | human | vlm | critic).")
    p.add_argument("recipe")
    p.add_argument("--pairs", required=True, help="pairs directory written by `vidpo generate`")
    add_overwrite(p, "the labelling")
    add_overrides(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("judge-eval", help="how far to trust a judge: agreement with human labels, CIs, position bias",
                       description="Label the pairs of --pairs that the human labels file --human labels with the "
                                   "recipe's label.labeler (usually the VLM; its answer cache makes a rerun free), "
                                   "and report agreement at segment and video level, tie rates and the position "
                                   "bias with 95%% bootstrap CIs over pairs: --out/judge_eval.json and "
                                   "judge_eval.md.")
    p.add_argument("recipe")
    p.add_argument("--pairs", required=True, help="pairs directory written by `vidpo generate`")
    p.add_argument("--human", required=True, help="human labels JSONL (the file label.labeler: human reads)")
    p.add_argument("--out", required=True, help="directory for the report and the judge's labels")
    p.add_argument("--from-manifest", action="store_true",
                   help="judge the labels already in PAIRS/manifest.jsonl (and their recorded VLM answers) "
                        "instead of labelling again")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the CIs (default 2000)")
    add_overrides(p)
    p.set_defaults(func=cmd_judge_eval)

    p = sub.add_parser("run", help="generate -> label -> train -> eval -> report from one recipe",
                       description="The main job: one round of preference optimisation into --out (resumable).")
    p.add_argument("recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--no-resume", action="store_true")
    add_overwrite(p, "--out")
    add_overrides(p)
    p.set_defaults(func=cmd_run)


# ----- command line ------------------------------------------------------------------------------------
def cmd_cache(args) -> int:
    cfg = load_config(args.recipe, args.overrides)
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    print(json.dumps(run_cache(cfg, args.out, rank=rank, world_size=world), indent=2, default=str))
    return 0


def add_cache_verb(sub) -> None:
    p = sub.add_parser("cache", help="encode a clip manifest into VAE-latent + text-embedding shards",
                       description="Decode the clips of cache.manifest, encode them with cache.vae and their "
                                   "captions with cache.text_encoder into --out (resumable; under torchrun, or "
                                   "with --rank/--world-size, each process takes its share of the shards). "
                                   "Train on the result with --set data.source=latents data.shards=OUT.")
    p.add_argument("recipe", help="recipe YAML with a cache section")
    p.add_argument("--out", required=True, help="cache directory (index.json + shards/)")
    p.add_argument("--rank", type=int, help="this process's rank (default $RANK or 0)")
    p.add_argument("--world-size", type=int, help="number of processes (default $WORLD_SIZE or 1)")
    add_overrides(p)
    p.set_defaults(func=cmd_cache)


def cmd_compare(args) -> int:
    result = compare(args.recipes, args.out, seeds=args.seeds, overrides=args.overrides)
    print(markdown_table(result["methods"], result["runs"]), end="")
    return 0


def add_compare_verb(sub) -> None:
    p = sub.add_parser("compare", help="run recipes x seeds through `vidpo run` and tabulate oracle deltas",
                       description="Method comparison: each recipe is run for each seed (resumable); writes "
                                   "OUT/summary.json, OUT/comparison.md and OUT/report.html.")
    p.add_argument("recipes", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_overrides(p)
    p.set_defaults(func=cmd_compare)
