"""``vidpo launch RECIPE``: run a recipe's whole job (or one verb of it) with torchrun or SLURM.

    vidpo launch RECIPE --out runs/x --dry-run        # write the script(s) to runs/x/launch/ and print them
    vidpo launch RECIPE --out runs/x --check          # preflight only (vidpo.cluster.preflight), no allocation
    vidpo launch RECIPE --out runs/x                  # preflight, then submit / start
    vidpo launch RECIPE --out runs/x --verb train     # one stage (or run / iterate) instead of the whole job

The job's stages are ``vidpo.cluster.job``'s (cache -> generate -> label -> train -> eval). A stage on every
GPU is one torchrun per node (c10d rendezvous); a one-process stage runs on the first node.

``cluster.launcher``:
  slurm     ``cluster.mode: single``: one allocation, ``OUT/launch/job.sbatch``, running the stages in order as
            srun steps. ``chain``: one job per stage, ``OUT/launch/<n>-<stage>.sbatch`` (a one-process stage asks
            for one node), submitted by ``OUT/launch/submit.sh`` with ``--dependency=afterok`` on the one before.
  torchrun  ``OUT/launch/job.sh`` for machines without SLURM: the stages in order; on several nodes, run it on
            each with ``NODE_RANK`` set (they meet at ``cluster.rdzv_endpoint``; one-process stages run on node 0).

Every script sets up the environment the recipe names (``cluster.modules``, ``venv``, ``workdir``, ``setup``,
``env``; SLURM stages in ``cluster.container_image`` through pyxis) and survives preemption: SLURM scripts carry
``#SBATCH --requeue`` and ``#SBATCH --signal=B:USR1@cluster.signal_grace_s``; the script's trap passes the
signal to the running stage, which stops at a safe point (vidpo.utils.preemption), then the job requeues itself
and the requeued job resumes where it stopped (finished stages are skipped by their markers in
``OUT/launch/done/``). The layout is checked before anything is written. Recipe overrides (``--set``) are passed
to every stage. Templates (``recipes/launch/``) use ``{{ name }}`` placeholders; a placeholder that renders
empty on a line of its own drops the line.
"""
from __future__ import annotations

import os
import re
import shlex
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from vidpo.cluster.job import ALL, Step, job_steps
from vidpo.cluster.preflight import layout_problems, trains_on_every_gpu
from vidpo.config import REPO_ROOT, ConfigError, RunConfig
from vidpo.training.distributed import DistributedSetupError, resolve_layout
from vidpo.utils import atomic

TEMPLATE_DIR = REPO_ROOT / "recipes" / "launch"
TEMPLATES = {"slurm": "slurm.sbatch.tmpl", "torchrun": "torchrun.sh.tmpl"}
RUNNER, SUBMIT = "stages.sh.tmpl", "submit.sh.tmpl"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun passes these on to its workers (the default set plus SLURM's SIGUSR1)."""


@dataclass
class LaunchPlan:
    """What ``vidpo launch`` writes and starts: the job's steps and the scripts around them."""

    launcher: str
    mode: str
    world: int
    nodes: int
    gpus_per_node: int
    layout: object
    steps: list[Step]
    scripts: dict = field(default_factory=dict)
    """Script path -> text, in the order they are printed; ``entry`` is the one to submit / run."""
    entry: Optional[Path] = None
    torchrun: list[str] = field(default_factory=list)
    """The torchrun command line (one node's view) of the first step on every GPU (one launch, one node)."""

    @property
    def script(self) -> str:
        return self.scripts[self.entry]

    def describe(self) -> str:
        lay = self.layout
        return (f"dp {lay.dp} (shard {lay.dp_shard} x replicate {lay.dp_replicate}) x cp {lay.cp} x tp {lay.tp}"
                f"{' + sp' if lay.sp else ''}")

    def write(self) -> list[Path]:
        """Write every script (atomically, executable); returns their paths."""
        for path, text in self.scripts.items():
            atomic.write_text(path, text)
            os.chmod(path, 0o755)
        return list(self.scripts)


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


def _template(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text()


def _layout(cfg: RunConfig, world: int, check: bool = True):
    problems = layout_problems(cfg, world) if check else []
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} problems with the layout:\n" + "\n".join("  " + p for p in problems))
    try:
        return resolve_layout(world, cfg.parallel)
    except DistributedSetupError as exc:
        raise ConfigError(f"parallel: {exc}") from None


def _shell(argv: Sequence[str]) -> str:
    """``argv`` as shell words; words holding a shell variable stay double-quoted so it expands."""
    return " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in argv)


def _environment(cl) -> str:
    lines = [f"module load {shlex.quote(m)}" for m in cl.modules]
    if cl.venv:
        lines.append(f"source {shlex.quote(str(Path(cl.venv) / 'bin' / 'activate'))}")
    if cl.workdir:
        lines.append(f"cd {shlex.quote(cl.workdir)}")
    return "\n".join(lines + list(cl.setup))


def _exports(cfg: RunConfig, layout) -> str:
    env = list(cfg.cluster.env)
    if layout.tp > 1 and not any(e.startswith("CUDA_DEVICE_MAX_CONNECTIONS=") for e in env):
        # megatron-core's TP layers rely on it to issue their async collectives before the overlapping GEMMs.
        env.append("CUDA_DEVICE_MAX_CONNECTIONS=1")
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in (e.split("=", 1) for e in env))


