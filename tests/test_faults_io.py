"""Faults of output folders and files: one writer per folder (a second is refused naming the holder,
also under torchrun; a dead holder's lock is taken over; a live writer's temporaries are never deleted), pairs
and training runs that refuse other settings (naming the keys) unless ``--overwrite``, one clear line for each
bad file or path, and a full disk said as such, after which the rerun resumes to the same weights.

Concurrent runs are real processes; the first is held still with SIGSTOP while the second tries, so the test
does not depend on timing. The full disk and the read-only output are real file systems (a size-limited tmpfs
and a read-only one, mounted in a private mount namespace)."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.distributed import free_port
from helpers.micro import MICRO
from helpers.models import save_perturbed_base
from safetensors.torch import load_file, save_file

from vidpo.cli import build_parser, written_folders
from vidpo.cli import main as cli
from vidpo.config import REPO_ROOT, load_config
from vidpo.stages.generate import generate_pairs
from vidpo.stages.label import label_pairs
from vidpo.utils import atomic
from vidpo.utils.lock import FolderLocked, holder_of, output_lock

PRETRAIN = str(REPO_ROOT / "recipes" / "shapes" / "pretrain.yaml")
DPO = str(REPO_ROOT / "recipes" / "shapes" / "dpo_demo.yaml")
SHORT_TRAIN = ["train.eval_every=0", "train.ckpt_every=1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def sets(*items):
    return [a for s in list(MICRO) + list(items) for a in ("--set", str(s))]


def vidpo_command(*args):
    return [sys.executable, "-m", "vidpo", *map(str, args)]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def wait_for_holder(folder: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """The lock record of ``folder`` once a process holds it (failing if ``proc`` ends first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = holder_of(folder)
        if record:
            return record
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended ({proc.returncode}) before it held {folder}:\n"
                                 + proc.stderr.read()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"nothing locked {folder} within {timeout} s")


