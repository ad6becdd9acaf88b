"""Labels from the IPO critic: the toy critic's adapter, scoring clips with any critic, and the ``critic`` labeller.

Every critic implements one scoring interface (``vidpo.models.critic.Critic``): ``score(clips, captions,
segment_ids) -> CriticScores`` per frame, per segment and per video, plus the Davidson tie parameter. The VLM
critic (``vidpo.models.critic.vlm``) reads the captions itself; the shapes world's toy network reads condition
tokens, so ``ShapesCritic`` puts it behind the interface: it parses each caption back into the world's
condition and its tokens. ``score_clips`` scores a set of clips in batches (a view, a Monte-Carlo dropout draw);
``score_videos`` is its form for the shapes world's condition ids. A pair's label is the sign of the score
difference, a tie within ``tie_margin_of`` the critic's tie parameter (the Davidson rule, raised by
``critic.min_confidence``). ``Symmetries`` are the shapes world's label-preserving views of a clip (flips and
time reversal with the caption mapped), used for training augmentation and for Dual-IPO's distinct voting
passes; a prompt file's critic has the identity alone. Training the critic is ``vidpo.ipo.critic``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from vidpo.config import ConfigError, RunConfig, resolve_path
from vidpo.labeling.base import Labeler, LabelingError, LabelResult, PairBatch, register_labeler
from vidpo.models.critic import (
    Critic,
    CriticScores,
    VideoCritic,
    Views,
    VLMCritic,
    VLMCriticSettings,
    load_critic,
    save_critic,
)
from vidpo.models.dit.config import DiTConfig
from vidpo.training.modeling import build_world, pick_device


def tie_margin_of(critic: VideoCritic | Critic, margin: Optional[float], min_confidence: float = 0.0) -> float:
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


class Symmetries(Views):
    """Label-preserving transforms of (clips, condition, segment labels) of the shapes world.

    Index 0 is the identity. A transform is offered only when the world's direction vocabulary is closed
    under it (e.g. 'left' exists for 'right') and, for time reversal, when the segments are symmetric
    in time (reversing the frames maps segment s onto segment S-1-s).
    """

    def __init__(self, world, segment_ids: torch.Tensor):
        self.world = world
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

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.items]

    def clips(self, k: int, clips: torch.Tensor) -> torch.Tensor:
        dims = self.items[k].dims
        return clips.flip(dims) if dims else clips

    def cond_ids(self, k: int, cond_ids: torch.Tensor) -> torch.Tensor:
        out = cond_ids.clone()
        out[:, 2] = self.items[k].direction_map.to(cond_ids.device)[cond_ids[:, 2]]
        return out

    def captions(self, k: int, captions: Sequence[str]) -> list[str]:
        """The captions of the conditions seen through transform k (the direction mapped)."""
        return self.world.captions(self.cond_ids(k, cond_ids_from_captions(self.world, captions)))

    def segments(self, k: int, per_segment: torch.Tensor) -> torch.Tensor:
        """Segment-indexed values (B, S) seen through transform k (and back: every transform is an involution)."""
        return per_segment.flip(-1) if self.items[k].reverses_time else per_segment

    def frames(self, k: int, per_frame: torch.Tensor) -> torch.Tensor:
        """Frame-indexed values (B, T) seen through transform k (and back)."""
        return per_frame.flip(1) if self.items[k].reverses_time else per_frame


def _direction_permutation(vectors: torch.Tensor, sign: torch.Tensor) -> Optional[torch.Tensor]:
    target = vectors * sign
    mapped = []
    for v in target:
        hit = torch.nonzero((vectors - v).abs().sum(1) < 1e-6).flatten()
        if hit.numel() == 0:
            return None
        mapped.append(int(hit[0]))
    return torch.tensor(mapped, dtype=torch.long)


# ----- the toy critic behind the scoring interface -----------------------------------------------------------
class ShapesCritic(Critic):
    """The toy ``VideoCritic`` of the shapes world as a ``Critic``: captions parsed back into the world's conditions
    (``cond_ids_from_captions``), their tokens given to the network; the world's ``Symmetries`` as its views."""

    kind = "shapes"

    def __init__(self, net: VideoCritic, world):
        super().__init__()
        self.net = net
        self.world = world

    @property
    def log_tie(self) -> torch.nn.Parameter:
        return self.net.log_tie

    @property
    def frame_differences(self) -> bool:
        return self.net.frame_differences

    def set_dropout(self, active: bool) -> None:
        self.net.set_dropout(active)

    def views(self, segment_ids: torch.Tensor) -> Symmetries:
        return Symmetries(self.world, segment_ids)

    def tokens(self, captions: Sequence[str]) -> torch.Tensor:
        return self.world.tokens(cond_ids_from_captions(self.world, captions))

    def score(self, clips: torch.Tensor, captions: Sequence[str], segment_ids: torch.Tensor) -> CriticScores:
        device = next(self.net.parameters()).device
        if clips.dtype == torch.uint8:
            clips = clips.float() / 127.5 - 1.0
        return self.net(clips.to(device), self.tokens(captions).to(device), segment_ids)

    def save(self, path, extra: Optional[dict] = None) -> None:
        save_critic(self.net, path, extra)


