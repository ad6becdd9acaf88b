"""The shapes world: procedurally rendered, captioned clips with known ground truth.

This is vidpo's embedded data set. A *condition* is a triple of indices ``(colour, shape, direction)``
into the vocabularies of a :class:`~vidpo.config.WorldConfig`; its clip shows one antialiased filled
shape of ``object_size`` pixels on a black background, moving ``speed`` pixels per frame in the
direction, and its caption reads "a red circle moving left". Because the world is procedural, the
exact oracle (``vidpo.data.oracle``) can score any clip against its caption.

Pretraining data can be *corrupted* on purpose (``render(..., corrupt=True)``), so that a base model
learns a "bad mode" that preference optimisation must then remove. Each clip independently gets at
most one corruption, with the configured probabilities:

* ``wrong_colour``: the clip shows another vocabulary colour than the caption names;
* ``reversed_direction``: the object moves opposite to the captioned direction;
* ``static``: the object does not move;
* ``local_artifact``: inside a window of ``artifact_segment_frames`` consecutive frames (aligned to a
  multiple of that length, so it falls inside one DenseDPO segment of the same length) one of
  ``flicker`` (the colour changes to another palette colour), ``dropout`` (the object vanishes) or
  ``jitter`` (the object jumps 2-3.5 px away from its path, independently in each window frame).

Geometry: pixel ``(row i, column j)`` has its centre at ``(x, y) = (j + 0.5, i + 0.5)``; x grows to the
right and y downwards, so "up" is ``(0, -1)``. The coverage of a pixel by a shape is its area coverage
(box filter) for squares and the clamped signed distance ``clamp(0.5 - sdf, 0, 1)`` for circles and
diamonds (:func:`shape_coverage`); no pixel whose centre is more than ``size / 2 + 0.5`` from the
object's centre along an axis is drawn, so "fully inside" means ``size / 2 <= centre <= extent -
size / 2``. A clip is ``-1 + 2 * coverage * rgb`` per channel, in ``[-1, 1]``, background ``-1``.

Every random draw comes from the ``torch.Generator`` passed in, in a fixed order and with a fixed
count per clip, whether or not ``corrupt`` is set: the same generator state gives the same clips, and
a clean render and a corrupted render from the same state share the objects' start positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from vidpo.config import WorldConfig

PALETTE: Dict[str, Tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
}
"""Colour name -> RGB in [0, 1]. Every colour has max channel 1 (saturated), so brightness = coverage
and the oracle can read chromaticity as ``rgb / max(rgb)``; any two colours are >= 0.5 apart."""

SHAPES: Tuple[str, ...] = ("square", "circle", "diamond")
"""Shapes the renderer knows; a world's ``shapes`` vocabulary is a subset."""

_DIAGONAL = 1.0 / math.sqrt(2.0)
DIRECTIONS: Dict[str, Tuple[float, float]] = {
    "right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    "up-right": (_DIAGONAL, -_DIAGONAL), "up-left": (-_DIAGONAL, -_DIAGONAL),
    "down-right": (_DIAGONAL, _DIAGONAL), "down-left": (-_DIAGONAL, _DIAGONAL),
}
"""Direction name -> unit (dx, dy) in image coordinates (y down)."""

OPPOSITE: Dict[str, str] = {
    "right": "left", "left": "right", "up": "down", "down": "up",
    "up-right": "down-left", "down-left": "up-right", "up-left": "down-right", "down-right": "up-left",
}

CORRUPTIONS: Tuple[str, ...] = ("none", "wrong_colour", "reversed_direction", "local_artifact", "static")
ARTIFACT_KINDS: Tuple[str, ...] = ("flicker", "dropout", "jitter")

# Jitter jumps are this many pixels (uniform); well above the oracle's residual scale (0.75 px) so a
# jump is unmistakable, and small enough to fit next to the path in a 16 x 16 frame.
JITTER_MIN_PX = 2.0
JITTER_MAX_PX = 3.5


