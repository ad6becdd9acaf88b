"""Videos read on demand, indexed like one stacked tensor.

A round's pool (every generated video) and a critic's training pairs used to be loaded whole: at real-model size
that is far beyond a node's memory (a decoded Wan 2.1 480p video is 97 MB of uint8 frames; 16k pairs are ~3 TB).
``VideoRows`` holds how to read each video, not the video: ``rows[i]`` reads one, a slice, a list or a 1-D index
tensor reads and stacks those asked, ``take`` and ``cat`` make new sequences without reading anything, and ``map``
applies a per-video transform at read time. Readers (``pair_rows``) read one row of a shard through the file's
memory map (``ShardReader(rows_only=True)``), so a step that asks for a batch reads exactly that batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from vidpo.data.pairs import PairRecord, ShardReader
from vidpo.data.video_io import PairFrames

Reader = Callable[[], torch.Tensor]


class VideoRows:
    """N videos, each read by its own zero-argument reader when asked for (module docstring)."""

    def __init__(self, readers: Sequence[Reader]):
        self._readers = list(readers)
        self._probe: Optional[torch.Tensor] = None

    @staticmethod
    def of_tensor(videos: torch.Tensor) -> "VideoRows":
        """The videos of a stacked tensor (N, ...), as rows (for joining in-memory videos with read ones)."""
        return VideoRows([lambda i=i: videos[i] for i in range(videos.shape[0])])

    @staticmethod
    def cat(parts: Sequence["VideoRows | torch.Tensor"]) -> "VideoRows":
        """The parts one after the other (tensors are taken as their rows)."""
        readers: list[Reader] = []
        for part in parts:
            readers += (part if isinstance(part, VideoRows) else VideoRows.of_tensor(part))._readers
        return VideoRows(readers)

    def __len__(self) -> int:
        return len(self._readers)

    def video(self, i: int) -> torch.Tensor:
        """Video ``i``, read now."""
        return self._readers[i]()

    def _first(self) -> torch.Tensor:
        if self._probe is None:
            if not self._readers:
                raise IndexError("an empty sequence of videos has no video shape")
            self._probe = self.video(0)
        return self._probe

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._first().shape))

    @property
    def dtype(self) -> torch.dtype:
        return self._first().dtype

    def nbytes_per_video(self) -> int:
        probe = self._first()
        return probe.numel() * probe.element_size()

    def take(self, rows) -> "VideoRows":
        """The videos ``rows`` (ints, or a 1-D index tensor), in that order, still unread."""
        return VideoRows([self._readers[p] for p in self._positions(rows)])

    def map(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> "VideoRows":
        """Each video passed through ``transform`` when it is read."""
        return VideoRows([lambda read=read: transform(read()) for read in self._readers])

    def _positions(self, index) -> list[int]:
        if isinstance(index, slice):
            return list(range(*index.indices(len(self))))
        if isinstance(index, torch.Tensor):
            if index.dtype == torch.bool or index.dim() != 1:
                raise TypeError(f"VideoRows takes a 1-D integer index tensor, got {index.dtype} {tuple(index.shape)}")
            index = index.tolist()
        elif not isinstance(index, (list, tuple, range)):
            raise TypeError(f"VideoRows cannot be indexed by {type(index).__name__}")
        return [int(p) if int(p) >= 0 else len(self) + int(p) for p in index]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.video(index if index >= 0 else len(self) + index)
        positions = self._positions(index)
        if not positions:
            return torch.empty((0, *self._first().shape), dtype=self.dtype)
        return torch.stack([self.video(p) for p in positions])


IN_MEMORY_BYTES = 8 << 30
"""Below this many bytes a set of videos read over and over (a critic's training pairs, one batch a step) is loaded
whole (``load_if_small``); above it, it is read batch by batch from the shards."""


def load_if_small(*parts: VideoRows, budget: int = IN_MEMORY_BYTES) -> "tuple[VideoRows | torch.Tensor, ...]":
    """``parts`` loaded as tensors when all of them together hold at most ``budget`` bytes, else left unread."""
    total = sum(len(p) * p.nbytes_per_video() for p in parts if len(p))
    return tuple(p[:] for p in parts) if total <= budget else parts


def take_rows(videos: "VideoRows | torch.Tensor", index) -> "VideoRows | torch.Tensor":
    """``videos[index]`` that stays unread for ``VideoRows`` (a tensor is indexed as usual)."""
    return videos.take(index) if isinstance(videos, VideoRows) else videos[index]


def pair_rows(pairs_dir, records: Sequence[PairRecord], key: str, *, kind: str = "pixels") -> VideoRows:
    """The ``key`` videos ('first' / 'second') of ``records`` of a pairs directory, read row by row.

    ``kind`` 'pixels': decoded frames (uint8) when the pairs were decoded, else the shards' clips as float (the
    shapes world's pairs are pixels); 'latents': the shards' tensors as float."""
    if kind not in ("pixels", "latents"):
        raise ValueError(f"pair_rows: kind must be 'pixels' or 'latents', got {kind!r}")
    records = list(records)
    frames = PairFrames(pairs_dir, rows_only=True)
    if kind == "pixels" and records and frames.has_frames(records[0]):
        return VideoRows([lambda r=r: frames.get_uint8(r, key) for r in records])
    shards = ShardReader(pairs_dir, max_cached=4, rows_only=True)
    return VideoRows([lambda r=r: shards.get(r, key).float() for r in records])
