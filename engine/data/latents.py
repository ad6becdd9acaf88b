"""Training on cached latents: the shard format of ``vidpo cache``, a dataset over it, and a resumable loader.

Layout of a cache directory (written by ``vidpo.stages.cache``, read here)::

    cache.json                     the settings the cache was made with (a rerun must match them)
    index.json                     written once every shard is complete (format below)
    shards/shard_00000.safetensors latents (n, C, T, H, W), text_emb (n, L, D), text_mask (n, L) bool
    shards/shard_00000.json        the shard's record: clip ids, captions, skipped clips (its "done" mark)

``index.json``: ``{"format": "vidpo-latents/1", "num_samples", "latent_shape": [C, T, H, W],
"text_shape": [L, D], "dtype", "latent_norm", "fps", "frames", "shards": [{"file", "rows", "clip_ids"}],
"skipped": [...]}``.

**The sample stream.** Sample ``i`` of the dataset is row ``i`` in shard order. The loader walks an endless
*global stream*: position ``p`` is sample ``perm_e[p mod N]`` of epoch ``e = p // N``, where ``perm_e`` is a
permutation drawn from the stream ``(seed, "latents", "epoch", e)`` (identity when not shuffling). With
``W`` data-parallel ranks and per-rank batch ``B``, every batch step covers ``W * B`` consecutive positions
and rank ``r`` takes positions ``cursor + r * B ... cursor + r * B + B - 1``. The loader's whole state is
``cursor`` (positions consumed by all ranks together, equal on every rank): a checkpoint stores it and a
resumed run continues with exactly the positions an uninterrupted run would have visited next — also
after a change of world size or batch size, since positions never depend on either.
"""
from __future__ import annotations

import collections
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from vidpo.utils.seeding import generator

log = logging.getLogger("vidpo")

FORMAT = "vidpo-latents/1"
INDEX_FILE = "index.json"
SETTINGS_FILE = "cache.json"
SHARD_DIR = "shards"
TENSORS = ("latents", "text_emb", "text_mask")


class LatentDataError(ValueError):
    """A cache directory, index or shard that cannot be used; the message names the file."""


def shard_stem(index: int) -> str:
    return f"{SHARD_DIR}/shard_{index:05d}"


def read_index(root: str | os.PathLike) -> dict:
    """``index.json`` of a finished cache, checked for the fields the loader needs."""
    path = Path(root) / INDEX_FILE
    if not path.exists():
        hint = " (the cache is incomplete: rerun `vidpo cache` to finish it)" if (Path(root) / SETTINGS_FILE).exists() \
            else " (not a `vidpo cache` output directory)"
        raise LatentDataError(f"{path}: not found{hint}")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise LatentDataError(f"{path}: unreadable ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise LatentDataError(f"{path}: not a {FORMAT} index (format={index.get('format') if isinstance(index, dict) else None!r})")
    for key in ("latent_shape", "text_shape", "shards"):
        if key not in index:
            raise LatentDataError(f"{path}: missing key '{key}'")
    return index


@dataclass(frozen=True)
class LatentInfo:
    """What a model trained on a cache must match."""

    channels: int
    latent_frames: int
    height: int
    width: int
    text_len: int
    text_dim: int


def latent_info(root: str | os.PathLike) -> LatentInfo:
    index = read_index(root)
    c, t, h, w = index["latent_shape"]
    length, dim = index["text_shape"]
    return LatentInfo(int(c), int(t), int(h), int(w), int(length), int(dim))


class LatentShardDataset:
    """Random access to the samples of a cache: ``read([i, ...]) -> dict`` of stacked float32 tensors.

    Every shard is checked when the dataset opens (file present, header readable and complete, tensors and
    shapes as the index says); a bad shard is skipped with a warning naming it (``on_error='skip'``) or is
    an error (``'raise'``). Reading later opens shards by memory map, so memory stays flat.
    """

    def __init__(self, root: str | os.PathLike, *, on_error: str = "raise"):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r} is not one of ['skip', 'raise']")
        self.root = Path(root)
        self.index = read_index(self.root)
        self.latent_shape = tuple(int(v) for v in self.index["latent_shape"])
        self.text_shape = tuple(int(v) for v in self.index["text_shape"])
        self.problems: List[str] = []
        self.shards: List[str] = []
        self.clip_ids: List[str] = []
        rows: List[tuple] = []
        for entry in self.index["shards"]:
            try:
                count = self._check_shard(entry)
            except LatentDataError as exc:
                if on_error == "raise":
                    raise
                self.problems.append(str(exc))
                log.warning("skipping shard: %s", exc)
                continue
            shard_id = len(self.shards)
            self.shards.append(entry["file"])
            self.clip_ids.extend(entry.get("clip_ids", [f"{entry['file']}#{r}" for r in range(count)]))
            rows.extend((shard_id, r) for r in range(count))
        if not rows:
            raise LatentDataError(f"{self.root / INDEX_FILE}: no usable samples"
                                  + (f" ({len(self.problems)} bad shards)" if self.problems else ""))
        self._rows = rows

    def _check_shard(self, entry: dict) -> int:
        path = self.root / entry["file"]
        if not path.exists():
            raise LatentDataError(f"{path}: shard missing")
        rows = int(entry["rows"])
        expected = {"latents": (rows, *self.latent_shape), "text_emb": (rows, *self.text_shape),
                    "text_mask": (rows, self.text_shape[0])}
        try:
            with safe_open(str(path), "pt") as f:
                keys = set(f.keys())
                for name, shape in expected.items():
                    if name not in keys:
                        raise LatentDataError(f"{path}: no tensor '{name}'")
                    got = tuple(f.get_slice(name).get_shape())
                    if got != shape:
                        raise LatentDataError(f"{path}: '{name}' has shape {got}, the index says {shape}")
        except (SafetensorError, OSError) as exc:
            raise LatentDataError(f"{path}: shard unreadable ({exc})") from None
        return rows

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """Samples ``indices`` stacked: latents float32 (n, C, T, H, W), text_emb float32 (n, L, D),
        text_mask bool (n, L)."""
        by_shard: Dict[int, List[tuple]] = collections.defaultdict(list)
        for slot, i in enumerate(indices):
            shard_id, row = self._rows[i]
            by_shard[shard_id].append((slot, row))
        n = len(indices)
        out = {"latents": torch.empty((n, *self.latent_shape), dtype=torch.float32),
               "text_emb": torch.empty((n, *self.text_shape), dtype=torch.float32),
               "text_mask": torch.empty((n, self.text_shape[0]), dtype=torch.bool)}
        for shard_id, members in by_shard.items():
            path = self.root / self.shards[shard_id]
            try:
                with safe_open(str(path), "pt") as f:
                    for name in TENSORS:
                        view = f.get_slice(name)
                        for slot, row in members:
                            out[name][slot] = view[row:row + 1][0]
            except (SafetensorError, OSError) as exc:
                # Skipping here would change which samples later positions map to: stop instead.
                raise LatentDataError(f"{path}: shard became unreadable during training ({exc})") from None
        return out


