"""The whole recipe (``RunConfig``) and the rules that span its sections.

Each section checks its own fields (``Section.problems``); ``RunConfig.rules`` adds what only two sections
together can tell, so that everything the recipe alone decides fails at load, before any stage runs:

* ``pref.reference: lora_disabled`` needs a ``lora`` section; LoRA cannot be tensor-parallel (``parallel.tp``);
* ``data.source: latents`` trains ``train.objective: sft`` only;
* ``train.objective: consistency_distill`` needs the student's initial weights (``distill.teacher`` or
  ``train.init_from``);
* a DiT's patch size must divide the shapes world's frames, height and width;
* a recipe that asks for several processes (``multi_process``) must lay them out on its own cluster
  (``cluster.nodes * cluster.gpus_per_node``): tp * cp divides the world size, ``parallel.dp_shard`` the
  data-parallel size, which divides ``train.batch_size``; the DiT's heads divide over tp * cp and its latent
  frames over cp; tensor parallel stays inside a node; the objective is one distributed training covers.

What depends on more than the recipe stays where it is used: files on disk (checkpoints, caches, pairs), a
diffusers model's head count (read from its directory), the processes torchrun started, and what one command
needs that another does not (``vidpo iterate`` needs ``train.init_from``; ``vidpo train`` a preference
objective's ``pref.pairs``, which ``vidpo run`` sets itself).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vidpo.config.choices import OBJECTIVES, PREFERENCE_OBJECTIVES, PRESET_NAMES
from vidpo.config.cluster import ClusterConfig, ParallelConfig
from vidpo.config.distill import DistillConfig, RewardConfig
from vidpo.config.fields import Problem, Problems, Section
from vidpo.config.ipo import CriticConfig, IterateConfig
from vidpo.config.model import FlowConfig, LoRAConfig, ModelConfig, SampleConfig, WorldConfig
from vidpo.config.preference import GenerateConfig, LabelConfig, PreferenceConfig
from vidpo.config.prompts import PromptsConfig
from vidpo.config.training import CacheConfig, DataConfig, EvalConfig, TrainConfig


@dataclass
class RunConfig(Section):
    """A whole recipe. ``problems()`` lists everything wrong with it: each section's own problems, then the
    cross-section rules of ``rules`` (module docstring)."""

    seed: int = 0
    """Root of every random stream of the run (vidpo.utils.seeding): data, noise, timesteps, init, sampling."""

    model: ModelConfig = field(default_factory=ModelConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    pref: PreferenceConfig = field(default_factory=PreferenceConfig)
    lora: Optional[LoRAConfig] = None
    """LoRA adapters on the policy (None: full fine-tuning). Setting any lora.* key turns LoRA on."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Distributed layout (tensor / sequence / context / data parallel); used when started by torchrun."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Cluster the run is launched on (``vidpo launch``) and its link speeds (``vidpo scale``)."""

    critic: CriticConfig = field(default_factory=CriticConfig)
    """The IPO critic: its network, training and labelling rules."""

    iterate: IterateConfig = field(default_factory=IterateConfig)
    """Rounds of iterative preference optimisation with critic refinement (``vidpo iterate``)."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    """Consistency distillation (``vidpo preprocess``, ``train.objective: consistency_distill``)."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward mixture of consistency distillation."""

    data: DataConfig = field(default_factory=DataConfig)
    """Training data source (shapes world or cached latents)."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    """Latent / text-embedding caching (``vidpo cache``)."""

    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    """Prompt set of a real model (prompt file, held-out split, negative prompt) and its text embeddings."""

    def problems(self, prefix: str = "", world_size: Optional[int] = None) -> list[Problem]:
        """Everything wrong with the recipe: each section's problems, then the cross-section rules.
        ``world_size``: the processes the run will have, when known otherwise than from ``cluster``."""
        return self.section_problems(prefix) + self.rules(prefix, world_size)

    def rules(self, prefix: str = "", world_size: Optional[int] = None) -> list[Problem]:
        """The cross-section rules (module docstring); ``world_size`` replaces the cluster's world."""
        p = Problems(prefix)
        p.at_least(self, 0, "seed")
        train, par, cl = self.train, self.parallel, self.cluster
        if self.pref.reference == "lora_disabled" and self.lora is None:
            p.add("pref.reference=lora_disabled needs LoRA (set a lora section, e.g. --set lora.rank=8)",
                  "pref.reference", "lora")
        if self.lora is not None and par.tp > 1:
            p.add(f"parallel.tp={par.tp}: LoRA adapters are not tensor-parallel: use parallel.tp=1 (context / data "
                  "parallel work with LoRA) or full fine-tuning with pref.reference=frozen_copy", "parallel.tp", "lora")
        if self.data.source == "latents" and train.objective in OBJECTIVES and train.objective != "sft":
            p.add(f"data.source 'latents' trains train.objective 'sft' only, got '{train.objective}' (preference "
                  "objectives read pairs directories: pref.pairs)", "data.source", "train.objective")
        # a release (wan) is its own teacher and the student's initial weights (model.path)
        if train.objective == "consistency_distill" and self.model.kind == "dit" \
                and not (self.distill.teacher or train.init_from):
            p.add("train.objective=consistency_distill: the student needs initial weights: set distill.teacher "
                  "(or train.init_from)", "train.objective", "distill.teacher", "train.init_from")
        dit = self._dit()
        if dit is not None and self.data.source == "shapes":
            w = self.world
            for axis, name, size, patch in zip("THW", ("frames", "height", "width"), (w.frames, w.height, w.width),
                                               dit.patch_size):
                if size >= 1 and size % patch:
                    p.add(f"world.{name} = {size} is not divisible by the model's patch size {patch} along {axis} "
                          f"(patch_size {tuple(dit.patch_size)} from model.preset / model.patch_size)",
                          f"world.{name}", "model.patch_size", "model.preset")
        if world_size is not None and world_size < 1:
            p.add(f"the world size must be >= 1, got {world_size}")
        elif world_size is not None or self.multi_process():
            frames = self.world.frames // dit.patch_size[0] if dit is not None else None
            world = cl.world_size if world_size is None else world_size
            origin = (f"the recipe's world size {world} = cluster.nodes {cl.nodes} * cluster.gpus_per_node "
                      f"{cl.gpus_per_node}" if world_size is None else f"world size {world}")
            p += par.layout_problems(world, num_heads=dit.num_heads if dit is not None else None,
                                     frames=frames, batch=train.batch_size, world_from=origin)
        if self.multi_process():
            if par.tp > cl.gpus_per_node >= 1:
                p.add(f"parallel.tp={par.tp} spans nodes (cluster.gpus_per_node={cl.gpus_per_node}): keep tensor "
                      "parallel inside a node's NVLink domain", "parallel.tp", "cluster.gpus_per_node")
            release_student = train.objective == "consistency_distill" and self.model.kind != "dit"
            if release_student and par.cp > 1:
                p.add(f"parallel.cp={par.cp}: a release's consistency student trains data parallel and tensor (+ "
                      "sequence) parallel; context parallel is not supported for it (the rewards decode whole clips)",
                      "parallel.cp", "train.objective")
            elif train.objective not in PREFERENCE_OBJECTIVES and train.objective in OBJECTIVES and not release_student:
                p.add(f"train.objective={train.objective} runs in one process; distributed training covers "
                      f"{', '.join(PREFERENCE_OBJECTIVES)} and a release's consistency_distill (this recipe asks for "
                      f"{self._processes_asked()})", "train.objective", "parallel.tp", "parallel.cp", "cluster.nodes")
        return p

    def multi_process(self) -> bool:
        """Whether the recipe itself asks for several processes: model parallelism (parallel.tp * parallel.cp
        > 1) or several nodes. Its layout is then checked against its own cluster (world size = cluster.nodes *
        cluster.gpus_per_node). A data-parallel layout on one node names no world size (torchrun's decides;
        ``vidpo launch`` checks it against the cluster when it builds the launch)."""
        return self.cluster.nodes > 1 or self.parallel.tp * self.parallel.cp > 1

    def _processes_asked(self) -> str:
        par, cl = self.parallel, self.cluster
        parts = [f"parallel.tp * parallel.cp = {par.tp * par.cp}"] if par.tp * par.cp > 1 else []
        if cl.nodes > 1:
            parts.append(f"cluster.nodes = {cl.nodes}")
        return " and ".join(parts)

    def _dit(self):
        """The DiT of ``model`` when it is one and a valid one (its problems are ``model``'s), else None."""
        if self.model.kind != "dit" or self.model.preset not in PRESET_NAMES:
            return None
        try:
            return self.model.dit()
        except (ValueError, TypeError):
            return None
