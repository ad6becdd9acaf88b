"""The layout of a ``vidpo iterate`` run directory, as one public object.

    DIR/config.yaml                    the resolved recipe of the run
    DIR/seed/pairs/                    the seed pairs (labelled by iterate.seed_labeler: on the shapes world the
                                       oracle, the stand-in for human labels; people or the VLM judge on a prompt file)
    DIR/critic_0/                      the critic trained on them
    DIR/base_eval.safetensors          the initial policy's per-sample evaluation (the shapes world's oracle)
    DIR/base/model.safetensors         a release's own weights as the initial policy (a prompt file without
                                       train.init_from: what "policy 0" and the base reference load)
    DIR/prompt_embeddings/, DIR/clips/ a prompt file's run parts (vidpo.stages.parts.prepare_run)
    DIR/round_<r>/pairs{,_eval,_ranked,_kto}/   the round's generated, evaluation and re-paired pairs
    DIR/round_<r>/critic/              the refined critic (Dual-IPO, r >= 2)
    DIR/round_<r>/train/               policy r's training run (checkpoints, metrics)
    DIR/round_<r>/eval.safetensors     policy r's per-sample evaluation (shapes); DIR/round_<r>/eval/ its judged
                                       evaluation against the initial policy (a prompt file)
    DIR/round_<r>/round.json           the round's row: its presence marks the round finished
    DIR/timings.json, DIR/summary.json

``RunLayout.open(DIR)`` rebuilds the domain (the shapes world and its oracle, or the prompt file) and the segment
ids of the videos the critic sees from the run's ``config.yaml``: what the rounds work in, and what measurements
of a finished run read it with. A prompt file's parts (prompt embeddings, VAE) are prepared on first use.

Under torchrun the layout also carries the run's process groups (``parallel``): the stages that scale with the
data (generation, decoding, labelling, training, sampling for the evaluation) run on every rank, and the small
ones that write one file (the oracle's labels, a critic, the pseudo-labels, a round's row) run on rank 0 while
the others wait (``RunLayout.on_main``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from vidpo.config import RunConfig, load_config, resolve_path
from vidpo.data.domains import Domain, ShapesDomain, exact_oracle
from vidpo.stages.parts import RunParts, prepare_run
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_domain, pick_device, run_segment_ids

TIMINGS_FILE = "timings.json"
ROUND_FILE = "round.json"
BASE_WEIGHTS = "base/model.safetensors"
T = TypeVar("T")


@dataclass
class RunLayout:
    """Where everything of one iterate run lives, and the parts every stage of it shares."""

    cfg: RunConfig
    out: Path
    domain: Domain
    """Where the prompts come from: the shapes world (``ShapesDomain``) or a prompt file."""
    segment_ids: torch.Tensor
    """The segment of each pixel frame of the videos the critic and the labellers see."""
    device: torch.device
    base_path: Path
    """Weights of the initial policy: ``train.init_from``, or (a release without it) ``DIR/base/model.safetensors``."""
    world: Optional[object] = None
    """The shapes world (None for a prompt file)."""
    oracle: Optional[object] = None
    """The shapes world's exact oracle: it labels the seed pairs and measures (``vidpo.data.domains``); None for a
    prompt file, which has none."""
    parallel: Optional[object] = None
    """The run's ParallelContext under torchrun (``vidpo.training.distributed``); None in one process."""
    _parts: Optional[RunParts] = None

    @classmethod
    def open(cls, out_dir: str | Path, cfg: Optional[RunConfig] = None) -> "RunLayout":
        """The run in ``out_dir``, configured by its saved ``config.yaml`` unless ``cfg`` is given."""
        out = Path(out_dir)
        cfg = load_config(out / "config.yaml") if cfg is None else cfg
        domain = build_domain(cfg)
        if isinstance(domain, ShapesDomain):
            world = domain.world
            return cls(cfg=cfg, out=out, domain=domain, segment_ids=run_segment_ids(cfg), device=pick_device(),
                       base_path=ckpt.find_weights(resolve_path(cfg.train.init_from)), world=world,
                       oracle=exact_oracle(world))
        base = ckpt.find_weights(resolve_path(cfg.train.init_from)) if cfg.train.init_from else out / BASE_WEIGHTS
        return cls(cfg=cfg, out=out, domain=domain, segment_ids=run_segment_ids(cfg, domain, pixels=True),
                   device=pick_device(), base_path=base)

    @property
    def shapes(self) -> bool:
        """Whether the run is on the shapes world (an oracle measures it) rather than a prompt file."""
        return self.world is not None

    @property
    def rank(self) -> int:
        return self.parallel.rank if self.parallel is not None else 0

    @property
    def ranks(self) -> int:
        """Processes of the run (1 without torchrun)."""
        return self.parallel.world_size if self.parallel is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing in one process): what one rank wrote is there for all after it."""
        if self.ranks > 1:
            dist.barrier()

    def exists(self, path: Path) -> bool:
        """Whether ``path`` is there, the same answer on every rank: each rank looks, then all wait for each other.
        For a step that rank 0 writes through ``on_main`` and that every rank skips when its file is there: a rank
        that looked only after rank 0 had written the file (it was still loading what rank 0 did not need) would
        skip the barrier rank 0 and the others wait in, and the ranks' collectives would pair up wrongly (a hang)."""
        there = Path(path).exists()
        self.barrier()   # no rank writes it (on_main) before every rank has looked
        return there

    def on_main(self, fn: Callable[[], T]) -> Optional[T]:
        """``fn()`` on rank 0 while the other ranks wait; its result on rank 0, None on the others. For the small
        steps that write one file (a critic, the oracle's labels): the others read the file afterwards."""
        result = fn() if self.is_main else None
        self.barrier()
        return result

    @property
    def parts(self) -> RunParts:
        """The run's parts (``vidpo.stages.parts.prepare_run``: prompt embeddings in ``DIR/prompt_embeddings``, the
        VAE, real clips), prepared on first use (under torchrun the ranks share out the embedding)."""
        if self._parts is None:
            self._parts = prepare_run(self.cfg, self.out, device=self.device, rank=self.rank, world_size=self.ranks)
        return self._parts

    @property
    def num_segments(self) -> int:
        """S, the segments of each video."""
        return int(self.segment_ids.max()) + 1

    @property
    def seed_pairs_dir(self) -> Path:
        return self.out / "seed" / "pairs"

    @property
    def critic_0_dir(self) -> Path:
        return self.out / "critic_0"

    @property
    def base_eval_path(self) -> Path:
        return self.out / "base_eval.safetensors"

    @property
    def timings_path(self) -> Path:
        return self.out / TIMINGS_FILE

    def round_dir(self, r: int) -> Path:
        return self.out / f"round_{r}"

    def eval_path(self, r: int) -> Path:
        """Policy r's per-sample evaluation (r = 0: the initial policy's)."""
        return self.base_eval_path if r == 0 else self.round_dir(r) / "eval.safetensors"

    def policy_path(self, r: int) -> Path:
        """Weights of policy r (0: the initial policy)."""
        return self.base_path if r == 0 else ckpt.find_weights(self.round_dir(r) / "train")

    def reference_path(self, r: int) -> Path:
        """Weights of the reference that trains policy r from policy r-1."""
        return self.base_path if self.cfg.iterate.reference == "base" else self.policy_path(r - 1)

    def critic_dir(self, r: int) -> Path:
        """The critic that labelled round r: the latest refined critic of rounds 2..r, else critic 0."""
        for k in range(r, 1, -1):
            if (self.round_dir(k) / "critic" / "critic.safetensors").exists():
                return self.round_dir(k) / "critic"
        return self.critic_0_dir


def open_run(out_dir: str | Path, cfg: Optional[RunConfig] = None) -> RunLayout:
    """``RunLayout.open``: the run in ``out_dir``."""
    return RunLayout.open(out_dir, cfg)
