"""A round's pool of videos, read on demand.

Every generated pair of a round contributes its two videos to the pool, the first videos then the second ones
(2N), with their captions, prompt ids and a prompt key (``read_video_pool``). The critic or the served judge reads
the pool's pixels (the shapes world's clips, or a latent model's decoded uint8 frames); the pairs written from it
and Dual-IPO's implicit rewards read its latents.

Nothing of the pool is held in memory beyond what one step of its reader asks for. ``PoolVideos`` indexes the
videos like a (2N, ...) tensor (an int, a slice, a list or a 1-D index tensor gives a stacked tensor) and reads
each asked video alone from its shard through the shard file's memory map. A decoded Wan 2.1 480p video is 97 MB
of uint8 frames and 8.4 MB of fp32 latents: a pool of 16k pairs is ~3 TB of frames, which used to be loaded whole
on every rank. ``pool_scores`` hands a scorer the pool in chunks of at most ``POOL_CHUNK_BYTES``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from vidpo.data.domains import Domain, ShapesDomain
from vidpo.data.pairs import PAIRS_FILE, PairRecord, ShardReader, read_manifest
from vidpo.data.video_io import PairFrames
from vidpo.labeling.base import LabelingError
from vidpo.labeling.critic import PoolScorer
from vidpo.models.critic import CriticScores

POOL_CHUNK_BYTES = 2 << 30
"""The most bytes of videos ``pool_scores`` hands its scorer at once (decoded Wan 480p: 21 videos)."""


class PoolVideos:
    """The (2N, ...) videos of a generated pairs directory, read on demand: video i < N is record i's first video,
    video N + i its second one. ``read(record, key)`` gives one video; indexing stacks the asked ones."""

    def __init__(self, records: Sequence[PairRecord], read: Callable[[PairRecord, str], torch.Tensor],
                 rows: Optional[Sequence[int]] = None):
        self._records = list(records)
        self._read = read
        self._rows = list(range(2 * len(self._records))) if rows is None else list(rows)
        self._first: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self._rows)

    def video(self, i: int) -> torch.Tensor:
        """Video ``i`` of this view."""
        row = self._rows[i]
        n = len(self._records)
        return self._read(self._records[row % n], "first" if row < n else "second")

    def _probe(self) -> torch.Tensor:
        if self._first is None:
            if not self._rows:
                raise IndexError("an empty pool has no video shape")
            self._first = self.video(0)
        return self._first

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._probe().shape))

    @property
    def dtype(self) -> torch.dtype:
        return self._probe().dtype

    def nbytes_per_video(self) -> int:
        probe = self._probe()
        return probe.numel() * probe.element_size()

    def take(self, rows: Sequence[int]) -> "PoolVideos":
        """A lazy view of the videos ``rows`` of this one, in that order."""
        return PoolVideos(self._records, self._read, [self._rows[int(i)] for i in rows])

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.video(index if index >= 0 else len(self) + index)
        if isinstance(index, slice):
            positions = range(*index.indices(len(self)))
        elif isinstance(index, torch.Tensor):
            if index.dtype == torch.bool or index.dim() != 1:
                raise TypeError(f"PoolVideos takes a 1-D integer index tensor, got {index.dtype} {tuple(index.shape)}")
            positions = index.tolist()
        elif isinstance(index, (list, tuple, range)):
            positions = [int(i) for i in index]
        else:
            raise TypeError(f"PoolVideos cannot be indexed by {type(index).__name__}")
        positions = [p if p >= 0 else len(self) + p for p in positions]
        if not positions:
            return torch.empty((0, *self._probe().shape), dtype=self.dtype)
        return torch.stack([self.video(p) for p in positions])


@dataclass
class VideoPool:
    """Every video of a round's generated pairs: the first videos, then the second ones (2N)."""

    pixels: PoolVideos
    """(2N, 3, F, H, W) what a critic scores: the shapes world's clips (float), or decoded frames (uint8)."""
    latents: PoolVideos
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


def _videos(src: Path, records: list[PairRecord]) -> tuple[PoolVideos, PoolVideos]:
    """(pixels, latents) of the pool: decoded uint8 frames and the shards' latents, or the shards' clips for both."""
    frames = PairFrames(src, rows_only=True)
    shards = ShardReader(src, max_cached=4, rows_only=True)

    def latent(record: PairRecord, key: str) -> torch.Tensor:
        return shards.get(record, key).float()

    if records and frames.has_frames(records[0]):
        return PoolVideos(records, frames.get_uint8), PoolVideos(records, latent)
    clips = PoolVideos(records, latent)
    return clips, clips


def read_video_pool(src: Path, domain: Domain) -> VideoPool:
    """The pool of the generated pairs in ``src`` (module docstring), keyed by ``domain``'s prompts."""
    records = _records(src)
    pixels, latents = _videos(src, records)
    cond = _cond_ids(records).repeat(2, 1)
    prompt_ids = [r.prompt_id for r in records] * 2
    return VideoPool(pixels=pixels, latents=latents, captions=[r.caption for r in records] * 2,
                     prompt_ids=prompt_ids, cond_ids=cond, keys=prompt_keys(domain, prompt_ids, cond))


def pool_videos(src: Path) -> PoolVideos:
    """The pixels of every video of the generated pairs in ``src``, read on demand (decoded uint8 frames when the
    pairs were decoded, else the shards' clips as float): (2N, 3, F, H, W)."""
    return _videos(src, _records(src))[0]


def read_pool(src: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``pool_videos`` loaded whole, and the conditions: (videos (2N, 3, F, H, W), cond_ids (2N, K)). For
    measurements of toy pools; a real model's pool is read through ``pool_videos``."""
    records = _records(src)
    return _videos(src, records)[0][:], _cond_ids(records).repeat(2, 1)


def pool_chunks(videos: PoolVideos, chunk_bytes: int = POOL_CHUNK_BYTES) -> list[range]:
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
