"""Reports of ``vidpo iterate`` runs and the comparison of several recipes x seeds.

``write_iterate_report`` turns a shapes run's (or a comparison's) per-round rows into ``metrics.jsonl`` rows, the
rounds figure (oracle score with its CI, critic accuracy before / after refinement, pseudo-labels kept), a
per-round table, and the generic run report (``vidpo.evaluation.report``). ``compare_iterations`` runs every recipe for
every seed (``vidpo.ipo.rounds.iterate``; later recipes reuse what is identical by construction with the first
one's run of the same seed) and aggregates each round over seeds with a Student-t CI.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vidpo.evaluation.report import write_report
from vidpo.utils import atomic


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
    """metrics.jsonl rows per round, the rounds figure, then ``vidpo.evaluation.report.write_report`` and a section with
    the figure at the top of report.html."""
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




# ----- a prompt file's run: the judged evaluation per round ---------------------------------------------------
def _judged_metrics(summary: dict) -> list[dict]:
    """metrics.jsonl rows of a prompt-file run (phase 'judged', step = round): win rate against the initial policy
    with its interval, pseudo-labels kept, training pairs."""
    rows = []
    for row in summary["rounds"]:
        entry = {"step": row["round"], "phase": "judged", "pseudo_labels_kept": row.get("pseudo_labels_kept", 0),
                 "train_pairs": (row.get("train") or {}).get("pairs", 0)}
        win = (row.get("judged") or {}).get("win_rate")
        if win:
            entry.update({"win_rate": win["mean"], "win_rate_ci_lo": win["ci95"][0], "win_rate_ci_hi": win["ci95"][1]})
        rows.append(entry)
    return rows


def plot_judged_rounds(rows: list[dict], path: Path) -> Path:
    """The judged win rate of each round's policy against the initial policy (95% CI over prompts; 0.5 = no
    difference), and the pseudo-labels kept per round."""
    fig = Figure(figsize=(9, 3.8))
    FigureCanvasAgg(fig)
    ax_w, ax_p = fig.subplots(1, 2)
    judged = [(r["round"], r["judged"]["win_rate"]) for r in rows if (r.get("judged") or {}).get("win_rate")]
    if judged:
        rounds = [k for k, _ in judged]
        ax_w.errorbar(rounds, [w["mean"] for _, w in judged],
                      yerr=[[w["mean"] - w["ci95"][0] for _, w in judged], [w["ci95"][1] - w["mean"] for _, w in judged]],
                      fmt="o-", capsize=4, color="C0", label="policy vs initial policy")
    ax_w.axhline(0.5, color="grey", lw=1, ls="--")
    ax_w.set(title="judged win rate vs the initial policy (95% CI)", xlabel="round", ylim=(0, 1))
    ax_p.bar([r["round"] for r in rows], [r.get("pseudo_labels_kept") or 0 for r in rows], color="C1")
    ax_p.set(title="pseudo-labels kept (PCE > threshold)", xlabel="round")
    for ax in (ax_w, ax_p):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)
    return path


def judged_rounds_table(rows: list[dict]) -> str:
    """HTML table, one row per round of a prompt-file run: the judged comparison with the initial policy, the
    labels the policy trained on, the pseudo-labels kept. (No oracle: no critic accuracy is measured.)"""
    def num(v, fmt="{:.3f}"):
        return "—" if v is None else fmt.format(v)

    head = ("<tr><th>round</th><th>judged win rate vs initial policy [95% CI]</th><th>wins / ties / losses</th>"
            "<th>judge</th><th>training pairs</th><th>first video preferred / tie fraction of the labels</th>"
            "<th>pseudo-labels kept</th></tr>")
    body = []
    for r in rows:
        judged, labels = r.get("judged") or {}, r.get("labels") or {}
        win = judged.get("win_rate")
        rate = f"{win['mean']:.3f} [{win['ci95'][0]:.3f}, {win['ci95'][1]:.3f}]" if win else "—"
        counts = " / ".join(num(judged.get(k), "{:.0f}") for k in ("wins", "ties", "losses"))
        fractions = f"{num(labels.get('first_better_fraction'))} / {num(labels.get('tie_fraction'))}"
        body.append(f"<tr><td>{r['round']}</td><td>{rate}</td><td>{counts}</td>"
                    f"<td>{html.escape(str(judged.get('judge', '—')))}</td>"
                    f"<td>{num((r.get('train') or {}).get('pairs'), '{:.0f}')}</td><td>{fractions}</td>"
                    f"<td>{num(r.get('pseudo_labels_kept'), '{:.0f}')}</td></tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def write_judged_iterate_report(out: Path, summary: dict) -> Path:
    """A prompt-file run's report: metrics.jsonl rows per round, the judged-rounds figure and table on top of
    ``vidpo.evaluation.report.write_report``'s page."""
    atomic.write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in _judged_metrics(summary)))
    figure = plot_judged_rounds(summary["rounds"], out / "report" / "ipo_rounds.png")
    page = write_report(out)
    text = page.read_text()
    section = ('<h2>Rounds</h2><figure class="plot"><img src="report/ipo_rounds.png" alt="rounds">'
               '<figcaption>judged win rate against the initial policy and pseudo-labels kept per round'
               '</figcaption></figure>' + judged_rounds_table(summary["rounds"]))
    marker = "<h2>Summary</h2>"
    text = text.replace(marker, section + marker, 1) if marker in text else text.replace("</body>", section + "</body>")
    atomic.write_text(page, text)
    return figure
