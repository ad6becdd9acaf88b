"""``vidpo launch RECIPE``: start a recipe's distributed training from its ``parallel`` and ``cluster`` sections.

    vidpo launch recipes/cluster/dit1.3b_densedpo_128gpu.yaml --out runs/wan --dry-run   # print, start nothing
    vidpo launch RECIPE --out runs/x                                                     # submit / start it

``cluster.launcher``:
  torchrun  one node: ``torchrun --standalone --nproc-per-node G -m vidpo train ...``, run here; several
            nodes: a shell script (``recipes/launch/torchrun.sh.tmpl``) with a c10d rendezvous on
            ``cluster.rdzv_endpoint``, to start on every node
  slurm     an sbatch script (``recipes/launch/slurm.sbatch.tmpl``): one srun task per node runs torchrun
            with the rendezvous on the allocation's first node; written to ``OUT/launch.sbatch`` and submitted

The layout is checked before anything starts (world = nodes * gpus_per_node divisible by tp * cp, heads by
tp * cp, latent frames by cp, the global batch by the data-parallel size, tensor parallel inside a node),
so a typo costs a second, not a queue wait. Recipe overrides (``--set``) are forwarded to every rank.
Templates use ``{{ name }}`` placeholders; a placeholder that renders empty on a line of its own drops
the line.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vidpo.cluster.scale import model_config
from vidpo.config import REPO_ROOT, ConfigError, RunConfig
from vidpo.training.distributed import DistributedSetupError, resolve_layout

TEMPLATE_DIR = REPO_ROOT / "recipes" / "launch"
TEMPLATES = {"slurm": "slurm.sbatch.tmpl", "torchrun": "torchrun.sh.tmpl"}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass
class LaunchPlan:
    """What ``vidpo launch`` would start: the torchrun argv (one node's view), and the script around it."""

    launcher: str
    world: int
    nodes: int
    gpus_per_node: int
    layout: object
    torchrun: list[str]
    script: str
    script_path: Path

    def describe(self) -> str:
        lay = self.layout
        return (f"dp {lay.dp} (shard {lay.dp_shard} x replicate {lay.dp_replicate}) x cp {lay.cp} x tp {lay.tp}"
                f"{' + sp' if lay.sp else ''}")


def render(template: str, values: dict, *, source: str = "template") -> str:
    """Fill ``{{ name }}`` placeholders; a line whose only content was placeholders that rendered empty is
    dropped. An unknown placeholder is an error naming it."""
    out = []
    for line in template.splitlines():
        names = _PLACEHOLDER.findall(line)
        for name in names:
            if name not in values:
                raise KeyError(f"{source}: unknown placeholder '{{{{ {name} }}}}'")
        rendered = _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line)
        if names and not rendered.strip() and not _PLACEHOLDER.sub("", line).strip():
            continue
        out.append(rendered)
    return "\n".join(out) + "\n"


def _check(cfg: RunConfig, world: int):
    dcfg = model_config(cfg)
    try:
        layout = resolve_layout(world, cfg.parallel, num_heads=dcfg.num_heads,
                                frames=cfg.world.frames // dcfg.patch_size[0])
    except DistributedSetupError as exc:
        raise ConfigError(f"parallel: {exc}") from None
    if layout.tp > cfg.cluster.gpus_per_node:
        raise ConfigError(f"parallel.tp={layout.tp} spans nodes (cluster.gpus_per_node={cfg.cluster.gpus_per_node}): "
                          "keep tensor parallel inside a node's NVLink domain")
    if cfg.train.batch_size % layout.dp:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel size "
                          f"{layout.dp} (world {world} / (tp {layout.tp} * cp {layout.cp}))")
    if cfg.train.objective == "sft":
        raise ConfigError("train.objective=sft runs in one process; distributed training covers flow_dpo, "
                          "dense_dpo and kto")
    return layout