def as_critic(critic: VideoCritic | Critic, world=None) -> Critic:
    """``critic`` behind the scoring interface: a bare ``VideoCritic`` wrapped with ``world``, a ``Critic`` as it is."""
    if isinstance(critic, Critic):
        return critic
    if isinstance(critic, VideoCritic):
        if world is None:
            raise ValueError("the toy critic reads the shapes world's condition tokens: pass the world")
        return ShapesCritic(critic, world)
    raise TypeError(f"not a critic: {type(critic).__name__}")


def build_critic(cfg: RunConfig, world) -> VideoCritic:
    """The toy network of the recipe's ``critic`` section, for ``world``'s vocabulary (from the global RNG)."""
    dcfg = DiTConfig(in_channels=3, patch_size=tuple(cfg.critic.patch_size), width=cfg.critic.width,
                     depth=cfg.critic.depth, num_heads=cfg.critic.num_heads, cond_vocab_size=world.vocab_size,
                     attention="sdpa" if cfg.model.attention == "auto" else cfg.model.attention)
    return VideoCritic(dcfg, dropout=cfg.critic.dropout, tie_init=cfg.critic.tie_init,
                       frame_differences=cfg.critic.frame_differences)


def vlm_critic_settings(cfg: RunConfig) -> VLMCriticSettings:
    """The VLM critic of the recipe's ``critic`` section (``critic.backbone`` resolved)."""
    c = cfg.critic
    return VLMCriticSettings(backbone=str(resolve_path(c.backbone)), frames_per_segment=c.frames_per_segment,
                             pooling=c.pooling, instruction=c.instruction, lora_rank=c.lora_rank,
                             lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, lora_targets=list(c.lora_targets),
                             dropout=c.dropout, dtype=c.backbone_dtype)


def build_scorer(cfg: RunConfig, world=None) -> Critic:
    """A fresh, untrained critic of the recipe (from the global RNG): the VLM critic when ``critic.backbone`` is
    set, else the toy network of ``world`` behind its adapter."""
    if cfg.critic.backbone:
        return VLMCritic(vlm_critic_settings(cfg), tie_init=cfg.critic.tie_init)
    if world is None:
        raise ConfigError("critic.backbone must name a vision-language model directory: the toy critic scores the "
                          "shapes world's clips only, and this run has a prompt file")
    return ShapesCritic(build_critic(cfg, world), world)


def open_critic(path, world=None, device=None) -> Critic:
    """The critic saved at ``path`` (a file or its directory) behind the scoring interface, in eval mode: a VLM
    critic as it is, a toy one with ``world``."""
    critic = load_critic(path, device or pick_device())
    if isinstance(critic, VideoCritic) and world is None:
        raise LabelingError(f"{path} is a toy critic of the shapes world; it cannot score this run's videos")
    return as_critic(critic, world).eval()


# ----- scoring ----------------------------------------------------------------------------------------------
@torch.no_grad()
def score_clips(critic: Critic, clips: torch.Tensor, captions: Sequence[str], segment_ids: torch.Tensor, *,
                batch_size: int = 128, views: Optional[Views] = None, view: int = 0,
                dropout_seed: Optional[int] = None) -> CriticScores:
    """Critic scores of clips (n, 3, T, H, W) (float in [-1, 1] or uint8) with their captions, on CPU, in the
    clips' own frame / segment order.

    ``view`` k > 0 scores view k of ``views`` (default: the critic's own) and maps the frames and segments back;
    ``dropout_seed`` turns Monte-Carlo dropout on with that seed (one draw per call).
    """
    device = next(critic.parameters()).device
    critic.eval()
    if view and views is None:
        views = critic.views(segment_ids)
    if dropout_seed is not None:
        critic.set_dropout(True)
    devices = [device] if device.type == "cuda" else []
    captions = list(captions)
    frames, segments = [], []
    try:
        with torch.random.fork_rng(devices=devices):
            if dropout_seed is not None:
                torch.manual_seed(dropout_seed)
            for start in range(0, clips.shape[0], batch_size):
                x, c = clips[start:start + batch_size], captions[start:start + batch_size]
                if view:
                    x, c = views.clips(view, x), views.captions(view, c)
                out = critic.score(x, c, segment_ids)
                f, s = out.frames.cpu(), out.segments.cpu()
                frames.append(views.frames(view, f) if view else f)
                segments.append(views.segments(view, s) if view else s)
    finally:
        critic.set_dropout(False)
    frames_t = torch.cat(frames)
    return CriticScores(frames=frames_t, segments=torch.cat(segments), video=frames_t.mean(1))


