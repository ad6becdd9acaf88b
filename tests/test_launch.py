"""``vidpo launch``: the job scripts built from a recipe's parallel and cluster sections (dry runs: written and
printed, nothing submitted), the layout checks that run before anything is written, and the preflight
``--check`` that finds every problem of a job before any allocation."""
import re
import shutil
import subprocess

import pytest
from helpers.micro import MICRO
from helpers.models import save_perturbed_base
from helpers.vlm_server import FakeVLM

from vidpo.cli import main as cli
from vidpo.cluster.launch import build_launch, render
from vidpo.config import REPO_ROOT, load_config

WAN = "recipes/cluster/dit1.3b_densedpo_128gpu.yaml"
IPO = "recipes/cluster/dit5b_ipo_round.yaml"
WAN_LORA = "recipes/wan/wan2.1_1.3b_densedpo_lora.yaml"
ENVIRONMENT = ["cluster.modules=[cuda/12.4,nccl]", "cluster.venv=/opt/vidpo-venv", "cluster.workdir=/work/vidpo",
               "cluster.setup=[ulimit -n 65536]"]


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def dry_run(capsys, recipe, out, *extra):
    code = cli(["launch", recipe, "--out", str(out), "--dry-run", *extra])
    printed, err = capsys.readouterr()
    return code, printed, err


def valid_bash(*paths):
    if shutil.which("bash"):
        for path in paths:
            assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, f"{path} is not valid bash"


def stage_lines(script: str) -> list[str]:
    """The ``stage`` calls of a job script, each joined into one line."""
    body = script.replace("\\\n  ", "")
    return [line for line in body.splitlines() if line.startswith("stage ")]


def test_single_allocation_runs_every_stage_with_environment_requeue_and_signal(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "wan13b"
    code, printed, _ = dry_run(capsys, WAN, out, *sets("train.lr=1e-5", "cluster.account=vidpo-lab", *ENVIRONMENT))
    assert code == 0
    script_path = out / "launch" / "job.sbatch"
    script = script_path.read_text()
    assert script in printed and sorted(p.name for p in (out / "launch").iterdir()) == ["job.sbatch"]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=96", "#SBATCH --time=48:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=vidpo-lab", f"#SBATCH --output={out}/slurm-%j.out", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append", "#SBATCH --chdir=/work/vidpo",
                 "module load cuda/12.4", "module load nccl", "source /opt/vidpo-venv/bin/activate",
                 "cd /work/vidpo", "ulimit -n 65536",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export NCCL_IB_TIMEOUT=22",
                 "trap 'forward_stop USR1' USR1", "trap 'forward_stop TERM' TERM",
                 '  scontrol requeue "$SLURM_JOB_ID" || echo "vidpo job: requeue refused; resubmit" >&2'):
        assert line in lines, line
    # the environment comes before anything runs
    assert lines.index("module load cuda/12.4") < lines.index("source /opt/vidpo-venv/bin/activate") \
        < lines.index("cd /work/vidpo") < lines.index("ulimit -n 65536") < lines.index("trap 'forward_stop USR1' USR1")
    assert "#SBATCH --qos" not in script  # unset options leave no line behind
    assert "world 128" in script and "dp 64 (shard 64 x replicate 1) x cp 1 x tp 2 + sp" in script
    assert "Stages: generate -> label -> train -> eval" in script
    steps = stage_lines(script)
    assert [s.split()[1:3] for s in steps] == [["generate-1", "all"], ["generate-2", "all"], ["label-1", "all"],
                                               ["label-2", "all"], ["train", "all"], ["eval", "all"]]
    forwarded = "--set train.lr=1e-5 --set cluster.account=vidpo-lab"
    torchrun = ('srun torchrun "--nnodes=$SLURM_NNODES" --nproc-per-node=8 "--rdzv-id=$SLURM_JOB_ID" '
                '--rdzv-backend=c10d "--rdzv-endpoint=$MASTER_ADDR:{port}" '
                '--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=300 -m vidpo ')
    assert steps[0].startswith("stage generate-1 all " + torchrun.format(port=29500) +
                               f"generate {WAN} --out {out}/pairs {forwarded}")
    assert f"generate {WAN} --out {out}/pairs_heldout --split heldout {forwarded}" in steps[1]
    assert steps[2].startswith("stage label-1 all srun torchrun ")   # every rank labels its share
    assert f"-m vidpo label {WAN} --pairs {out}/pairs {forwarded}" in steps[2]
    assert steps[4].endswith(f"-m vidpo train {WAN} --out {out} {forwarded} "
                             "--set 'cluster.modules=[cuda/12.4,nccl]' --set cluster.venv=/opt/vidpo-venv "
                             "--set cluster.workdir=/work/vidpo --set 'cluster.setup=[ulimit -n 65536]' "
                             f"--set pref.pairs={out}/pairs")
    assert f"-m vidpo run {WAN} --out {out} {forwarded}" in steps[5]
    ports = [int(m) for m in re.findall(r"MASTER_ADDR:(\d+)", script)]
    assert len(set(ports)) == len(ports) == 6, "every torchrun step meets at a rendezvous of its own"
    valid_bash(script_path)


