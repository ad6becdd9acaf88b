"""``vidpo compare``: run several recipes (methods) over several seeds and tabulate their oracle deltas.

For each recipe and seed it runs the whole pipeline (``vidpo.stages.pipeline.run_pipeline``) into
``OUT/<recipe name>/seed<k>`` (resumable: a finished run is read back, not redone), then writes
``OUT/summary.json`` with one row per (method, seed) plus one aggregate row per method, and
``OUT/report.html``. Every row has the oracle delta with its paired 95% CI, the motion component's delta
(DenseDPO's claim: vanilla DPO on motion-biased labels lowers motion while structural / dense keep it),
how many labels the method used, and the run's time.

The aggregate row's interval is over seeds (mean +- t * sd / sqrt(n_seeds)): it is the interval a reader
needs to decide whether a method's gain is reproducible, not only significant for one seed.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from vidpo.config import load_config
from vidpo.evaluation.evaluate import mean_ci
from vidpo.evaluation.report import write_report
from vidpo.stages.common import setup_logging
from vidpo.stages.pipeline import run_pipeline
from vidpo.utils import atomic

log = logging.getLogger("vidpo")


def _labels_used(summary: dict) -> int | None:
    labels = summary.get("labels") or {}
    pairs, segments = labels.get("pairs"), labels.get("segments")
    if pairs is None:
        return None
    return pairs * (segments if summary.get("objective") == "dense_dpo" else 1)


def run_row(name: str, seed: int, summary: dict) -> dict:
    comps = summary.get("components", {})
    return {
        "method": name, "seed": seed, "objective": summary.get("objective"), "pairs_mode": summary.get("generate_mode"),
        "base": round(summary["oracle"]["base"]["mean"], 4), "final": round(summary["oracle"]["final"]["mean"], 4),
        "delta": round(summary["oracle"]["delta"]["mean"], 4),
        "delta_ci95": [round(v, 4) for v in summary["oracle"]["delta"]["ci95"]],
        "motion_delta": round(comps.get("motion", {}).get("delta", float("nan")), 4),
        "consistency_delta": round(comps.get("consistency", {}).get("delta", float("nan")), 4),
        "colour_delta": round(comps.get("colour", {}).get("delta", float("nan")), 4),
        "labels_used": _labels_used(summary), "win_rate": round(summary.get("win_rate", float("nan")), 3),
        "seconds": summary.get("timings", {}).get("total_s"),
    }


def aggregate(name: str, rows: list[dict]) -> dict:
    deltas = torch.tensor([r["delta"] for r in rows], dtype=torch.float64)
    stats = mean_ci(deltas)
    return {"method": name, "seed": "all", "delta": round(stats["mean"], 4),
            "delta_ci95": [round(v, 4) for v in stats["ci95"]],
            "motion_delta": round(sum(r["motion_delta"] for r in rows) / len(rows), 4),
            "consistency_delta": round(sum(r["consistency_delta"] for r in rows) / len(rows), 4),
            "colour_delta": round(sum(r["colour_delta"] for r in rows) / len(rows), 4),
            "labels_used": rows[0]["labels_used"], "seeds_with_ci_above_0": sum(r["delta_ci95"][0] > 0 for r in rows),
            "n_seeds": len(rows)}


def compare(recipes: Sequence[str], out_dir: str | Path, *, seeds: Sequence[int] = (0,), overrides: Sequence[str] = (),
            names: Sequence[str] | None = None) -> dict:
    out_dir = Path(out_dir)
    setup_logging(out_dir)
    names = list(names) if names else [Path(r).stem for r in recipes]
    if len(set(names)) != len(names):
        raise ValueError(f"recipe names must be distinct, got {names}")
    rows, aggregates = [], []
    for name, recipe in zip(names, recipes):
        method_rows = []
        for seed in seeds:
            run_dir = out_dir / name / f"seed{seed}"
            done = run_dir / "summary.json"
            if done.exists():
                summary = json.loads(done.read_text())
            else:
                cfg = load_config(recipe, [*overrides, f"seed={seed}"])
                summary = run_pipeline(cfg, run_dir)
            row = run_row(name, seed, summary)
            log.info("compare: %s seed %d: delta %.4f [%.4f, %.4f], motion %+.4f", name, seed, row["delta"],
                     *row["delta_ci95"], row["motion_delta"])
            method_rows.append(row)
        rows += method_rows
        aggregates.append(aggregate(name, method_rows))
    result = {"methods": aggregates, "runs": rows, "seeds": list(seeds), "recipes": dict(zip(names, map(str, recipes)))}
    atomic.write_json(out_dir / "summary.json", result)
    atomic.write_text(out_dir / "comparison.md", markdown_table(aggregates, rows))
    try:
        write_report(out_dir)
    except FileNotFoundError:
        pass  # the report needs a metrics.jsonl; a comparison has its summary and markdown table
    return result


def markdown_table(aggregates: list[dict], rows: list[dict]) -> str:
    lines = ["| method | seed | oracle delta | 95% CI | motion delta | consistency delta | colour delta | labels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows + aggregates:
        lo, hi = r["delta_ci95"]
        lines.append(f"| {r['method']} | {r['seed']} | {r['delta']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                     f"{r['motion_delta']:+.4f} | {r['consistency_delta']:+.4f} | {r['colour_delta']:+.4f} | "
                     f"{r['labels_used']} |")
    return "\n".join(lines) + "\n"


