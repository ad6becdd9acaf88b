"""Differentiable rewards of the shapes world, scored by its exact oracle (``vidpo.data.oracle``): what the toy
world's consistency distillation optimises (``vidpo.objectives.rewards`` mixes them by name).

``shapes_appearance``  image-text: ``(colour + shape) / 2`` of single frames, in [0, 1]
``shapes_motion``      video-text: the mean of the oracle's motion and consistency components
``shapes_oracle``      video-text: the mean of all four components
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

from vidpo.data.oracle import ShapesOracle


class ShapesAppearanceReward:
    """Image-text reward: ``(colour_t + shape_t) / 2`` of single frames ``(N, 3, H, W) -> (N,)`` in [0, 1]."""

    kind = "image"
    name = "shapes_appearance"

    def __init__(self, oracle: ShapesOracle):
        self.oracle = oracle

    def __call__(self, frames: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        if frames.dim() != 4:
            raise ValueError(f"{self.name} takes frames (N, 3, H, W), got {tuple(frames.shape)}")
        # The oracle's frame terms need a clip; a frame repeated twice is one whose colour/shape terms are
        # exactly that frame's (they are per-frame), and whose motion terms are ignored here.
        clip = frames.unsqueeze(2).expand(-1, -1, 2, -1, -1)
        terms = self.oracle.frame_terms(clip, cond_ids.to(frames.device))
        return 0.5 * (terms["colour"][:, 0] + terms["shape"][:, 0])


class ShapesOracleVideoReward:
    """Video-text reward: the mean of the chosen oracle components, ``(N, 3, T, H, W) -> (N,)`` in [0, 1]."""

    kind = "video"

    def __init__(self, oracle: ShapesOracle, components: Sequence[str], name: str):
        self.oracle = oracle
        self.components = tuple(components)
        self.name = name

    def __call__(self, clips: torch.Tensor, cond_ids: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 5:
            raise ValueError(f"{self.name} takes clips (N, 3, T, H, W), got {tuple(clips.shape)}")
        score = self.oracle.score(clips, cond_ids.to(clips.device))
        return torch.stack([score.components[c] for c in self.components]).mean(0)


SHAPES_REWARDS: Dict[str, Callable[[ShapesOracle], object]] = {
    "shapes_appearance": ShapesAppearanceReward,
    "shapes_motion": lambda oracle: ShapesOracleVideoReward(oracle, ("motion", "consistency"), "shapes_motion"),
    "shapes_oracle": lambda oracle: ShapesOracleVideoReward(
        oracle, ("colour", "shape", "motion", "consistency"), "shapes_oracle"),
}
"""Reward name -> factory(oracle). Kind is a property of the reward, checked against the config section."""