def score_videos(critic: VideoCritic | Critic, clips: torch.Tensor, cond_ids: torch.Tensor, world,
                 segment_ids: torch.Tensor, *, batch_size: int = 128, symmetries: Optional[Symmetries] = None,
                 view: int = 0, dropout_seed: Optional[int] = None) -> CriticScores:
    """``score_clips`` for the shapes world: clips (n, C, T, H, W) of the conditions ``cond_ids`` (n, 3)."""
    return score_clips(as_critic(critic, world), clips, world.captions(cond_ids), segment_ids, batch_size=batch_size,
                       views=symmetries, view=view, dropout_seed=dropout_seed)


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
    """Labels pairs (and scores single videos) with a trained critic of either kind; it never fails a comparison."""

    name = "critic"

    def __init__(self, cfg: Optional[RunConfig] = None, world=None, *, critic: Optional[VideoCritic | Critic] = None,
                 checkpoint: Optional[str] = None, tie_margin: Optional[float] = None,
                 min_confidence: Optional[float] = None, granularity: Optional[str] = None,
                 batch_size: Optional[int] = None) -> None:
        """From a run config (``critic.checkpoint``, ``critic.tie_margin``, ``critic.min_confidence``,
        ``critic.granularity``), or from a ready ``critic`` / ``checkpoint``; explicit keywords win over the config.
        ``world`` maps a toy critic's captions to its tokens (default: the recipe's shapes world); a VLM critic
        reads the captions itself."""
        c = cfg.critic if cfg is not None else None
        if critic is None:
            checkpoint = checkpoint or (c.checkpoint if c is not None else None)
            if not checkpoint:
                raise LabelingError("label.labeler=critic needs critic.checkpoint (a critic trained with "
                                    "`vidpo critic train`), e.g. --set critic.checkpoint=runs/critic")
            critic = load_critic(resolve_path(checkpoint), pick_device())
        if isinstance(critic, VideoCritic) and world is None:
            if cfg is None:
                raise ValueError("CriticLabeler needs world= (or cfg= to build it) for a toy critic")
            world = build_world(cfg)
        self.world = world
        self.critic = as_critic(critic, world).eval()
        margin = tie_margin if tie_margin is not None else (c.tie_margin if c is not None else None)
        confidence = min_confidence if min_confidence is not None else (c.min_confidence if c is not None else 0.0)
        self.tie_margin = tie_margin_of(self.critic, margin, confidence)
        self.granularity = granularity or (c.granularity if c is not None else "video")
        if self.granularity not in ("segment", "video"):
            raise ValueError(f"critic granularity must be 'segment' or 'video', got {self.granularity!r}")
        self.batch_size = batch_size or (c.batch_size_eval if c is not None else 128)

    def _captions(self, cond_ids: Optional[torch.Tensor], captions: Sequence[str]) -> list[str]:
        """The captions the critic reads: a toy critic's from the structured conditions when the batch has them."""
        if isinstance(self.critic, ShapesCritic) and cond_ids is not None and cond_ids.numel():
            return self.world.captions(cond_ids.to(torch.long))
        return list(captions)

    def label(self, batch: PairBatch) -> LabelResult:
        captions = self._captions(batch.cond_ids, batch.captions)
        kw = dict(batch_size=self.batch_size)
        a = score_clips(self.critic, batch.first, captions, batch.segment_ids, **kw)
        b = score_clips(self.critic, batch.second, captions, batch.segment_ids, **kw)
        if self.granularity == "segment":
            labels = labels_from_differences(a.segments - b.segments, self.tie_margin)
        else:
            verdict = labels_from_differences(a.video - b.video, self.tie_margin)
            labels = verdict[:, None].expand(-1, batch.num_segments).contiguous()
        return LabelResult.from_labels(labels)

    def label_pointwise(self, clips: torch.Tensor, captions: list[str], segment_ids: torch.Tensor,
                        cond_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Critic scores (n, S) per segment ('video' granularity: the whole-video score in every segment)."""
        out = score_clips(self.critic, clips, self._captions(cond_ids, captions), segment_ids,
                          batch_size=self.batch_size)
        if self.granularity == "video":
            return out.video[:, None].expand(-1, out.segments.shape[1]).contiguous()
        return out.segments


# ----- the critic as the scorer of a pool of videos (KTO, ranked DPO: vidpo.ipo.pairing) ----------------------
PoolScorer = Callable[[torch.Tensor, Sequence[str], torch.Tensor], CriticScores]
"""``(videos (n, 3, T, H, W), captions (n,), cond_ids (n, K)) -> scores``: what ranks a pool of videos (the critic;
the shapes oracle, which reads the conditions, in the ceiling ablation of ``vidpo iterate``; K = 0 off the shapes
world)."""


def critic_scorer(critic: VideoCritic | Critic, cfg: RunConfig, world, segment_ids: torch.Tensor) -> PoolScorer:
    """The critic as a ``PoolScorer`` (``world``: a toy critic's)."""
    scorer = as_critic(critic, world)

    def score(videos: torch.Tensor, captions: Sequence[str], cond: torch.Tensor) -> CriticScores:
        return score_clips(scorer, videos, captions, segment_ids, batch_size=cfg.critic.batch_size_eval)
    return score
