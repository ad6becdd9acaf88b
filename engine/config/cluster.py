"""The distributed sections: how one training run is split over processes (``parallel``; used when torchrun
starts it) and the cluster ``vidpo launch`` starts it on and ``vidpo scale`` sizes it for (``cluster``).

The layout arithmetic against a world size is ``ParallelConfig.layout_problems``; the loader applies it to
the recipe's own cluster (``RunConfig``), ``vidpo.training.distributed`` to the processes torchrun started.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from vidpo.config.choices import ActivationCheckpointing, Launcher, LaunchMode, ParamDtype, ProcessGroupBackend
from vidpo.config.fields import Problem, Problems, Section, choice

ParallelInit = Literal["rank0", "full"]
"""How a multi-process run builds its initial model (``parallel.init``; ``vidpo.training.sharded_init``)."""


@dataclass
class ParallelConfig(Section):
    """How one training run is split over processes (``torchrun`` ranks). The data-parallel size is what
    remains of the world: ``dp = world_size / (tp * cp)``. A single process uses only
    ``activation_checkpointing``, and refuses a layout that asks for more than one rank (the error says to
    start the run with torchrun)."""

    tp: int = 1
    """Tensor-parallel size: attention heads and MLP columns are split over this many ranks (Megatron
    ColumnParallelLinear / RowParallelLinear). Keep it within one node (NVLink)."""

    sp: bool = False
    """Sequence parallel (an option of tensor parallel): the norm / modulation / residual regions hold
    1/tp of the tokens, all-gathers and reduce-scatters replace TP's all-reduces. Ignored when tp = 1."""

    cp: int = 1
    """Context-parallel size (Ulysses): each rank holds 1/cp of the latent frames; self-attention swaps the
    sequence split for a head split with two all-to-alls. Needs heads % (tp * cp) == 0 and latent
    frames (after temporal patching) % cp == 0."""

    dp_shard: int = -1
    """Ranks of a data-parallel group over which parameters, gradients and optimizer state are sharded
    (FSDP2 ``fully_shard``; context-parallel ranks join the shard group, as in torchtitan). -1: all of the
    data-parallel ranks; 1: no sharding (replicated data parallel, gradients all-reduced); between: hybrid
    sharding (shard within groups of dp_shard, replicate across them)."""

    fsdp_param_dtype: str = choice("float32", ParamDtype)
    """Dtype FSDP all-gathers parameters in for compute (gradients are always reduced in float32)."""

    cpu_offload: bool = False
    """FSDP2 CPU offload (``CPUOffloadPolicy``): each rank's shard of the parameters, their gradients and the
    optimizer state live in host memory; FSDP copies a unit to the GPU for its forward / backward and the
    optimizer steps on the CPU. Trades host-device copies (and a slower optimizer step) for GPU memory, for
    14B-class models. Needs FSDP, i.e. parameters sharded over more than one rank (``dp_shard`` > 1, or -1
    with a data-parallel size > 1): without sharding there is nothing FSDP manages, so one process or
    ``dp_shard: 1`` is refused. Compute still runs on the GPU (on CPU-only runs the copies are no-ops)."""

    activation_checkpointing: str = choice("none", ActivationCheckpointing)
    """'full' recomputes every transformer block in the backward pass (a diffusers model through its own
    gradient checkpointing), in one process as in a parallel layout."""

    compile: bool = False
    """torch.compile each transformer block of the parallel model (GPU runs; slow to start on CPU)."""

    backend: str = choice("auto", ProcessGroupBackend)
    """Process-group backend: 'auto' is nccl on CUDA, gloo on CPU."""

    timeout_minutes: int = 30
    """Collective timeout of the process groups."""

    init: str = choice("rank0", ParallelInit)
    """How a multi-process run builds its initial policy (and a frozen reference copy) before splitting it
    (``vidpo.training.sharded_init``). 'rank0': rank 0 alone loads the weights, into host memory; the other ranks
    build the model on the meta device (no memory, no weights read); every rank lays its skeleton out
    (TP / SP / CP / FSDP), allocates only its own shards on its device and receives them from rank 0
    (``set_model_state_dict(..., broadcast_from_rank0=True)``), so no GPU holds a whole model (a 14B Wan in
    bf16: 28 GB per GPU before the split with 'full', twice that with a frozen reference copy). Its shards,
    buffers, LoRA initialisation and random-generator states (ranks seeded alike, as runs are) equal 'full''s
    exactly, for every model kind and layout (tested with gloo on CPU: the DiT, Wan, Wan 2.2's two experts and
    CogVideoX under FSDP (also offloaded), TP (+ SP) and CP), hence the default. 'full': every rank loads the
    whole model on its device, then splits it."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "tp", "cp", "timeout_minutes")
        p.check(self.dp_shard == -1 or self.dp_shard >= 1, "dp_shard",
                f"must be -1 (all data-parallel ranks) or >= 1, got {self.dp_shard}")
        p.check(not (self.cpu_offload and self.dp_shard == 1), "cpu_offload",
                "offloads FSDP's parameter shards, but dp_shard=1 turns FSDP off: use dp_shard -1 or > 1")
        return p

    @property
    def model_parallel(self) -> int:
        """Ranks one model replica spans: tp * cp."""
        return self.tp * self.cp

    def layout_problems(self, world: int, *, num_heads: Optional[int] = None, frames: Optional[int] = None,
                        batch: Optional[int] = None, prefix: str = "parallel.",
                        world_from: str = "") -> list[Problem]:
        """What keeps this layout from running on ``world`` ranks (and a model with ``num_heads`` heads and
        ``frames`` latent frames after temporal patching, and a global batch of ``batch``), in the words of
        ``vidpo.training.distributed.resolve_layout``; ``world_from`` (where the world size comes from) is
        added to the problems that depend on it. Sizes below 1 are left to ``rules``."""
        p = Problems()
        tp, cp = self.tp, self.cp
        if tp < 1 or cp < 1 or world < 1:
            return p
        if num_heads is not None and num_heads % (tp * cp):
            p.add(f"the model's {num_heads} attention heads are not divisible by {prefix}tp * {prefix}cp = "
                  f"{tp * cp} (TP splits heads, Ulysses CP splits them again)", prefix + "tp", prefix + "cp")
        if frames is not None and frames % cp:
            p.add(f"{frames} latent frames (after temporal patching) are not divisible by {prefix}cp = {cp}",
                  prefix + "cp")
        where = f" ({world_from})" if world_from else ""
        if world % (tp * cp):
            p.add(f"world size {world} is not divisible by {prefix}tp * {prefix}cp = {tp * cp}{where}",
                  prefix + "tp", prefix + "cp", "cluster.nodes", "cluster.gpus_per_node")
            return p
        dp = world // (tp * cp)
        shard = dp if self.dp_shard in (-1, 0) else self.dp_shard
        if shard >= 1 and dp % shard:
            p.add(f"{prefix}dp_shard={self.dp_shard} must divide the data-parallel size {dp} (= world {world} / "
                  f"(tp {tp} * cp {cp})); use -1 for all of it{where}", prefix + "dp_shard")
        if self.cpu_offload and shard == 1 and self.dp_shard != 1:   # dp_shard=1 itself is a rule (rules)
            p.add(f"{prefix}cpu_offload needs FSDP, but world {world} / (tp {tp} * cp {cp}) leaves one "
                  f"data-parallel rank: nothing is sharded{where}", prefix + "cpu_offload")
        if batch is not None and batch % dp:
            p.add(f"train.batch_size={batch} is not divisible by the data-parallel size {dp} (world {world} / "
                  f"(tp {tp} * cp {cp})): every rank must take an equal share of the global batch{where}",
                  "train.batch_size")
        return p


@dataclass
class ClusterConfig(Section):
    """Where ``vidpo launch`` starts the run: node count, GPUs, SLURM settings, and the link speeds
    ``vidpo scale`` uses to estimate communication time."""

    nodes: int = 1
    """Nodes of the job; world size = nodes * gpus_per_node."""

    gpus_per_node: int = 8
    """GPUs (= torchrun processes) per node."""

    launcher: str = choice("torchrun", Launcher)
    """'torchrun': a torchrun command / shell script for this machine (or several, with a rendezvous
    endpoint); 'slurm': an sbatch script that runs torchrun once per node with srun."""

    partition: Optional[str] = None
    """SLURM partition (#SBATCH --partition)."""

    account: Optional[str] = None
    """SLURM account (#SBATCH --account)."""

    qos: Optional[str] = None
    """SLURM quality of service (#SBATCH --qos)."""

    time_limit: str = "24:00:00"
    """SLURM wall-clock limit (#SBATCH --time)."""

    job_name: Optional[str] = None
    """Job name; default: the recipe's file name."""

    cpus_per_gpu: int = 12
    """CPU cores reserved per GPU (data loading, decode)."""

    mode: str = choice("single", LaunchMode)
    """How ``vidpo launch`` runs a whole job (cache -> generate -> label -> train -> eval): 'single' is one
    allocation running the stages in order, each an srun / torchrun step; 'chain' is one SLURM job per stage,
    each waiting for the one before (``sbatch --dependency=afterok``), submitted by ``OUT/launch/submit.sh``.
    The torchrun launcher always runs the stages in order."""

    container_image: Optional[str] = None
    """Container image for srun (pyxis/enroot ``--container-image``); None runs on the host."""

    container_mounts: List[str] = field(default_factory=list)
    """``--container-mounts`` entries (``/host/path:/container/path``)."""

    modules: List[str] = field(default_factory=list)
    """Environment modules the job script loads first (``module load NAME``), e.g. ``cuda/12.4``."""

    venv: Optional[str] = None
    """Python virtual environment the job script activates (``source VENV/bin/activate``) after the
    modules; None: the ``vidpo`` and ``torchrun`` on the submitting shell's PATH."""

    workdir: Optional[str] = None
    """Directory the job runs in (``cd``; inside a container ``srun --container-workdir``); relative
    paths of the recipe and ``--out`` are read from there. None: the directory the job was submitted from."""

    setup: List[str] = field(default_factory=list)
    """More shell lines of the job script, after modules, venv and workdir (conda activate, exports that
    need the shell ...)."""

    requeue: bool = True
    """SLURM: ``#SBATCH --requeue``, and on the stop signal the job requeues itself once the running stage
    has stopped (``scontrol requeue``); the requeued job skips the stages it finished and resumes the one
    it stopped."""

    signal_grace_s: int = 300
    """SLURM sends the job script SIGUSR1 this many seconds before the time limit (``#SBATCH
    --signal=B:USR1@N``); the script passes it to the running stage, which checkpoints (train) or finishes
    its shard / batch (generate, label) and exits. Also torchrun's ``--shutdown-timeout``: the time a
    stopping stage gets before it is killed. Leave room for one training step plus a checkpoint."""

    env: List[str] = field(default_factory=list)
    """``KEY=VALUE`` environment variables exported for the run (NCCL settings, cache directories)."""

    rdzv_endpoint: Optional[str] = None
    """torchrun launcher on several nodes: ``host:port`` of the rendezvous (node 0). SLURM jobs use the
    first node of the allocation."""

    master_port: int = 29500
    """Rendezvous port."""

    gpu_memory_gib: float = 80.0
    """Memory per GPU (H100 SXM: 80, H200: 141); ``vidpo scale`` checks the estimate against it."""

    gpu_tflops: float = 989.0
    """Dense bf16 peak TFLOP/s per GPU (H100 SXM: 989), for the compute-time estimate."""

    mfu: float = 0.4
    """Model-FLOPs utilisation assumed for the compute-time estimate."""

    intra_node_gbytes_per_s: float = 450.0
    """Per-GPU unidirectional bandwidth inside a node (NVLink 4 on H100: ~450 GB/s)."""

    inter_node_gbytes_per_s: float = 50.0
    """Per-GPU unidirectional bandwidth between nodes (one 400 Gb/s InfiniBand NIC per GPU: 50 GB/s)."""

    host_link_gbytes_per_s: float = 25.0
    """Per-GPU host <-> GPU copy bandwidth with pinned memory (PCIe Gen5 x16: 64 GB/s on paper, about 25 GB/s
    per GPU when two GPUs share a PCIe switch); times parallel.cpu_offload's copies in ``vidpo scale``."""

    host_memory_gbytes_per_s: float = 25.0
    """Per-GPU share of the host's memory bandwidth (a node's ~200-400 GB/s over its GPUs); times the AdamW step
    that parallel.cpu_offload runs on the CPU in ``vidpo scale``."""

    def rules(self, prefix: str = "") -> list[Problem]:
        p = Problems(prefix)
        p.at_least(self, 1, "nodes", "gpus_per_node", "cpus_per_gpu", "signal_grace_s")
        for name in ("modules", "setup", "container_mounts"):
            for item in getattr(self, name):
                p.check(bool(str(item).strip()) and "\n" not in str(item), name,
                        f"entry {item!r} must be one non-empty line")
        p.check(1 <= self.master_port <= 65535, "master_port", f"must be a port in [1, 65535], got {self.master_port}")
        p.positive(self, "gpu_memory_gib", "gpu_tflops", "intra_node_gbytes_per_s", "inter_node_gbytes_per_s",
                   "host_link_gbytes_per_s", "host_memory_gbytes_per_s")
        p.fraction(self, "mfu", low_open=True)
        for item in self.env:
            p.check("=" in item and not item.startswith("="), "env", f"entry {item!r} is not KEY=VALUE")
        return p

    @property
    def world_size(self) -> int:
        """Processes of a launch: nodes * gpus_per_node."""
        return self.nodes * self.gpus_per_node
