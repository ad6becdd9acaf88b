"""What the critic's training pairs teach: the oracle's four components of each round's pairs in IPO runs.

For every run directory given (one ``vidpo iterate`` run: ``RUN/round_r/pairs_ranked`` or ``pairs_kto``), and for
each round, this scores the pairs the policy trained on with the oracle (a measurement; the run never trained on
these scores) and reports, per oracle component (colour, shape, motion, consistency) and for the total:

* ``winner``  the mean score of the preferred videos (what the round pushes the policy towards),
* ``gap``     the mean score difference preferred - rejected (what the round pushes it away from),

plus ``agreement`` (how often the oracle prefers the preferred video) and, where the critic's weights are in
the run, the agreement per quartile of the critic's score gap (the narrowest quarter first).

Why: two rounds can train on labels that agree with the oracle equally often and still teach different things.
On the shapes world a critic trained on a few hundred labels ranks mostly by colour (gaps of 0.19-0.35 in colour
and 0.02-0.04 in motion over rounds 1-3), while the oracle's own ranking of the same kind of pool separates the
pairs more by consistency (0.32) and motion (0.05-0.07), where the base's samples are weakest
(benchmarks/reports/2026-11-21_ipo_search_cpu.md).

    python benchmarks/analyses/ipo_pair_components.py runs/final2/ipo/seed0 runs/final2/ipo/seed1 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vidpo.config import load_config
from vidpo.data.oracle import COMPONENTS, ShapesOracle
from vidpo.data.pairs import MANIFEST_FILE
from vidpo.ipo.critic import load_preference_data
from vidpo.labeling.critic import score_videos
from vidpo.models.critic import load_critic
from vidpo.training.modeling import build_world


def _critic_of_round(run: Path, r: int):
    """The critic that labelled round r: the refined one of round r, else the last one before it."""
    for k in range(r, 0, -1):
        if (run / f"round_{k}" / "critic" / "critic.safetensors").exists():
            return load_critic(run / f"round_{k}" / "critic")
    return load_critic(run / "critic_0") if (run / "critic_0").exists() else None


def round_components(run: Path, r: int, world, oracle: ShapesOracle) -> dict | None:
    pairs = next((run / f"round_{r}" / name for name in ("pairs_ranked", "pairs_kto", "pairs")
                  if (run / f"round_{r}" / name / MANIFEST_FILE).exists()), None)
    if pairs is None:
        return None
    data = load_preference_data(pairs)
    keep = data.video_labels != 0
    sign = data.video_labels[keep].double()
    first, second, cond = data.first[keep], data.second[keep], data.cond_ids[keep]
    winner = torch.where(sign.view(-1, 1, 1, 1, 1) > 0, first, second)
    loser = torch.where(sign.view(-1, 1, 1, 1, 1) > 0, second, first)
    with torch.no_grad():
        good, bad = oracle.score(winner, cond), oracle.score(loser, cond)
    row = {"round": r, "pairs_dir": pairs.name, "pairs": int(keep.sum()),
           "agreement": round(float((good.total > bad.total).double().mean()), 4),
           "total": {"winner": round(float(good.total.mean()), 4),
                     "gap": round(float((good.total - bad.total).mean()), 4)}}
    for name in COMPONENTS:
        row[name] = {"winner": round(float(good.components[name].mean()), 4),
                     "gap": round(float((good.components[name] - bad.components[name]).mean()), 4)}
    critic = _critic_of_round(run, r)
    if critic is not None:
        seg = torch.zeros(winner.shape[2], dtype=torch.long)
        margin = (score_videos(critic, winner, cond, world, seg).video
                  - score_videos(critic, loser, cond, world, seg).video).double()
        right = (good.total > bad.total).double()
        order = torch.argsort(margin)
        row["agreement_by_critic_gap_quartile"] = [round(float(right[q].mean()), 4)
                                                   for q in torch.tensor_split(order, 4)]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="vidpo iterate run directories (each holds config.yaml)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    out = []
    for run in args.runs:
        if not (run / "config.yaml").exists():
            print(f"{run}: no config.yaml (not a vidpo iterate run directory)", file=sys.stderr)
            return 2
        cfg = load_config(run / "config.yaml")
        world = build_world(cfg)
        oracle = ShapesOracle(world)
        r = 1
        while (run / f"round_{r}").exists():
            row = round_components(run, r, world, oracle)
            if row is not None:
                row["run"] = str(run)
                out.append(row)
                comps = "  ".join(f"{k} {row[k]['winner']:.3f}/{row[k]['gap']:+.3f}" for k in ("total", *COMPONENTS))
                quart = row.get("agreement_by_critic_gap_quartile")
                print(f"{run} round {r}: {row['pairs']} pairs, agreement {row['agreement']:.3f}"
                      f"{'' if quart is None else ' (by critic-gap quartile ' + ' '.join(f'{q:.2f}' for q in quart) + ')'}"
                      f"\n    winner/gap  {comps}", flush=True)
            r += 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
