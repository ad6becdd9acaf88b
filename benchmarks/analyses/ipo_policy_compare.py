"""Two sets of ``vidpo iterate`` runs, round by round: is one recipe's policy better than the other's?

For each round r and each seed, the oracle scores of the two runs' round-r policies on the same 256 evaluation
seeds (``round_r/eval.safetensors``) are compared pairwise (``vidpo.evaluation.evaluate.paired_delta``); the mean of those
per-seed differences gets a t-interval over the seeds (the seeds are the independent units). Also each run's
round R over round 1. Runs sharing round 1 (``--reuse``) differ from round 2 on only.

Measured (benchmarks/reports/2026-11-22_ipo_cpu.md, sections 0c-0d): ``ipo_dual_pool.yaml`` (runs/pool60) over
``ipo.yaml`` (runs/half7), round 3 +0.0039 [+0.0018, +0.0060] on 7 seeds; with ``iterate.vote_keep_fraction=0.5``
(runs/pool60_k50) +0.0026 [-0.0015, +0.0067].

    python benchmarks/analyses/ipo_policy_compare.py runs/pool60/ipo runs/half7/ipo --seeds 0 1 2 3 4 5 6 \
        --json benchmarks/results/ipo_policy_compare_20261122.jsonl
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from vidpo.evaluation.evaluate import load_eval_result, mean_ci, paired_delta

# The shared helpers live one folder up (benchmarks/common.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import rounded_ci


def compare(a: Path, b: Path, seeds: list[int]) -> dict:
    """Per round: the per-seed paired oracle differences a - b, their mean with a t-interval over the seeds, and
    how many seeds are higher; and a's last round over its round 1."""
    rounds = sorted(int(p.name.split("_")[1]) for p in (a / f"seed{seeds[0]}").glob("round_*")
                    if (p / "eval.safetensors").exists())
    out: dict = {"a": str(a), "b": str(b), "seeds": seeds, "rounds": {}}
    for r in rounds:
        per_seed = [paired_delta(load_eval_result(a / f"seed{s}" / f"round_{r}" / "eval.safetensors"),
                                 load_eval_result(b / f"seed{s}" / f"round_{r}" / "eval.safetensors"))["oracle"]["mean"]
                    for s in seeds]
        out["rounds"][str(r)] = {"per_seed": [round(v, 4) for v in per_seed],
                                 "mean": rounded_ci(mean_ci(torch.tensor(per_seed))),
                                 "higher": sum(v > 0 for v in per_seed)}
    last = rounds[-1]
    over_first = [paired_delta(load_eval_result(a / f"seed{s}" / f"round_{last}" / "eval.safetensors"),
                               load_eval_result(a / f"seed{s}" / "round_1" / "eval.safetensors"))["oracle"]["mean"]
                  for s in seeds]
    out[f"a_round_{last}_over_round_1"] = {"per_seed": [round(v, 4) for v in over_first],
                                           "mean": rounded_ci(mean_ci(torch.tensor(over_first)))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="directory of run A's seeds (A/seed<k>/round_r/eval.safetensors)")
    p.add_argument("b", type=Path, help="directory of run B's seeds, the baseline")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--json", type=Path, help="append the comparison as one JSON line")
    args = p.parse_args(argv)
    result = compare(args.a, args.b, args.seeds)
    for r, row in result["rounds"].items():
        print(f"round {r}: {args.a} - {args.b} = {row['mean'][0]:+.4f} [{row['mean'][1]:+.4f}, {row['mean'][2]:+.4f}]"
              f" ({row['higher']} of {len(args.seeds)} seeds higher; per seed {row['per_seed']})")
    key = next(k for k in result if k.startswith("a_round_"))
    print(f"{args.a}: {key.replace('_', ' ')[2:]} = {result[key]['mean']}")
    if args.json:
        result.update({"command": " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv or sys.argv[1:])]),
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
