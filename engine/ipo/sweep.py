"""Several ``vidpo iterate`` recipes x seeds, and their aggregate per round.

``compare_iterations`` runs every recipe for every seed into ``OUT/<recipe>/seed<k>`` (later recipes reuse
what is identical by construction with the first one's run of the same seed, ``vidpo.ipo.reuse``), in up to
``jobs`` processes at once spread over the least busy GPUs, then aggregates each round over seeds with a
Student-t interval and writes ``OUT/summary.json`` and the report.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo.config import ConfigError, RunConfig, load_config
from vidpo.evaluation.evaluate import mean_ci
from vidpo.ipo.report import write_iterate_report
from vidpo.ipo.reuse import CRITIC_KEYS, ROUND_KEYS, ROUND_PAIR_KEYS, differing_keys, same_weights
from vidpo.ipo.rounds import brief_ci, iterate
from vidpo.utils import atomic


def compare_iterations(recipes: Sequence[str], seeds: Sequence[int], out_dir: str | Path, overrides=(),
                       jobs: int = 1, gpus: Optional[str] = None) -> dict:
    """Run every recipe for every seed into ``out/<recipe>/seed<k>`` and aggregate per round over seeds.

    ``jobs`` > 1 runs up to that many runs at once, each in its own process (``_run_in_processes``), spread
    over the CUDA devices ``gpus`` (``gpu_list``); the aggregation then reads the finished runs back."""
    out = Path(out_dir)
    methods: dict[str, list[dict]] = {}
    first = Path(recipes[0]).stem
    for recipe in recipes:
        if load_config(recipe, list(overrides)).prompts.path:
            raise ConfigError(f"{recipe}: comparing recipes x seeds aggregates the shapes world's oracle scores; run "
                              "a prompt-file recipe on its own (vidpo iterate RECIPE --out DIR)")
    if jobs > 1:
        _run_in_processes(recipes, seeds, out, list(overrides), jobs, gpu_list(gpus))
    for seed in seeds:
        for recipe in recipes:
            name = Path(recipe).stem
            cfg = load_config(recipe, list(overrides) + [f"seed={seed}"])
            run_dir = out / name / f"seed{seed}"
            # Later recipes share what is identical by construction with the first one's run of this seed.
            source = out / first / f"seed{seed}" if name != first else None
            try:
                reuse = source if source is not None and can_reuse(cfg, source) else None
                methods.setdefault(name, []).append(iterate(cfg, run_dir, reuse=reuse))
            finally:
                _close_run_log(run_dir)
    table = {name: aggregate_runs(runs) for name, runs in methods.items()}
    summary = {"seeds": list(seeds), "methods": table}
    atomic.write_json(out / "summary.json", summary)
    rows = []
    for k, (name, agg) in enumerate(table.items()):
        for row in agg["rounds"]:
            rows.append({"step": row["round"], "phase": name, "oracle/total": row["oracle"]["mean"],
                         "critic_accuracy": row["critic_accuracy"] or float("nan")})
    atomic.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    base = next(iter(table.values()))["base"]["oracle"]
    write_iterate_report(out, summary, {n: a["rounds"] for n, a in table.items()}, base)
    return summary


def gpu_list(spec: Optional[str]) -> list[str]:
    """The CUDA devices ``--jobs`` spreads its runs over: ``spec`` as a comma-separated list, ``'none'`` for none,
    or (None) the visible ones: ``CUDA_VISIBLE_DEVICES`` when set, else every device torch counts."""
    if spec is not None:
        if spec.strip().lower() == "none":
            return []
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        if not devices:
            raise ConfigError(f"vidpo iterate --gpus: expected device ids like 0,1 or 'none', got {spec!r}")
        return devices
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def least_busy(devices: list[str], in_use: list[str]) -> Optional[str]:
    """The device of ``devices`` that the fewest running runs (``in_use``: one entry per run) hold; the first on
    a tie; None without devices. With more runs than devices, runs share devices evenly."""
    if not devices:
        return None
    return min(devices, key=lambda d: (in_use.count(d), devices.index(d)))


def _run_in_processes(recipes: Sequence[str], seeds: Sequence[int], out: Path, overrides: list, jobs: int,
                      gpus: Sequence[str] = ()) -> None:
    """Every (recipe, seed) run as its own ``vidpo iterate`` process, at most ``jobs`` at a time.

    Why processes: a run is one long chain of small CPU ops, so on a few cores several runs side by side (each
    at ``train.num_threads``) use the machine far better than one run with more threads. A later recipe's run of
    a seed starts only once the first recipe's run of that seed has finished, so it can reuse its stages as
    the serial comparison does. With ``gpus``, each process sees one of them (``CUDA_VISIBLE_DEVICES``), the one
    the fewest running runs hold. Each process writes its output to ``out/<recipe>/seed<k>.log``. A failed run
    stops new starts; the running ones finish (every run is resumable) and the error names the failed runs' logs."""
    if jobs < 1:
        raise ConfigError(f"vidpo iterate --jobs must be >= 1, got {jobs}")
    pending = [(r, s) for r in recipes[:1] for s in seeds] + [(r, s) for r in recipes[1:] for s in seeds]
    running: dict = {}
    failed: list[str] = []
    try:
        _schedule(recipes, out, overrides, jobs, pending, running, failed, list(gpus))
    finally:   # an interrupted comparison stops its runs too (each resumes where it stopped)
        for proc, _, handle, _ in running.values():
            proc.terminate()
            proc.wait()
            handle.close()
    if failed:
        raise RuntimeError("vidpo iterate --jobs: run(s) failed: " + "; ".join(failed)
                           + ". Fix the cause and rerun the same command: finished rounds are kept.")