def shape_coverage(shape: str, centers: torch.Tensor, size: float, height: int, width: int) -> torch.Tensor:
    """Antialiased coverage in [0, 1] of one shape kind at ``centers (..., 2)`` (x, y): ``(..., H, W)``.

    With ``h = size / 2``, ``dx = x_pixel - cx``, ``dy = y_pixel - cy``:
    square  ``clamp(h + 0.5 - |dx|, 0, 1) * clamp(h + 0.5 - |dy|, 0, 1)`` (exact box-filtered area);
    circle  ``clamp(h + 0.5 - sqrt(dx^2 + dy^2), 0, 1)``;
    diamond ``min(clamp(0.5 - (|dx| + |dy| - h) / sqrt(2), 0, 1), clamp(h + 0.5 - |dx|, 0, 1),
    clamp(h + 0.5 - |dy|, 0, 1))`` (the square ``|dx| + |dy| <= h``; the box terms trim the vertices).
    Differentiable in ``centers`` (almost everywhere).
    """
    half = size / 2.0
    xs = torch.arange(width, device=centers.device, dtype=centers.dtype) + 0.5
    ys = torch.arange(height, device=centers.device, dtype=centers.dtype) + 0.5
    dx = xs.view(*([1] * (centers.dim() - 1)), 1, width) - centers[..., 0, None, None]
    dy = ys.view(*([1] * (centers.dim() - 1)), height, 1) - centers[..., 1, None, None]
    if shape == "square":
        return (half + 0.5 - dx.abs()).clamp(0, 1) * (half + 0.5 - dy.abs()).clamp(0, 1)
    if shape == "circle":
        # The epsilon keeps the gradient of sqrt finite when a pixel centre coincides with the centre.
        return (half + 0.5 - torch.sqrt(dx * dx + dy * dy + 1e-12)).clamp(0, 1)
    if shape == "diamond":
        # The half-plane approximation spills up to 0.7 px past the vertices; bounding it by the
        # box coverage keeps the drawn support inside the diamond's own square |dx|, |dy| <= h.
        edges = (0.5 - (dx.abs() + dy.abs() - half) * _DIAGONAL).clamp(0, 1)
        box = torch.minimum((half + 0.5 - dx.abs()).clamp(0, 1), (half + 0.5 - dy.abs()).clamp(0, 1))
        return torch.minimum(edges, box)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


@dataclass
class RenderedBatch:
    """A batch of rendered clips and what they really show."""

    clips: torch.Tensor
    """float32 ``(n, 3, T, H, W)`` in [-1, 1], background -1 (black)."""

    shown: torch.Tensor
    """LongTensor ``(n, 3)``: (colour, shape, direction) indices actually drawn. The direction is -1 for
    a static clip, and for a reversed clip whose opposite direction is not in the vocabulary."""

    corruption: List[str]
    """Per clip, one of ``CORRUPTIONS``."""

    artifact_frames: torch.Tensor
    """LongTensor ``(n, 2)``: ``[start, end)`` frames of a local artifact (end exclusive), -1 if none."""

    artifact_kind: List[str] = field(default_factory=list)
    """Per clip, one of ``ARTIFACT_KINDS`` for a local artifact, else ``""``."""

    centers: torch.Tensor | None = None
    """float32 ``(n, T, 2)``: the object's centre (x, y) in pixels per frame (after jitter)."""


