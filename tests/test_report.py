"""vidpo.evaluation.report: the HTML run report on a synthetic run directory."""
import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidpo.evaluation.report import PhaseSeries, ReportWarning, ema, is_noisy, load_metrics, render_json, write_report


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    collector = _Collector()
    collector.feed(Path(path).read_text(encoding="utf-8"))
    return collector


def write_metrics(run_dir, bad_lines=True):
    rng = np.random.default_rng(0)
    lines = []
    for step in range(0, 200, 2):
        row = {"step": step, "phase": "train", "loss": 0.69 * math.exp(-step / 80) + 0.05 * rng.random(),
               "margin_mean": step / 100 + 0.1 * rng.standard_normal(), "accuracy": min(1.0, 0.5 + step / 400),
               "lr": 1e-3 * min(1.0, step / 20), "grad_norm": 1.0 + rng.random(), "note": "text is ignored"}
        lines.append(json.dumps(row))
    for step in (0, 50, 100, 150, 199):
        row = {"step": step, "phase": "eval", "implicit_accuracy": 0.5 + step / 500}
        for name, base in (("total", 0.6), ("colour", 0.7), ("motion", 0.5)):
            value = base + step / 1000
            row.update({f"oracle/{name}": value, f"oracle/{name}_ci_lo": value - 0.03,
                        f"oracle/{name}_ci_hi": value + 0.03})
        lines.append(json.dumps(row))
    lines.append(json.dumps({"step": 201, "phase": "train", "loss": float("nan")}))  # a skipped bad step
    if bad_lines:
        lines.insert(2, "{not json")
        lines.insert(5, "")
        lines.insert(7, json.dumps({"phase": "train", "loss": 1.0}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def write_gif(path, colour, frames=4, size=16):
    images = []
    for t in range(frames):
        image = Image.new("RGB", (size * 3, size), (20, 20, 20))
        for x in range(4):
            for y in range(4):
                image.putpixel((2 + 3 * t + x, 6 + y), colour)
        images.append(image)
    images[0].save(path, save_all=True, append_images=images[1:], duration=120, loop=0)


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run 1"  # a space: references must be URL-quoted
    run.mkdir()
    write_metrics(run)
    summary = {
        "objective": "flow_dpo",
        "oracle": {
            "base": {"mean": 0.61, "ci95": [0.58, 0.64], "components": {"colour": 0.7, "motion": 0.5}},
            "final": {"mean": 0.79, "ci95": [0.76, 0.82], "components": {"colour": 0.9, "motion": 0.68}},
            "delta": {"mean": 0.18, "ci95": [0.14, 0.22]},
        },
        "rounds": [{"round": 1, "oracle": 0.7, "pairs": 256}, {"round": 2, "oracle": 0.79, "pairs": 256}],
        "<script>alert(1)</script>": "x < y & z",
    }
    (run / "summary.json").write_text(json.dumps(summary))
    samples = run / "samples"
    samples.mkdir()
    write_gif(samples / "base.gif", (200, 40, 40))
    write_gif(samples / "final.gif", (40, 200, 40))
    Image.new("RGB", (40, 20), (0, 0, 255)).save(samples / "grid_round_2.png")
    (samples / "notes.txt").write_text("not an image")
    (run / "config.yaml").write_text("train:\n  objective: flow_dpo\n  lr: 1.0e-4  # <b>not bold</b>\n")
    return run


def test_report_references_existing_decodable_files(run_dir):
    with pytest.warns(ReportWarning) as record:
        out = write_report(run_dir)
    assert out == run_dir / "report.html"
    page = parse(out)
    sources = [img["src"] for img in page.images]
    assert "samples/base.gif" in sources and "samples/final.gif" in sources
    assert "samples/grid_round_2.png" in sources and not any("notes.txt" in s for s in sources)
    for name in ("loss.png", "train_metrics.png", "eval_oracle.png", "eval_metrics.png"):
        assert f"report/{name}" in sources
    for src in sources:
        path = run_dir / src  # no character needed quoting here
        assert path.is_file(), src
        with Image.open(path) as image:
            image.load()
            assert image.size[0] > 10 and image.size[1] > 10
    # base and final sit side by side, before the rest of the gallery
    assert sources.index("samples/base.gif") + 1 == sources.index("samples/final.gif")
    assert sources.index("samples/final.gif") < sources.index("samples/grid_round_2.png")
    assert "details" in page.tags
    assert not [p for p in run_dir.rglob("*") if ".tmp." in p.name]
    messages = [str(w.message) for w in record]
    assert any("metrics.jsonl: line 3 skipped" in m for m in messages)
    assert any("metrics.jsonl: line 8 skipped" in m and "step" in m for m in messages)
    assert not any("line 6" in m for m in messages)  # blank lines are fine


def test_report_page_escapes_and_shows_tables_and_notes(run_dir):
    with pytest.warns(ReportWarning):
        out = write_report(run_dir)
    raw = out.read_text(encoding="utf-8")
    assert "<script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "<b>not bold</b>" not in raw and "&lt;b&gt;not bold&lt;/b&gt;" in raw
    text = " ".join(parse(out).text)
    assert "x < y & z" in text
    # the oracle dict is one table: rows base/final/delta, flattened columns
    for cell in ("components.colour", "ci95", "[0.58, 0.64]", "0.18", "delta"):
        assert cell in text
    assert "1 non-finite 'loss' values (train) not drawn" in text
    assert "line 3 skipped" in text


def test_space_in_file_names_is_url_quoted(tmp_path):
    run = tmp_path / "r"
    (run / "samples").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "phase": "train", "loss": 1.0}) + "\n")
    write_gif(run / "samples" / "base sample.gif", (255, 0, 0))
    page = parse(write_report(run))
    assert [img["src"] for img in page.images] == ["samples/base%20sample.gif", "report/loss.png"]


