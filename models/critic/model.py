"""The IPO critic: a video scorer of ``(clip or latent, condition)`` with one score per temporal segment.

``VideoCritic.forward(x, cond, segment_ids) -> CriticScores``:
  x            (B, C, T, H, W)  pixel clip in [-1, 1] (toy world) or a VAE latent
  cond         (B, L) long      class-token ids (``cond_vocab_size > 0``), or (B, L, cond_dim) text features
  segment_ids  (T,) long        frame -> segment 0..S-1 (``vidpo.data.segments.segment_ids``); None: one segment
  -> frames    (B, T)           one score per frame (latent frame of a ``pt``-patch repeated ``pt`` times)
     segments  (B, S)           mean of the frame scores of each segment
     video     (B,)             mean of the frame scores (= the frame-count-weighted mean of ``segments``)

Scores are logits of a Bradley-Terry model with ties (``vidpo.ipo.critic``): for two videos of one prompt,
``d = video_a - video_b`` and ``P(a better) = e^{d/2} / (e^{d/2} + e^{-d/2} + nu)`` where
``nu = exp(log_tie)`` is the Davidson tie parameter this module learns alongside the scores.

Layout (the blocks are the policy's ``DiTBlock`` with one learned, time-free modulation instead of adaLN):
  inputs        the clip, and with ``frame_differences`` also its temporal difference
                ``x[:, :, t] - x[:, :, t-1]`` (zero at t = 0) as C more channels -> (B, C', T, H, W)
  patch_embed   patchify (B, C', T, H, W) -> (B, n, C'*pt*ph*pw) -> Linear -> (B, n, D)
  cond_embed    Embedding(V, D) or the text MLP, exactly as the policy's
  blocks x depth  self-attention (3-D RoPE) over all video tokens, cross-attention to the condition, MLP;
                the shared modulation table (6, D) starts with gates 1, shifts/scales 0 (a plain pre-LN
                transformer), and dropout follows every block (for Monte-Carlo dropout votes)
  pool          per latent frame: attention pooling over its (H/ph)(W/pw) tokens,
                ``a = softmax_hw(w . LN(h))``, ``f = sum_hw a * LN(h)``  -> (B, T/pt, D)
  head          Linear -> GELU -> Dropout -> Linear(D, 1)               -> (B, T/pt) frame scores

Why frame differences: motion and temporal consistency (does the object move as captioned, steadily?) are two
of the shapes oracle's four components, and a patch token of one frame cannot see either; attention across
frames can, but learning it from a few hundred labels is slow. The difference channels put the displacement
into every token: on the shapes world, a critic trained on the same 384 seed labels is ~0.02-0.03 more accurate
on the fresh pairs of later rounds (mean over 3 seeds; benchmarks/reports/2026-11-21_ipo_search_cpu.md).

Why attention pooling: in a 16 x 16 clip the object covers 1-4 of 16 patches; a plain mean over the
frame would drown what the critic must judge (its colour, shape and displacement) in background.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vidpo.models.dit.config import DiTConfig
from vidpo.models.dit.model import ClassTokenEmbedding, DiTBlock, TextEmbedding, patchify
from vidpo.models.dit.rope import grid_positions, rope_cos_sin

VIDEO_CRITIC_FORMAT = "vidpo-critic-1"
_GATE_ROWS = (2, 5)   # (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m): the two gates


@dataclass
class CriticScores:
    """Scores of B videos with T frames and S segments (higher is better)."""

    frames: torch.Tensor
    """(B, T) per-frame scores."""

    segments: torch.Tensor
    """(B, S) per-segment scores: the mean of the frame scores of each segment."""

    video: torch.Tensor
    """(B,) whole-video scores: the mean of the frame scores."""


class Views:
    """Label-preserving views of what a critic scores, index 0 the identity: how a clip, its caption and its
    per-segment / per-frame values look through view k (and back: every view is an involution). This base has
    the identity alone; the shapes world's ``vidpo.labeling.critic.Symmetries`` add flips and time reversal."""

    def __len__(self) -> int:
        return 1

    @property
    def names(self) -> list[str]:
        return ["identity"]

    def clips(self, k: int, clips: torch.Tensor) -> torch.Tensor:
        return clips

    def captions(self, k: int, captions: Sequence[str]) -> list[str]:
        return list(captions)

    def segments(self, k: int, per_segment: torch.Tensor) -> torch.Tensor:
        return per_segment

    def frames(self, k: int, per_frame: torch.Tensor) -> torch.Tensor:
        return per_frame