def build_launch(cfg: RunConfig, recipe: str, overrides: Sequence[str] = (), *, out: str,
                 launcher: str | None = None) -> LaunchPlan:
    """The launch of ``recipe`` (already loaded as ``cfg``, with ``overrides``) into run directory ``out``."""
    cl = cfg.cluster
    launcher = launcher or cl.launcher
    if launcher not in TEMPLATES:
        raise ConfigError(f"cluster.launcher={launcher!r} is not one of {sorted(TEMPLATES)}")
    if cl.nodes < 1 or cl.gpus_per_node < 1:
        raise ConfigError(f"cluster.nodes={cl.nodes} and cluster.gpus_per_node={cl.gpus_per_node} must be >= 1")
    world = cl.nodes * cl.gpus_per_node
    layout = _check(cfg, world)
    verb_args = ["train", recipe, "--out", out] + [a for o in overrides for a in ("--set", o)]
    if launcher == "slurm" or cl.nodes > 1:
        endpoint = "$MASTER_ADDR:$MASTER_PORT" if launcher == "slurm" else (cl.rdzv_endpoint or "")
        if not endpoint:
            raise ConfigError(f"cluster.nodes={cl.nodes} with launcher torchrun needs cluster.rdzv_endpoint "
                              "(host:port of node 0), or cluster.launcher=slurm")
        rdzv = ["--nnodes", str(cl.nodes), "--nproc-per-node", str(cl.gpus_per_node), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", endpoint, "--rdzv-id", "$SLURM_JOB_ID" if launcher == "slurm" else "vidpo"]
    else:
        rdzv = ["--standalone", "--nproc-per-node", str(cl.gpus_per_node)]
    torchrun = ["torchrun", *rdzv, "-m", "vidpo", *verb_args]

    env = list(cl.env)
    if layout.tp > 1 and not any(e.startswith("CUDA_DEVICE_MAX_CONNECTIONS=") for e in env):
        # megatron-core's TP layers rely on it to issue their async collectives before the overlapping GEMMs.
        env.append("CUDA_DEVICE_MAX_CONNECTIONS=1")
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in env))
    job_name = cl.job_name or Path(recipe).stem
    script_path = Path(out) / ("launch.sbatch" if launcher == "slurm" else "launch.sh")
    common = {"recipe": recipe, "nodes": cl.nodes, "gpus_per_node": cl.gpus_per_node, "world": world,
              "out": shlex.quote(out), "setup": "\n".join(cl.setup), "exports": exports,
              "script_path": script_path, "master_port": cl.master_port}
    plan = LaunchPlan(launcher=launcher, world=world, nodes=cl.nodes, gpus_per_node=cl.gpus_per_node,
                      layout=layout, torchrun=torchrun, script="", script_path=script_path)
    common["layout"] = plan.describe()
    template = (TEMPLATE_DIR / TEMPLATES[launcher]).read_text()
    if launcher == "slurm":
        extra = [f"#SBATCH --{key}={value}" for key, value in
                 (("partition", cl.partition), ("account", cl.account), ("qos", cl.qos)) if value]
        srun = []
        if cl.container_image:
            srun.append(f"--container-image={shlex.quote(cl.container_image)}")
            if cl.container_mounts:
                srun.append(f"--container-mounts={shlex.quote(','.join(cl.container_mounts))}")
        values = dict(common, job_name=job_name, cpus_per_task=cl.cpus_per_gpu * cl.gpus_per_node,
                      time_limit=cl.time_limit, sbatch_extra="\n".join(extra),
                      srun_args="".join(a + " " for a in srun), verb_args=shlex.join(verb_args))
    else:
        how = ("Run it on this node." if cl.nodes == 1 else
               f"Run it on each of the {cl.nodes} nodes; they meet at {cl.rdzv_endpoint}.")
        command = " ".join(a if a.startswith("$") else shlex.quote(a) for a in torchrun)
        values = dict(common, how_to_run=how, command=command)
    plan.script = render(template, values, source=TEMPLATES[launcher])
    return plan