def test_minimal_run_dir_and_missing_metrics(tmp_path):
    run = tmp_path / "minimal"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(run)
    (run / "metrics.jsonl").write_text("")
    out = write_report(run)
    assert "no readable rows" in out.read_text()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "phase": "eval", "win_rate": 0.6}) + "\n")
    (run / "summary.json").write_text("{broken")
    with pytest.warns(ReportWarning, match="summary.json: not readable JSON"):
        out = write_report(run)
    page = parse(out)
    assert [img["src"] for img in page.images] == ["report/eval_metrics.png"]
    assert "Summary" not in " ".join(page.text)


def test_metrics_parsing_repeated_steps_and_ci_bands(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "phase": "train", "loss": 1.0},
            {"step": 1, "phase": "train", "loss": 1.5},  # a resumed run logs step 1 again: last wins
            {"step": 5, "phase": "eval", "oracle/total": 0.5, "oracle/total_ci_lo": 0.4, "oracle/total_ci_hi": 0.6},
            {"step": 6, "phase": "eval", "oracle/total": 0.7, "oracle/total_ci_lo": 0.6}, [1, 2], "3"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(ReportWarning) as record:
        loaded, problems = load_metrics(path)
    assert [str(w.message).split(": ", 1)[1] for w in record] == [
        "line 6 skipped: expected a JSON object, got list", "line 7 skipped: expected a JSON object, got str"]
    assert len(loaded) == 5 and len(problems) == 2
    train = PhaseSeries(loaded, "train")
    assert train.get("loss") == ([1, 2], [1.5, 1.0])
    evaluation = PhaseSeries(loaded, "eval")
    assert evaluation.keys() == ["oracle/total"]
    assert evaluation.band("oracle/total") == ([5], [0.4], [0.6])


def test_ema_is_debiased_and_constant_preserving():
    assert ema([3.0] * 50) == pytest.approx([3.0] * 50)
    values = [0.0, 10.0]
    assert ema(values, weight=0.5) == pytest.approx([0.0, 5.0 / 0.75])  # m2 = 0.5 * 10, debiased by 1 - 0.5^2
    smoothed = ema(list(np.sin(np.arange(400) * 0.5) + np.arange(400) / 100), weight=0.9)
    assert np.std(np.diff(smoothed)) < np.std(np.diff(np.sin(np.arange(400) * 0.5)))


def test_only_noisy_series_get_smoothed():
    steps = np.arange(200)
    assert not is_noisy(list(np.minimum(1.0, steps / 20) * 1e-3))  # an lr warmup
    assert not is_noisy(list(0.5 + steps / 400))
    assert is_noisy(list(np.random.default_rng(0).random(200)))
    assert is_noisy(list(steps / 100 + 0.1 * np.random.default_rng(1).standard_normal(200)))


def test_render_json_layouts():
    rounds = render_json([{"round": 1, "score": 0.5}, {"round": 2, "score": 0.75, "extra": {"a": 1}}])
    assert rounds.count("<tr>") == 3 and "extra.a" in rounds
    per_component = render_json({"colour": {"base": 0.1, "final": 0.2}, "motion": {"base": 0.3, "final": 0.4}})
    assert per_component.count("<table>") == 1 and per_component.count("<tr>") == 3
    mixed = render_json({"a": 1, "runs": [{"x": [{"deep": 1}]}]})
    assert "<h3>runs</h3>" in mixed and "deep" in mixed


def test_cli_writes_the_report(run_dir):
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "vidpo", "report", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == run_dir / "report.html"
    missing = subprocess.run([sys.executable, "-m", "vidpo", "report", str(run_dir / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "run directory not found" in missing.stderr