class Critic(nn.Module):
    """The scoring interface of every critic: what training (``vidpo.ipo.critic``), accuracy, the ``critic``
    labeller, pool pairing and Dual-IPO votes call.

    ``score(clips, captions, segment_ids) -> CriticScores``
        clips        (n, 3, F, H, W) pixels, float in [-1, 1] or uint8 (decoded videos)
        captions     n prompts the videos were made from
        segment_ids  (F,) long, frame -> segment 0..S-1 (contiguous)
        -> frames (n, F), segments (n, S), video (n,); differentiable when gradients are on
    ``log_tie``           the Davidson tie parameter (a scalar Parameter); ``tie_parameter`` = exp(log_tie)
    ``set_dropout(on)``   Monte-Carlo dropout on or off, the rest of the critic left as it is
    ``views(segment_ids)``  its label-preserving ``Views`` (identity only unless the critic's world has more)
    ``save(path)``        weights and rebuild settings in one safetensors file, written atomically; ``load_critic``
                          reads any critic back

    Implementations: the toy critic of the shapes world (``vidpo.labeling.critic.ShapesCritic``: a ``VideoCritic``
    reading the world's condition tokens) and the VLM critic (``vidpo.models.critic.vlm.VLMCritic``)."""

    kind = "critic"

    def score(self, clips: torch.Tensor, captions: Sequence[str], segment_ids: torch.Tensor) -> CriticScores:
        raise NotImplementedError

    @property
    def tie_parameter(self) -> float:
        """nu = exp(log_tie): the Davidson tie weight."""
        return math.exp(float(self.log_tie.detach()))

    def set_dropout(self, active: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.train(active)

    def views(self, segment_ids: torch.Tensor) -> Views:
        return Views()

    def save(self, path, extra: Optional[dict] = None) -> None:
        raise NotImplementedError


def segment_means(frame_scores: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) frame scores -> (B, S) mean per segment, with ``segment_ids`` (T,) in 0..S-1."""
    ids = segment_ids.to(frame_scores.device, torch.long)
    num = int(ids.max()) + 1
    onehot = F.one_hot(ids, num).to(frame_scores.dtype)                # (T, S)
    return frame_scores @ (onehot / onehot.sum(0, keepdim=True))


class VideoCritic(nn.Module):
    """Segment-level video critic; see the module docstring for the layout and the score semantics."""

    def __init__(self, cfg: DiTConfig, dropout: float = 0.1, tie_init: float = 0.0, frame_differences: bool = False):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"critic dropout must be in [0, 1), got {dropout}")
        self.config = cfg
        self.dropout_p = float(dropout)
        self.frame_differences = bool(frame_differences)
        d, (pt, ph, pw) = cfg.width, cfg.patch_size
        streams = 2 if self.frame_differences else 1
        self.patch_embed = nn.Linear(streams * cfg.in_channels * pt * ph * pw, d)
        self.cond_embed = (ClassTokenEmbedding(cfg.cond_vocab_size, d) if cfg.uses_class_tokens
                           else TextEmbedding(cfg.cond_dim, d))
        self.modulation = nn.Parameter(torch.zeros(6, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.dropout = nn.Dropout(dropout)
        self.pool_norm = nn.LayerNorm(d, eps=cfg.eps)
        self.pool_query = nn.Linear(d, 1)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(approximate="tanh"), nn.Dropout(dropout), nn.Linear(d, 1))
        self.log_tie = nn.Parameter(torch.tensor(float(tie_init)))
        """log nu of the Davidson tie model (``vidpo.ipo.critic.bt_ties_log_probs``)."""
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.cond_embed, ClassTokenEmbedding):
            nn.init.normal_(self.cond_embed.table.weight, std=0.02)
        self.modulation.zero_()
        for row in _GATE_ROWS:
            self.modulation[row] = 1.0
        for block in self.blocks:
            block.modulation.zero_()   # the per-block tables learn offsets from the shared one

    @property
    def tie_parameter(self) -> float:
        """nu = exp(log_tie): the Davidson tie weight (0 would be plain Bradley-Terry)."""
        return math.exp(float(self.log_tie.detach()))

    def set_dropout(self, active: bool) -> None:
        """Switch the dropout layers alone on or off (Monte-Carlo dropout leaves the rest in eval mode)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.train(active)

    def frame_scores(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W), condition -> (B, T) per-frame scores (latent frames repeated ``pt`` times)."""
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"critic expects x of shape (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        if cond.shape[0] != x.shape[0]:
            raise ValueError(f"condition batch {cond.shape[0]} does not match the video batch {x.shape[0]}")
        b, _, frames, height, width = x.shape
        grid = cfg.patch_grid(frames, height, width)
        dtype = self.patch_embed.weight.dtype
        x = x.to(dtype)
        if self.frame_differences:
            step = x[:, :, 1:] - x[:, :, :-1]
            x = torch.cat([x, torch.cat([torch.zeros_like(x[:, :, :1]), step], dim=2)], dim=1)   # (B, 2C, T, H, W)
        h = self.patch_embed(patchify(x, cfg.patch_size))                                 # (B, n, D)
        context = self.cond_embed(cond if cfg.uses_class_tokens else cond.to(dtype))        # (B, L, D)
        cos, sin = rope_cos_sin(grid_positions(grid, device=x.device), cfg.head_dim, cfg.rope_theta)
        modulation = self.modulation.unsqueeze(0).expand(b, -1, -1)
        for block in self.blocks:
            h = self.dropout(block(h, modulation, context, cos, sin))
        h = self.pool_norm(h).view(b, grid[0], grid[1] * grid[2], -1)                     # (B, T', hw, D)
        weights = torch.softmax(self.pool_query(h).squeeze(-1), dim=-1)                   # (B, T', hw)
        pooled = (weights.unsqueeze(-1) * h).sum(2)                                       # (B, T', D)
        scores = self.head(pooled).squeeze(-1).float()                                     # (B, T')
        return scores.repeat_interleave(cfg.patch_size[0], dim=1)                          # (B, T)

    def forward(self, x: torch.Tensor, cond: torch.Tensor,
                segment_ids: Optional[torch.Tensor] = None) -> CriticScores:
        frames = self.frame_scores(x, cond)
        if segment_ids is None:
            segment_ids = torch.zeros(frames.shape[1], dtype=torch.long)
        if segment_ids.numel() != frames.shape[1]:
            raise ValueError(f"segment_ids has {segment_ids.numel()} entries for {frames.shape[1]} frames")
        return CriticScores(frames=frames, segments=segment_means(frames, segment_ids), video=frames.mean(1))


# ----- files ----------------------------------------------------------------------------------------------
def critic_metadata(model: VideoCritic) -> dict:
    """What rebuilds ``model``: its DiT config and dropout, as JSON strings (safetensors metadata)."""
    cfg = dataclasses.asdict(model.config)
    cfg["patch_size"] = list(cfg["patch_size"])
    return {"format": VIDEO_CRITIC_FORMAT, "dit_config": json.dumps(cfg), "dropout": str(model.dropout_p),
            "frame_differences": str(int(model.frame_differences))}


def save_video_critic(model: VideoCritic, path, extra: Optional[dict] = None) -> None:
    """Weights + rebuild metadata, written atomically (to ``path``.tmp-PID, then renamed)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = critic_metadata(model)
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_video_critic(path, device: torch.device | str = "cpu") -> VideoCritic:
    """Rebuild a toy critic saved by ``save_video_critic`` (a .safetensors file)."""

    path = Path(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != VIDEO_CRITIC_FORMAT:
        raise ValueError(f"{path}: not a vidpo critic file (metadata format {meta.get('format')!r})")
    fields = json.loads(meta["dit_config"])
    fields["patch_size"] = tuple(fields["patch_size"])
    model = VideoCritic(DiTConfig(**fields), dropout=float(meta["dropout"]),
                        frame_differences=meta.get("frame_differences", "0") == "1")
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
