"""``vidpo iterate`` (IPO / Dual-IPO rounds, one run or recipes x seeds) and ``vidpo critic train | eval``."""
from __future__ import annotations

import json
import os

from vidpo.cli.common import add_overrides, add_overwrite, print_json
from vidpo.config import ConfigError, load_config
from vidpo.ipo.critic import (
    critic_eval_job,
    critic_train_job,
)
from vidpo.ipo.rounds import iterate
from vidpo.ipo.sweep import compare_iterations


def add_critic_verbs(sub) -> None:
    p = sub.add_parser("critic", help="train / evaluate the IPO critic on labelled preference pairs",
                       description="The IPO critic: a segment-level video scorer trained with a Bradley-Terry "
                                   "loss that handles ties.")
    verbs = p.add_subparsers(dest="critic_verb", metavar="SUBVERB")
    verbs.required = True
    t = verbs.add_parser("train", help="train a critic on labelled pairs directories; report held-out accuracy")
    t.add_argument("recipe", help="recipe giving the world (or the prompt file) and the critic section "
                                  "(critic.backbone: the VLM critic)")
    t.add_argument("--pairs", nargs="+", required=True, help="labelled pairs directories (manifest.jsonl)")
    t.add_argument("--heldout", nargs="+", help="labelled pairs to report accuracy on (default: hold out "
                                                "critic.heldout_fraction of --pairs)")
    t.add_argument("--out", required=True, help="critic directory (critic.safetensors, critic.json)")
    add_overrides(t)
    t.set_defaults(func=cmd_critic_train)
    e = verbs.add_parser("eval", help="accuracy of a critic against the labels of pairs directories")
    e.add_argument("recipe")
    e.add_argument("--critic", required=True, help="critic directory or critic.safetensors")
    e.add_argument("--pairs", nargs="+", required=True)
    add_overrides(e)
    e.set_defaults(func=cmd_critic_eval)


# ----- CLI --------------------------------------------------------------------------------------------------
def cmd_iterate(args) -> int:
    if len(args.recipes) == 1 and not args.seeds:
        summary = iterate(load_config(args.recipes[0], args.overrides), args.out, reuse=args.reuse,
                          overwrite=args.overwrite)
        if "base" in summary:   # the shapes world: the oracle measures
            keys = ("round", "oracle", "delta_vs_base", "critic_accuracy", "critic_accuracy_before_refine",
                    "pseudo_labels_kept")
            brief = {"base": summary["base"]["oracle"]}
        else:                   # a prompt file: the judged evaluation against the initial policy
            keys = ("round", "judged", "pseudo_labels_kept")
            brief = {"seed_labels": {k: summary["seed_labels"][k] for k in ("pairs", "labeler")}}
        brief.update(rounds=[{k: row.get(k) for k in keys} for row in summary["rounds"]], timings=summary["timings"])
        if "judged" in keys:
            for row in brief["rounds"]:
                row["judged"] = {k: (row["judged"] or {}).get(k) for k in ("win_rate", "wins", "ties", "losses")}
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("vidpo iterate under torchrun runs one recipe and seed over all its ranks; run a "
                          "comparison of recipes or --seeds without torchrun (it spreads its runs over the GPUs)")
    else:
        brief = compare_iterations(args.recipes, args.seeds or [0], args.out, args.overrides, jobs=args.jobs,
                                   gpus=args.gpus)
    if os.environ.get("RANK", "0") == "0":   # under torchrun, rank 0 reports
        print(json.dumps(brief, indent=2))
    return 0


def add_iterate_verb(sub) -> None:
    p = sub.add_parser("iterate", help="rounds of IPO: generate -> critic labels -> train -> eval (+ Dual-IPO)",
                       description="R rounds of iterative preference optimisation with a critic into --out "
                                   "(resumable: rerun the same command after a kill). With several recipes or "
                                   "--seeds, each run goes to OUT/<recipe>/seed<k> and OUT holds the comparison.")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", nargs="+", type=int, help="run each recipe with these seeds")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="with several recipes or --seeds: run up to N runs at once, one process each at "
                        "train.num_threads (e.g. 2 runs at 1 thread on a 2-core CPU)")
    p.add_argument("--gpus", metavar="IDS", default=None,
                   help="with --jobs: comma-separated CUDA devices to spread the runs over, each run on the least "
                        "busy one (default: the visible devices, if any; 'none': leave CUDA_VISIBLE_DEVICES as it is)")
    add_overwrite(p, "a run folder that holds a run of another config (a single run)")
    p.add_argument("--reuse", metavar="RUN_DIR", help="link the seed labels, critic 0 (unless critic.* training "
                   "settings differ), base evaluation and round-1 pairs (all of round 1 when only round>=2 settings "
                   "differ) from another run of the same seed")
    add_overrides(p)
    p.set_defaults(func=cmd_iterate)


def cmd_critic_train(args) -> int:
    print_json(critic_train_job(load_config(args.recipe, args.overrides), args.out, args.pairs, args.heldout or ()))
    return 0


def cmd_critic_eval(args) -> int:
    print_json(critic_eval_job(load_config(args.recipe, args.overrides), args.critic, args.pairs))
    return 0
