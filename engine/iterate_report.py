"""Reports of ``vidpo iterate`` runs and the comparison of several recipes x seeds.

``write_iterate_report`` turns a run's (or a comparison's) per-round rows into ``metrics.jsonl`` rows, the
rounds figure (oracle score with its CI, critic accuracy before / after refinement, pseudo-labels kept), a
per-round table, and the generic run report (``vidpo.report``). ``compare_iterations`` runs every recipe for
every seed (``vidpo.iterate.iterate``; later recipes reuse what is identical by construction with the first
one's run of the same seed) and aggregates each round over seeds with a Student-t CI.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from vidpo import atomic
from vidpo.config import RunConfig
from vidpo.evaluate import mean_ci
from vidpo.iterate import (_CRITIC_KEYS, _ROUND_KEYS, _ROUND_PAIR_KEYS, _brief, _differing_keys, _same_weights,
                           iterate)
from vidpo.recipe import ConfigError


# ----- report -----------------------------------------------------------------------------------------------
def _round_metrics(summary: dict) -> list[dict]:
    """metrics.jsonl rows (phase 'eval', step = round; round 0 = the initial policy) for the generic report."""
    base = summary["base"]["oracle"]
    rows = [{"step": 0, "phase": "eval", "oracle/total": base["mean"], "oracle/total_ci_lo": base["ci95"][0],
             "oracle/total_ci_hi": base["ci95"][1]}]
    for row in summary["rounds"]:
        o = row["oracle"]
        entry = {"step": row["round"], "phase": "eval", "oracle/total": o["mean"], "oracle/total_ci_lo": o["ci95"][0],
                 "oracle/total_ci_hi": o["ci95"][1], "pseudo_labels_kept": row["pseudo_labels_kept"]}
        entry.update({f"oracle/{k}": v for k, v in row.get("components", {}).items()})
        for key in ("critic_accuracy", "critic_accuracy_before_refine", "critic_accuracy_pool",
                    "critic_accuracy_pool_before_refine"):
            if row.get(key) is not None:
                entry[key] = row[key]
        rows.append(entry)
    return rows


def plot_rounds(series: dict[str, list[dict]], path: Path, base: Optional[dict] = None) -> Path:
    """Panels across rounds: oracle score with 95% CI, critic accuracy (before / after refinement; on the fresh
    pairs and, where measured, over all within-prompt pairs of their videos), and
    pseudo-labels kept (only when some round kept any: without refinement that panel would be empty).
    ``series`` maps a label to its round rows (each with 'round', 'oracle' {mean, ci95}, 'critic_accuracy',
    optional 'critic_accuracy_before_refine', 'pseudo_labels_kept')."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    refined = any(r.get("pseudo_labels_kept") for rows in series.values() for r in rows)
    fig = Figure(figsize=(13 if refined else 9, 3.8))
    FigureCanvasAgg(fig)
    ax_o, ax_c, *rest = fig.subplots(1, 3 if refined else 2)
    ax_p = rest[0] if rest else None
    for k, (name, rows) in enumerate(series.items()):
        colour = f"C{k}"
        rounds = [0] + [r["round"] for r in rows] if base else [r["round"] for r in rows]
        means = ([base["mean"]] if base else []) + [r["oracle"]["mean"] for r in rows]
        lo = ([base["ci95"][0]] if base else []) + [r["oracle"]["ci95"][0] for r in rows]
        hi = ([base["ci95"][1]] if base else []) + [r["oracle"]["ci95"][1] for r in rows]
        ax_o.plot(rounds, means, "o-", color=colour, label=name)
        ax_o.fill_between(rounds, lo, hi, color=colour, alpha=0.15)
        rr = [r["round"] for r in rows]
        ax_c.plot(rr, [r.get("critic_accuracy") for r in rows], "o-", color=colour, label=f"{name}: labelling critic")
        before = [(r["round"], r["critic_accuracy_before_refine"]) for r in rows
                  if r.get("critic_accuracy_before_refine") is not None]
        if before:
            ax_c.plot(*zip(*before), "x--", color=colour, label=f"{name}: before refinement")
        pool = [(r["round"], r["critic_accuracy_pool"]) for r in rows if r.get("critic_accuracy_pool") is not None]
        if pool:   # the same critics over every within-prompt pair of the fresh videos (runs since 2026-11-22)
            ax_c.plot(*zip(*pool), "s:", color=colour, alpha=0.7, label=f"{name}: all pairs of those videos")
        pool_before = [(r["round"], r["critic_accuracy_pool_before_refine"]) for r in rows
                       if r.get("critic_accuracy_pool_before_refine") is not None]
        if pool_before:
            ax_c.plot(*zip(*pool_before), "+:", color=colour, alpha=0.7, label=f"{name}: all pairs, before refinement")
        if ax_p is not None:
            ax_p.bar([x + 0.8 * (k - (len(series) - 1) / 2) / max(len(series), 1) for x in rr],
                     [r.get("pseudo_labels_kept") or 0 for r in rows], width=0.8 / max(len(series), 1),
                     color=colour, label=name)
    ax_o.set(title="oracle score of the policy (95% CI)", xlabel="round (0 = initial policy)")
    ax_c.set(title="critic accuracy vs oracle (fresh pairs)", xlabel="round")
    from matplotlib.ticker import MaxNLocator

    axes = [ax_o, ax_c]
    if ax_p is not None:
        ax_p.set(title="pseudo-labels kept (PCE > threshold)", xlabel="round")
        axes.append(ax_p)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)
    return path


