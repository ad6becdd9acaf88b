"""Domains: where a run's prompts come from, the pixel geometry of its videos, and what else it knows.

The stages (generate, label, train, evaluate) know a domain only through this interface:

  ``prompts(split)``           the ``PromptSet`` of 'train' or 'heldout'
  ``fps``, ``frames``, ``height``, ``width``   the pixel geometry of the videos the model makes
  ``condition_ids(ids)``       (n, K) structured conditions of an exact judge, or None
  ``real_clips(ids, gen)``     (n, 3, F, H, W) ground-truth pixel clips of the prompts, or None
  ``oracle``                   an exact scorer of the domain's videos (the toy world's), or None

Code outside the domains reaches the shapes world and its oracle only through ``shapes_world(cfg.world)`` and
``exact_oracle(world)`` here, never by their classes.

Two domains:

* ``PromptFileDomain``: a prompt file (``prompts.path``, ``vidpo.data.prompts``) split into train and held-out
  by id; its videos have the recipe's ``generate.frames / height / width / fps``. Real clips of its prompts
  come from the latent cache that ``vidpo cache`` writes, not from here.
* ``ShapesDomain``: the embedded toy world (``vidpo.data.shapes``): its prompts are the captions of its
  conditions, one prompt per condition (id ``shapes-<index>``), the same set for both splits (the splits
  differ by their noise streams); its structured conditions feed the exact oracle, and it renders real clips.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from vidpo.data.oracle import ShapesOracle
from vidpo.data.prompts import Prompt, PromptError, PromptSet, read_prompt_file
from vidpo.data.shapes import ShapesWorld

SHAPES_PREFIX = "shapes-"
SPLITS = ("train", "heldout")


class Domain:
    """The interface (module docstring)."""

    name = "domain"
    fps: float
    frames: int
    height: int
    width: int

    def prompts(self, split: str) -> PromptSet:
        raise NotImplementedError

    def condition_ids(self, prompt_ids: Sequence[str]) -> Optional[torch.Tensor]:
        return None

    def real_clips(self, prompt_ids: Sequence[str], generator: torch.Generator) -> Optional[torch.Tensor]:
        return None

    @property
    def oracle(self):
        return None

    @property
    def pixel_shape(self) -> tuple[int, int, int, int]:
        return 3, self.frames, self.height, self.width


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class ShapesDomain(Domain):
    """The shapes world as a domain (module docstring)."""

    name = "shapes"

    def __init__(self, world: ShapesWorld):
        self.world = world
        cfg = world.cfg
        self.fps, self.frames, self.height, self.width = float(cfg.fps), cfg.frames, cfg.height, cfg.width
        conditions = world.condition(torch.arange(world.num_conditions))
        self._prompts = PromptSet(Prompt(id=shapes_prompt_id(i), text=text)
                                  for i, text in enumerate(world.captions(conditions)))
        self._oracle: Optional[ShapesOracle] = None

    def prompts(self, split: str) -> PromptSet:
        _check_split(split)
        return self._prompts

    def condition_ids(self, prompt_ids: Sequence[str]) -> torch.Tensor:
        return self.world.condition(torch.tensor([shapes_condition_index(p) for p in prompt_ids], dtype=torch.long))

    def real_clips(self, prompt_ids: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        return self.world.render(self.condition_ids(prompt_ids), generator, corrupt=False).clips

    @property
    def oracle(self) -> ShapesOracle:
        if self._oracle is None:
            self._oracle = ShapesOracle(self.world)
        return self._oracle


class PromptFileDomain(Domain):
    """A prompt file's prompts, split by ``heldout_fraction``, made into videos of the given geometry."""

    name = "prompts"

    def __init__(self, prompts: PromptSet, *, heldout_fraction: float, fps: float, frames: int, height: int,
                 width: int):
        self.all_prompts = prompts
        self._splits = dict(zip(SPLITS, prompts.split(heldout_fraction)))
        self.fps, self.frames, self.height, self.width = float(fps), int(frames), int(height), int(width)
        source = prompts.source or "the prompt set"
        if not len(self._splits["train"]):
            raise PromptError(f"{source}: no prompt is left for training (prompts.heldout_fraction = "
                              f"{heldout_fraction} holds out all {len(prompts)})")

    @classmethod
    def from_file(cls, path, **kwargs) -> "PromptFileDomain":
        return cls(read_prompt_file(path), **kwargs)

    def prompts(self, split: str) -> PromptSet:
        _check_split(split)
        return self._splits[split]


def shapes_prompt_id(index: int) -> str:
    """The prompt id of the shapes world's condition ``index`` (its position in the world's condition order)."""
    return f"{SHAPES_PREFIX}{index:04d}"


def shapes_condition_index(prompt_id: str) -> int:
    if not prompt_id.startswith(SHAPES_PREFIX) or not prompt_id[len(SHAPES_PREFIX):].isdigit():
        raise PromptError(f"'{prompt_id}' is not a prompt of the shapes world (ids are {SHAPES_PREFIX}NNNN)")
    return int(prompt_id[len(SHAPES_PREFIX):])


def shapes_world(world_cfg) -> ShapesWorld:
    """The shapes world of a recipe's ``world`` section."""
    return ShapesWorld(world_cfg)


def exact_oracle(world) -> ShapesOracle:
    """The exact oracle of the shapes world ``world``: graded per-component, per-segment scores of its clips."""
    return ShapesOracle(world)
