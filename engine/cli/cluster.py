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
from vidpo.cluster.launch import TEMPLATES, build_launch
from vidpo.cluster.scale import TEXT_TOKENS, estimate, format_report
from vidpo.config import ConfigError, load_config
from vidpo.utils import atomic


def cmd_launch(args) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if args.nodes:
        cfg.cluster.nodes = args.nodes
    if args.gpus_per_node:
        cfg.cluster.gpus_per_node = args.gpus_per_node
    out = args.out or str(Path("runs") / Path(args.recipe).stem)
    plan = build_launch(cfg, args.recipe, args.overrides, out=out, launcher=args.launcher)
    if args.dry_run:
        print(plan.script, end="")
        return 0
    if plan.launcher == "torchrun" and plan.nodes == 1:
        if shutil.which("torchrun") is None:
            raise ConfigError("torchrun is not on PATH (it comes with torch)")
        return subprocess.call(plan.torchrun)
    atomic.write_text(plan.script_path, plan.script)
    if plan.launcher == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError(f"sbatch is not on PATH: the script is in {plan.script_path}; submit it from a "
                              "SLURM login node")
        return subprocess.call(["sbatch", str(plan.script_path)])
    print(f"wrote {plan.script_path}: run it on each of the {plan.nodes} nodes")
    return 0


def add_launch_verb(sub) -> None:
    p = sub.add_parser("launch", help="start a recipe's distributed training (torchrun or a SLURM sbatch script)",
                       description="Build the torchrun command / sbatch script from the recipe's parallel and "
                                   "cluster sections; --dry-run prints it.")
    p.add_argument("recipe")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--launcher", choices=sorted(TEMPLATES), help="override cluster.launcher")
    p.add_argument("--nodes", type=int, help="override cluster.nodes")
    p.add_argument("--gpus-per-node", type=int, help="override cluster.gpus_per_node")
    p.add_argument("--dry-run", action="store_true", help="print the command / script, start nothing")
    add_overrides(p)
    p.set_defaults(func=cmd_launch)


def cmd_scale(args) -> int:
    cfg = load_config(args.recipe, args.overrides, world_size=args.world)
    world = args.world or cfg.cluster.nodes * cfg.cluster.gpus_per_node
    est = estimate(cfg, world, cond_len=args.cond_len)
    print(json.dumps(est.as_dict(), indent=2) if args.json else format_report(est))
    return 0 if est.fits else 1


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("--world", type=int, help="world size (default cluster.nodes * cluster.gpus_per_node)")
    p.add_argument("--cond-len", type=int, help=f"condition tokens (default {TEXT_TOKENS} for text presets)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown tables")


def add_scale_verb(sub) -> None:
    p = sub.add_parser("scale", help="per-GPU memory and communication of a recipe's layout, on paper",
                       description="Estimate memory per GPU and communication volume / time per step for RECIPE "
                                   "at --world ranks (exit status 1 when it does not fit).")
    add_scale_arguments(p)
    add_overrides(p)
    p.set_defaults(func=cmd_scale)

