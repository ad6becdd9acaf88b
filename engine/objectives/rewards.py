"""Differentiable reward models behind one interface, and the weighted mixture T2V-Turbo(-v2) optimises.

Source: T2V-Turbo-v2 (arXiv 2410.05677) eq. 10-11, after T2V-Turbo. The reward objective on a decoded
student sample ``x^ = D(f_theta(x_t, t, c))`` (B, 3, T, H, W) with prompt ``c``::

    R(x^, c) = sum_i beta_i  * mean_{m in frames_b} R_img_i(x^[:, :, m], c)      image-text rewards on a few
             + sum_j gamma_j * R_vid_j(x^, c)                                    random frames per clip (M of them)
    loss_reward = - mean_b R(x^_b, c_b)

Interface. A reward is a callable ``reward(pixels, cond_ids) -> (N,)`` with attributes ``name`` and
``kind``:

* ``kind == "image"``: ``pixels (N, 3, H, W)`` are frames in [-1, 1];
* ``kind == "video"``: ``pixels (N, 3, T, H, W)`` are clips in [-1, 1].

It must be differentiable w.r.t. ``pixels`` (its gradient trains the student). ``cond_ids (N, K)`` is the
prompt in whatever form the reward reads (class triples on the shapes world; a real text reward would take
token ids or strings through a closure). Large image-text / video-text models (HPSv2.1, CLIP, InternVideo2)
plug in as such callables loaded from a local path (``vidpo.objectives.rewards_models``: ``reward.models``, CLIP-style
scoring rules, on a release's VAE-decoded videos); none is bundled (nothing downloads weights).

The shapes world's rewards read the exact oracle (``vidpo.data.oracle``), which is differentiable almost
everywhere w.r.t. the clip:

* ``shapes_appearance`` (image-text): per frame, ``(colour + shape) / 2`` of the oracle's frame terms --
  "does this frame show the captioned colour and shape", the role CLIP/HPS play;
* ``shapes_motion`` (video-text): ``(motion + consistency) / 2`` -- "does the clip move as captioned, steadily",
  the role of a video-text model;
* ``shapes_oracle`` (video-text): the oracle total.

Honest caveat: the oracle is also the evaluation metric, so a reward-trained student is optimised on the
measured quantity (the shapes world has no independent critic); components are kept separate so a recipe
can reward only some of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from vidpo.data.shapes_rewards import SHAPES_REWARDS

REWARDS: Dict[str, Callable] = dict(SHAPES_REWARDS)
"""Reward name -> factory(oracle or model) of every known reward; kind is a property of the reward, checked
against the config section. The shapes world's (``vidpo.data.shapes_rewards``) score with its exact oracle."""


@dataclass
class RewardTerm:
    reward: Callable
    weight: float


class RewardMixture:
    """``R = sum_i beta_i mean_frames R_img_i + sum_j gamma_j R_vid_j`` (module doc) over decoded clips.

    ``decode`` maps the student's output to pixels in [-1, 1] (identity on the pixel-space shapes world;
    a VAE decoder for latent models).
    """

    def __init__(self, terms: Sequence[RewardTerm], *, image_frames: int = 2,
                 decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        for term in terms:
            if getattr(term.reward, "kind", None) not in ("image", "video"):
                raise TypeError(f"reward {getattr(term.reward, 'name', term.reward)!r} has no kind 'image'/'video'")
        if image_frames < 1:
            raise ValueError(f"image_frames must be >= 1, got {image_frames}")
        self.terms = [t for t in terms if t.weight != 0.0]
        self.image_frames = image_frames
        self.decode = decode or (lambda x: x)

    def __bool__(self) -> bool:
        return bool(self.terms)

    @property
    def names(self) -> List[str]:
        return [t.reward.name for t in self.terms]

    def draw_frames(self, batch: int, frames: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch, M)`` distinct random frame indices per clip (M = min(image_frames, frames))."""
        m = min(self.image_frames, frames)
        return torch.rand(batch, frames, generator=generator).argsort(dim=1)[:, :m]

    def __call__(self, latents: torch.Tensor, cond_ids: torch.Tensor,
                 frame_index: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``(R (B,), {name: (B,) unweighted reward})`` for latents ``(B, C, T, H, W)`` and frame picks ``(B, M)``."""
        pixels = self.decode(latents)
        batch, _, frames = pixels.shape[:3]
        total = pixels.new_zeros(batch)
        parts: Dict[str, torch.Tensor] = {}
        for term in self.terms:
            if term.reward.kind == "image":
                m = frame_index.shape[1]
                channels, height, width = pixels.shape[1], pixels.shape[3], pixels.shape[4]
                index = frame_index.to(pixels.device)[:, None, :, None, None].expand(-1, channels, -1, height, width)
                picked = torch.gather(pixels, 2, index)                               # (B, 3, M, H, W)
                flat = picked.transpose(1, 2).reshape(batch * m, channels, height, width)
                value = term.reward(flat, cond_ids.repeat_interleave(m, dim=0)).view(batch, m).mean(1)
            else:
                value = term.reward(pixels, cond_ids)
            parts[term.reward.name] = value
            total = total + term.weight * value
        return total, parts


def build_reward_mixture(reward_cfg, oracle, decode=None) -> RewardMixture:
    """The mixture of a ``RewardConfig`` (``image`` / ``video``: name -> weight) on the shapes world."""
    terms = []
    for kind, table in (("image", reward_cfg.image), ("video", reward_cfg.video)):
        for name, weight in (table or {}).items():
            if name not in REWARDS:
                raise ValueError(f"reward.{kind}: unknown reward {name!r}; known: {sorted(REWARDS)}")
            reward = REWARDS[name](oracle)
            if reward.kind != kind:
                raise ValueError(f"reward.{kind}: {name!r} is a {reward.kind}-text reward; list it under "
                                 f"reward.{reward.kind}")
            terms.append(RewardTerm(reward, float(weight)))
    return RewardMixture(terms, image_frames=reward_cfg.image_frames, decode=decode)
