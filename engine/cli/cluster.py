"""``vidpo launch`` (start a recipe's distributed training with torchrun or SLURM) and ``vidpo scale``
(per-GPU memory and communication of a layout, on paper).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from vidpo.cli.common import add_overrides
from vidpo.cluster.arch import RELEASES, ArchitectureError
from vidpo.cluster.job import VERBS, job_steps
from vidpo.cluster.launch import TEMPLATES, build_launch
from vidpo.cluster.preflight import preflight
from vidpo.cluster.scale import TEXT_TOKENS, default_world, estimate, format_report
from vidpo.config import ConfigError, load_config
from vidpo.config.choices import LaunchMode
from vidpo.config.fields import values_of


def _load_for_check(args):
    """The recipe and the loader's problems. A recipe that does not load is loaded again on one process
    (parallel.tp = parallel.cp = 1, one node), so that its paths and endpoint are still checked in the same run
    (its layout problems are among the loader's); None when even that fails."""
    try:
        return load_config(args.recipe, args.overrides), []
    except ConfigError as exc:
        problems = exc.problems
    one_process = ["parallel.tp=1", "parallel.cp=1", "parallel.dp_shard=-1", "cluster.nodes=1"]
    try:
        return load_config(args.recipe, list(args.overrides) + one_process, world_size=1), problems
    except ConfigError:
        return None, problems


def cmd_launch(args) -> int:
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    if args.check:
        cfg, recipe_problems = _load_for_check(args)
    else:
        cfg, recipe_problems = load_config(args.recipe, args.overrides), []
    if cfg is not None:
        if args.nodes:
            cfg.cluster.nodes = args.nodes
        if args.gpus_per_node:
            cfg.cluster.gpus_per_node = args.gpus_per_node
    if args.check:
        if cfg is None:
            problems = list(recipe_problems) + ["(paths, model directory and endpoint are checked once the recipe "
                                                "loads)"]
        else:
            problems = preflight(cfg, job_steps(cfg, args.recipe, args.overrides, out, args.launch_verb), out,
                                 recipe_problems=recipe_problems, check_layout=not recipe_problems)
        if problems:
            print(f"vidpo launch --check {args.recipe}: {len(problems)} problem(s)")
            for line in problems:
                print(f"  {line}")
            return 1
        print(f"vidpo launch --check {args.recipe}: ok")
        return 0
    plan = build_launch(cfg, args.recipe, args.overrides, out=out, launcher=args.launcher, verb=args.launch_verb,
                        mode=args.mode)
    if not args.dry_run and not args.no_check:
        problems = preflight(cfg, plan.steps, out)
        if problems:
            raise ConfigError(f"{len(problems)} problem(s) found before launching (vidpo launch --check; "
                              "--no-check skips it):\n" + "\n".join("  " + p for p in problems))
    paths = plan.write()
    if args.dry_run:
        for path in paths:
            print(f"# ---- {path}")
            print(plan.scripts[path], end="")
        return 0
    if plan.launcher == "torchrun":
        if plan.nodes > 1:
            print(f"wrote {plan.entry}: run it on each of the {plan.nodes} nodes with NODE_RANK=0..{plan.nodes - 1}")
            return 0
        return subprocess.call(["bash", str(plan.entry)])
    if shutil.which("sbatch") is None:
        raise ConfigError(f"sbatch is not on PATH: the script is in {plan.entry}; submit it from a SLURM login node"
                          f" ({'bash' if plan.mode == 'chain' else 'sbatch'} {plan.entry})")
    return subprocess.call(["bash" if plan.mode == "chain" else "sbatch", str(plan.entry)])


def add_launch_verb(sub) -> None:
    p = sub.add_parser("launch", help="run a recipe's whole job (or one verb) with torchrun or SLURM",
                       description="Write the job script(s) of RECIPE (the stages cache -> generate -> label -> "
                                   "train -> eval, or --verb) from its parallel and cluster sections into "
                                   "OUT/launch/ and submit / start them; --dry-run writes and prints them, "
                                   "--check only looks for what would stop the job (exit status 1).")
    p.add_argument("recipe")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--verb", dest="launch_verb", default="job", choices=VERBS,
                   help="what to launch: the whole job (default), one of its stages, `run` or `iterate`")
    p.add_argument("--launcher", choices=sorted(TEMPLATES), help="override cluster.launcher")
    p.add_argument("--mode", choices=values_of(LaunchMode), help="override cluster.mode (single | chain)")
    p.add_argument("--nodes", type=int, help="override cluster.nodes")
    p.add_argument("--gpus-per-node", type=int, help="override cluster.gpus_per_node")
    p.add_argument("--dry-run", action="store_true", help="write and print the script(s), start nothing")
    p.add_argument("--check", action="store_true",
                   help="preflight only: paths, model directory, VLM endpoint, layout; every problem at once")
    p.add_argument("--no-check", action="store_true", help="launch without the preflight check")
    add_overrides(p)
    p.set_defaults(func=cmd_launch)


def cmd_scale(args) -> int:
    cfg = load_config(args.recipe, args.overrides, world_size=args.world)
    world, why = (args.world, "--world") if args.world else default_world(cfg)
    try:
        est = estimate(cfg, world, cond_len=args.cond_len, arch=args.arch)
    except ArchitectureError as exc:
        raise ConfigError(f"{args.recipe}: {exc}") from None
    est.assumptions.insert(0, f"world {world}: {why}")
    print(json.dumps(est.as_dict(), indent=2) if args.json else format_report(est))
    return 0 if est.fits else 1


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("--world", type=int, help="world size (default cluster.nodes * cluster.gpus_per_node)")
    p.add_argument("--cond-len", type=int, help=f"condition tokens (default: the release's text length; {TEXT_TOKENS} "
                                                "for the DiT's text presets)")
    p.add_argument("--arch", choices=sorted(RELEASES),
                   help="a diffusers release's published architecture, for a model.path not on this machine "
                        "(default: read model.path, else the release its name recognises)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown tables")


def add_scale_verb(sub) -> None:
    p = sub.add_parser("scale", help="per-GPU memory and communication of a recipe's layout, on paper",
                       description="Estimate memory per GPU and communication volume / time per step for RECIPE "
                                   "at --world ranks (exit status 1 when it does not fit).")
    add_scale_arguments(p)
    add_overrides(p)
    p.set_defaults(func=cmd_scale)