def _torchrun_args(cfg: RunConfig, launcher: str, index: int, stage: str) -> list[str]:
    cl = cfg.cluster
    port = cl.master_port + index   # a fresh rendezvous per step: no step meets the last one's store
    if launcher == "slurm":
        rdzv = ["--nnodes=$SLURM_NNODES", f"--nproc-per-node={cl.gpus_per_node}", "--rdzv-id=$SLURM_JOB_ID",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=$MASTER_ADDR:{port}"]
    elif cl.nodes > 1:
        if not cl.rdzv_endpoint:
            raise ConfigError(f"cluster.nodes={cl.nodes} with launcher torchrun needs cluster.rdzv_endpoint "
                              "(host:port of node 0), or cluster.launcher=slurm")
        host, _, base = cl.rdzv_endpoint.rpartition(":")
        endpoint = f"{host}:{int(base) + index}" if base.isdigit() and host else cl.rdzv_endpoint
        rdzv = [f"--nnodes={cl.nodes}", f"--nproc-per-node={cl.gpus_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={endpoint}", f"--rdzv-id=vidpo-{stage}"]
    else:
        rdzv = ["--standalone", f"--nproc-per-node={cl.gpus_per_node}"]
    return ["torchrun", *rdzv, f"--signals-to-handle={TORCHRUN_SIGNALS}",
            f"--shutdown-timeout={cl.signal_grace_s}", "-m", "vidpo"]


def _srun(cfg: RunConfig, ranks: str) -> list[str]:
    cl = cfg.cluster
    args = ["srun"] + (["--nodes=1", "--ntasks=1"] if ranks != ALL else [])
    if cl.container_image:
        args.append(f"--container-image={cl.container_image}")
        if cl.container_mounts:
            args.append(f"--container-mounts={','.join(cl.container_mounts)}")
        if cl.workdir:
            args.append(f"--container-workdir={cl.workdir}")
    return args


def _step_lines(cfg: RunConfig, launcher: str, steps: Sequence[Step], first_index: int = 0) -> list[str]:
    lines = []
    for offset, step in enumerate(steps):
        for n, argv in enumerate(step.commands):
            index = first_index + offset * 4 + n
            name = step.stage if len(step.commands) == 1 else f"{step.stage}-{n + 1}"
            runner = _torchrun_args(cfg, launcher, index, name)[:-2] if step.ranks == ALL else ["python"]
            if launcher == "slurm":
                runner = _srun(cfg, step.ranks) + runner
            lines.append(f"stage {name} {step.ranks} \\\n  {_shell(runner)} \\\n  -m vidpo {_shell(argv)}")
    return lines


def _runner(cfg: RunConfig, launcher: str, out: str) -> str:
    if launcher == "slurm" and cfg.cluster.requeue:
        after, on_stop = ("the job requeues itself and the requeued job resumes.",
                          'scontrol requeue "$SLURM_JOB_ID" || echo "vidpo job: requeue refused; resubmit" >&2')
    elif launcher == "slurm":
        after, on_stop = ("the job ends (cluster.requeue is off: submit it again to resume).",
                          'echo "vidpo job: submit this script again to resume" >&2')
    else:
        after = "the script ends: run it again to resume."
        on_stop = 'echo "vidpo job: run this script again to resume" >&2'
    return render(_template(RUNNER), {"grace": cfg.cluster.signal_grace_s, "after_stop": after, "out": out,
                                      "launch_id": uuid.uuid4().hex[:12], "on_stop": on_stop},
                  source=RUNNER).rstrip("\n")


def build_launch(cfg: RunConfig, recipe: str, overrides: Sequence[str] = (), *, out: str,
                 launcher: Optional[str] = None, verb: str = "job", mode: Optional[str] = None) -> LaunchPlan:
    """The launch of ``verb`` of ``recipe`` (already loaded as ``cfg``, with ``overrides``) into ``out``."""
    cl = cfg.cluster
    launcher = launcher or cl.launcher
    mode = mode or cl.mode
    if launcher not in TEMPLATES:
        raise ConfigError(f"cluster.launcher={launcher!r} is not one of {sorted(TEMPLATES)}")
    if cl.nodes < 1 or cl.gpus_per_node < 1:
        raise ConfigError(f"cluster.nodes={cl.nodes} and cluster.gpus_per_node={cl.gpus_per_node} must be >= 1")
    world = cl.nodes * cl.gpus_per_node
    steps = job_steps(cfg, recipe, overrides, out, verb)
    layout = _layout(cfg, world, trains_on_every_gpu(steps))
    launch_dir = Path(out) / "launch"
    plan = LaunchPlan(launcher=launcher, mode=mode if launcher == "slurm" else "single", world=world,
                      nodes=cl.nodes, gpus_per_node=cl.gpus_per_node, layout=layout, steps=steps)
    every_gpu = [s for s in steps if s.ranks == ALL]
    if every_gpu:
        first = every_gpu[0]
        name = first.stage if len(first.commands) == 1 else f"{first.stage}-1"
        plan.torchrun = _torchrun_args(cfg, launcher, 0, name) + first.commands[0]
    common = {"recipe": recipe, "nodes": cl.nodes, "gpus_per_node": cl.gpus_per_node, "world": world,
              "layout": plan.describe(), "out": shlex.quote(out), "environment": _environment(cl),
              "exports": _exports(cfg, layout), "runner": _runner(cfg, launcher, shlex.quote(out))}
    if launcher == "torchrun":
        path = launch_dir / "job.sh"
        how = ("Run it on this node: bash " + str(path) if cl.nodes == 1 else
               f"Run it on each of the {cl.nodes} nodes with NODE_RANK=0..{cl.nodes - 1}: NODE_RANK=i bash {path}")
        plan.scripts[path] = render(_template(TEMPLATES["torchrun"]), dict(
            common, stages=" -> ".join(s.stage for s in steps), how_to_run=how,
            steps="\n".join(_step_lines(cfg, launcher, steps))), source=TEMPLATES["torchrun"])
        plan.entry = path
        return plan
    groups = [steps] if plan.mode == "single" else [[s] for s in steps]
    for n, group in enumerate(groups):
        path = launch_dir / ("job.sbatch" if plan.mode == "single" else f"{n + 1}-{group[0].stage}.sbatch")
        one_node = all(s.ranks != ALL for s in group)
        plan.scripts[path] = _sbatch(cfg, common, group, path, recipe, n * 16, nodes=1 if one_node else cl.nodes,
                                     how="Submit with: sbatch " + str(path) if plan.mode == "single" else
                                     f"Stage {n + 1} of {len(groups)}: submitted by {launch_dir / 'submit.sh'}")
    if plan.mode == "single":
        plan.entry = next(iter(plan.scripts))
        return plan
    submit = launch_dir / "submit.sh"
    jobs = list(plan.scripts)
    plan.scripts[submit] = render(_template(SUBMIT), {
        "recipe": recipe, "stages": " -> ".join(s.stage for s in steps), "script_path": submit,
        "submit_dir": shlex.quote(cl.workdir or os.getcwd()), "count": len(jobs),
        "submits": "\n".join(f"prev=$(submit {shlex.quote(str(p))})\necho \"{p.name}: job $prev\"" for p in jobs)},
        source=SUBMIT)
    plan.entry = submit
    return plan


def _sbatch(cfg: RunConfig, common: dict, steps: Sequence[Step], path: Path, recipe: str, first_index: int, *,
            nodes: int, how: str) -> str:
    cl = cfg.cluster
    extra = [f"#SBATCH --{key}={value}" for key, value in
             (("partition", cl.partition), ("account", cl.account), ("qos", cl.qos)) if value]
    if cl.workdir:   # relative paths (--output, the recipe, OUT) from there, as the stages see them
        extra.append(f"#SBATCH --chdir={cl.workdir}")
    if cl.requeue:
        extra.append("#SBATCH --requeue")
    stages = " -> ".join(s.stage for s in steps)
    name = cl.job_name or Path(recipe).stem
    return render(_template(TEMPLATES["slurm"]), dict(
        common, nodes=nodes, world=nodes * cl.gpus_per_node, stages=stages, how_to_run=how,
        layout=common["layout"] if any(s.ranks == ALL for s in steps) else "one process on the first node",
        job_name=name if len(steps) > 1 or cfg.cluster.mode == "single" else f"{name}-{steps[0].stage}",
        cpus_per_task=cl.cpus_per_gpu * cl.gpus_per_node, time_limit=cl.time_limit, grace=cl.signal_grace_s,
        sbatch_extra="\n".join(extra), master_port=cl.master_port,
        steps="\n".join(_step_lines(cfg, "slurm", steps, first_index))), source=TEMPLATES["slurm"])
