"""The `vidpo` CLI in real subprocesses: help of every verb, train -> sample -> eval, clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.micro import MICRO

REPO = Path(__file__).resolve().parent.parent
VERBS = ["train", "sample", "eval", "config", "report", "generate", "label", "run"]


def vidpo(*args, check=True, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "vidpo", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vidpo {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def sets(*extra):
    out = []
    for item in list(MICRO) + list(extra):
        out += ["--set", item]
    return out


def test_help_of_every_verb():
    top = vidpo("--help").stdout
    for verb in VERBS:
        assert verb in top
        assert "usage: vidpo " + verb in vidpo(verb, "--help").stdout


def test_train_sample_eval_chain(tmp_path):
    run = tmp_path / "run"
    out = vidpo("train", REPO / "recipes/shapes/pretrain.yaml", "--out", run,
                *sets("train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2"))
    summary = json.loads(out.stdout)
    assert summary["steps"] == 4 and 0.0 <= summary["final"]["oracle"]["mean"] <= 1.0
    for name in ("metrics.jsonl", "summary.json", "report.html", "samples/final.gif", "samples/final.png",
                 "checkpoints/latest", "config.yaml"):
        assert (run / name).exists(), name
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == [1, 2, 3, 4]
    assert any(r["phase"] == "eval" and "oracle/total" in r for r in rows)

    # Rerunning the finished run resumes at its last checkpoint and does no more steps.
    again = json.loads(vidpo("train", REPO / "recipes/shapes/pretrain.yaml", "--out", run,
                             *sets("train.max_steps=4")).stdout)
    assert again["steps"] == 4

    samples = tmp_path / "samples"
    vidpo("sample", "--ckpt", run, "--out", samples, "--num", 4)
    assert (samples / "samples.gif").exists() and (samples / "samples.safetensors").exists()
    assert len((samples / "captions.txt").read_text().splitlines()) == 4

    ev = tmp_path / "eval"
    brief = json.loads(vidpo("eval", "--ckpt", run, "--base", run, "--out", ev, "--num", 8).stdout)
    assert brief["delta"]["mean"] == 0.0  # same weights, same seeds: the paired delta is exactly zero
    full = json.loads((ev / "eval.json").read_text())
    assert set(full["model"]) >= {"oracle", "oracle/colour", "oracle/motion", "mode/wrong_colour",
                                  "mode/reversed_direction", "mode/static", "mode/missing"}
    assert set(brief["mode_rates"]) == {"wrong_colour", "reversed_direction", "static", "missing"}
    assert full["delta"]["mode/static"]["mean"] == 0.0 and 0 <= brief["mode_rates"]["missing"] <= 1
    lo, hi = full["model"]["oracle"]["ci95"]
    assert lo <= full["model"]["oracle"]["mean"] <= hi


def test_recipe_typo_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ntrain:\n  max_step: 3\n")
    proc = vidpo("train", bad, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if "error" in l]
    assert len(lines) == 1 and "max_step" in lines[0] and "train.max_steps" in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint_is_clear(tmp_path):
    proc = vidpo("sample", "--ckpt", tmp_path / "none", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "no weights at" in proc.stderr and "Traceback" not in proc.stderr


def test_config_explain():
    out = vidpo("config", "--explain", "pref.beta").stdout
    assert "pref.beta = 1000.0" in out
