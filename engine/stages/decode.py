"""Decode generated pairs to pixels: uint8 frame shards for labellers and H.264 mp4s for people.

``decode_pairs(pairs_dir, vae, fps)`` decodes the ``first`` and ``second`` latents of every shard named by the
pairs directory's records with the model's VAE (``vidpo.models.vae.VideoVAE``; ``IdentityVAE`` for a pixel-space
model), ``batch_size`` videos at a time, and writes beside the shards (layout in ``vidpo.data.video_io``)::

    frames/shard_00000.safetensors   first, second (S, 3, F, H, W) uint8, F = vae.pixel_frames(T)
    videos/<pair_id>_first.mp4       videos/<pair_id>_second.mp4
    decode.json                      the summary this function returns

Resumable: a shard whose frames file is complete (rows, frames and size as the latents and the VAE give them)
is not decoded again, and only its missing videos are written (from the frames file). A frames file is streamed
batch by batch to a temporary name and renamed once complete, and every mp4 is written the same way, so a kill
leaves no half-written file that a rerun would trust; the killed shard is decoded again.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE, PairDataError, PairRecord, read_manifest
from vidpo.data.video_io import (
    DECODE_FILE,
    FRAMES_DIR,
    FRAMES_FORMAT,
    VIDEOS_DIR,
    FramesWriter,
    display_scale,
    frames_name,
    tensor_shapes,
    to_uint8,
    video_name,
    write_mp4,
)
from vidpo.models.vae import VideoVAE
from vidpo.utils import atomic

log = logging.getLogger("vidpo")


def pair_records(pairs_dir: str | Path, on_error: str = "raise") -> tuple[list[PairRecord], list[str]]:
    """The records of a pairs directory: ``pairs.jsonl`` (what generate wrote), else ``manifest.jsonl``."""
    pairs_dir = Path(pairs_dir)
    path = pairs_dir / PAIRS_FILE
    if not path.exists() and (pairs_dir / MANIFEST_FILE).exists():
        path = pairs_dir / MANIFEST_FILE
    return read_manifest(path, need_labels=False, on_error=on_error)


def decode_pairs(pairs_dir: str | Path, vae: VideoVAE, fps: float, *, batch_size: int = 4,
                 write_videos: bool = True, records: Optional[Sequence[PairRecord]] = None,
                 keys: Sequence[str] = ("first", "second"), crf: int = 18, video_scale: Optional[int] = None,
                 on_error: str = "raise", progress: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """Decode every shard of ``pairs_dir`` to ``frames/`` (and ``videos/`` with ``write_videos``); the summary.

    Rank ``rank`` of ``world_size`` processes (a torchrun job's, process group up) decodes shards ``rank,
    rank + world_size, ...`` of the sorted shard names; rank 0 alone clears a killed run's temporary files
    first and writes the summary once every rank is done.

    ``records`` default to the directory's own (:func:`pair_records`); only the shards they name are decoded,
    and each record's videos are named by its pair id. ``fps`` is the frame rate of the pixel videos; ``crf`` their
    H.264 quality; ``video_scale`` enlarges their pixels (None: tiny clips up to about 128 pixels,
    ``vidpo.data.video_io.display_scale``; the frames are never scaled). A missing or unreadable shard raises
    PairDataError, or with ``on_error="skip"`` is skipped, counted and named."""
    pairs_dir = Path(pairs_dir)
    if batch_size < 1:
        raise ValueError(f"decode_pairs: batch_size must be >= 1, got {batch_size}")
    started = time.time()
    problems: list[str] = []
    if records is None:
        records, problems = pair_records(pairs_dir, on_error)
    by_shard: dict[str, list[PairRecord]] = defaultdict(list)
    for record in records:
        by_shard[record.shard].append(record)
    if rank == 0:
        for folder in (FRAMES_DIR, VIDEOS_DIR):
            atomic.clean_leftovers(pairs_dir / folder)
    if world_size > 1:
        dist.barrier()
    totals = {"shards_decoded": 0, "shards_skipped": 0, "videos_written": 0, "videos_decoded": 0}
    sizes: dict[str, int] = {}
    mine = [shard for i, shard in enumerate(sorted(by_shard)) if i % world_size == rank]
    for shard in tqdm(mine, desc="decode", disable=not progress or rank != 0, leave=False):
        try:
            plan = _ShardPlan(pairs_dir, shard, vae, keys, fps)
            plan.check_rows(by_shard[shard])
        except PairDataError as exc:
            if on_error == "raise":
                raise
            problems.append(str(exc))
            log.warning("skipping %s", exc)
            continue
        scale = video_scale or display_scale(plan.height, plan.width)
        sizes.update(frames=plan.frames, height=plan.height, width=plan.width, latent_frames=plan.latent_frames,
                     video_scale=scale)
        rows = {record.row: record for record in by_shard[shard]}
        if plan.complete():
            totals["shards_skipped"] += 1
            if write_videos:
                totals["videos_written"] += _missing_videos(pairs_dir, plan, rows, fps, crf, scale)
            continue
        totals["videos_written"] += _decode_shard(pairs_dir, plan, rows, vae, fps, batch_size=batch_size,
                                                  write_videos=write_videos, crf=crf, scale=scale)
        totals["videos_decoded"] += plan.rows * len(keys)
        totals["shards_decoded"] += 1
    if world_size > 1:
        counts = torch.tensor([totals[k] for k in totals] + [len(problems)], dtype=torch.float64)
        dist.all_reduce(counts)   # also the barrier: every shard is decoded before the summary says so
        totals = {k: int(v) for k, v in zip(totals, counts.tolist())}
    info = {"pairs": len(records), "shards": len(by_shard), **totals, "keys": list(keys), "fps": fps, **sizes,
            "vae": type(vae).__name__, "temporal_compression": vae.temporal_compression,
            "spatial_compression": vae.spatial_compression, "videos": bool(write_videos),
            "seconds": round(time.time() - started, 3), "skipped_shards": len(problems), "problems": problems[:50]}
    if rank == 0:
        atomic.write_json(pairs_dir / DECODE_FILE, info)
    log.info("decode: %d shards decoded, %d already complete, %d videos written, %d problems",
             totals["shards_decoded"], totals["shards_skipped"], totals["videos_written"], len(problems))
    return info


class _ShardPlan:
    """What one latent shard decodes to: rows, frames, size, the frames file and its metadata."""

    def __init__(self, pairs_dir: Path, shard: str, vae: VideoVAE, keys: Sequence[str], fps: float):
        self.source = pairs_dir / shard
        if not self.source.is_file():
            raise PairDataError(f"{self.source}: shard missing")
        shapes, _ = tensor_shapes(self.source)
        for key in keys:
            if key not in shapes:
                raise PairDataError(f"{self.source}: no tensor '{key}'")
            if len(shapes[key]) != 5 or shapes[key] != shapes[keys[0]]:
                raise PairDataError(f"{self.source}: '{key}' must be (S, C, T, H, W) like '{keys[0]}', got "
                                    f"{shapes[key]}")
        self.shard, self.keys = shard, list(keys)
        self.rows, _, self.latent_frames, h, w = shapes[keys[0]]
        self.frames = vae.pixel_frames(self.latent_frames)
        self.height, self.width = h * vae.spatial_compression, w * vae.spatial_compression
        self.shape = (self.rows, 3, self.frames, self.height, self.width)
        self.path = pairs_dir / frames_name(shard)
        self.metadata = {"format": FRAMES_FORMAT, "source": shard,
                         "vae": str(getattr(vae, "class_name", type(vae).__name__)),
                         "temporal_compression": str(vae.temporal_compression),
                         "latent_frames": str(self.latent_frames), "fps": str(fps)}

    def check_rows(self, records: Sequence[PairRecord]) -> None:
        for record in records:
            if record.row >= self.rows:
                raise PairDataError(f"{self.source}: pair {record.pair_id} row {record.row} out of range "
                                    f"({self.rows} rows)")

    def complete(self) -> bool:
        if not self.path.is_file():
            return False
        try:
            shapes, metadata = tensor_shapes(self.path)
        except PairDataError as exc:
            log.warning("%s; decoding it again", exc)
            return False
        # the VAE's name is informative only: a wrapper or subclass of the same VAE decodes the same frames
        same = all(shapes.get(key) == self.shape for key in self.keys) and all(
            metadata.get(k) == v for k, v in self.metadata.items() if k != "vae")
        if not same:
            log.warning("%s: made from other latents or settings (shapes %s, metadata %s); decoding it again",
                        self.path, shapes, metadata)
        return same


def _decode_shard(pairs_dir: Path, plan: _ShardPlan, rows: dict[int, PairRecord], vae: VideoVAE, fps: float, *,
                  batch_size: int, write_videos: bool, crf: int, scale: int) -> int:
    """Decode one shard batch by batch into its frames file (and videos); the number of videos written."""
    with safe_open(str(plan.source), "pt") as handle:
        written = 0
        with FramesWriter(plan.path, {key: plan.shape for key in plan.keys}, plan.metadata) as writer:
            for key in plan.keys:
                latents = handle.get_slice(key)
                for start in range(0, plan.rows, batch_size):
                    stop = min(plan.rows, start + batch_size)
                    with torch.no_grad():
                        pixels = vae.decode(latents[start:stop].float())
                    if tuple(pixels.shape) != (stop - start,) + plan.shape[1:]:
                        raise ValueError(f"{plan.source}: {type(vae).__name__}.decode gave {tuple(pixels.shape)} "
                                         f"for rows {start}..{stop - 1} of '{key}', expected "
                                         f"{(stop - start,) + plan.shape[1:]} (pixel_frames / spatial_compression "
                                         "disagree with decode)")
                    pixels = to_uint8(pixels.cpu())
                    writer.write(key, pixels)
                    if write_videos:
                        for offset, row in enumerate(range(start, stop)):
                            if row in rows:
                                write_mp4(pairs_dir / video_name(rows[row].pair_id, key), pixels[offset], fps,
                                          crf=crf, scale=scale)
                                written += 1
    return written


def _missing_videos(pairs_dir: Path, plan: _ShardPlan, rows: dict[int, PairRecord], fps: float, crf: int,
                    scale: int) -> int:
    """Write the videos of a decoded shard that are missing, from its frames file."""
    todo = [(row, key) for row in sorted(rows) for key in plan.keys
            if not (pairs_dir / video_name(rows[row].pair_id, key)).is_file()]
    if not todo:
        return 0
    with safe_open(str(plan.path), "pt") as handle:
        for row, key in todo:
            write_mp4(pairs_dir / video_name(rows[row].pair_id, key), handle.get_slice(key)[row], fps, crf=crf,
                      scale=scale)
    return len(todo)
