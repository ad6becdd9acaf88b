"""Labels from the IPO critic: scoring clips with a trained ``VideoCritic`` and the ``critic`` labeller.

The critic scores each (clip, caption) per frame, per segment and per video (``score_videos``); a pair's
label is the sign of the score difference, a tie within ``tie_margin_of`` the critic's tie parameter (the
Davidson rule, raised by ``critic.min_confidence``). ``Symmetries`` are the shapes world's label-preserving
views of a clip (flips and time reversal with the caption mapped), used for training augmentation and for
Dual-IPO's distinct voting passes. Training the critic is ``vidpo.ipo.critic``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from vidpo.config import RunConfig, resolve_path
from vidpo.labeling.base import Labeler, LabelingError, LabelResult, PairBatch, register_labeler
from vidpo.models.critic import CriticScores, VideoCritic, load_critic
from vidpo.models.dit.config import DiTConfig
from vidpo.training.modeling import build_world, pick_device


def tie_margin_of(critic: VideoCritic, margin: Optional[float], min_confidence: float = 0.0) -> float:
    """The labelling tie margin on |d|: ``margin`` if given, else the Davidson rule ``2 max(log nu, 0)``;
    raised, with ``min_confidence`` p > 0, to the d* where the winner's probability reaches p:
    ``1/p - 1 = e^{-d*} + nu e^{-d*/2}``, i.e. ``d* = -2 ln u`` with ``u = (sqrt(nu^2 + 4 (1/p - 1)) - nu) / 2``."""
    if not 0.0 <= min_confidence < 1.0:
        raise ValueError(f"critic.min_confidence must be in [0, 1), got {min_confidence}")
    nu = critic.tie_parameter
    out = float(margin) if margin is not None else 2.0 * max(math.log(nu), 0.0)
    if min_confidence > 0:
        u = (math.sqrt(nu * nu + 4.0 * (1.0 / min_confidence - 1.0)) - nu) / 2.0
        out = max(out, -2.0 * math.log(u))
    return out


def labels_from_differences(d: torch.Tensor, margin: float) -> torch.Tensor:
    """+1 where d > margin, -1 where d < -margin, else 0 (int64, shape of d)."""
    return (d > margin).long() - (d < -margin).long()


# ----- symmetries of the shapes world ---------------------------------------------------------------------
@dataclass(frozen=True)
class Symmetry:
    name: str
    dims: tuple                  # clip dims to flip: 4 = W, 3 = H, 2 = T
    direction_map: torch.Tensor  # (n_directions,) new direction index of each old one
    reverses_time: bool


class Symmetries:
    """Label-preserving transforms of (clips, condition, segment labels) of the shapes world.

    Index 0 is the identity. A transform is offered only when the world's direction vocabulary is closed
    under it (e.g. 'left' exists for 'right') and, for time reversal, when the segments are symmetric
    in time (reversing the frames maps segment s onto segment S-1-s).
    """

    def __init__(self, world, segment_ids: torch.Tensor):
        vectors = world.direction_vectors
        seg = segment_ids.to(torch.long)
        time_ok = bool(torch.equal(seg.flip(0), seg.max() - seg))
        self.items: list[Symmetry] = []
        for hflip in (False, True):
            for vflip in (False, True):
                for reverse in (False, True):
                    if reverse and not time_ok:
                        continue
                    sign = torch.tensor([-1.0 if hflip else 1.0, -1.0 if vflip else 1.0]) * (-1.0 if reverse else 1.0)
                    mapped = _direction_permutation(vectors, sign)
                    if mapped is None:
                        continue
                    dims = tuple(d for d, on in ((4, hflip), (3, vflip), (2, reverse)) if on)
                    name = "+".join(n for n, on in (("hflip", hflip), ("vflip", vflip), ("reverse", reverse)) if on)
                    self.items.append(Symmetry(name or "identity", dims, mapped, reverse))

    def __len__(self) -> int:
        return len(self.items)

    def clips(self, k: int, clips: torch.Tensor) -> torch.Tensor:
        dims = self.items[k].dims
        return clips.flip(dims) if dims else clips

    def cond_ids(self, k: int, cond_ids: torch.Tensor) -> torch.Tensor:
        out = cond_ids.clone()
        out[:, 2] = self.items[k].direction_map.to(cond_ids.device)[cond_ids[:, 2]]
        return out

    def segments(self, k: int, per_segment: torch.Tensor) -> torch.Tensor:
        """Segment-indexed values (B, S) seen through transform k (and back: every transform is an involution)."""
        return per_segment.flip(-1) if self.items[k].reverses_time else per_segment


def _direction_permutation(vectors: torch.Tensor, sign: torch.Tensor) -> Optional[torch.Tensor]:
    target = vectors * sign
    mapped = []
    for v in target:
        hit = torch.nonzero((vectors - v).abs().sum(1) < 1e-6).flatten()
        if hit.numel() == 0:
            return None
        mapped.append(int(hit[0]))
    return torch.tensor(mapped, dtype=torch.long)


# ----- scoring ----------------------------------------------------------------------------------------------
def build_critic(cfg: RunConfig, world) -> VideoCritic:
    dcfg = DiTConfig(in_channels=3, patch_size=tuple(cfg.critic.patch_size), width=cfg.critic.width,
                     depth=cfg.critic.depth, num_heads=cfg.critic.num_heads, cond_vocab_size=world.vocab_size,
                     attention="sdpa" if cfg.model.attention == "auto" else cfg.model.attention)
    return VideoCritic(dcfg, dropout=cfg.critic.dropout, tie_init=cfg.critic.tie_init,
                       frame_differences=cfg.critic.frame_differences)


@torch.no_grad()
def score_videos(critic: VideoCritic, clips: torch.Tensor, cond_ids: torch.Tensor, world,
                 segment_ids: torch.Tensor, *, batch_size: int = 128, symmetries: Optional[Symmetries] = None,
                 view: int = 0, dropout_seed: Optional[int] = None) -> CriticScores:
    """Critic scores of clips (n, C, T, H, W) on CPU, in the clips' own frame / segment order.

    ``view`` k > 0 scores transform k of ``symmetries`` (and maps the frames and segments back);
    ``dropout_seed`` turns Monte-Carlo dropout on with that seed (one draw per call).
    """
    device = next(critic.parameters()).device
    critic.eval()
    if dropout_seed is not None:
        critic.set_dropout(True)
    devices = [device] if device.type == "cuda" else []
    frames, segments = [], []
    try:
        with torch.random.fork_rng(devices=devices):
            if dropout_seed is not None:
                torch.manual_seed(dropout_seed)
            for start in range(0, clips.shape[0], batch_size):
                x, c = clips[start:start + batch_size], cond_ids[start:start + batch_size]
                if view:
                    x, c = symmetries.clips(view, x), symmetries.cond_ids(view, c)
                out = critic(x.to(device), world.tokens(c).to(device), segment_ids)
                f, s = out.frames.cpu(), out.segments.cpu()
                if view and symmetries.items[view].reverses_time:
                    f = f.flip(1)
                frames.append(f)
                segments.append(symmetries.segments(view, s) if view else s)
    finally:
        critic.set_dropout(False)
    frames_t = torch.cat(frames)
    return CriticScores(frames=frames_t, segments=torch.cat(segments), video=frames_t.mean(1))


# ----- the labeller ---------------------------------------------------------------------------------------
def cond_ids_from_captions(world, captions: Sequence[str]) -> torch.Tensor:
    """Parse shapes-world captions ('a red circle moving left') back into condition ids (n, 3)."""
    out = []
    for caption in captions:
        words = caption.split()
        try:
            colour, shape, direction = words[-4], words[-3], words[-1]
            out.append([world.colours.index(colour), world.shapes.index(shape), world.directions.index(direction)])
        except (IndexError, ValueError):
            raise LabelingError(f"the critic labeller cannot read the condition of caption {caption!r} "
                                "(expected 'a <colour> <shape> moving <direction>' of this world)") from None
    return torch.tensor(out, dtype=torch.long)


@register_labeler("critic")
class CriticLabeler(Labeler):
    """Labels pairs (and scores single videos) with a trained ``VideoCritic``; it never fails a comparison."""

    name = "critic"

    def __init__(self, cfg: Optional[RunConfig] = None, world=None, *, critic: Optional[VideoCritic] = None,
                 checkpoint: Optional[str] = None, tie_margin: Optional[float] = None,
                 min_confidence: Optional[float] = None, granularity: Optional[str] = None,
                 batch_size: Optional[int] = None) -> None:
        """From a run config (``critic.checkpoint``, ``critic.tie_margin``, ``critic.min_confidence``,
        ``critic.granularity``), or from a
        ready ``critic`` / ``checkpoint``; explicit keywords win over the config. ``world`` maps conditions to
        the critic's tokens."""
        if world is None:
            if cfg is None:
                raise ValueError("CriticLabeler needs world= (or cfg= to build it)")
            world = build_world(cfg)
        self.world = world
        c = cfg.critic if cfg is not None else None
        if critic is None:
            checkpoint = checkpoint or (c.checkpoint if c is not None else None)
            if not checkpoint:
                raise LabelingError("label.labeler=critic needs critic.checkpoint (a critic trained with "
                                    "`vidpo critic train`), e.g. --set critic.checkpoint=runs/critic")
            critic = load_critic(resolve_path(checkpoint), pick_device())
        self.critic = critic.eval()
        margin = tie_margin if tie_margin is not None else (c.tie_margin if c is not None else None)
        confidence = min_confidence if min_confidence is not None else (c.min_confidence if c is not None else 0.0)
        self.tie_margin = tie_margin_of(self.critic, margin, confidence)
        self.granularity = granularity or (c.granularity if c is not None else "video")
        if self.granularity not in ("segment", "video"):
            raise ValueError(f"critic granularity must be 'segment' or 'video', got {self.granularity!r}")
        self.batch_size = batch_size or (c.batch_size_eval if c is not None else 128)

    def _cond(self, cond_ids: Optional[torch.Tensor], captions: Sequence[str]) -> torch.Tensor:
        return cond_ids.to(torch.long) if cond_ids is not None else cond_ids_from_captions(self.world, captions)

    def label(self, batch: PairBatch) -> LabelResult:
        cond = self._cond(batch.cond_ids, batch.captions)
        kw = dict(batch_size=self.batch_size)
        a = score_videos(self.critic, batch.first, cond, self.world, batch.segment_ids, **kw)
        b = score_videos(self.critic, batch.second, cond, self.world, batch.segment_ids, **kw)
        if self.granularity == "segment":
            labels = labels_from_differences(a.segments - b.segments, self.tie_margin)
        else:
            verdict = labels_from_differences(a.video - b.video, self.tie_margin)
            labels = verdict[:, None].expand(-1, batch.num_segments).contiguous()
        return LabelResult.from_labels(labels)

    def label_pointwise(self, clips: torch.Tensor, captions: list[str], segment_ids: torch.Tensor,
                        cond_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Critic scores (n, S) per segment ('video' granularity: the whole-video score in every segment)."""
        out = score_videos(self.critic, clips, self._cond(cond_ids, captions), self.world, segment_ids,
                           batch_size=self.batch_size)
        if self.granularity == "video":
            return out.video[:, None].expand(-1, out.segments.shape[1]).contiguous()
        return out.segments


# ----- the critic as the scorer of a pool of videos (KTO, ranked DPO: vidpo.ipo.pairing) ----------------------
PoolScorer = Callable[[torch.Tensor, torch.Tensor], CriticScores]
"""``(videos (n, C, T, H, W), cond_ids (n, K)) -> scores``: what ranks a pool of videos (the critic; the
oracle in the ceiling ablation of ``vidpo iterate``)."""


def critic_scorer(critic: VideoCritic, cfg: RunConfig, world, segment_ids: torch.Tensor) -> PoolScorer:
    """The critic as a ``PoolScorer``."""
    def score(videos: torch.Tensor, cond: torch.Tensor) -> CriticScores:
        return score_videos(critic, videos, cond, world, segment_ids, batch_size=cfg.critic.batch_size_eval)
    return score
