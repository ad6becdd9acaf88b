"""Preemption: a stop signal (SIGUSR1, what SLURM's ``--signal`` sends) to a running ``vidpo train``, ``generate``
or ``label`` stops it at a safe point with exit status 75, and the same command run again ends exactly where
an uninterrupted run ends: the same final weights bit for bit, the same shards and manifests, no pair lost and
none done twice. ``train`` is stopped through the job script ``vidpo launch`` writes (its trap passes the
signal on), the others directly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.distributed import assert_all_ranks_ok, destroy_gloo, init_gloo, record, spawn_workers, worker_results
from helpers.micro import MICRO
from helpers.models import save_perturbed_base
from safetensors.torch import load_file

from vidpo.cli import main as cli
from vidpo.config import REPO_ROOT, load_config
from vidpo.utils import preemption

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "tests"))
SETS = [a for o in MICRO + ["train.num_threads=1"] for a in ("--set", o)]


def start(argv, cwd):
    """A process of its own session (its own process group, as a job step is)."""
    return subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stop_when(proc, ready, timeout=120.0):
    """Send SIGUSR1 to ``proc`` as soon as ``ready()`` holds (polled every 2 ms); its output and exit status."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before it could be stopped:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "never got going"
        time.sleep(0.002)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=timeout)
    return out, proc.returncode


