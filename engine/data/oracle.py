"""The exact oracle critic of the shapes world: graded, per-segment scores of clips against captions.

The oracle labels preference pairs per temporal segment (DenseDPO) and evaluates models, so it is
batched torch, deterministic, graded (a blurry or half-formed object gets partial credit) and gated
(noise or an empty frame scores ~0 on every component).

Notation, per clip and frame ``t`` (pixel centres ``q = (j + 0.5, i + 0.5)``, all sums over pixels):

* ``x = clamp((clip + 1) / 2, 0, 1)``, brightness ``b = max_c x_c``;
* soft foreground ``f = clamp((b - lo) / (hi - lo), 0, 1)`` (lo = 0.2, hi = 0.8): dim background noise
  is ignored, a rendered pixel of coverage ``a`` has ``b = a``;
* mass ``m_t = sum f``; centre ``c_t = sum u q / sum u`` with ``u = b * window(|q - c0_t|_inf)`` around
  the rough centre ``c0_t = sum f q / m_t`` (``ShapesOracle._centroid``: exact for a clean square);
  spread ``V_t = sum f |q - c_t|^2 / m_t``;
* chromaticity ``rho_t = sum f x / sum f b`` (3,), = the palette RGB for a clean render (max channel 1);
* per shape ``k`` (square, circle, diamond): reference mass ``A_k`` and spread ``V_k`` (mean over
  sub-pixel positions of the rendered template), template ``P_k,t = f(coverage_k at c_t)``.

Per-frame terms (``g(z, s) = exp(-z^2 / (2 s^2))``):

* presence ``p_t = max_k g(ln(m_t / A_k), 0.5) * g(ln(V_t / V_k) / 2, 0.5)``: "one object of about the
  right size, compact" -- the gate of every component;
* colour ``p_t * g(|rho_t - rgb(caption colour)|, 0.2)``;
* shape ``p_t * softmax_k(IoU_k / 0.03)[caption shape] * IoU_caption`` with the soft IoU
  ``IoU_k = sum min(f, P_k,t) / sum max(f, P_k,t)``: high only if the caption's shape fits better than
  every other known shape *and* fits well (``P_k,t`` is rendered at ``c_t`` corrected by one
  fixed-point step for the centre estimator's bias ``e_k`` on shape ``k``, ``_aligned_template``);
  motion and consistency then use the refined centre ``c_t - sum_k softmax_k(IoU_k / 0.03) e_k``;
* motion ``p_t * max(p_{t-1} g(|c_t - c_{t-1} - v*|, sv), p_{t+1} g(|c_{t+1} - c_t - v*|, sv))`` with
  ``v* = speed * direction`` and ``sv = max(0.35 speed, 0.15)`` px/frame (a missing neighbour at the
  clip's ends counts 0): the frame moved as captioned towards at least one neighbour;
* consistency ``p_t * g(ln(m_t / m~), 0.3) * g(|rho_t - rho~|, 0.2) * g(r_t, 0.75 px)`` where ``m~``,
  ``rho~`` are ``p``-weighted medians over the clip's frames and ``r_t = |c_t - (a + b t)|`` is the
  residual from a Theil-Sen line (``b`` = weighted median of the pairwise slopes
  ``(c_u - c_s) / (u - s)`` with weights ``p_s p_u``, ``a`` = weighted median of ``c_t - b t``). The
  medians make a local artifact (flicker, dropout, jitter) hit only the frames it is in, as long as it
  covers fewer than ~1/4 of the frames.

A segment's component is the mean of the per-frame term over its frames; a clip's component is the mean
over all frames; ``total = mean of the four components`` and ``segments = mean of the four segment
components``.

Differentiability (tested): every term is built from clamps, sums, products, logs, exps, softmax,
min/max and sorts of functions of ``clips``, so ``total``, ``segments`` and every component are
differentiable almost everywhere w.r.t. ``clips`` and can serve as a differentiable reward. What passes
no gradient: the foreground ``f`` where it saturates (``b < lo``: the dark background, ``b > hi``: the
fully lit interior; the centre and chromaticity read ``b`` and ``x`` directly, so lit pixels still get
gradient through them), channels other than the brightest one in ``b``, the median *weights*
(detached; the median passes its gradient to the selected element only) and the argmax over shapes in
the presence gate. ``score`` keeps the graph; ``prefer`` runs under ``no_grad``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from vidpo.data.segments import segment_mean, validate_segment_ids
from vidpo.data.shapes import PALETTE, SHAPES, ShapesWorld, shape_coverage

COMPONENTS = ("colour", "shape", "motion", "consistency")


@dataclass
class OracleConfig:
    """Scales of the oracle's terms (module doc). Defaults are tuned for 16 x 16 clips, objects of 5 px."""

    foreground_low: float = 0.2
    """Brightness below which a pixel is background."""
    foreground_high: float = 0.8
    """Brightness above which a pixel is fully foreground."""
    mass_log_sigma: float = 0.5
    """Presence: tolerance of ln(mass / reference mass)."""
    spread_log_sigma: float = 0.5
    """Presence: tolerance of ln(spread / reference spread) / 2 (a log-ratio of radii)."""
    colour_sigma: float = 0.2
    """Colour: tolerance of the RGB distance of the chromaticity to the caption's colour."""
    shape_temperature: float = 0.03
    """Shape: softmax temperature over the IoUs of the known shapes."""
    velocity_sigma_fraction: float = 0.35
    """Motion: tolerance of the velocity error as a fraction of the speed ..."""
    velocity_sigma_min: float = 0.15
    """... and at least this many px/frame."""
    consistency_mass_sigma: float = 0.3
    """Consistency: tolerance of ln(mass / median mass)."""
    consistency_colour_sigma: float = 0.2
    """Consistency: tolerance of the chromaticity's distance to the median chromaticity."""
    residual_sigma: float = 0.75
    """Consistency: tolerance (px) of the centroid's distance to the robust straight-line path."""


