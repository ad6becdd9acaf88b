"""Dual-IPO refinement, re-measured: the critic before and after each refinement on a large fresh pool.

``vidpo iterate`` measures the critic on its round's 128 fresh pairs and on every within-prompt pair of those
256 videos (896 pairs). At that size one round's paired before/after difference has a 95% interval of about
+-0.017, wider than the effect a refinement can have on the shapes world (its ceiling with oracle labels of every
pool pair is +0.02-0.03, benchmarks/reports/2026-11-22_ipo_cpu.md, section 0c). Across 7 seeds the rounds'
differences then scatter with a standard deviation of ~0.010, most of it this measurement noise.

This script measures the same thing on more of the same distribution: for each refined round r of a finished
run it samples ``--pairs`` new pairs (default 1024: 2048 videos, 64 per prompt) from the policy that generated
round r (policy r-1), on a generation stream of their own (``("round", r, "fresh")``, disjoint from the round's
training and evaluation streams), and scores every within-prompt pair of them (64 512 pairs at the default) with

* ``before``    the critic that labelled round r-1 (the one the refinement starts from; critic 0 for r = 2),
* ``after``     the refined critic of round r,
* ``critic_0``  the seed-label critic (what labels every round when refinement is off).

No oracle label trains anything here: the oracle only measures. The pairs share videos, so the per-pair normal
interval would be too narrow; a round's interval is a t-interval over its prompts (``vidpo.ipo.critic.pool_gain``:
the mean paired difference of each prompt's pairs, 32 independent clusters). The aggregate is a t-interval over
the rounds' differences (seeds independent). Fresh pairs are written under ``round_r/pairs_fresh_<pairs>`` of
the run and reused on a second call; ``--rows`` re-aggregates the rows of earlier calls.

Measured on ``recipes/shapes/ipo_dual_pool.yaml`` (runs/pool60, seeds 0-6;
benchmarks/reports/2026-11-22_ipo_cpu.md, section 0d): the first refinement (round 2) +0.0065 [+0.0019, +0.0110], higher on all 7 seeds, where the runs' own 896 pairs
gave +0.006 [-0.004, +0.016]; the second (round 3) -0.0009 [-0.0041, +0.0024].

    python benchmarks/analyses/ipo_critic_fresh_pool.py runs/pool60/ipo/seed{0,1,2,3,4,5,6} \
        --json benchmarks/results/ipo_critic_fresh_pool_20261122.jsonl \
        --plot benchmarks/results/ipo_critic_fresh_pool_20261122.png
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from vidpo.evaluation.evaluate import mean_ci
from vidpo.ipo.critic import pool_accuracy, pool_gain
from vidpo.ipo.layout import open_run
from vidpo.ipo.pool import read_pool
from vidpo.ipo.rounds import generate_round_pairs, load_frozen_policy
from vidpo.models.critic import load_critic
from vidpo.training.modeling import set_threads

# The shared helpers live one folder up (benchmarks/common.py), also when this file is imported from a test.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import rounded_ci

CRITICS = ("before", "after", "critic_0")


def round_measure(run, r: int, pairs: int) -> dict:
    """One refined round's critics on ``pairs`` fresh pairs of policy r-1 (module doc)."""
    rd = run.out / f"round_{r}"
    fresh_dir = rd / f"pairs_fresh_{pairs}"
    t = time.time()
    generate_round_pairs(run, fresh_dir, load_frozen_policy(run, run.policy_path(r - 1)), pairs, stream=("round", r, "fresh"))
    generate_s = time.time() - t
    videos, cond = read_pool(fresh_dir)
    with torch.no_grad():
        truth = run.oracle.score(videos, cond).total.double()
    critics = {"before": run.critic_dir(r - 1), "after": rd / "critic", "critic_0": run.out / "critic_0"}
    pools = {name: pool_accuracy(load_critic(directory / "critic.safetensors"), videos, cond, truth, run.world,
                                 run.segment_ids) for name, directory in critics.items()}
    prompts = pools["before"]["prompt"]
    row = {"run": str(run.out), "seed": run.cfg.seed, "round": r, "fresh_pairs": pairs, "videos": len(videos),
           "pool_pairs": pools["before"]["n"], "prompts": int(prompts.unique().numel()),
           "critics": {k: str(v) for k, v in critics.items()}, "generate_s": round(generate_s, 1)}
    for name in CRITICS:
        row[name] = round(pools[name]["accuracy"], 4)
    row["gain"] = rounded_ci(pool_gain(pools["after"], pools["before"]))
    row["gain_vs_critic_0"] = rounded_ci(pool_gain(pools["after"], pools["critic_0"]))
    return row