def test_chain_of_jobs_one_per_stage_submitted_in_order(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "chain"
    code, printed, _ = dry_run(capsys, WAN, out, *sets("cluster.mode=chain", "cluster.signal_grace_s=120",
                                                       "cluster.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                                                       "cluster.container_mounts=[/data:/data]", *ENVIRONMENT))
    assert code == 0
    launch = out / "launch"
    names = ["1-generate.sbatch", "2-label.sbatch", "3-train.sbatch", "4-eval.sbatch"]
    assert sorted(p.name for p in launch.iterdir()) == names + ["submit.sh"]
    for name in names:
        script = (launch / name).read_text()
        assert script in printed
        for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "module load cuda/12.4",
                     "source /opt/vidpo-venv/bin/activate", "cd /work/vidpo", "trap 'forward_stop USR1' USR1"):
            assert line in script.splitlines(), (name, line)
        assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/data:/data " \
               "--container-workdir=/work/vidpo" in script
        assert "#SBATCH --nodes=16" in script
        assert f"#SBATCH --job-name=dit1.3b_densedpo_128gpu-{name[2:-7]}" in script
        assert "--shutdown-timeout=120" in script
    assert "label-1 all" in (launch / "2-label.sbatch").read_text()
    submit = (launch / "submit.sh").read_text()
    order = [submit.index(f"prev=$(submit {launch / name})") for name in names]
    assert order == sorted(order)
    assert "sbatch --parsable --kill-on-invalid-dep=yes ${prev:+--dependency=afterok:$prev}" in submit
    valid_bash(*launch.iterdir())


def test_one_verb_and_hybrid_sharded_layout(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    code, printed, _ = dry_run(capsys, WAN, tmp_path / "t", "--verb", "train", *sets("train.lr=1e-5"))
    assert code == 0
    steps = stage_lines(printed)
    assert len(steps) == 1 and steps[0].endswith(f"-m vidpo train {WAN} --out {tmp_path / 't'} --set train.lr=1e-5")
    code, printed, _ = dry_run(capsys, IPO, tmp_path / "ipo", "--verb", "train")
    assert code == 0 and "dp 64 (shard 4 x replicate 16) x cp 1 x tp 2 + sp" in printed
    code, _, err = dry_run(capsys, IPO, tmp_path / "ipo", "--verb", "cache")
    assert code == 2 and "--verb cache: this recipe's job has no cache stage (its stages: generate -> label" in err
    # The IPO rounds run on every GPU of the allocation (each round's stages are sliced over the ranks).
    code, printed, _ = dry_run(capsys, IPO, tmp_path / "ipo", "--verb", "iterate")
    steps = stage_lines(printed)
    assert code == 0 and len(steps) == 1 and steps[0].startswith("stage iterate all")
    assert "srun torchrun" in steps[0] and steps[0].endswith(f"-m vidpo iterate {IPO} --out {tmp_path / 'ipo'}")


def test_torchrun_single_node_and_multi_node_scripts(tmp_path):
    cfg = load_config(WAN, ["cluster.launcher=torchrun", "cluster.nodes=1", "cluster.gpus_per_node=8",
                            "train.batch_size=4"])
    plan = build_launch(cfg, WAN, [], out="runs/x", verb="train")
    assert plan.torchrun[:3] == ["torchrun", "--standalone", "--nproc-per-node=8"]
    assert plan.torchrun[-6:] == ["-m", "vidpo", "train", WAN, "--out", "runs/x"]
    assert "Run it on this node: bash runs/x/launch/job.sh" in plan.script and plan.entry.name == "job.sh"
    assert "scontrol" not in plan.script and 'echo "vidpo job: run this script again to resume" >&2' in plan.script
    cfg = load_config(WAN, ["cluster.launcher=torchrun", "cluster.rdzv_endpoint=node0:29400"])
    plan = build_launch(cfg, WAN, ["train.lr=1e-5"], out="runs/x")
    assert " ".join(plan.torchrun).startswith(
        "torchrun --nnodes=16 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29400 "
        "--rdzv-id=vidpo-generate-1")
    steps = stage_lines(plan.script)
    assert steps[-1].endswith(f"-m vidpo run {WAN} --out runs/x --set train.lr=1e-5")
    assert "NODE_RANK=i bash runs/x/launch/job.sh" in plan.script
    path = tmp_path / "job.sh"
    path.write_text(plan.script)
    valid_bash(path)


@pytest.mark.parametrize("overrides, message", [
    (["cluster.launcher=torchrun"], "needs cluster.rdzv_endpoint"),
    (["cluster.gpus_per_node=2", "parallel.tp=4"], "parallel.tp=4 spans nodes \\(cluster.gpus_per_node=2\\)"),
    (["train.batch_size=100"], "train.batch_size=100 is not divisible by the data-parallel size 64"),
    (["parallel.tp=1", "parallel.cp=2"], "21 latent frames .* not divisible by parallel.cp = 2"),
    (["parallel.tp=8"], "12 attention heads are not divisible by parallel.tp \\* parallel.cp = 8"),
    (["parallel.tp=3"], "world size 128 is not divisible by parallel.tp \\* parallel.cp = 3"),
    (["parallel.dp_shard=5"], "parallel.dp_shard=5 must divide the data-parallel size 64"),
    (["cluster.env=[NOEQUALS]"], "cluster.env entry 'NOEQUALS' is not KEY=VALUE"),
    (["cluster.signal_grace_s=0"], "cluster.signal_grace_s must be >= 1"),
    (["cluster.mode=parallel"], "cluster.mode"),
    (["train.objective=sft"], "train.objective=sft runs in one process"),
])
def test_bad_layouts_fail_before_anything_is_written(capsys, tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(REPO_ROOT)
    code, out, err = dry_run(capsys, WAN, tmp_path / "x", *sets(*overrides))
    assert code == 2 and not out and not (tmp_path / "x").exists()
    assert err.startswith("vidpo launch: error: ")
    assert re.search(message, err), err


def test_render_placeholders():
    text = "a={{ a }}\n{{ empty }}\n  {{ empty }}{{ empty }}\nkeep {{ empty }}\n"
    assert render(text, {"a": 1, "empty": ""}) == "a=1\nkeep \n"
    with pytest.raises(KeyError, match="unknown placeholder '{{ missing }}'"):
        render("{{ missing }}", {}, source="x.tmpl")


# ----- vidpo launch --check ----------------------------------------------------------------------------------
def check(capsys, recipe, *extra):
    code = cli(["launch", recipe, "--check", *extra])
    printed, err = capsys.readouterr()
    return code, printed.splitlines()


def test_check_lists_every_problem_at_once(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the recipe's model directory and prompt file are not here
    code, lines = check(capsys, str(REPO_ROOT / WAN_LORA), "--out", "runs/w",
                        *sets("label.vlm.base_url=http://127.0.0.1:9/v1", "cluster.nodes=1",
                              "cluster.gpus_per_node=3", "parallel.cp=2"))
    assert code == 1
    problems = lines[1:]
    assert lines[0].endswith(f"{len(problems)} problem(s)") and all(p.startswith("  ") for p in problems)
    text = "\n".join(problems)
    assert re.search(r"world size 3 is not divisible by parallel.tp \* parallel.cp = 2", text), text
    assert "model.path: checkpoints/Wan2.1-T2V-1.3B-Diffusers does not exist" in text
    assert "label.vlm.base_url: cannot reach the VLM server at http://127.0.0.1:9/v1" in text
    assert "prompts.path: prompts.jsonl does not exist" in text
    assert len(problems) == 4, text


def test_check_passes_a_job_whose_parts_exist_and_names_what_is_missing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("seed: 0\n")
    base = save_perturbed_base(load_config(None, MICRO), tmp_path / "base.safetensors")
    job = sets(*MICRO, f"train.init_from={base}", "train.objective=dense_dpo", "cluster.launcher=torchrun",
               "cluster.gpus_per_node=2")
    server = FakeVLM()
    try:
        code, lines = check(capsys, "r.yaml", *job, *sets("label.labeler=vlm", f"label.vlm.base_url={server.base_url}",
                                                         "label.vlm.model=fake-vlm"))
        assert (code, lines) == (0, ["vidpo launch --check r.yaml: ok"]) and server.probes == 1
    finally:
        server.close()
    # training alone reads pref.pairs, which the whole job would have made; the batch of 4 over 3 GPUs
    code, lines = check(capsys, "r.yaml", "--verb", "train", *job, *sets("cluster.gpus_per_node=3",
                                                                          "pref.pairs=nowhere"))
    assert code == 1 and lines[1:] == [
        "  pref.pairs: nowhere does not exist",
        "  train.batch_size=4 is not divisible by the data-parallel size 3 (world 3 / (tp 1 * cp 1)): every rank "
        "must take an equal share of the global batch (cluster.nodes 1 * cluster.gpus_per_node 3)"]