def vidpo(cwd, *args):
    done = subprocess.run([sys.executable, "-m", "vidpo", *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def in_process(cwd, *args):
    """``vidpo ARGS`` in this process (no interpreter to start), from ``cwd``."""
    here, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(cwd)
    try:
        assert cli([str(a) for a in args]) == 0
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)


def lines_of(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_train_stopped_by_the_job_scripts_signal_resumes_bit_for_bit(tmp_path, monkeypatch):
    recipe = str(REPO_ROOT / "recipes/shapes/pretrain.yaml")
    sets = SETS + ["--set", "train.max_steps=100", "--set", "train.eval_every=0", "--set", "train.ckpt_every=0",
                   "--set", "eval.num_samples=4"]
    in_process(tmp_path, "train", recipe, "--out", "whole", *sets)   # the uninterrupted run
    # the job script `vidpo launch` writes for this machine (torchrun launcher, one process: SFT)
    monkeypatch.chdir(tmp_path)
    assert cli(["launch", recipe, "--out", "stopped", "--verb", "train", "--launcher", "torchrun", "--dry-run",
                "--set", "cluster.gpus_per_node=1", *sets]) == 0
    script = tmp_path / "stopped" / "launch" / "job.sh"
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    out, code = stop_when(start(["bash", str(script)], tmp_path), lambda: lines_of(metrics) >= 2)
    assert code == 0 and "stopped by SIGUSR1" in out and "run this script again to resume" in out, out
    assert "vidpo train: train stopped at step" in out, out
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    checkpoints = sorted((tmp_path / "stopped" / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == [f"step_{stopped_at:07d}"] and 2 <= stopped_at < 100
    assert not list((tmp_path / "stopped" / "launch" / "done").iterdir()), "a stopped stage is not done"

    again = subprocess.run(["bash", str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and f"at step {stopped_at}" in again.stderr
    final = "checkpoints/step_0000100/model.safetensors"
    whole, resumed = load_file(tmp_path / "whole" / final), load_file(tmp_path / "stopped" / final)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 101)), "every step logged once"
    assert len(list((tmp_path / "stopped" / "launch" / "done").iterdir())) == 1, "the finished stage is marked"


@pytest.fixture
def base(tmp_path):
    return save_perturbed_base(load_config(None, MICRO), tmp_path / "base.safetensors")


def test_generate_stopped_between_shards_resumes_without_loss_or_repeat(tmp_path, base):
    (tmp_path / "r.yaml").write_text("seed: 0\n")
    sets = SETS + ["--set", f"train.init_from={base}", "--set", "train.objective=dense_dpo",
                   "--set", "generate.num_pairs=120", "--set", "generate.shard_size=2"]
    in_process(tmp_path, "generate", "r.yaml", "--out", "whole", *sets)
    shards = tmp_path / "stopped" / "shards"
    out, code = stop_when(start([sys.executable, "-m", "vidpo", "generate", "r.yaml", "--out", "stopped", *sets],
                                tmp_path), lambda: shards.exists() and any(shards.glob("*.safetensors")))
    assert code == preemption.EXIT_CODE, out
    assert "stopped before shard" in out and "rerun the same command to resume" in out
    done_before = sorted(p.name for p in shards.glob("*.safetensors"))
    assert 1 <= len(done_before) < 60 and not (tmp_path / "stopped" / "pairs.jsonl").exists()
    vidpo(tmp_path, "generate", "r.yaml", "--out", "stopped", *sets)
    info = json.loads((tmp_path / "stopped" / "generate.json").read_text())
    assert info["shards_skipped"] == len(done_before) and info["shards_written"] == 60 - len(done_before), \
        "each shard made once"
    whole_shards = sorted((tmp_path / "whole" / "shards").glob("*.safetensors"))
    assert [p.name for p in whole_shards] == sorted(p.name for p in shards.glob("*.safetensors"))
    for path in whole_shards:
        a, b = load_file(path), load_file(shards / path.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path.name
    assert (tmp_path / "whole" / "pairs.jsonl").read_text() == (tmp_path / "stopped" / "pairs.jsonl").read_text()


def test_label_stopped_between_batches_resumes_without_loss_or_repeat(tmp_path, base):
    (tmp_path / "r.yaml").write_text("seed: 0\n")
    sets = SETS + ["--set", f"train.init_from={base}", "--set", "train.objective=dense_dpo",
                   "--set", "generate.num_pairs=640", "--set", "generate.shard_size=128", "--set", "generate.steps=1"]
    in_process(tmp_path, "generate", "r.yaml", "--out", "whole", *sets)
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped")   # the same pairs, labelled twice
    in_process(tmp_path, "label", "r.yaml", "--pairs", "whole", *sets)
    partial = tmp_path / "stopped" / "labels.partial.jsonl"
    out, code = stop_when(start([sys.executable, "-m", "vidpo", "label", "r.yaml", "--pairs", "stopped", *sets],
                                tmp_path), lambda: lines_of(partial) >= 1)
    assert code == preemption.EXIT_CODE, out
    labelled_before = lines_of(partial)
    assert "label stopped after" in out and 64 <= labelled_before < 640 and labelled_before % 64 == 0, out
    assert not (tmp_path / "stopped" / "manifest.jsonl").exists()
    vidpo(tmp_path, "label", "r.yaml", "--pairs", "stopped", *sets)
    stats = json.loads((tmp_path / "stopped" / "label.json").read_text())
    assert stats["throughput"]["pairs"] == 640 - labelled_before, "the resumed run labels only what was left"
    whole = [json.loads(line) for line in (tmp_path / "whole" / "manifest.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "stopped" / "manifest.jsonl").read_text().splitlines()]
    assert [r["pair_id"] for r in resumed] == [r["pair_id"] for r in whole] and len(whole) == 640
    assert [(r["labels"], r["video_label"]) for r in resumed] == [(r["labels"], r["video_label"]) for r in whole]


def test_handler_is_restored_and_agreed_is_the_local_flag_in_one_process():
    before = signal.getsignal(signal.SIGUSR1)
    with preemption.handling_signals():
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert preemption.requested() and preemption.agreed()
    assert signal.getsignal(signal.SIGUSR1) == before and not preemption.requested()



def test_torchrun_ranks_stop_at_the_same_step_and_resume(tmp_path, monkeypatch):
    """The cluster path: the job script passes SIGUSR1 to torchrun, which passes it to both ranks
    (--signals-to-handle); they agree on the step, write one checkpoint together and stop; the rerun resumes
    there and logs every step once. (That a DCP checkpoint resumes bit for bit is tests/test_distributed_*'s.)"""
    pytest.importorskip("megatron.core")
    recipe = str(REPO_ROOT / "recipes/shapes/dpo_demo.yaml")
    base = save_perturbed_base(load_config(recipe, MICRO), tmp_path / "demo_base.safetensors")
    pref = [*MICRO, f"train.init_from={base}", f"pref.pairs={tmp_path / 'pairs'}", "train.num_threads=1"]
    in_process(tmp_path, "generate", recipe, "--out", "pairs", *[a for o in pref for a in ("--set", o)])
    in_process(tmp_path, "label", recipe, "--pairs", "pairs", *[a for o in pref for a in ("--set", o)])
    sets = [a for o in pref + ["train.max_steps=30", "train.eval_every=0", "train.ckpt_every=0",
                               "train.warmup_steps=0", "cluster.launcher=torchrun", "cluster.gpus_per_node=2"]
            for a in ("--set", o)]
    monkeypatch.chdir(tmp_path)
    assert cli(["launch", recipe, "--out", "stopped", "--verb", "train", "--dry-run", *sets]) == 0
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    out, code = stop_when(start(["bash", "stopped/launch/job.sh"], tmp_path), lambda: lines_of(metrics) >= 1)
    assert code == 0 and "stopped by SIGUSR1" in out, out[-4000:]
    assert out.count("train stopped at step") == 2, "both ranks stopped, at the same step"
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert [c.name for c in (tmp_path / "stopped" / "checkpoints").glob("step_*")] == [f"step_{stopped_at:07d}"]
    assert stopped_at < 30
    again = subprocess.run(["bash", "stopped/launch/job.sh"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"at step {stopped_at}" in again.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 31)) and (tmp_path / "stopped" / "checkpoints" / "step_0000030").is_dir()


def _expect(condition: bool) -> None:
    assert condition


def _agreement_worker(rank, port, result_dir):
    with worker_results(rank, result_dir, destroy_gloo) as results:
        init_gloo(rank, port)
        record(results, "nobody asked", lambda: _expect(not preemption.agreed()))
        if rank == 1:   # the signal reached one rank only (it may reach the others a step later)
            preemption.request()
        record(results, "one rank asked: every rank stops", lambda: _expect(preemption.agreed()))


def test_ranks_agree_to_stop_when_one_of_them_is_signalled(tmp_path):
    per_rank = spawn_workers(_agreement_worker, str(tmp_path))
    for name in ("nobody asked", "one rank asked: every rank stops"):
        assert_all_ranks_ok(per_rank, name)