def refined_rounds(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.parent.name.split("_")[1]) for p in run_dir.glob("round_*/critic/critic.safetensors"))


def summarize(rows: list[dict]) -> dict:
    """Per round and over all rounds: mean accuracies, the mean gain with a t-interval over the rows (one row per
    seed and round: independent runs), and how many rows went up."""
    aggregate = {"aggregate": True, "rounds": len(rows), "runs": sorted({row["run"] for row in rows})}
    for r in sorted({row["round"] for row in rows}) + [None]:
        chosen = [row for row in rows if r is None or row["round"] == r]
        name = "all" if r is None else f"round_{r}"
        aggregate[name] = {
            "n": len(chosen),
            **{key: round(sum(row[key] for row in chosen) / len(chosen), 4) for key in CRITICS},
            "gain": rounded_ci(mean_ci(torch.tensor([row["after"] - row["before"] for row in chosen]))),
            "gain_vs_critic_0": rounded_ci(mean_ci(torch.tensor([row["after"] - row["critic_0"] for row in chosen]))),
            "higher": sum(row["after"] > row["before"] for row in chosen)}
        a = aggregate[name]
        print(f"{name}: before {a['before']:.4f} -> after {a['after']:.4f}, gain {a['gain']} over {len(chosen)} "
              f"rounds ({a['higher']} higher); after vs critic 0 {a['gain_vs_critic_0']}")
    return aggregate


def plot(rows: list[dict], path: Path, *, title: str) -> None:
    """One panel per round: each seed's accuracy of critic 0, before and after the round's refinement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted({row["round"] for row in rows})
    fig, axes = plt.subplots(1, len(rounds), figsize=(3.4 * len(rounds), 3.4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], rounds):
        chosen = [row for row in rows if row["round"] == r]
        for row in chosen:
            ax.plot([0, 1, 2], [row[k] for k in ("critic_0", "before", "after")], marker="o", lw=1, alpha=0.6,
                    color="tab:green" if row["after"] > row["before"] else "tab:red")
        ax.plot([0, 1, 2], [sum(row[k] for row in chosen) / len(chosen) for k in ("critic_0", "before", "after")],
                marker="s", lw=2.5, color="black", label="mean")
        ax.set_xticks([0, 1, 2], ["critic 0", "before", "after"])
        ax.set_title(f"round {r} ({len(chosen)} seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on fresh within-prompt pairs")
    axes[0][0].legend(loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="finished refined vidpo iterate runs (one seed's directory each)")
    p.add_argument("--pairs", type=int, default=1024, help="fresh pairs per round (2x as many videos)")
    p.add_argument("--json", type=Path, help="append one JSON line per round and one for the aggregate")
    p.add_argument("--plot", type=Path, help="PNG: per round, each seed's critic 0 / before / after accuracy")
    p.add_argument("--rows", type=Path, nargs="+", default=[],
                   help="JSONL files of earlier calls: their round rows (not aggregates) join the aggregate")
    args = p.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    meta = {"command": command, "torch": torch.__version__, "python": platform.python_version(),
            "device": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
    rows = [row for path in args.rows for row in map(json.loads, path.read_text().splitlines())
            if not row.get("aggregate")]
    for run_dir in args.runs:
        run = open_run(run_dir)
        run.cfg.train.num_threads = 1
        run.cfg.train.progress = False
        set_threads(run.cfg)
        for r in refined_rounds(run_dir):
            row = round_measure(run, r, args.pairs)
            rows.append(row)
            print(f"{run_dir} round {r}: before {row['before']:.4f} after {row['after']:.4f} "
                  f"(gain {row['gain'][0]:+.4f} [{row['gain'][1]:+.4f}, {row['gain'][2]:+.4f}]), critic 0 "
                  f"{row['critic_0']:.4f}, {row['pool_pairs']} pairs of {row['videos']} videos", flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps({**row, **meta}) + "\n")
    if not rows:
        print("no refined round found (round_r/critic/critic.safetensors) and no --rows", file=sys.stderr)
        return 1
    aggregate = {**summarize(rows), **meta}
    if args.plot:
        plot(rows, args.plot, title=f"Dual-IPO refinement, critic accuracy on {rows[0]['videos']} fresh videos "
                                    "per round (green: after > before)")
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(aggregate) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