class ShapesWorld:
    """Vocabularies, condition enumeration, tokens, captions and the renderer of a ``WorldConfig``.

    Conditions are enumerated colour-major: ``index = (colour * n_shapes + shape) * n_directions +
    direction``. Model tokens use disjoint id ranges, never 0 (the classifier-free-guidance NULL token):
    colour ``1 .. nC``, shape ``nC + 1 .. nC + nS``, direction ``nC + nS + 1 .. nC + nS + nD``.
    """

    cond_len = 3

    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        self.colours: List[str] = list(cfg.colours)
        self.shapes: List[str] = list(cfg.shapes)
        self.directions: List[str] = list(cfg.directions)
        self._validate()
        self.frames, self.height, self.width = int(cfg.frames), int(cfg.height), int(cfg.width)
        self.speed, self.size = float(cfg.speed), float(cfg.object_size)
        self.colour_rgb = torch.tensor([PALETTE[c] for c in self.colours], dtype=torch.float32)
        self.direction_vectors = torch.tensor([DIRECTIONS[d] for d in self.directions], dtype=torch.float32)
        self.palette_names: List[str] = list(PALETTE)
        self.palette_rgb = torch.tensor([PALETTE[c] for c in self.palette_names], dtype=torch.float32)
        self._colour_to_palette = torch.tensor([self.palette_names.index(c) for c in self.colours])
        self._opposite = torch.tensor(
            [self.directions.index(OPPOSITE[d]) if OPPOSITE[d] in self.directions else -1 for d in self.directions])
        probs = [cfg.wrong_colour, cfg.reversed_direction, cfg.local_artifact, cfg.static]
        self._corruption_edges = torch.tensor(probs, dtype=torch.float64).cumsum(0)

    def _validate(self) -> None:
        cfg = self.cfg
        for name, vocab, known in (("colours", self.colours, PALETTE), ("shapes", self.shapes, SHAPES),
                                   ("directions", self.directions, DIRECTIONS)):
            unknown = [v for v in vocab if v not in known]
            if unknown:
                raise ValueError(f"world.{name}: unknown {unknown}; known: {', '.join(known)}")
        problems = cfg.problems("world.")  # the ranges and sums the recipe loader checks too
        if problems:
            raise ValueError("; ".join(problems))
        travel = cfg.speed * (cfg.frames - 1)
        for d in self.directions:
            dx, dy = DIRECTIONS[d]
            if abs(dx) * travel + cfg.object_size > cfg.width or abs(dy) * travel + cfg.object_size > cfg.height:
                raise ValueError(
                    f"world: an object of size {cfg.object_size} moving {d} at {cfg.speed} px/frame for "
                    f"{cfg.frames} frames does not fit in {cfg.height}x{cfg.width}")

    # ------------------------------------------------------------------ conditions
    @property
    def num_conditions(self) -> int:
        return len(self.colours) * len(self.shapes) * len(self.directions)

    @property
    def vocab_size(self) -> int:
        return 1 + len(self.colours) + len(self.shapes) + len(self.directions)

    def condition(self, index: torch.Tensor) -> torch.Tensor:
        """Condition triples ``(n, 3)`` of enumeration indices ``(n,)`` in ``[0, num_conditions)``."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_conditions):
            raise ValueError(f"condition index out of range [0, {self.num_conditions})")
        n_shapes, n_dirs = len(self.shapes), len(self.directions)
        return torch.stack([index // (n_shapes * n_dirs), (index // n_dirs) % n_shapes, index % n_dirs], dim=1)

    def condition_index(self, cond_ids: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`condition`: ``(n, 3) -> (n,)``."""
        cond_ids = self._check_cond(cond_ids)
        return (cond_ids[:, 0] * len(self.shapes) + cond_ids[:, 1]) * len(self.directions) + cond_ids[:, 2]

    def tokens(self, cond_ids: torch.Tensor) -> torch.Tensor:
        """Model token ids ``(n, 3)`` (disjoint ranges per attribute, never 0)."""
        cond_ids = self._check_cond(cond_ids)
        offsets = torch.tensor([1, 1 + len(self.colours), 1 + len(self.colours) + len(self.shapes)],
                               device=cond_ids.device)
        return cond_ids + offsets

    def captions(self, cond_ids: torch.Tensor) -> List[str]:
        """``"a red circle moving left"`` (``"an orange ..."``) per condition."""
        cond_ids = self._check_cond(cond_ids)
        return [f"{'an' if self.colours[c][0] in 'aeiou' else 'a'} {self.colours[c]} {self.shapes[s]} moving "
                f"{self.directions[d]}" for c, s, d in cond_ids.tolist()]

    def _check_cond(self, cond_ids: torch.Tensor) -> torch.Tensor:
        cond_ids = torch.as_tensor(cond_ids, dtype=torch.long)
        if cond_ids.dim() != 2 or cond_ids.shape[1] != 3:
            raise ValueError(f"cond_ids must have shape (n, 3), got {tuple(cond_ids.shape)}")
        limits = (len(self.colours), len(self.shapes), len(self.directions))
        for k, limit in enumerate(limits):
            column = cond_ids[:, k]
            if column.numel() and (int(column.min()) < 0 or int(column.max()) >= limit):
                raise ValueError(f"cond_ids[:, {k}] out of range [0, {limit})")
        return cond_ids

    # ------------------------------------------------------------------ rendering
    def start_range(self, velocity: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Valid start centres for per-frame ``velocity (n, 2)`` (px/frame): ``(low, high)``, each ``(n, 2)``.

        The object (half-size h) stays inside for every frame iff the start centre ``c0`` satisfies
        ``h + max(0, -D) <= c0 <= extent - h - max(0, D)`` per axis, with ``D = velocity * (T - 1)``.
        """
        half = self.size / 2.0
        travel = velocity * (self.frames - 1)
        extent = torch.tensor([self.width, self.height], dtype=velocity.dtype, device=velocity.device)
        low = half + (-travel).clamp_min(0)
        high = extent - half - travel.clamp_min(0)
        return low, high

    def render(self, cond_ids: torch.Tensor, generator: torch.Generator, *, corrupt: bool = False) -> RenderedBatch:
        """Render one clip per condition (see the module doc for geometry, corruptions, determinism)."""
        cond_ids = self._check_cond(cond_ids)
        device = generator.device
        cond_ids = cond_ids.to(device)
        n, T, L = cond_ids.shape[0], self.frames, int(self.cfg.artifact_segment_frames)
        n_colours, n_palette = len(self.colours), len(self.palette_names)

        # All draws up front, fixed order and count (determinism; clean and corrupt share positions).
        def uniform(*shape):
            return torch.rand(*shape, generator=generator, device=device, dtype=torch.float64)
        u_corrupt, u_wrong, u_start = uniform(n), uniform(n), uniform(n, 2)
        u_kind, u_window, u_flicker = uniform(n), uniform(n), uniform(n)
        u_jitter_len, u_jitter_angle = uniform(n, L), uniform(n, L)

        kind = torch.zeros(n, dtype=torch.long, device=device)  # index into CORRUPTIONS
        if corrupt:
            edges = self._corruption_edges.to(device)
            kind = torch.where(u_corrupt < edges[-1], 1 + (u_corrupt[:, None] >= edges).sum(1), kind)
        is_wrong, is_reversed = kind == 1, kind == 2
        is_artifact, is_static = kind == 3, kind == 4

        shown = cond_ids.clone()
        if n_colours > 1:
            offset = 1 + (u_wrong * (n_colours - 1)).long().clamp_max(n_colours - 2)
            shown[:, 0] = torch.where(is_wrong, (cond_ids[:, 0] + offset) % n_colours, cond_ids[:, 0])
        opposite = self._opposite.to(device)[cond_ids[:, 2]]
        shown[:, 2] = torch.where(is_reversed, opposite, shown[:, 2])
        shown[:, 2] = torch.where(is_static, torch.full_like(shown[:, 2], -1), shown[:, 2])

        velocity = self.direction_vectors.to(device, torch.float64)[cond_ids[:, 2]] * self.speed
        velocity = torch.where(is_reversed[:, None], -velocity, velocity)
        velocity = torch.where(is_static[:, None], torch.zeros_like(velocity), velocity)
        low, high = self.start_range(velocity)
        start = low + u_start * (high - low)
        t = torch.arange(T, device=device, dtype=torch.float64)
        centers = start[:, None, :] + velocity[:, None, :] * t[None, :, None]  # (n, T, 2)

        colour = self.palette_rgb.to(device, torch.float64)[self._colour_to_palette.to(device)[shown[:, 0]]]
        colour = colour[:, None, :].expand(n, T, 3).clone()  # (n, T, 3)
        visible = torch.ones(n, T, dtype=torch.float64, device=device)

        # Local artifacts live in window [start, start + L), aligned to a multiple of L.
        slots = T // L
        window_start = (u_window * slots).long().clamp_max(slots - 1) * L
        artifact_kind = (u_kind * len(ARTIFACT_KINDS)).long().clamp_max(len(ARTIFACT_KINDS) - 1)
        in_window = (t[None, :] >= window_start[:, None]) & (t[None, :] < (window_start + L)[:, None])
        in_window = in_window & is_artifact[:, None]
        flicker = in_window & (artifact_kind == 0)[:, None]
        dropout = in_window & (artifact_kind == 1)[:, None]
        jitter = in_window & (artifact_kind == 2)[:, None]

        shown_palette = self._colour_to_palette.to(device)[shown[:, 0]]
        flicker_offset = 1 + (u_flicker * (n_palette - 1)).long().clamp_max(n_palette - 2)
        flicker_rgb = self.palette_rgb.to(device, torch.float64)[(shown_palette + flicker_offset) % n_palette]
        colour = torch.where(flicker[..., None], flicker_rgb[:, None, :], colour)
        visible = torch.where(dropout, torch.zeros_like(visible), visible)
        centers = self._apply_jitter(centers, jitter, window_start, u_jitter_len, u_jitter_angle)

        # Geometry above is float64 (exact, tiny); per-pixel work is float32 (the clips' dtype, 2x faster).
        coverage = torch.zeros(n, T, self.height, self.width, dtype=torch.float32, device=device)
        for s, shape in enumerate(self.shapes):
            chosen = shown[:, 1] == s
            if bool(chosen.any()):
                coverage[chosen] = shape_coverage(shape, centers[chosen].float(), self.size, self.height, self.width)
        coverage = coverage * visible.float()[..., None, None]
        clips = torch.addcmul(torch.full((), -1.0, device=device), coverage[:, None],
                              (2.0 * colour.float()).permute(0, 2, 1)[..., None, None])

        artifact_frames = torch.where(is_artifact[:, None], torch.stack([window_start, window_start + L], 1),
                                      torch.full((n, 2), -1, dtype=torch.long, device=device))
        names = [CORRUPTIONS[k] for k in kind.tolist()]
        kinds = [ARTIFACT_KINDS[a] if c == "local_artifact" else "" for c, a in zip(names, artifact_kind.tolist())]
        return RenderedBatch(clips=clips, shown=shown, corruption=names, artifact_frames=artifact_frames,
                             artifact_kind=kinds, centers=centers.float())

    def _apply_jitter(self, centers, jitter, window_start, u_len, u_angle):
        """Displace the jittered frames by 2-3.5 px at a random angle, kept inside the frame.

        Each axis of the offset is flipped when it would push the object out (the free range is at
        least ``W - size`` wide, so one sign fits whenever ``W - size >= 2 * 3.5``), then clamped as a
        last resort for tiny frames.
        """
        n, T, _ = centers.shape
        L = u_len.shape[1]
        radius = JITTER_MIN_PX + (JITTER_MAX_PX - JITTER_MIN_PX) * u_len
        angle = 2.0 * math.pi * u_angle
        offset = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1)  # (n, L, 2)
        frame = (window_start[:, None] + torch.arange(L, device=centers.device)[None, :]).clamp_max(T - 1)
        base = torch.gather(centers, 1, frame[..., None].expand(n, L, 2))
        half = self.size / 2.0
        extent = torch.tensor([self.width, self.height], dtype=centers.dtype, device=centers.device)
        moved = base + offset
        outside = (moved < half) | (moved > extent - half)
        moved = torch.where(outside, base - offset, moved)
        moved = torch.maximum(torch.minimum(moved, extent - half), torch.full_like(moved, half))
        jittered = centers.clone()
        jittered.scatter_(1, frame[..., None].expand(n, L, 2), moved)
        return torch.where(jitter[..., None], jittered, centers)

    def sample_batch(self, n: int, generator: torch.Generator, corrupt: bool = True
                     ) -> Tuple[RenderedBatch, torch.Tensor]:
        """Draw ``n`` conditions uniformly and render them: ``(RenderedBatch, cond_ids (n, 3))``."""
        index = torch.randint(self.num_conditions, (n,), generator=generator, device=generator.device)
        cond_ids = self.condition(index.cpu())
        return self.render(cond_ids, generator, corrupt=corrupt), cond_ids
