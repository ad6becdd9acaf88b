"""A round's pool of videos, read on demand.

Every generated pair of a round contributes its two videos to the pool, the first videos then the second ones
(2N), with their captions, prompt ids and a prompt key (``read_video_pool``). The critic or the served judge reads
the pool's pixels (the shapes world's clips, or a latent model's decoded uint8 frames); the pairs written from it
and Dual-IPO's implicit rewards read its latents.

Nothing of the pool is held in memory beyond what one step of its reader asks for: its pixels and latents are
``vidpo.data.video_rows.VideoRows``, indexed like (2N, ...) tensors, each asked video read alone from its shard
through the shard file's memory map. A decoded Wan 2.1 480p video is 97 MB of uint8 frames and 8.4 MB of fp32
latents: a pool of 16k pairs is ~3 TB of frames, which used to be loaded whole on every rank. ``pool_scores`` hands
a scorer the pool in chunks of at most ``POOL_CHUNK_BYTES``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vidpo.data.domains import Domain, ShapesDomain
from vidpo.data.pairs import PAIRS_FILE, PairRecord, read_manifest
from vidpo.data.video_rows import VideoRows, pair_rows
from vidpo.labeling.base import LabelingError
from vidpo.labeling.critic import PoolScorer
from vidpo.models.critic import CriticScores

POOL_CHUNK_BYTES = 2 << 30
"""The most bytes of videos ``pool_scores`` hands its scorer at once (decoded Wan 480p: 21 videos)."""


@dataclass
class VideoPool:
    """Every video of a round's generated pairs: the first videos, then the second ones (2N)."""

    pixels: VideoRows
    """(2N, 3, F, H, W) what a critic scores: the shapes world's clips (float), or decoded frames (uint8)."""
    latents: VideoRows
    """(2N, C, T, h, w) what the policy trains on (float; the clips themselves for the shapes world)."""
    captions: list
    prompt_ids: list
    cond_ids: torch.Tensor
    """(2N, K) the shapes world's conditions (K = 0 for a prompt file)."""
    keys: torch.Tensor
    """(2N,) long: the prompt key (``prompt_keys``)."""

    def __len__(self) -> int:
        return len(self.captions)


def prompt_keys(domain: Domain, prompt_ids, cond_ids: torch.Tensor) -> torch.Tensor:
    """(n,) long keys of the prompts: the shapes world's condition index, or a prompt's position in the prompt
    file (what groups a pool by prompt, and what Dual-IPO's shared implicit-reward draws are named by)."""
    if isinstance(domain, ShapesDomain):
        return domain.world.condition_index(cond_ids)
    order = {p.id: i for i, p in enumerate(domain.all_prompts)}
    missing = sorted({p for p in prompt_ids if p not in order}, key=str)
    if missing:
        raise LabelingError(f"pairs of prompts {missing[:3]} are not in this run's prompt file")
    return torch.tensor([order[p] for p in prompt_ids], dtype=torch.long)


def _records(src: Path) -> list[PairRecord]:
    records, _ = read_manifest(src / PAIRS_FILE, need_labels=False, on_error="skip")
    return records


def _cond_ids(records: list[PairRecord]) -> torch.Tensor:
    if all(r.cond_ids for r in records):
        return torch.tensor([r.cond_ids for r in records], dtype=torch.long)
    return torch.zeros(len(records), 0, dtype=torch.long)


def _videos(src: Path, records: list[PairRecord], kind: str = "pixels") -> VideoRows:
    """The pool's videos: the records' first videos, then their second ones (``pair_rows``' ``kind``)."""
    return VideoRows.cat([pair_rows(src, records, key, kind=kind) for key in ("first", "second")])


def read_video_pool(src: Path, domain: Domain) -> VideoPool:
    """The pool of the generated pairs in ``src`` (module docstring), keyed by ``domain``'s prompts."""
    records = _records(src)
    pixels, latents = _videos(src, records, "pixels"), _videos(src, records, "latents")
    cond = _cond_ids(records).repeat(2, 1)
    prompt_ids = [r.prompt_id for r in records] * 2
    return VideoPool(pixels=pixels, latents=latents, captions=[r.caption for r in records] * 2,
                     prompt_ids=prompt_ids, cond_ids=cond, keys=prompt_keys(domain, prompt_ids, cond))


def pool_videos(src: Path) -> VideoRows:
    """The pixels of every video of the generated pairs in ``src``, read on demand (decoded uint8 frames when the
    pairs were decoded, else the shards' clips as float): (2N, 3, F, H, W)."""
    return _videos(src, _records(src))


def read_pool(src: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``pool_videos`` loaded whole, and the conditions: (videos (2N, 3, F, H, W), cond_ids (2N, K)). For
    measurements of toy pools; a real model's pool is read through ``pool_videos``."""
    records = _records(src)
    return _videos(src, records)[:], _cond_ids(records).repeat(2, 1)


def pool_chunks(videos: VideoRows, chunk_bytes: int = POOL_CHUNK_BYTES) -> list[range]:
    """Consecutive ranges of ``videos`` of at most ``chunk_bytes`` each (at least one video a range)."""
    if not len(videos):
        return []
    per_chunk = max(1, chunk_bytes // max(1, videos.nbytes_per_video()))
    return [range(a, min(len(videos), a + per_chunk)) for a in range(0, len(videos), per_chunk)]


def pool_scores(scorer: PoolScorer, pool: VideoPool, chunk_bytes: int = POOL_CHUNK_BYTES) -> CriticScores:
    """``scorer``'s scores of every video of ``pool``, fed in chunks of at most ``chunk_bytes`` of pixels (the
    whole pool at once when it fits: a toy pool is scored exactly as one tensor)."""
    parts = [scorer(pool.pixels[rows.start:rows.stop], pool.captions[rows.start:rows.stop],
                    pool.cond_ids[rows.start:rows.stop]) for rows in pool_chunks(pool.pixels, chunk_bytes)]
    if not parts:
        raise LabelingError("the round's pool has no video to score")
    return CriticScores(frames=torch.cat([p.frames for p in parts]), segments=torch.cat([p.segments for p in parts]),
                        video=torch.cat([p.video for p in parts]))