def refused_while_stopped(pid: int, command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` while process ``pid`` is stopped (SIGSTOP): it still holds its lock, it cannot finish."""
    os.kill(pid, signal.SIGSTOP)
    try:
        return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    finally:
        os.kill(pid, signal.SIGCONT)


# ----- one writer per folder ---------------------------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holder_and_the_first_finishes(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(vidpo_command("train", PRETRAIN, "--out", out,
                                           *sets("train.max_steps=3", *SHORT_TRAIN)),
                             env=ENV, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = wait_for_holder(out, first)
    assert record["pid"] == first.pid and record["host"] == socket.gethostname()
    second = refused_while_stopped(first.pid, vidpo_command("train", PRETRAIN, "--out", out,
                                                            *sets("seed=1", "train.max_steps=3", *SHORT_TRAIN)))
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]

    assert second.returncode == 2 and "Traceback" not in second.stderr
    [line] = error_lines(second.stderr)
    assert f"{out} is in use by pid {first.pid} on {socket.gethostname()}" in line
    assert "vidpo train" in line and str(PRETRAIN) in line   # the holder's command
    # Nothing of the first run was lost or mixed: all its steps, its seed, no temporaries left, lock released.
    assert json.loads(stdout)["steps"] == 3
    assert load_config(out / "config.yaml").seed == 0
    assert json.loads((out / "train_settings.json").read_text())["seed"] == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not [p for p in out.rglob("*") if atomic.TMP_MARK in p.name]
    assert holder_of(out) is None


def test_every_verb_that_writes_a_folder_locks_it(tmp_path):
    out, pairs = str(tmp_path / "o"), str(tmp_path / "p")
    parser = build_parser()
    writes_out = [["train", "r.yaml", "--out", out], ["generate", "r.yaml", "--out", out],
                  ["run", "r.yaml", "--out", out], ["iterate", "r.yaml", "--out", out],
                  ["cache", "r.yaml", "--out", out], ["preprocess", "r.yaml", "--out", out],
                  ["distill", "r.yaml", "--out", out],
                  ["eval", "--ckpt", "c", "--out", out], ["sample", "--ckpt", "c", "--out", out],
                  ["compare", "r.yaml", "--out", out], ["critic", "train", "r.yaml", "--pairs", pairs, "--out", out],
                  ["judge-eval", "r.yaml", "--pairs", pairs, "--human", "h", "--out", out]]
    for argv in writes_out:
        assert written_folders(parser.parse_args(argv)) == [Path(out)], argv
    assert written_folders(parser.parse_args(["label", "r.yaml", "--pairs", pairs])) == [Path(pairs)]
    # `vidpo launch` starts the job that writes --out (and takes its lock): it must not hold it itself
    assert written_folders(parser.parse_args(["launch", "r.yaml", "--out", out])) == []


def test_lock_is_reentrant_refuses_another_process_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "out"
    try_lock = ("import sys\nfrom vidpo.utils.lock import output_lock\n"
                "with output_lock(sys.argv[1], command='probe'):\n    pass\n")
    with output_lock(folder, command="holder"):
        with output_lock(folder):   # the same process again (vidpo run's stages): no deadlock
            assert holder_of(folder)["command"] == "holder"
        other = subprocess.run([sys.executable, "-c", try_lock, str(folder)], capture_output=True, text=True,
                               env=ENV, timeout=60)
        assert holder_of(folder)["pid"] == os.getpid()   # still held after the inner block
    assert other.returncode != 0 and "FolderLocked" in other.stderr
    assert f"in use by pid {os.getpid()} on {socket.gethostname()}" in other.stderr and "(holder)" in other.stderr
    assert holder_of(folder) is None   # a clean release empties the record

    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys\nfrom vidpo.utils.lock import "
                             "output_lock\nwith output_lock(sys.argv[1], command='doomed'):\n"
                             "    os.kill(os.getpid(), signal.SIGKILL)\n", str(folder)], env=ENV, timeout=60)
    assert killed.returncode == -signal.SIGKILL and holder_of(folder)["command"] == "doomed"
    with caplog.at_level(logging.WARNING, logger="vidpo"), output_lock(folder):
        assert holder_of(folder)["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and "(doomed)" in caplog.text and "no longer running" in caplog.text


def test_cleanup_keeps_the_temporaries_of_live_writers(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {f"model.safetensors.tmp-{live.pid}": "keep", f"step_0000004.tmp-{live.pid}-x1y2/": "keep",
                 f"trainer_state.pt.tmp-{dead.pid}": "remove", f"step_0000003.tmp-{dead.pid}-a7b8/": "remove",
                 f"meta.json.tmp-{os.getpid()}": "remove", "step_0000002.tmp-k3jx_q/": "remove",
                 f"step_0000001.tmp-{dead.pid}-old/": "remove", "model.safetensors": "keep"}
        for name in names:
            if name.endswith("/"):
                (tmp_path / name / "model.safetensors").parent.mkdir()
                (tmp_path / name / "model.safetensors").write_bytes(b"x")
            else:
                (tmp_path / name).write_bytes(b"x")
        assert atomic.clean_leftovers(tmp_path) == 5
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n.rstrip("/") for n, v in names.items()
                                                                    if v == "keep")
    finally:
        live.kill()
        live.wait()
    with atomic.atomic_dir(tmp_path / "ckpt") as tmp:   # a directory's temporary name carries its writer too
        assert atomic.tmp_owner(tmp.name) == os.getpid()


def test_torchrun_rank0_holds_the_lock_for_the_job(tmp_path):
    pytest.importorskip("megatron.core")
    base = save_perturbed_base(load_config(DPO, MICRO), tmp_path / "base.safetensors")
    overrides = list(MICRO) + [f"train.init_from={base}", f"pref.pairs={tmp_path / 'pairs'}", "train.eval_every=0",
                               "train.ckpt_every=1", "train.warmup_steps=0", "generate.num_pairs=4"]
    cfg = load_config(DPO, overrides)
    generate_pairs(cfg, tmp_path / "pairs")
    label_pairs(cfg, tmp_path / "pairs")
    out = tmp_path / "dist"
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                            "127.0.0.1", "--master-port", str(free_port()), "-m", "vidpo", "train", DPO, "--out",
                            str(out), *sets(*overrides[len(MICRO):], "train.max_steps=2", "parallel.tp=2")],
                           env=ENV, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = wait_for_holder(out, job)
    environ = dict(item.split("=", 1) for item in
                   Path(f"/proc/{record['pid']}/environ").read_text().split("\0") if "=" in item)
    assert environ["RANK"] == "0" and record["pid"] != job.pid   # a worker of the job, its rank 0
    second = refused_while_stopped(record["pid"], vidpo_command("train", DPO, "--out", out,
                                                                *sets(*overrides[len(MICRO):], "train.max_steps=2")))
    _, stderr = job.communicate(timeout=400)
    assert job.returncode == 0, stderr[-4000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    [line] = error_lines(second.stderr)
    assert f"in use by pid {record['pid']} on {socket.gethostname()}" in line
    # rank 0 recorded the run's settings: the same folder refuses another seed afterwards, naming it
    assert json.loads((out / "train_settings.json").read_text())["seed"] == 0
    assert cli(["train", DPO, "--out", str(out), *sets(*overrides[len(MICRO):], "seed=3")]) == 2


def shards_of(pairs: Path) -> dict:
    return {p.name: load_file(p) for p in sorted((pairs / "shards").iterdir())}


def same_shards(a: dict, b: dict) -> bool:   # tensors, not bytes: safetensors orders its metadata at random
    return a.keys() == b.keys() and all(x.keys() == b[n].keys() and all(torch.equal(x[k], b[n][k]) for k in x)
                                        for n, x in a.items())


# ----- provenance --------------------------------------------------------------------------------------------
def test_generate_rerun_with_another_seed_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    base = save_perturbed_base(load_config(DPO, MICRO), tmp_path / "base.safetensors")
    common = sets(f"train.init_from={base}", "generate.num_pairs=4")
    pairs = tmp_path / "a" / "pairs"
    assert cli(["generate", DPO, "--out", str(pairs), *common]) == 0
    before = shards_of(pairs)
    (pairs / "manifest.jsonl").write_text("{}\n")   # stands for labels of these pairs
    capsys.readouterr()

    assert cli(["generate", DPO, "--out", str(pairs), *common, "--set", "seed=1"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "(seed differ): seed: 0 -> 1" in line and "--overwrite" in line and str(pairs) in line
    assert same_shards(shards_of(pairs), before)

    # `vidpo run` keeps the pairs it finds (resume): only if they were made with the settings asked for now
    assert cli(["run", DPO, "--out", str(pairs.parent), *common, "--set", "seed=1"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith("vidpo run: error: ") and "seed: 0 -> 1" in line
    assert same_shards(shards_of(pairs), before) and not (pairs.parent / "checkpoints").exists()

    assert cli(["generate", DPO, "--out", str(pairs), *common, "--set", "seed=1", "--overwrite"]) == 0
    assert not (pairs / "manifest.jsonl").exists(), "the old pairs' labels went with them"
    fresh = tmp_path / "b" / "pairs"
    assert cli(["generate", DPO, "--out", str(fresh), *common, "--set", "seed=1"]) == 0
    after = shards_of(pairs)
    assert same_shards(after, shards_of(fresh)) and not same_shards(after, before)
    assert (pairs / "pairs.jsonl").read_text() == (fresh / "pairs.jsonl").read_text()
    # more pairs with the same settings are not "other settings": the folder grows
    assert cli(["generate", DPO, "--out", str(pairs), *sets(f"train.init_from={base}", "generate.num_pairs=8",
                                                             "seed=1")]) == 0


def test_training_run_refuses_another_seed_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", PRETRAIN, "--out", str(out), *sets("train.max_steps=1", *SHORT_TRAIN)]) == 0
    capsys.readouterr()
    assert cli(["train", PRETRAIN, "--out", str(out), *sets("seed=1", "train.max_steps=2", *SHORT_TRAIN)]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "seed: 0 -> 1" in line and "--overwrite" in line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000001"

    assert cli(["train", PRETRAIN, "--out", str(out), "--overwrite",
                *sets("seed=1", "train.max_steps=2", *SHORT_TRAIN)]) == 0
    assert json.loads((out / "train_settings.json").read_text())["seed"] == 1
    assert load_config(out / "config.yaml").seed == 1
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == [1, 2], "a run started over, not resumed"


# ----- one line for each bad file or path --------------------------------------------------------------------
def test_bad_files_and_paths_are_one_line_with_exit_2(tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all" * 10)
    good = save_perturbed_base(load_config(PRETRAIN, MICRO), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    other = tmp_path / "other_size.safetensors"     # the keys of the model, one tensor of another model's shape
    state = load_file(str(good))
    name = max(state, key=lambda k: state[k].numel())
    state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:])
    save_file(state, str(other))
    cases = [
        (["train", PRETRAIN, "--out", str(tmp_path / "r1"), *sets(f"train.init_from={garbage}")],
         [f"train.init_from: {garbage} is not a readable checkpoint / safetensors file", "header"]),
        (["eval", "--ckpt", str(truncated), "--out", str(tmp_path / "e1"), "--recipe", PRETRAIN, *sets()],
         [f"--ckpt: {truncated} is not a readable checkpoint / safetensors file"]),
        (["train", PRETRAIN, "--out", str(a_file), *sets()], [f"{a_file}: is a file, not a folder"]),
        (["train", PRETRAIN, "--out", str(tmp_path / "r2"), *sets(f"train.init_from={other}")],
         [f"{other}: weights do not fit the model: size mismatch for {name}"]),
        (["generate", PRETRAIN, "--out", str(a_file / "pairs"), *sets(f"train.init_from={good}")],
         [f"{a_file / 'pairs'}: not a directory"]),
    ]
    for argv, wanted in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        [line] = error_lines(err)
        assert line.startswith(f"vidpo {argv[0]}: error: ") and "Traceback" not in err
        for text in wanted:
            assert text in line, (text, line)
    assert cli(["--debug", *cases[0][0]]) == 2   # --debug: the traceback too
    assert "Traceback" in capsys.readouterr().err


# ----- a full disk, a read-only output -----------------------------------------------------------------------
def _mount_namespace(scratch: Path) -> list[str]:
    """A command prefix that runs its command in a private mount namespace where it may mount tmpfs, or skip."""
    scratch.mkdir()
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        if shutil.which(prefix[0]) and subprocess.run(prefix + ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                                                str(scratch)], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("no mount namespace to mount a size-limited tmpfs in (needs root or user namespaces)")


def test_full_disk_is_said_and_the_rerun_resumes_to_the_same_weights(tmp_path):
    prefix = _mount_namespace(tmp_path / "probe")
    train = vidpo_command("train", PRETRAIN, *sets("train.max_steps=6", *SHORT_TRAIN))
    # the uninterrupted run, alongside (one thread each)
    reference = subprocess.Popen(train + ["--out", str(tmp_path / "reference")], env=ENV, cwd=REPO_ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # a checkpoint of the micro model is ~1 MB (weights, EMA weights, optimizer); keep=2: the third does not fit
    disk, read_only, kept = tmp_path / "disk", tmp_path / "read_only", tmp_path / "kept"
    for d in (disk, read_only):
        d.mkdir()
    q = " ".join
    script = "\n".join([
        f"mount -t tmpfs -o ro,size=1m tmpfs {read_only} || exit 90",
        f"({q(train)} --out {read_only}/run > /dev/null 2> {tmp_path}/err3; echo $? > {tmp_path}/rc3) &",
        f"mount -t tmpfs -o size=2600k tmpfs {disk} || exit 90",
        f"{q(train)} --out {disk}/run > {tmp_path}/out1 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1",
        f"ls {disk}/run > {tmp_path}/after1",
        f"mount -o remount,size=64m {disk}",   # space is freed
        f"{q(train)} --out {disk}/run > {tmp_path}/out2 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2",
        f"cp -r {disk}/run {kept}",
        "wait",
    ])
    done = subprocess.run(prefix + ["sh", "-c", script], env=ENV, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-3000:]

    def read(name):
        return (tmp_path / name).read_text()

    assert read("rc1").strip() == "2" and "summary.json" not in read("after1").split(), "stopped mid-run"
    assert "Traceback" not in read("err1")
    [line] = error_lines(read("err1"))
    assert "the disk is full" in line and f"{disk}/run/checkpoints/step_000000" in line, line
    assert atomic.TMP_MARK not in line, "named by the file's final path"
    assert read("rc2").strip() == "0", read("err2")[-3000:]
    assert "resumed from" in read("err2")
    got = load_file(kept / "checkpoints" / "step_0000006" / "model.safetensors")
    want = load_file(tmp_path / "reference" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    assert read("rc3").strip() == "2" and "Traceback" not in read("err3")
    [line] = error_lines(read("err3"))
    assert f"cannot write to {read_only}/run" in line and "read-only" in line


def test_disk_full_errors_of_every_writer_become_one_kind():
    # what torch's zip writer and safetensors raise on ENOSPC, as seen on a full tmpfs
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    torch_error.__context__ = OSError(28, "No space left on device")
    assert atomic.is_disk_full(torch_error)
    assert atomic.is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os "
                                            "error 28)"))
    assert not atomic.is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"))
    assert not atomic.is_disk_full(FolderLocked("x"))