def rounds_table(series: dict[str, list[dict]], base: Optional[dict]) -> str:
    """HTML table, one row per method and round: oracle score and gain over the initial policy and over
    round 1 (95% CIs), the critic's accuracy on fresh pairs and on every within-prompt pair of their videos
    before -> after refinement, the pseudo-labels kept, and how often the oracle agrees with the labels the
    policy trained on."""
    import html

    def ci(stats, sign="+"):
        if not stats:
            return "—"
        lo, hi = stats.get("ci95") or (None, None)
        f = f"{{:{sign}.4f}}"
        return f"{f.format(stats['mean'])} [{f.format(lo)}, {f.format(hi)}]" if lo is not None else f.format(stats["mean"])

    def num(v, fmt="{:.3f}"):
        return "—" if v is None else fmt.format(v)

    head = ("<tr><th>method</th><th>round</th><th>oracle</th><th>vs initial policy</th><th>vs round 1</th>"
            "<th>critic accuracy on fresh pairs (before &rarr; after refinement)</th><th>the same over all "
            "within-prompt pairs of those videos (refinement's gain)</th><th>pseudo-labels kept</th>"
            "<th>training labels agree with oracle</th></tr>")
    rows = []
    if base:
        rows.append(f"<tr><th>initial policy</th><td>0</td><td>{ci(base, '')}</td>" + "<td></td>" * 6 + "</tr>")
    for name, rounds in series.items():
        for r in rounds:
            before, after = r.get("critic_accuracy_before_refine"), r.get("critic_accuracy")
            acc = f"{num(before)} &rarr; {num(after)}" if before is not None else num(after)
            pool_before, pool = r.get("critic_accuracy_pool_before_refine"), r.get("critic_accuracy_pool")
            pool_acc = f"{num(pool_before)} &rarr; {num(pool)}" if pool_before is not None else num(pool)
            if r.get("critic_accuracy_pool_gain"):
                pool_acc += f" ({ci(r['critic_accuracy_pool_gain'])})"
            agree = r.get("label_agreement", (r.get("labels") or {}).get("oracle_agreement"))
            rows.append(f"<tr><th>{html.escape(name)}</th><td>{r['round']}</td><td>{ci(r['oracle'], '')}</td>"
                        f"<td>{ci(r.get('delta_vs_base'))}</td><td>{ci(r.get('delta_vs_round_1'))}</td><td>{acc}</td>"
                        f"<td>{pool_acc}</td><td>{num(r.get('pseudo_labels_kept'), '{:.0f}')}</td>"
                        f"<td>{num(agree)}</td></tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def write_iterate_report(out: Path, summary: dict, series: Optional[dict] = None, base: Optional[dict] = None) -> Path:
    """metrics.jsonl rows per round, the rounds figure, then ``vidpo.report.write_report`` and a section with
    the figure at the top of report.html."""
    from vidpo.report import write_report

    if series is None:
        atomic.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in _round_metrics(summary)))
        series, base = {summary.get("objective", "policy"): summary["rounds"]}, summary["base"]["oracle"]
    figure = plot_rounds(series, out / "report" / "ipo_rounds.png", base)
    page = write_report(out)
    html = page.read_text()
    section = ('<h2>Rounds</h2><figure class="plot"><img src="report/ipo_rounds.png" alt="rounds">'
               '<figcaption>oracle score, critic accuracy and pseudo-labels kept per round</figcaption></figure>'
               + rounds_table(series, base))
    marker = "<h2>Summary</h2>"
    html = html.replace(marker, section + marker, 1) if marker in html else html.replace("</body>", section + "</body>")
    atomic.write_text(page, html)
    return figure


# ----- several recipes x seeds -----------------------------------------------------------------------------
def compare_iterations(recipes: Sequence[str], seeds: Sequence[int], out_dir: str | Path, overrides=(),
                       jobs: int = 1, gpus: Optional[str] = None) -> dict:
    """Run every recipe for every seed into ``out/<recipe>/seed<k>`` and aggregate per round over seeds.

    ``jobs`` > 1 runs up to that many runs at once, each in its own process (``_run_in_processes``), spread
    over the CUDA devices ``gpus`` (``gpu_list``); the aggregation then reads the finished runs back."""
    from vidpo.recipe import load_config

    out = Path(out_dir)
    methods: dict[str, list[dict]] = {}
    first = Path(recipes[0]).stem
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
                reuse = source if source is not None and _can_reuse(cfg, source) else None
                methods.setdefault(name, []).append(iterate(cfg, run_dir, reuse=reuse))
            finally:
                _close_run_log(run_dir)
    table = {name: _aggregate(runs) for name, runs in methods.items()}
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
    import subprocess
    import sys
    import time

    from vidpo.recipe import load_config

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
            if name != first and _can_reuse(cfg, source):
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


def _can_reuse(cfg: RunConfig, source: Path) -> bool:
    from vidpo.recipe import load_config

    try:
        other = load_config(source / "config.yaml")
        return _same_weights(cfg.train.init_from, other.train.init_from) and all(
            any(fnmatch.fnmatch(k, p) for p in _ROUND_KEYS + _ROUND_PAIR_KEYS + _CRITIC_KEYS)
            for k in _differing_keys(cfg, other))
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


def _aggregate(runs: list[dict]) -> dict:
    """Per round: mean over seeds with a 95% Student-t CI over seeds, of the oracle score, the gain over the
    initial policy and over round 1, the critic accuracy (before / after refinement) and the pseudo-labels
    kept."""
    def over_seeds(values):
        values = [v for v in values if v is not None]
        return _brief(mean_ci(torch.tensor(values, dtype=torch.float64))) if values else None

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
