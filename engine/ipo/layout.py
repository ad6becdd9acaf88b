"""The layout of a ``vidpo iterate`` run directory, as one public object.

    DIR/config.yaml                    the resolved recipe of the run
    DIR/seed/pairs/                    the seed pairs (oracle-labelled: the stand-in for human labels)
    DIR/critic_0/                      the critic trained on them
    DIR/base_eval.safetensors          the initial policy's per-sample evaluation
    DIR/round_<r>/pairs{,_eval,_ranked,_kto}/   the round's generated, evaluation and re-paired pairs
    DIR/round_<r>/critic/              the refined critic (Dual-IPO, r >= 2)
    DIR/round_<r>/train/               policy r's training run (checkpoints, metrics)
    DIR/round_<r>/eval.safetensors     policy r's per-sample evaluation
    DIR/round_<r>/round.json           the round's row: its presence marks the round finished
    DIR/timings.json, DIR/summary.json

``RunLayout.open(DIR)`` rebuilds the world, oracle and segment ids from the run's ``config.yaml``: what the
rounds work in, and what measurements of a finished run read it with.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from vidpo.config import RunConfig, load_config, resolve_path
from vidpo.data.domains import exact_oracle
from vidpo.training import checkpoint as ckpt
from vidpo.training.modeling import build_world, pick_device, run_segment_ids

TIMINGS_FILE = "timings.json"
ROUND_FILE = "round.json"


@dataclass
class RunLayout:
    """Where everything of one iterate run lives, and the parts every stage of it shares."""

    cfg: RunConfig
    out: Path
    world: object
    segment_ids: torch.Tensor
    device: torch.device
    oracle: object
    """The shapes world's exact oracle: it labels the seed pairs and measures (``vidpo.data.domains``)."""
    base_path: Path
    """Weights of the initial policy (``train.init_from``)."""

    @classmethod
    def open(cls, out_dir: str | Path, cfg: Optional[RunConfig] = None) -> "RunLayout":
        """The run in ``out_dir``, configured by its saved ``config.yaml`` unless ``cfg`` is given."""
        out = Path(out_dir)
        cfg = load_config(out / "config.yaml") if cfg is None else cfg
        world = build_world(cfg)
        return cls(cfg=cfg, out=out, world=world, segment_ids=run_segment_ids(cfg), device=pick_device(),
                   oracle=exact_oracle(world), base_path=ckpt.find_weights(resolve_path(cfg.train.init_from)))

    @property
    def num_segments(self) -> int:
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
