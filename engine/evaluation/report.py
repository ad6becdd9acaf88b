"""The run report: one self-contained HTML page of a run directory, with PNG plots beside it.

``write_report(run_dir)`` reads what a run left behind and writes ``run_dir/report.html`` plus PNG plots
under ``run_dir/report/``; ``vidpo report RUN_DIR`` does the same from a shell.

Inputs (only ``metrics.jsonl`` is required; a missing file just omits its section):

- ``metrics.jsonl`` (a distillation's: ``student/metrics.jsonl``): one JSON object per line with ``step`` and
  ``phase`` ('train' / 'eval' / other; missing means 'train') and numeric fields. Drawn: the training loss raw and EMA-smoothed, every other
  numeric train metric as small multiples, the eval ``oracle/*`` keys on one figure with 95% CI bands
  where ``<key>_ci_lo`` / ``<key>_ci_hi`` exist, and remaining eval / other-phase metrics as small
  multiples. A line that is not a JSON object with a numeric ``step`` is skipped with a warning naming
  the file and line; a step logged twice (a resumed run) keeps its last row; non-finite values are
  left out of the plots and counted in the page's notes.
- ``summary.json``: nested JSON shown as tables. A dict of dicts becomes one table (a row per key,
  nested leaves flattened into dotted columns, e.g. base / final / delta x mean / ci95); a list of
  dicts becomes a table with one row per element (per-round results); other dicts recurse under
  headings.
- ``samples/*.gif`` / ``samples/*.png``: images captioned with their file names; ``base*`` and the
  matching ``final*`` file are shown side by side first.
- ``eval/judged.json`` + ``eval/videos/<stem>_{base,policy}.mp4`` (the layout of
  ``vidpo.evaluation.judge``): the held-out prompts' base and policy videos side by side as HTML5
  ``<video>`` tags (``.gif`` as images), the judge's verdict under each pair and the win rate with its
  95% CI over prompts on top; without ``judged.json`` the video pairs are shown without verdicts.
- ``config.yaml``: shown verbatim in a collapsible block.

Plots go through matplotlib's Agg canvas directly (no pyplot: no global backend switch and no figure
registry to leak). Every file is written under a temporary name and moved in place with os.replace,
so a crash never leaves a half-written report.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vidpo.evaluation.judge import EVAL_DIR, JUDGED_NAME, ROLES, VIDEO_DIR

REPORT_NAME = "report.html"
DISTILL_STUDENT = "student"                                   # a distillation's training run (vidpo distill)
DISTILL_NAMES = {"base": "teacher", "policy": "student"}
PLOT_DIR = "report"
MAX_LINE_WARNINGS = 20
MAX_PANELS = 36
MAX_TABLE_COLUMNS = 16
SHORT_LIST = 4
CI_SUFFIXES = ("_ci_lo", "_ci_hi")
IMAGE_SUFFIXES = (".gif", ".png")
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")
MAX_JUDGED_PAIRS = 64
ROW_NAME_KEYS = ("round", "step", "name", "id", "iteration")


class ReportWarning(UserWarning):
    """Something in the run directory was unreadable and left out of the report."""


# ----------------------------------------------------------------------------------------------- IO
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_figure(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_metrics(path: Path) -> Tuple[List[dict], List[str]]:
    """Rows of a metrics.jsonl and the messages of the lines skipped (each also a ReportWarning).

    A row is kept when it is a JSON object with a numeric 'step'; 'phase' defaults to 'train'.
    """
    rows, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
                if not _is_number(row.get("step")):
                    raise ValueError(f"no numeric 'step' (got {row.get('step')!r})")
            except ValueError as err:  # json.JSONDecodeError is a ValueError
                problems.append(f"{path}: line {lineno} skipped: {err}")
                continue
            row.setdefault("phase", "train")
            rows.append(row)
    for message in problems[:MAX_LINE_WARNINGS]:
        warnings.warn(message, ReportWarning, stacklevel=2)
    if len(problems) > MAX_LINE_WARNINGS:
        warnings.warn(f"{path}: {len(problems) - MAX_LINE_WARNINGS} more bad lines skipped",
                      ReportWarning, stacklevel=2)
    return rows, problems


# ------------------------------------------------------------------------------------------ series
class PhaseSeries:
    """Per-key (steps, values) of one phase, sorted by step, the last row of a repeated step winning."""

    def __init__(self, rows: Sequence[dict], phase: str):
        by_key: Dict[str, Dict[float, float]] = {}
        self.dropped: Dict[str, int] = {}
        for row in rows:
            if str(row.get("phase")) != phase:
                continue
            step = row["step"]
            for key, value in row.items():
                if key in ("step", "phase") or not _is_number(value):
                    continue
                if not math.isfinite(value):
                    self.dropped[key] = self.dropped.get(key, 0) + 1
                    by_key.setdefault(key, {}).pop(step, None)
                    continue
                by_key.setdefault(key, {})[step] = float(value)
        self.series = {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items() if v}

    def keys(self) -> List[str]:
        return [k for k in sorted(self.series) if not k.endswith(CI_SUFFIXES)]

    def get(self, key: str):
        return self.series.get(key, ([], []))

    def band(self, key: str):
        """(steps, lo, hi) where both CI bounds were logged, or None."""
        lo, hi = self.series.get(key + CI_SUFFIXES[0]), self.series.get(key + CI_SUFFIXES[1])
        if not lo or not hi:
            return None
        hi_map = dict(zip(*hi))
        steps = [s for s in lo[0] if s in hi_map]
        lo_map = dict(zip(*lo))
        return (steps, [lo_map[s] for s in steps], [hi_map[s] for s in steps]) if steps else None

    def last_values(self) -> Dict[str, float]:
        return {k: self.series[k][1][-1] for k in self.keys()}


def ema(values: Sequence[float], weight: Optional[float] = None) -> List[float]:
    """Debiased exponential moving average (TensorBoard's smoothing).

    ``m_t = w m_{t-1} + (1 - w) x_t``, reported as ``m_t / (1 - w^t)`` so the start is not pulled to 0.
    The default weight spans about 1/20 of the series: ``w = 1 - 20 / n`` clipped to [0, 0.99].
    """
    if weight is None:
        weight = min(0.99, max(0.0, 1.0 - 20.0 / max(len(values), 1)))
    smoothed, moving = [], 0.0
    for t, value in enumerate(values, start=1):
        moving = weight * moving + (1.0 - weight) * value
        smoothed.append(moving / (1.0 - weight ** t) if weight > 0 else value)
    return smoothed


# ------------------------------------------------------------------------------------------- plots
def _style_axes(ax, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=7)


def _maybe_log_scale(ax, values: Sequence[float]) -> None:
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")


def is_noisy(values: Sequence[float]) -> bool:
    """True when step-to-step changes are mostly noise: mean |second difference| over mean |first
    difference| is ~0 for smooth curves (lr schedules, accuracy ramps) and ~1.5 for white noise."""
    if len(values) < 5:
        return False
    first = [b - a for a, b in zip(values, values[1:])]
    second = [b - a for a, b in zip(first, first[1:])]
    mean_first = sum(abs(d) for d in first) / len(first)
    return mean_first > 0 and sum(abs(d) for d in second) / len(second) > 0.5 * mean_first


def _draw_raw_and_smooth(ax, steps, values, colour="C0") -> None:
    """Noisy series: faint raw line plus EMA; smooth ones are drawn as they are (an EMA would only lag)."""
    marker = "o" if len(steps) <= 12 else None
    if len(steps) > 20 and is_noisy(values):
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8, label="raw")
        ax.plot(steps, ema(values), color=colour, linewidth=1.6, label="EMA")
    else:
        ax.plot(steps, values, color=colour, linewidth=1.4, marker=marker, markersize=3)


def plot_loss(series: PhaseSeries, path: Path) -> Optional[Path]:
    steps, values = series.get("loss")
    if not steps:
        return None
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, values, color="C0", alpha=0.35, linewidth=0.9, label="loss (raw)")
    ax.plot(steps, ema(values), color="C0", linewidth=2.0, label="loss (EMA)")
    _maybe_log_scale(ax, values)
    _style_axes(ax, "training loss")
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_small_multiples(series: PhaseSeries, keys: Sequence[str], path: Path, title: str) -> Optional[Path]:
    keys = list(keys)[:MAX_PANELS]
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.5 * nrows))
    for index, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        steps, values = series.get(key)
        band = series.band(key)
        if band:
            ax.fill_between(band[0], band[1], band[2], color="C1", alpha=0.2, linewidth=0)
        _draw_raw_and_smooth(ax, steps, values, colour="C1" if band else "C0")
        _style_axes(ax, key)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_oracle(series: PhaseSeries, keys: Sequence[str], path: Path) -> Optional[Path]:
    """Oracle total (bold) and components on one axis, 95% CI bands where logged."""
    if not keys:
        return None
    fig = Figure(figsize=(7.5, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ordered = sorted(keys, key=lambda k: (k != "oracle/total", k))
    for index, key in enumerate(ordered):
        steps, values = series.get(key)
        colour = "black" if key == "oracle/total" else f"C{index % 10}"
        band = series.band(key)
        if band:
            ax.fill_between(band[0], band[1], band[2], color=colour, alpha=0.15, linewidth=0)
        ax.plot(steps, values, color=colour, marker="o", markersize=3,
                linewidth=2.2 if key == "oracle/total" else 1.2, label=key.split("/", 1)[1] or key)
    _style_axes(ax, "oracle score over training (bands: 95% CI)")
    ax.set_xlabel("step", fontsize=8)
    ax.legend(fontsize=8, loc="best")
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------- HTML bits
def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _format_scalar(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        shown = ", ".join(_format_scalar(v) for v in value[:SHORT_LIST])
        return f"[{shown}{', … (%d)' % len(value) if len(value) > SHORT_LIST else ''}]"
    return str(value)


def _is_leaf(value) -> bool:
    if isinstance(value, list):
        return all(v is None or isinstance(v, (str, int, float, bool)) for v in value)
    return not isinstance(value, dict)


def _flatten(mapping: dict, prefix: str = "") -> Optional[Dict[str, object]]:
    """Dotted-key leaves of a nested dict, or None when a leaf is a list of objects (not tabular)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            inner = _flatten(value, name + ".")
            if inner is None:
                return None
            flat.update(inner)
        elif _is_leaf(value):
            flat[name] = value
        else:
            return None
    return flat


def _table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table whose first cell of each row is its row header."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + f"<th>{_esc(_format_scalar(row[0]))}</th>"
                   + "".join(f"<td>{_esc(_format_scalar(v))}</td>" for v in row[1:]) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _columns_of(flat_rows: Sequence[Dict[str, object]]) -> List[str]:
    columns: List[str] = []
    for flat in flat_rows:
        columns.extend(k for k in flat if k not in columns)
    return columns


def render_json(value, level: int = 3) -> str:
    """HTML tables for arbitrary nested JSON (see the module docstring for the layout rules)."""
    heading = f"h{min(level, 6)}"
    if _is_leaf(value):
        return f"<p>{_esc(_format_scalar(value))}</p>"
    if isinstance(value, list):
        flat_rows = [_flatten(v) if isinstance(v, dict) else None for v in value]
        if value and all(f is not None for f in flat_rows):
            columns = _columns_of(flat_rows)
            if len(columns) <= MAX_TABLE_COLUMNS:
                if columns[0] in ROW_NAME_KEYS:  # rows already name themselves: no index column
                    return _table(columns, [[f.get(c) for c in columns] for f in flat_rows])
                rows = [[i] + [f.get(c) for c in columns] for i, f in enumerate(flat_rows)]
                return _table(["#"] + columns, rows)
        return "".join(f"<{heading}>[{i}]</{heading}>{render_json(v, level + 1)}" for i, v in enumerate(value))
    leaves = {k: v for k, v in value.items() if _is_leaf(v)}
    nested = {k: v for k, v in value.items() if not _is_leaf(v)}
    parts = []
    if leaves:
        parts.append(_table(["key", "value"], [[k, v] for k, v in leaves.items()]))
    dict_rows = {k: _flatten(v) for k, v in nested.items() if isinstance(v, dict)}
    if nested and len(dict_rows) == len(nested) and all(f is not None for f in dict_rows.values()):
        columns = _columns_of(list(dict_rows.values()))
        if len(columns) <= MAX_TABLE_COLUMNS:
            parts.append(_table([""] + columns, [[k] + [f.get(c) for c in columns] for k, f in dict_rows.items()]))
            return "".join(parts)
    for key, inner in nested.items():
        parts.append(f"<{heading}>{_esc(key)}</{heading}>{render_json(inner, level + 1)}")
    return "".join(parts)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _image_tag(run_dir: Path, path: Path) -> str:
    rel = path.relative_to(run_dir).as_posix()
    style = ""
    try:
        with Image.open(path) as image:
            width = image.size[0]
        # Toy-world samples are a few dozen pixels wide: scale them up without blurring.
        if width < 320:
            style = f' style="width:{min(320, width * max(1, 320 // max(width, 1)))}px"'
    except (OSError, ValueError):  # an unreadable image is still linked, just not sized
        pass
    return (f'<figure><img src="{_esc(quote(rel))}" alt="{_esc(path.name)}"{style}>'
            f"<figcaption>{_esc(path.name)}</figcaption></figure>")


def render_samples(run_dir: Path) -> str:
    sample_dir = run_dir / "samples"
    if not sample_dir.is_dir():
        return ""
    files = sorted((p for p in sample_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not files:
        return ""
    by_name = {p.name: p for p in files}
    pairs, used = [], set()
    for path in files:
        if not path.stem.startswith("base"):
            continue
        stem = "final" + path.stem[len("base"):]
        candidates = [stem + path.suffix] + [stem + s for s in IMAGE_SUFFIXES if s != path.suffix.lower()]
        partner = next((by_name[c] for c in candidates if c in by_name and c not in used), None)
        if partner is not None:
            pairs.append((path, partner))
            used.update({path.name, partner.name})
    parts = ["<h2>Samples</h2>"]
    for before, after in pairs:
        parts.append('<div class="pair">' + _image_tag(run_dir, before) + _image_tag(run_dir, after) + "</div>")
    rest = [p for p in files if p.name not in used]
    if rest:
        parts.append('<div class="gallery">' + "".join(_image_tag(run_dir, p) for p in rest) + "</div>")
    return "\n".join(parts)


_OUTCOME_TEXT = {"policy": "policy better", "base": "base better", "tie": "tie", "failed": "comparison failed"}


def _video_figure(run_dir: Path, path: Optional[Path], role: str, expected: str) -> str:
    """A <video> (an <img> for a GIF) of one side of a judged pair, or a placeholder naming the missing file."""
    if path is None:
        return (f'<figure><div style="width:320px;padding:2em 0;background:#eee;text-align:center">missing: '
                f"{_esc(expected)}</div><figcaption>{_esc(role)}</figcaption></figure>")
    rel = _esc(quote(path.relative_to(run_dir).as_posix()))
    if path.suffix.lower() == ".gif":
        media = f'<img src="{rel}" alt="{_esc(role)}" style="width:320px">'
    else:
        media = (f'<video src="{rel}" width="320" controls loop muted playsinline preload="metadata">'
                 f'<a href="{rel}">{_esc(path.name)}</a></video>')
    return f"<figure>{media}<figcaption>{_esc(role)}: {_esc(path.name)}</figcaption></figure>"


def render_judged(run_dir: Path, names: Optional[Dict[str, str]] = None) -> Tuple[str, List[str]]:
    """The side-by-side section of held-out base and policy videos, and the notes it adds. ``names``: what the
    page calls the two roles (default their own names; a distillation's are the teacher and the student).

    Reads ``run_dir/eval/judged.json`` (``vidpo.evaluation.judge.JudgedComparison.save``): the win rate with
    its CI on top, then per pair the base and the policy video (named by the record, else found as
    ``eval/videos/<stem>_<role>.{mp4,webm,gif}``) with the verdict under them. Without (or with an unreadable)
    judged.json, the pairs of ``eval/videos/*_base.*`` / ``*_policy.*`` are shown without verdicts.
    """
    eval_dir = run_dir / EVAL_DIR
    judged_path, video_dir = eval_dir / JUDGED_NAME, eval_dir / VIDEO_DIR
    names = {role: role for role in ROLES} | dict(names or {})
    notes: List[str] = []
    records, summary = None, None
    if judged_path.is_file():
        try:
            data = json.loads(judged_path.read_text(encoding="utf-8"))
            records, summary = list(data["pairs"]), data.get("summary") or {}
            if not all(isinstance(r, dict) and isinstance(r.get("videos"), dict) for r in records):
                raise ValueError("every element of 'pairs' must be an object with 'videos'")
        except (ValueError, OSError, KeyError, TypeError) as err:
            message = f"{judged_path}: not a readable judged comparison, verdicts left out ({err})"
            warnings.warn(message, ReportWarning, stacklevel=2)
            notes.append(message)
            records, summary = None, None
    if records is None:  # videos without verdicts
        if not video_dir.is_dir():
            return "", notes
        files = {p.name: p for p in video_dir.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}
        records = []
        for name in sorted(files, key=_natural_key):
            stem, suffix = name.rsplit(".", 1)
            if stem.endswith("_base") and f"{stem[:-5]}_policy.{suffix}" in files:
                records.append({"videos": {role: f"{VIDEO_DIR}/{stem[:-5]}_{role}.{suffix}" for role in ROLES}})
        if not records:
            return "", notes
    parts = [f"<h2>Held-out prompts: {_esc(names['base'])} and {_esc(names['policy'])} side by side</h2>"]
    if summary is not None:
        rate = summary.get("win_rate") or {}
        lo, hi = (list(rate.get("ci95") or []) + [None, None])[:2]
        counts = ", ".join(f"{_format_scalar(summary.get(k))} {k}" for k in ("wins", "ties", "losses", "failed"))
        parts.append(f'<p class="winrate"><strong>Win rate of the {_esc(names["policy"])} over the '
                     f'{_esc(names["base"])}: '
                     f"{_esc(_format_scalar(rate.get('mean')))}</strong> (95% CI {_esc(_format_scalar(lo))} to "
                     f"{_esc(_format_scalar(hi))}, over {_esc(_format_scalar(summary.get('ci_over_prompts')))} "
                     f"prompts; ties count half) · {_esc(counts)} of {_esc(_format_scalar(summary.get('pairs')))} "
                     f"pairs · judge: {_esc(summary.get('judge', '?'))}</p>")
    for record in records[:MAX_JUDGED_PAIRS]:
        figures = []
        for role in ROLES:
            expected = str(record["videos"].get(role, ""))
            path = eval_dir / expected if expected else None
            if path is None or not path.is_file():
                stem = Path(expected).name.rsplit(f"_{role}.", 1)[0]
                path = next((c for c in (video_dir / f"{stem}_{role}{s}" for s in VIDEO_SUFFIXES) if c.is_file()),
                            None)
                if path is None:
                    notes.append(f"{eval_dir}: {role} video {expected!r} missing")
            figures.append(_video_figure(run_dir, path, names[role], expected))
        caption = ""
        if "prompt_id" in record:
            outcome = str(record.get("outcome"))
            outcome = (f"{names[outcome]} better" if outcome in ROLES
                       else _OUTCOME_TEXT.get(outcome, outcome))
            shown = names["policy" if record.get("policy_first") else "base"]
            detail = f" ({record['message']})" if record.get("message") else ""
            caption = (f'<p class="verdict"><strong>{_esc(outcome)}</strong>{_esc(detail)} · prompt '
                       f"{_esc(record['prompt_id'])}, seed {_esc(record.get('seed'))} · shown first: {shown}<br>"
                       f"<em>{_esc(record.get('caption', ''))}</em></p>")
        parts.append(f'<div class="judged"><div class="pair">{"".join(figures)}</div>{caption}</div>')
    if len(records) > MAX_JUDGED_PAIRS:
        notes.append(f"{eval_dir}: only the first {MAX_JUDGED_PAIRS} of {len(records)} video pairs are shown")
    return "\n".join(parts), notes


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{margin-bottom:0.2em} .meta{color:#666;font-size:0.9em}
table{border-collapse:collapse;margin:0.6em 0 1.2em;font-size:0.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right} thead th{background:#f3f3f3}
tbody th{text-align:left;background:#fafafa}
img{max-width:100%;image-rendering:pixelated} .plot img{image-rendering:auto}
figure{display:inline-block;margin:0.4em 1em 0.8em 0;vertical-align:top}
figcaption{font-size:0.85em;color:#555;text-align:center}
.pair{display:flex;gap:1.5em;flex-wrap:wrap} .notes{background:#fff7e0;border:1px solid #f0d890;padding:0.5em 1em}
pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:0.85em}
"""


def _plot_figure(run_dir: Path, path: Optional[Path], caption: str) -> str:
    if path is None:
        return ""
    rel = path.relative_to(run_dir).as_posix()
    return (f'<figure class="plot"><img src="{_esc(quote(rel))}" alt="{_esc(caption)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "phase"


# ------------------------------------------------------------------------------------------ report
def write_report(run_dir) -> Path:
    """Write ``run_dir/report.html`` and its plots under ``run_dir/report/``; returns the HTML path.

    A distillation's directory (``vidpo distill``: the student's training in ``student/``, the teacher-vs-student
    evaluation in ``eval/``) is reported from ``student/metrics.jsonl`` and ``student/config.yaml``, its judged
    videos named teacher and student. Raises FileNotFoundError naming the path when the run directory or its
    metrics.jsonl is missing. Unreadable optional inputs are skipped with a ReportWarning and listed in the
    page's notes.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"write_report: run directory not found: {run_dir}")
    names = None
    if not metrics_path.is_file() and (run_dir / DISTILL_STUDENT / "metrics.jsonl").is_file():
        metrics_path, names = run_dir / DISTILL_STUDENT / "metrics.jsonl", DISTILL_NAMES
    if not metrics_path.is_file():
        raise FileNotFoundError(f"write_report: {metrics_path} not found (every run writes one)")
    plot_dir = run_dir / PLOT_DIR
    plot_dir.mkdir(exist_ok=True)
    rows, notes = load_metrics(metrics_path)
    phases = sorted({str(r["phase"]) for r in rows}, key=lambda p: (p != "train", p != "eval", p))
    last_step = max((r["step"] for r in rows), default=None)

    sections = []
    for phase in phases:
        series = PhaseSeries(rows, phase)
        notes.extend(f"{metrics_path}: {count} non-finite '{key}' values ({phase}) not drawn"
                     for key, count in sorted(series.dropped.items()))
        keys = series.keys()
        figures = []
        if phase == "train":
            figures.append(_plot_figure(run_dir, plot_loss(series, plot_dir / "loss.png"), "training loss"))
            others = [k for k in keys if k != "loss"]
            figures.append(_plot_figure(run_dir, plot_small_multiples(
                series, others, plot_dir / "train_metrics.png", "training metrics"), "training metrics"))
        else:
            oracle = [k for k in keys if k.startswith("oracle/")] if phase == "eval" else []
            others = [k for k in keys if k not in oracle]
            figures.append(_plot_figure(run_dir, plot_oracle(series, oracle, plot_dir / "eval_oracle.png"),
                                        "oracle score (total and components)"))
            name = _safe_name(phase)
            figures.append(_plot_figure(run_dir, plot_small_multiples(
                series, others, plot_dir / f"{name}_metrics.png", f"{phase} metrics"), f"{phase} metrics"))
        if len(keys) > MAX_PANELS:
            notes.append(f"{phase}: only the first {MAX_PANELS} of {len(keys)} metrics are drawn")
        latest = series.last_values()
        title = {"train": "Training", "eval": "Evaluation"}.get(phase, f"Phase: {phase}")
        sections.append(f"<h2>{_esc(title)}</h2>" + "".join(figures)
                        + (f"<h3>Latest values</h3>{_table(['metric', 'value'], [[k, v] for k, v in latest.items()])}"
                           if latest else ""))
    if not rows:
        sections.append("<p>metrics.jsonl has no readable rows yet.</p>")

    summary_html = ""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            summary_html = "<h2>Summary</h2>" + render_json(summary)
        except (ValueError, OSError) as err:
            message = f"{summary_path}: not readable JSON, section left out ({err})"
            warnings.warn(message, ReportWarning, stacklevel=2)
            notes.append(message)

    config_html = ""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        config_path = metrics_path.parent / "config.yaml"
    if config_path.is_file():
        config_text = config_path.read_text(encoding="utf-8", errors="replace")
        config_html = (f"<h2>Configuration</h2><details><summary>config.yaml ({len(config_text.splitlines())} "
                       f"lines)</summary><pre>{_esc(config_text)}</pre></details>")

    judged_html, judged_notes = render_judged(run_dir, names)
    notes.extend(judged_notes)

    notes_html = ""
    if notes:
        items = "".join(f"<li>{_esc(n)}</li>" for n in notes[:50])
        more = f"<li>… and {len(notes) - 50} more</li>" if len(notes) > 50 else ""
        notes_html = f'<div class="notes"><strong>Notes</strong><ul>{items}{more}</ul></div>'

    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    meta = f"{len(rows)} metric rows" + (f", last step {_format_scalar(last_step)}" if last_step is not None else "")
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vidpo run report: {_esc(run_dir.resolve().name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Run report: {_esc(run_dir.resolve().name)}</h1>",
        f'<p class="meta">{_esc(str(run_dir.resolve()))} · {_esc(meta)} · generated {_esc(generated)}</p>',
        notes_html, summary_html, judged_html, render_samples(run_dir), *sections, config_html,
        "</body></html>",
    ])
    out = run_dir / REPORT_NAME
    _atomic_write_bytes(out, page.encode("utf-8"))
    return out