def default_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1). Runs with tensor or context
    parallelism must pass their *data-parallel* rank and size instead."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LatentLoader:
    """This rank's batches of the global sample stream (module docstring), read ahead by worker threads.

    ``next_batch()`` returns the dataset tensors plus ``positions`` (int64 (B,), global stream positions, a
    stable per-sample key for noise) and ``indices`` (dataset sample indices). ``state_dict()`` /
    ``load_state_dict()`` save and restore the position; batches read ahead but not yet returned are not
    part of the state and are read again after a restore.
    """

    def __init__(self, dataset: LatentShardDataset, batch_size: int, *, seed: int, shuffle: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None, workers: int = 2,
                 prefetch: int = 4, pin_memory: Optional[bool] = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        default_rank, default_world = default_rank_world()
        self.rank = default_rank if rank is None else int(rank)
        self.world_size = default_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.prefetch = max(1, prefetch)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.cursor = 0
        self._scheduled = 0
        self._pending: collections.deque = collections.deque()
        self._perms: Dict[int, torch.Tensor] = {}
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="vidpo-latents")

    # ----- the stream --------------------------------------------------------------------------------
    @property
    def step_size(self) -> int:
        """Global positions consumed per batch step (all ranks)."""
        return self.batch_size * self.world_size

    def _permutation(self, epoch: int) -> Optional[torch.Tensor]:
        if not self.shuffle:
            return None
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=generator(self.seed, "latents", "epoch", epoch))
        return self._perms[epoch]

    def sample_indices(self, positions: Sequence[int]) -> List[int]:
        """Dataset indices of global stream positions."""
        n = len(self.dataset)
        out = []
        for p in positions:
            epoch, offset = divmod(int(p), n)
            perm = self._permutation(epoch)
            out.append(offset if perm is None else int(perm[offset]))
        return out

    def positions_for(self, cursor: int) -> List[int]:
        """The global positions this rank reads in the batch step that starts at ``cursor``."""
        first = cursor + self.rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def _read(self, positions: List[int], indices: List[int]) -> dict:
        batch = self.dataset.read(indices)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        batch["positions"] = torch.tensor(positions, dtype=torch.int64)
        batch["indices"] = torch.tensor(indices, dtype=torch.int64)
        return batch

    def _fill(self) -> None:
        while len(self._pending) < self.prefetch:
            # Indices (and the epoch permutations behind them) are made here, in the caller's thread, so
            # workers only read.
            positions = self.positions_for(self._scheduled)
            future = self._pool.submit(self._read, positions, self.sample_indices(positions))
            self._pending.append((self._scheduled, future))
            self._scheduled += self.step_size

    def next_batch(self) -> dict:
        self._fill()
        cursor, future = self._pending.popleft()
        batch = future.result()
        self.cursor = cursor + self.step_size
        self._fill()
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ----- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "num_samples": len(self.dataset), "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("num_samples") not in (None, len(self.dataset)):
            log.warning("latent loader: the checkpoint saw %s samples, the cache now has %d; positions map to "
                        "different samples from here on", state.get("num_samples"), len(self.dataset))
        if state.get("seed", self.seed) != self.seed or state.get("shuffle", self.shuffle) != self.shuffle:
            log.warning("latent loader: seed/shuffle differ from the checkpoint's; the sample order changes")
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self.cursor = self._scheduled = int(state["cursor"])

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
