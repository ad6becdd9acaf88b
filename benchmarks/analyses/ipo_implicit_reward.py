"""Does the policy know something the critic does not? The implicit reward of Dual-IPO's pseudo-labelled pairs.

Dual-IPO's premise is that the generator and the reward model improve each other: the policy's DPO implicit
reward ``R(y|x)`` (``vidpo.ipo.dual``, the PCE's input) could carry information the critic lacks, e.g. from the
flow-matching regulariser on real clips. This script reads a finished refined run (``iterate.refine: true``),
whose ``round_r/pairs/pseudo.jsonl`` holds every voted pair with both videos' implicit rewards, scores the pairs
with the oracle (a measurement) and reports, per round, how often the oracle agrees with

* ``implicit_all``       the ordering by ``R(first) - R(second)`` over all pairs,
* ``implicit_on_ties``   that ordering where the critic's vote abstained (a tie vote: the pairs the critic
                         cannot label, where an independent signal would help most),
* ``implicit_confident`` that ordering on the half of the pairs with the larger ``|R(first) - R(second)|``,
* ``votes``              the critic's majority vote where it did not abstain,
* ``kept`` / ``dropped`` the vote on the pairs the PCE kept / dropped.

Measured on runs/dual60 (seeds 0-3, rounds 2-3): the implicit reward agrees with the oracle 0.45-0.59 on the
critic's abstentions (chance), 0.67-0.73 overall: it is a copy of what the critic taught the policy, useful to
filter the critic's votes (kept 0.86-0.95 vs dropped 0.62-0.88) but with no independent signal to add.

    python benchmarks/analyses/ipo_implicit_reward.py runs/dual60/ipo/seed0 runs/dual60/ipo/seed1 \
        --json benchmarks/results/ipo_implicit_reward_20261122.jsonl
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from vidpo.config import load_config
from vidpo.data.oracle import ShapesOracle
from vidpo.ipo.dual import PSEUDO_FILE, read_pseudo_rows
from vidpo.ipo.pool import read_pool
from vidpo.training.modeling import build_world, set_threads


def _agreement(predicted: torch.Tensor, truth: torch.Tensor, where: torch.Tensor) -> dict:
    keep = where & (truth != 0) & (predicted != 0)
    n = int(keep.sum())
    return {"n": n, "agreement": round(float((predicted[keep] == truth[keep]).double().mean()), 4) if n else None}


def round_measure(round_dir: Path, oracle: ShapesOracle) -> dict:
    """The agreements of one refined round (module doc)."""
    pairs_dir = round_dir / "pairs"
    rows = read_pseudo_rows(pairs_dir)
    videos, cond = read_pool(pairs_dir)
    if "first_video" in rows[0]:
        first = torch.tensor([r["first_video"] for r in rows])
        second = torch.tensor([r["second_video"] for r in rows])
    else:   # runs before iterate.refine_pairs: one line per generated pair, in the order of the pool's halves
        first, second = torch.arange(len(rows)), torch.arange(len(rows), 2 * len(rows))
    with torch.no_grad():
        scores = oracle.score(videos, cond).total.double()
    truth = torch.sign(scores[first] - scores[second])
    margin = torch.tensor([r["reward_first"] - r["reward_second"] for r in rows], dtype=torch.float64)
    implicit = torch.sign(margin).long()
    vote = torch.tensor([r["video_label"] for r in rows], dtype=torch.long)
    kept = torch.tensor([bool(r["kept"]) for r in rows])
    everything = torch.ones_like(kept)
    confident = margin.abs() > margin.abs().median()
    return {"pairs": len(rows), "implicit_all": _agreement(implicit, truth, everything),
            "implicit_on_ties": _agreement(implicit, truth, vote == 0),
            "implicit_confident": _agreement(implicit, truth, confident),
            "votes": _agreement(vote, truth, everything), "kept": _agreement(vote, truth, kept),
            "dropped": _agreement(vote, truth, ~kept)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished refined vidpo iterate runs (one seed's directory each)")
    p.add_argument("--json", type=Path, help="append one JSON line per round")
    args = p.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    results = []
    for run in args.runs:
        cfg = load_config(run / "config.yaml")
        cfg.train.num_threads = 1
        set_threads(cfg)
        oracle = ShapesOracle(build_world(cfg))
        for round_dir in sorted(run.glob("round_*")):
            if not (round_dir / "pairs" / PSEUDO_FILE).exists():
                continue   # round 1, or a round that did not refine
            row = {"run": str(run), "round": int(round_dir.name.split("_")[1]), **round_measure(round_dir, oracle)}
            print(json.dumps(row), flush=True)
            results.append(dict(row, command=command, torch=torch.__version__,
                                timestamp=time.strftime("%Y-%m-%dT%H:%M:%S")))
    if not results:
        raise SystemExit("no refined round found (round_r/pairs/pseudo.jsonl): was the run made with iterate.refine?")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