@dataclass
class OracleScore:
    """Scores of a batch of n clips with S temporal segments and T frames."""

    total: torch.Tensor
    """``(n,)`` in [0, 1]: mean of the four components."""
    components: Dict[str, torch.Tensor]
    """``"colour" | "shape" | "motion" | "consistency" -> (n,)`` in [0, 1]."""
    segments: torch.Tensor
    """``(n, S)``: mean of the four segment components."""
    segment_components: Dict[str, torch.Tensor]
    """component -> ``(n, S)``."""
    frame_components: Dict[str, torch.Tensor] = field(default_factory=dict)
    """component -> ``(n, T)`` per-frame terms, plus ``"presence"``."""


def _gauss(z: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-(z * z) / (2.0 * sigma * sigma))


def weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Lower weighted median over the last dim: ``(..., N), (..., N) -> (...)``.

    The smallest value ``v_(i)`` (in sorted order) whose cumulative weight reaches half the total. A
    tiny floor on the weights keeps an all-zero weight vector well defined (it becomes the plain lower
    median). The gradient goes to the selected value.
    """
    weights = weights.detach().clamp_min(0) + 1e-6
    sorted_values, order = values.sort(dim=-1)
    cumulative = torch.gather(weights, -1, order).cumsum(-1)
    half = 0.5 * cumulative[..., -1:]
    index = (cumulative < half).sum(-1, keepdim=True).clamp_max(values.shape[-1] - 1)
    return torch.gather(sorted_values, -1, index).squeeze(-1)


class ShapesOracle:
    """Scores clips of a :class:`ShapesWorld` against their conditions (formulas in the module doc)."""

    def __init__(self, world: ShapesWorld, config: Optional[OracleConfig] = None):
        self.world = world
        self.config = config or OracleConfig()
        self.frames, self.height, self.width = world.frames, world.height, world.width
        self.shape_names = list(SHAPES)
        # Caption shape index (world vocabulary) -> index among all known shapes.
        self._shape_to_known = torch.tensor([self.shape_names.index(s) for s in world.shapes])
        self._colour_rgb = torch.tensor([PALETTE[c] for c in world.colours], dtype=torch.float32)
        self._velocity = world.direction_vectors * world.speed
        self._velocity_sigma = max(self.config.velocity_sigma_fraction * world.speed, self.config.velocity_sigma_min)
        self._xs = torch.arange(self.width, dtype=torch.float32) + 0.5
        self._ys = torch.arange(self.height, dtype=torch.float32) + 0.5
        self._reference_mass, self._reference_spread = self._reference_moments()

    def foreground(self, brightness: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return ((brightness - cfg.foreground_low) / (cfg.foreground_high - cfg.foreground_low)).clamp(0, 1)

    def _reference_moments(self):
        """Mass and spread of each known shape's template, averaged over 8 x 8 sub-pixel offsets."""
        offsets = (torch.arange(8, dtype=torch.float64) + 0.5) / 8.0
        ox, oy = torch.meshgrid(offsets, offsets, indexing="xy")
        centers = torch.stack([self.width / 2.0 + ox.reshape(-1), self.height / 2.0 + oy.reshape(-1)], -1)
        masses, spreads = [], []
        for shape in self.shape_names:
            coverage = shape_coverage(shape, centers, self.world.size, self.height, self.width)
            mass, _, spread = self._moments(self.foreground(coverage), coverage)
            masses.append(mass.mean())
            spreads.append(spread.mean())
        return torch.stack(masses), torch.stack(spreads)

    def _moments(self, f: torch.Tensor, brightness: torch.Tensor):
        """Mass ``(...,)``, centre ``(..., 2)`` and spread ``(...,)`` of foreground ``f (..., H, W)``.

        Moments are separable, ``sum_ij f_ij g(x_j) = (sum_i f_ij) @ g(x)``, so they are computed on
        the row and column marginals.
        """
        xs, ys = self._xs.to(f.device, f.dtype), self._ys.to(f.device, f.dtype)
        columns, rows = f.sum(-2), f.sum(-1)  # (..., W), (..., H)
        mass = columns.sum(-1)
        safe_mass = mass + 1e-6
        centre = self._centroid(brightness, columns, rows, safe_mass)
        spread = ((columns * (xs - centre[..., 0, None]) ** 2).sum(-1)
                  + (rows * (ys - centre[..., 1, None]) ** 2).sum(-1)) / safe_mass
        return mass, centre, spread

    # ------------------------------------------------------------------ scoring
    def score(self, clips: torch.Tensor, cond_ids: torch.Tensor,
              segment_ids: Optional[torch.Tensor] = None) -> OracleScore:
        """Score ``clips (n, 3, T, H, W)`` in [-1, 1] against ``cond_ids (n, 3)``.

        ``segment_ids`` ``(T,)`` (``vidpo.data.segments``) splits the frames into S segments; None: S = 1.
        """
        if clips.dim() != 5 or clips.shape[1] != 3 or tuple(clips.shape[3:]) != (self.height, self.width):
            raise ValueError(f"clips must have shape (n, 3, T, {self.height}, {self.width}), got {tuple(clips.shape)}")
        if not clips.is_floating_point():
            raise ValueError(f"clips must be a floating-point tensor in [-1, 1], got {clips.dtype}")
        n, _, T, _, _ = clips.shape
        if T < 2:
            raise ValueError(f"clips need at least 2 frames to score motion and consistency, got {T}")
        cond_ids = self.world._check_cond(cond_ids).to(clips.device)
        if cond_ids.shape[0] != n:
            raise ValueError(f"{cond_ids.shape[0]} conditions for {n} clips")
        if segment_ids is None:
            segment_ids = torch.zeros(T, dtype=torch.long)
        num_segments = validate_segment_ids(segment_ids, T)
        frames = self.frame_terms(clips, cond_ids)
        segment_components = {k: segment_mean(frames[k], segment_ids, num_segments) for k in COMPONENTS}
        components = {k: frames[k].mean(-1) for k in COMPONENTS}
        total = torch.stack([components[k] for k in COMPONENTS]).mean(0)
        segments = torch.stack([segment_components[k] for k in COMPONENTS]).mean(0)
        return OracleScore(total=total, components=components, segments=segments,
                           segment_components=segment_components, frame_components=frames)

    def frame_terms(self, clips: torch.Tensor, cond_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-frame terms ``(n, T)``: presence and the four components (module doc)."""
        cfg, device, n = self.config, clips.device, clips.shape[0]
        eps = 1e-6
        x, f, mass, centroid, chroma, presence = self._observe(clips)
        dtype = x.dtype

        target_rgb = self._colour_rgb.to(device, dtype)[cond_ids[:, 0]]  # (n, 3)
        colour = presence * _gauss((chroma - target_rgb[:, None, :]).norm(dim=-1), cfg.colour_sigma)

        aligned = [self._aligned_template(s, centroid) for s in self.shape_names]
        templates = torch.stack([t for t, _ in aligned], 2)  # (n, T, K, H, W)
        biases = torch.stack([b for _, b in aligned], 2)  # (n, T, K, 2)
        overlap = torch.minimum(f[:, :, None], templates).sum((-1, -2))  # (n, T, K)
        union = mass[..., None] + templates.sum((-1, -2)) - overlap  # sum max = sum f + sum P - sum min
        iou = overlap / (union + eps)
        target_shape = self._shape_to_known.to(device)[cond_ids[:, 1]]
        index = target_shape.view(n, 1, 1).expand(n, iou.shape[1], 1)
        beliefs = torch.softmax(iou / cfg.shape_temperature, -1)  # (n, T, K)
        shape = presence * beliefs.gather(-1, index).squeeze(-1) * iou.gather(-1, index).squeeze(-1)
        # Motion and consistency use the centre corrected for the bias of the shape that is drawn.
        centroid = centroid - (beliefs[..., None] * biases).sum(2)

        expected = self._velocity.to(device, dtype)[cond_ids[:, 2]]  # (n, 2)
        motion = presence * self._motion(centroid, presence, expected)

        consistency = presence * self._consistency(mass, chroma, centroid, presence)
        return {"presence": presence, "colour": colour, "shape": shape, "motion": motion,
                "consistency": consistency}

    def _observe(self, clips: torch.Tensor):
        """What every term reads: ``x (n, 3, T, H, W)``, foreground ``f (n, T, H, W)``, mass ``(n, T)``,
        centre ``(n, T, 2)``, chromaticity ``(n, T, 3)`` and presence ``(n, T)`` (module doc)."""
        cfg, eps = self.config, 1e-6
        # float64 in, float64 out (for reference tests); anything else is scored in float32.
        dtype = torch.float64 if clips.dtype == torch.float64 else torch.float32
        x = ((clips.to(dtype) + 1.0) * 0.5).clamp(0, 1)
        brightness = x.amax(1)
        f = self.foreground(brightness)
        mass, centroid, spread = self._moments(f, brightness)
        chroma = (f[:, None] * x).sum((-1, -2)) / ((f * brightness).sum((-1, -2)) + eps)[:, None]
        chroma = chroma.permute(0, 2, 1)
        ref_mass = self._reference_mass.to(clips.device, dtype)
        ref_spread = self._reference_spread.to(clips.device, dtype)
        mass_fit = _gauss(torch.log((mass[..., None] + eps) / ref_mass), cfg.mass_log_sigma)
        spread_fit = _gauss(0.5 * torch.log((spread[..., None] + eps) / ref_spread), cfg.spread_log_sigma)
        presence = (mass_fit * spread_fit).amax(-1)
        return x, f, mass, centroid, chroma, presence

    @torch.no_grad()
    def failure_modes(self, clips: torch.Tensor, cond_ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Which bad mode each clip shows: ``name -> (n,)`` bool, for the rates an evaluation reports.

        Hard calls on whole clips, so the "bad mode" of a base model (and its removal by preference
        training) reads as a rate rather than hiding inside graded component scores:

        * ``missing``: no object -- presence below 0.5 on average over the frames;
        * ``wrong_colour``: an object whose presence-weighted mean chromaticity is nearer another vocabulary
          colour than the caption's;
        * ``reversed_direction``: an object whose velocity (presence-weighted least-squares slope of its
          centre over time) points backwards, ``v . d < -0.5 speed`` for the caption's unit direction ``d``;
        * ``static``: an object moving at under a quarter of the captioned speed.
        """
        cond_ids = self.world._check_cond(cond_ids).to(clips.device)
        _, _, _, centroid, chroma, presence = self._observe(clips.float())
        weight = presence / (presence.sum(-1, keepdim=True) + 1e-6)  # (n, T)
        present = presence.mean(-1) >= 0.5
        mean_chroma = (weight[..., None] * chroma).sum(1)  # (n, 3)
        palette = self._colour_rgb.to(clips.device)
        nearest = torch.cdist(mean_chroma, palette).argmin(-1)
        t = torch.arange(clips.shape[2], device=clips.device, dtype=centroid.dtype)
        t_mean = (weight * t).sum(-1, keepdim=True)
        dt = t - t_mean  # (n, T)
        c_mean = (weight[..., None] * centroid).sum(1, keepdim=True)
        velocity = (weight[..., None] * dt[..., None] * (centroid - c_mean)).sum(1) / \
            ((weight * dt * dt).sum(-1, keepdim=True) + 1e-6)  # (n, 2) px / frame
        expected = self._velocity.to(clips.device, velocity.dtype)[cond_ids[:, 2]]
        speed = self.world.speed
        along = (velocity * expected).sum(-1) / speed  # signed speed along the captioned direction
        return {"missing": ~present, "wrong_colour": present & (nearest != cond_ids[:, 0]),
                "reversed_direction": present & (along < -0.5 * speed),
                "static": present & (velocity.norm(dim=-1) < 0.25 * speed)}

    def _centroid(self, brightness: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor,
                  safe_mass: torch.Tensor) -> torch.Tensor:
        """Object centre ``(..., 2)``: brightness-weighted mean of pixel centres near the rough centre.

        ``columns``/``rows`` are the marginals of the foreground ``f``, ``safe_mass`` its mass + eps.

        The foreground-weighted centre ``c0 = sum f q / m`` is robust but biased by the foreground
        clamp (up to 0.25 px for a square at a sub-pixel offset); the brightness is the coverage itself,
        whose weighted mean is exact for a box-filtered square. So ``c = sum u q / sum u`` with
        ``u = b * clamp(h + 2 - |q - c0|_inf, 0, 1)``: the soft window (half-size ``object_size / 2 + 2``)
        keeps the whole object and drops faraway background.
        """
        xs, ys = self._xs.to(brightness.device, brightness.dtype), self._ys.to(brightness.device, brightness.dtype)
        rough = torch.stack([columns @ xs, rows @ ys], -1) / safe_mass[..., None]
        reach = self.world.size / 2.0 + 2.0
        # clamp(r - max(|dx|, |dy|)) = min(clamp(r - |dx|), clamp(r - |dy|)): separable windows.
        window_x = (reach - (xs - rough[..., 0, None]).abs()).clamp(0, 1)  # (n, T, W)
        window_y = (reach - (ys - rough[..., 1, None]).abs()).clamp(0, 1)  # (n, T, H)
        u = brightness * torch.minimum(window_x[..., None, :], window_y[..., :, None])
        u_columns, u_rows = u.sum(-2), u.sum(-1)
        total = u_columns.sum(-1) + 1e-6
        return torch.stack([u_columns @ xs, u_rows @ ys], -1) / total[..., None]

    def _aligned_template(self, shape: str, centre: torch.Tensor):
        """Foreground template ``(n, T, H, W)`` of ``shape`` at the centre corrected for estimator bias,
        and that bias ``(n, T, 2)``.

        The centre estimator is exact for squares but off by up to ~0.04 px (circle) / ~0.09 px
        (diamond) at some sub-pixel offsets, enough to cost a small shape several IoU points. One
        fixed-point step removes most of it: with ``e(c)`` the estimate on the shape's own template
        rendered at ``c``, use ``c' = c - (e(c) - c)`` (residual <= 0.007 / 0.03 px).
        """
        size = self.world.size
        coverage = shape_coverage(shape, centre, size, self.height, self.width)
        bias = self._moments(self.foreground(coverage), coverage)[1] - centre
        return self.foreground(shape_coverage(shape, centre - bias, size, self.height, self.width)), bias

    def _motion(self, centroid: torch.Tensor, presence: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
        """Per-frame motion match ``(n, T)`` (before the presence gate), module doc.

        ``max(p_{t-1} g(|c_t - c_{t-1} - v*|), p_{t+1} g(|c_{t+1} - c_t - v*|))``: the better of the
        backward and forward displacement, each trusted as much as the neighbour is present. Taking the
        better side keeps a glitch local: the frames next to a jittered or vanished frame keep full
        credit from their other side, the glitched frame itself loses both.
        """
        step = centroid[:, 1:] - centroid[:, :-1]  # (n, T-1, 2): displacement t -> t+1
        match = _gauss((step - expected[:, None, :]).norm(dim=-1), self._velocity_sigma)  # (n, T-1)
        zero = match.new_zeros(match.shape[0], 1)
        backward = torch.cat([zero, match * presence[:, :-1]], 1)
        forward = torch.cat([match * presence[:, 1:], zero], 1)
        return torch.maximum(backward, forward)

    def _consistency(self, mass, chroma, centroid, presence) -> torch.Tensor:
        """Per-frame temporal consistency factor in [0, 1] (``(n, T)``, before the presence gate)."""
        cfg = self.config
        n, T = mass.shape
        median_mass = weighted_median(mass, presence)
        mass_term = _gauss(torch.log((mass + 1e-6) / (median_mass[:, None] + 1e-6)), cfg.consistency_mass_sigma)
        chroma_t = chroma.permute(0, 2, 1)  # (n, 3, T)
        median_chroma = weighted_median(chroma_t, presence[:, None, :].expand_as(chroma_t))  # (n, 3)
        colour_term = _gauss((chroma - median_chroma[:, None, :]).norm(dim=-1), cfg.consistency_colour_sigma)

        first, second = torch.triu_indices(T, T, offset=1, device=mass.device)
        gap = (second - first).to(centroid.dtype)
        slopes = (centroid[:, second] - centroid[:, first]) / gap[None, :, None]  # (n, P, 2)
        pair_weight = presence[:, first] * presence[:, second]  # (n, P)
        slope = weighted_median(slopes.permute(0, 2, 1), pair_weight[:, None, :].expand(n, 2, -1))  # (n, 2)
        t = torch.arange(T, device=mass.device, dtype=centroid.dtype)
        offsets = centroid - slope[:, None, :] * t[None, :, None]  # (n, T, 2)
        intercept = weighted_median(offsets.permute(0, 2, 1), presence[:, None, :].expand(n, 2, -1))
        line = intercept[:, None, :] + slope[:, None, :] * t[None, :, None]
        residual = (centroid - line).norm(dim=-1)
        position_term = _gauss(residual, cfg.residual_sigma)
        return mass_term * colour_term * position_term

    # ------------------------------------------------------------------ preferences
    @torch.no_grad()
    def prefer(self, first: torch.Tensor, second: torch.Tensor, cond_ids: torch.Tensor,
               segment_ids: Optional[torch.Tensor] = None, tie_margin: float = 0.05) -> torch.Tensor:
        """Per-segment preference labels ``(n, S)`` in {+1, -1, 0} for two clips of the same conditions.

        ``+1`` where ``segments(first) - segments(second) > tie_margin``, ``-1`` where it is
        ``< -tie_margin``, ``0`` (tie) otherwise.
        """
        if first.shape != second.shape:
            raise ValueError(f"prefer: clip shapes differ, {tuple(first.shape)} vs {tuple(second.shape)}")
        if tie_margin < 0:
            raise ValueError(f"prefer: tie_margin must be >= 0, got {tie_margin}")
        both = self.score(torch.cat([first, second]), torch.cat([cond_ids, cond_ids]), segment_ids).segments
        diff = both[: first.shape[0]] - both[first.shape[0]:]
        return (diff > tie_margin).long() - (diff < -tie_margin).long()