def _schedule(recipes, out: Path, overrides: list, jobs: int, pending: list, running: dict, failed: list,
              gpus: list[str]) -> None:
    """The loop of ``_run_in_processes``: start what may start, collect what finished, until nothing is left.

    ``running`` ((recipe, seed) -> (process, log path, log file, device or None)) and ``failed`` are the
    caller's, so that it can stop what is still running if this is interrupted."""

    first = Path(recipes[0]).stem
    done: set = set()
    while pending or running:
        for key, (proc, log_path, handle, _) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            del running[key]
            if proc.returncode == 0:
                done.add(key)
            else:
                failed.append(f"{Path(key[0]).stem} seed {key[1]} (exit {proc.returncode}, {log_path})")
        if failed:
            pending = []
        for recipe, seed in list(pending):
            if len(running) >= jobs:
                break
            name = Path(recipe).stem
            if name != first and (recipes[0], seed) not in done:
                continue   # waits for the first recipe's run of this seed (the stages it may share)
            pending.remove((recipe, seed))
            run_dir = out / name / f"seed{seed}"
            command = [sys.executable, "-m", "vidpo", "iterate", str(recipe), "--out", str(run_dir)]
            for item in overrides + [f"seed={seed}"]:
                command += ["--set", item]
            cfg = load_config(recipe, overrides + [f"seed={seed}"])
            source = out / first / f"seed{seed}"
            if name != first and can_reuse(cfg, source):
                command += ["--reuse", str(source)]
            log_path = out / name / f"seed{seed}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            threads = cfg.train.num_threads
            if threads > 0:   # OpenMP's own pool too, not only torch's intra-op threads: N runs share the cores
                env["OMP_NUM_THREADS"] = str(threads)
            device = least_busy(gpus, [entry[3] for entry in running.values()])
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            handle = open(log_path, "ab")
            running[(recipe, seed)] = (subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env),
                                       log_path, handle, device)
        if running:
            time.sleep(0.5)


def can_reuse(cfg: RunConfig, source: Path) -> bool:
    try:
        other = load_config(source / "config.yaml")
        return same_weights(cfg.train.init_from, other.train.init_from) and all(
            any(fnmatch.fnmatch(k, p) for p in ROUND_KEYS + ROUND_PAIR_KEYS + CRITIC_KEYS)
            for k in differing_keys(cfg, other))
    except (ConfigError, OSError):
        return False


def _close_run_log(run_dir: Path) -> None:
    """Detach the run's vidpo.log handler (``setup_logging`` adds one per run directory), so the next run of
    a comparison does not write into this run's log."""
    root = logging.getLogger("vidpo")
    path = os.path.abspath(run_dir / "vidpo.log")   # what logging.FileHandler keeps as baseFilename
    for handler in [h for h in root.handlers if getattr(h, "baseFilename", None) == path]:
        root.removeHandler(handler)
        handler.close()


def _mean_or_none(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def aggregate_runs(runs: list[dict]) -> dict:
    """Per round: mean over seeds with a 95% Student-t CI over seeds, of the oracle score, the gain over the
    initial policy and over round 1, the critic accuracy (before / after refinement) and the pseudo-labels
    kept."""
    def over_seeds(values):
        values = [v for v in values if v is not None]
        return brief_ci(mean_ci(torch.tensor(values, dtype=torch.float64))) if values else None

    rounds = []
    for i in range(len(runs[0]["rounds"])):
        rows = [run["rounds"][i] for run in runs]
        acc = over_seeds([r.get("critic_accuracy") for r in rows])
        before = over_seeds([r.get("critic_accuracy_before_refine") for r in rows])
        pool = over_seeds([r.get("critic_accuracy_pool") for r in rows])   # None for runs made before it existed
        pool_before = over_seeds([r.get("critic_accuracy_pool_before_refine") for r in rows])
        pool_gain = over_seeds([(r.get("critic_accuracy_pool_gain") or {}).get("mean") for r in rows])
        firsts = [run["rounds"][0] for run in runs]
        rounds.append({"round": rows[0]["round"], "oracle": over_seeds([r["oracle"]["mean"] for r in rows]),
                       "delta_vs_base": over_seeds([r["delta_vs_base"]["mean"] for r in rows]),
                       # round r against round 1 of the same seed (does iterating add to the first round?)
                       "delta_vs_round_1": over_seeds([r["oracle"]["mean"] - f["oracle"]["mean"]
                                                       for r, f in zip(rows, firsts)]) if i else None,
                       "critic_accuracy": acc["mean"] if acc else None,
                       "critic_accuracy_ci95": acc["ci95"] if acc else None,
                       "critic_accuracy_before_refine": before["mean"] if before else None,
                       "critic_accuracy_pool": pool["mean"] if pool else None,
                       "critic_accuracy_pool_before_refine": pool_before["mean"] if pool_before else None,
                       # refinement's gain in pool accuracy, mean over seeds with a t-CI over seeds
                       "critic_accuracy_pool_gain": pool_gain,
                       "pseudo_labels_kept": sum(r["pseudo_labels_kept"] for r in rows) / len(rows),
                       "label_agreement": _mean_or_none([(r.get("labels") or {}).get("oracle_agreement") for r in rows]),
                       "per_seed_oracle": [r["oracle"]["mean"] for r in rows],
                       "per_seed_delta_ci95": [r["delta_vs_base"]["ci95"] for r in rows]})
    base = over_seeds([run["base"]["oracle"]["mean"] for run in runs])
    return {"rounds": rounds, "base": {"oracle": base},
            "minutes_per_run": round(sum(run["timings"]["total_s"] for run in runs) / len(runs) / 60, 1)}
