"""Does the critic still rank the *policies* of an IPO run as the oracle does? (reward over-optimisation check)

IPO trains each round on the critic's labels, so the policy moves towards whatever the critic rewards. For a
finished ``vidpo iterate`` run this samples every saved policy (the initial one, and each round's kept
checkpoints, e.g. ``r2@80`` and ``r2@120``) on the same noise seeds, scores the samples with critic 0 and with
the oracle, and prints for each policy the mean critic score and the mean oracle score, then for each pair of
policies the paired difference under both (with the critic's 95% CI over the samples).

A critic that is being over-optimised keeps rising from round to round while the oracle stalls or falls: on the
shapes world (``ipo.yaml``, held-out seeds 3 and 4) critic 0's mean score of the policy goes 0.50 -> 2.02 ->
2.82 -> 3.60 (seed 3) while the oracle goes 0.378 -> 0.393 -> 0.398 -> 0.382, and the critic prefers round 3 to
round 2 by 0.79 [0.66, 0.91] where the oracle prefers round 2 by 0.016 (benchmarks/reports/2026-11-22_ipo_cpu.md,
section 1b).

The samples use their own noise seeds (``eval.seed_offset`` = ``--offset``), not the run's evaluation seeds.
The oracle scores are measurements only.

    python benchmarks/analyses/ipo_policy_drift.py runs/final2_ipo5/ipo/seed3 --json benchmarks/results/ipo_policy_drift.jsonl
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from vidpo.config import load_config, resolve_path
from vidpo.data.oracle import ShapesOracle
from vidpo.evaluation.evaluate import evaluate_model, mean_ci
from vidpo.labeling.critic import score_videos
from vidpo.models.critic import load_critic
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_policy, build_world, run_segment_ids, set_threads


def policies(run: Path, init_from: str) -> list[tuple[str, Path]]:
    """(name, weights) of the initial policy and of every kept checkpoint of every round, in training order."""
    found = [("base", ckpt.find_weights(resolve_path(init_from)))]
    r = 1
    while (run / f"round_{r}" / "train" / "checkpoints").exists():
        steps = sorted((run / f"round_{r}" / "train" / "checkpoints").glob("step_*"))
        found += [(f"r{r}@{int(s.name[len('step_'):])}", s) for s in steps]
        r += 1
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished vidpo iterate run (one seed's directory)")
    p.add_argument("--offset", type=int, default=100000, help="first noise seed of the samples")
    p.add_argument("--samples", type=int, default=None, help="samples per policy (default: the run's eval.num_samples)")
    p.add_argument("--json", type=Path, help="append the result as one JSON line")
    p.add_argument("--plot", type=Path, help="PNG: mean oracle and mean critic score per policy")
    args = p.parse_args(argv)
    cfg = load_config(args.run / "config.yaml")
    cfg.train.num_threads = 1
    cfg.eval.seed_offset = args.offset
    set_threads(cfg)
    world = build_world(cfg)
    oracle, segment_ids = ShapesOracle(world), run_segment_ids(cfg)
    critic = load_critic(args.run / "critic_0" / "critic.safetensors")

    scores = {}
    for name, path in policies(args.run, cfg.train.init_from):
        model = build_policy(cfg, world, "cpu")
        ckpt.load_weights(model, path)
        result = evaluate_model(model.eval(), cfg, world, oracle, num_samples=args.samples)
        scores[name] = {"oracle": result.total.double(),
                        "critic": score_videos(critic, result.samples, result.cond_ids, world, segment_ids).video.double()}
        print(f"{name:8s} oracle {float(scores[name]['oracle'].mean()):.4f} critic {float(scores[name]['critic'].mean()):+.3f}",
              flush=True)
    names = list(scores)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            critic_d = mean_ci(scores[b]["critic"] - scores[a]["critic"])
            oracle_d = mean_ci(scores[b]["oracle"] - scores[a]["oracle"])
            pairs.append({"from": a, "to": b, "oracle_delta": round(oracle_d["mean"], 5),
                          "oracle_ci95": [round(v, 5) for v in oracle_d["ci95"]],
                          "critic_delta": round(critic_d["mean"], 4), "critic_ci95": [round(v, 4) for v in critic_d["ci95"]],
                          "agree": (oracle_d["mean"] > 0) == (critic_d["mean"] > 0)})
            print(f"{a:8s} -> {b:8s} oracle {oracle_d['mean']:+.4f} critic {critic_d['mean']:+.3f} "
                  f"[{critic_d['ci95'][0]:+.3f}, {critic_d['ci95'][1]:+.3f}]", flush=True)
    result = {"run": str(args.run), "samples": int(next(iter(scores.values()))["oracle"].numel()),
              "policies": {k: {"oracle": round(float(v["oracle"].mean()), 5), "critic": round(float(v["critic"].mean()), 4)}
                           for k, v in scores.items()},
              "pairs": pairs, "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
              "torch": torch.__version__, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with args.json.open("a") as f:
            f.write(json.dumps(result) + "\n")
    if args.plot:
        plot(result["policies"], scores, args.plot, title=str(args.run))
    return 0


def plot(means: dict, scores: dict, path: Path, *, title: str) -> None:
    """Oracle (left axis, with 95% CI) and critic (right axis) mean score of each policy, in training order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(means)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ci = [mean_ci(scores[n]["oracle"])["ci95"] for n in names]
    ax.errorbar(x, [means[n]["oracle"] for n in names], yerr=[[means[n]["oracle"] - c[0] for n, c in zip(names, ci)],
                [c[1] - means[n]["oracle"] for n, c in zip(names, ci)]], color="tab:blue", marker="o", capsize=3)
    ax.set_ylabel("oracle (mean, 95% CI)", color="tab:blue")
    ax.set_xticks(list(x), names)
    twin = ax.twinx()
    twin.plot(list(x), [means[n]["critic"] for n in names], color="tab:red", marker="s")
    twin.set_ylabel("critic 0 score (mean)", color="tab:red")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
