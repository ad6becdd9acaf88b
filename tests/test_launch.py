"""``vidpo launch``: the sbatch script / torchrun command built from a recipe's parallel and cluster sections
(dry runs only: nothing is submitted), and the layout checks that run before anything starts."""
import re
import shutil
import subprocess

import pytest

from vidpo.cli import main as cli
from vidpo.cluster.launch import build_launch, render
from vidpo.config import REPO_ROOT, load_config

WAN = "recipes/cluster/dit1.3b_densedpo_128gpu.yaml"
IPO = "recipes/cluster/dit5b_ipo_round.yaml"


def dry_run(capsys, recipe, *extra):
    code = cli(["launch", recipe, "--out", "runs/wan13b", "--dry-run", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_slurm_script_for_16_nodes_of_8_gpus(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    code, script, _ = dry_run(capsys, WAN, "--set", "train.lr=1e-5", "--set", "cluster.account=vidpo-lab")
    assert code == 0
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=96", "#SBATCH --time=48:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=vidpo-lab", "#SBATCH --output=runs/wan13b/slurm-%j.out",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "export NCCL_IB_TIMEOUT=22"):
        assert line in lines, line
    assert "#SBATCH --qos" not in script  # unset options leave no line behind
    assert "world 128" in script and "dp 64 (shard 64 x replicate 1) x cp 1 x tp 2 + sp" in script
    launch = script[script.index("srun "):]
    assert '--nnodes="$SLURM_NNODES" --nproc-per-node=8' in launch
    assert '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in launch
    assert launch.rstrip().endswith(f"-m vidpo train {WAN} --out runs/wan13b --set train.lr=1e-5 "
                                    "--set cluster.account=vidpo-lab")
    assert not (REPO_ROOT / "runs" / "wan13b").exists(), "a dry run writes nothing"
    if shutil.which("bash"):
        path = tmp_path / "launch.sbatch"
        path.write_text(script)
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, "the script is not valid bash"


def test_hybrid_sharded_recipe_and_container(capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    code, script, _ = dry_run(capsys, IPO, "--set", "cluster.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
                              "--set", "cluster.container_mounts=[/data:/data]",
                              "--set", "cluster.setup=[cd /work/vidpo]")
    assert code == 0
    assert "dp 64 (shard 4 x replicate 16) x cp 1 x tp 2 + sp" in script
    assert "srun --container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/data:/data torchrun" \
        in script
    assert "\ncd /work/vidpo\n" in script


def test_torchrun_single_node_and_multi_node_scripts():
    cfg = load_config(WAN, ["cluster.launcher=torchrun", "cluster.nodes=1", "cluster.gpus_per_node=8",
                            "train.batch_size=4"])
    plan = build_launch(cfg, WAN, [], out="runs/x")
    assert plan.torchrun[:4] == ["torchrun", "--standalone", "--nproc-per-node", "8"]
    assert plan.torchrun[4:] == ["-m", "vidpo", "train", WAN, "--out", "runs/x"]
    assert "Run it on this node." in plan.script and plan.script_path.name == "launch.sh"
    cfg = load_config(WAN, ["cluster.launcher=torchrun", "cluster.rdzv_endpoint=node0:29400"])
    plan = build_launch(cfg, WAN, ["train.lr=1e-5"], out="runs/x")
    assert " ".join(plan.torchrun).startswith(
        "torchrun --nnodes 16 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id vidpo")
    assert "--set train.lr=1e-5" in plan.script.splitlines()[-1]


@pytest.mark.parametrize("overrides, message", [
    (["cluster.launcher=torchrun"], "needs cluster.rdzv_endpoint"),
    (["cluster.gpus_per_node=2", "parallel.tp=4"], "parallel.tp=4 spans nodes \\(cluster.gpus_per_node=2\\)"),
    (["train.batch_size=100"], "train.batch_size=100 is not divisible by the data-parallel size 64"),
    (["parallel.tp=1", "parallel.cp=2"], "21 latent frames .* not divisible by parallel.cp = 2"),
    (["parallel.tp=8"], "12 attention heads are not divisible by parallel.tp \\* parallel.cp = 8"),
    (["parallel.tp=3"], "world size 128 is not divisible by parallel.tp \\* parallel.cp = 3"),
    (["parallel.dp_shard=5"], "parallel.dp_shard=5 must divide the data-parallel size 64"),
    (["cluster.env=[NOEQUALS]"], "cluster.env entry 'NOEQUALS' is not KEY=VALUE"),
    (["train.objective=sft"], "train.objective=sft runs in one process"),
])
def test_bad_layouts_fail_before_anything_starts(capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(REPO_ROOT)
    code, out, err = dry_run(capsys, WAN, *[a for o in overrides for a in ("--set", o)])
    assert code == 2 and not out
    assert err.startswith("vidpo launch: error: ")
    assert re.search(message, err), err


def test_render_placeholders():
    text = "a={{ a }}\n{{ empty }}\n  {{ empty }}{{ empty }}\nkeep {{ empty }}\n"
    assert render(text, {"a": 1, "empty": ""}) == "a=1\nkeep \n"
    with pytest.raises(KeyError, match="unknown placeholder '{{ missing }}'"):
        render("{{ missing }}", {}, source="x.tmpl")
