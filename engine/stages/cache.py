"""``vidpo cache``: clips of a manifest -> VAE latents + text embeddings in safetensors shards.

For each shard of ``cache.shard_size`` manifest entries (shard ``k`` holds entries ``k*S .. k*S+S-1`` of
the validated manifest, whatever the number of processes):

1. decode the clips (``vidpo.data.decode``: sampled at ``cache.fps``, ``cache.frames`` frames, resized and
   center-cropped to ``cache.height x cache.width``, in ``[-1, 1]``), skipping unusable videos by policy;
2. encode them with the VAE (diffusers, loaded from a local directory): ``z`` is the posterior *mean*
   (a cached sample would freeze one noise draw into the data forever), normalised as the model family
   expects: Wan ``(z - latents_mean) / latents_std`` per channel, CogVideoX ``z * scaling_factor``;
3. embed the captions with the text encoder (transformers, local directory): the last hidden state,
   ``(L, D)`` with ``L = cache.text_max_length``, zero past the caption's tokens (Wan's convention), and
   the attention mask;
4. write ``shards/shard_k.safetensors`` and then its record ``shards/shard_k.json``, each atomically.

A shard whose record exists is complete and is never redone, so a killed run rerun with the same command
finishes the rest. Rank ``r`` of ``N`` processes takes shards ``r, r + N, ...``; the last process to find
every shard complete writes ``index.json`` (``vidpo.data.latents`` has the format). ``cache.json`` keeps
the settings: a rerun with different ones is refused (it would mix incompatible shards).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from vidpo.config import ConfigError, RunConfig, resolve_path
from vidpo.data.decode import ClipDecoder, SamplingSpec
from vidpo.data.latents import FORMAT, INDEX_FILE, SETTINGS_FILE, SHARD_DIR, default_rank_world, shard_stem
from vidpo.data.manifest import read_clip_manifest
from vidpo.models.text_encoder import TextEncoder
from vidpo.models.vae import DiffusersVAE, vae_facts
from vidpo.training.modeling import pick_device
from vidpo.utils import atomic
from vidpo.utils.provenance import record_or_check

log = logging.getLogger("vidpo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_dir(value: Optional[str], key: str) -> Path:
    if not value:
        raise ConfigError(f"'{key}' is not set: give a local directory (e.g. --set {key}=/models/...)")
    path = resolve_path(value)
    if not (path / "config.json").is_file():
        raise ConfigError(f"'{key}' = {value}: no config.json in {path} (expected a save_pretrained directory)")
    return path


def file_digest(path: Path) -> str:
    """sha1 of a file; of a folder manifest, its videos' names and sizes and its caption files."""
    h = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(f"{file.relative_to(path)}:{file.stat().st_size}\n".encode())
            if file.suffix.lower() != ".txt":
                continue  # videos by name and size: hashing every video of a dataset would take minutes
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----- the job ------------------------------------------------------------------------------------------
def cache_settings(cfg: RunConfig, manifest: Path, vae_dir: Path, text_dir: Path, tok_dir: Path) -> dict:
    c = cfg.cache
    return {"format": FORMAT, "manifest": str(manifest.resolve()), "manifest_sha1": file_digest(manifest),
            "vae": str(vae_dir.resolve()), "vae_config_sha1": file_digest(vae_dir / "config.json"),
            "text_encoder": str(text_dir.resolve()), "tokenizer": str(tok_dir.resolve()),
            "fps": c.fps, "frames": c.frames, "height": c.height, "width": c.width, "resize": c.resize,
            "text_max_length": c.text_max_length, "shard_size": c.shard_size, "dtype": c.dtype,
            "on_bad_input": c.on_bad_input}


def _record_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"{shard_stem(k)}.json"


def _clean_own_leftovers(out_dir: Path, shards: Sequence[int]) -> None:
    """Remove temporary files of *this rank's* shards only: another rank may be writing its own right now."""
    shard_dir = out_dir / SHARD_DIR
    if not shard_dir.exists():
        return
    mine = {Path(shard_stem(k)).name for k in shards}
    for p in shard_dir.iterdir():
        if atomic.TMP_MARK in p.name and p.name.split(".", 1)[0] in mine:
            p.unlink(missing_ok=True)


def _write_shard(out_dir: Path, k: int, kept: list, latents: List[torch.Tensor], emb, mask, dtype,
                 skipped: list) -> None:
    stem = shard_stem(k)
    record = {"file": f"{stem}.safetensors" if kept else None, "rows": len(kept),
              "clip_ids": [c.clip_id for c in kept], "captions": [c.caption for c in kept],
              "ground_truth": [c.ground_truth for c in kept], "skipped": skipped}
    if kept:
        tensors = {"latents": torch.stack(latents).to(dtype), "text_emb": emb.to(dtype), "text_mask": mask}
        atomic.save_safetensors(tensors, out_dir / f"{stem}.safetensors",
                                metadata={"format": FORMAT, "clip_ids": json.dumps(record["clip_ids"])})
    atomic.write_json(_record_path(out_dir, k), record)  # last: its presence means the shard is complete


def write_index_if_complete(out_dir: Path, num_shards: int, meta: dict) -> Optional[Path]:
    """Write ``index.json`` when every shard has its record; returns its path, or None if some are missing."""
    records = []
    for k in range(num_shards):
        path = _record_path(out_dir, k)
        if not path.exists():
            return None
        records.append(json.loads(path.read_text()))
    shards = [{key: r[key] for key in ("file", "rows", "clip_ids", "captions", "ground_truth")}
              for r in records if r["rows"]]
    if not shards:
        raise ConfigError(f"{out_dir}: every clip was skipped, nothing to index (see the warnings above)")
    index = dict(meta, format=FORMAT, num_samples=sum(s["rows"] for s in shards), shards=shards,
                 skipped=[s for r in records for s in r["skipped"]])
    path = out_dir / INDEX_FILE
    atomic.write_json(path, index)
    return path


def run_cache(cfg: RunConfig, out_dir: str | os.PathLike, *, rank: Optional[int] = None,
              world_size: Optional[int] = None, device: Optional[torch.device] = None) -> dict:
    """Encode this rank's missing shards (module docstring); returns counts for the CLI to print."""
    t0 = time.time()
    c = cfg.cache
    out_dir = Path(out_dir)
    default_rank, default_world = default_rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world size {world_size})")
    if not c.manifest:
        raise ConfigError("'cache.manifest' is not set: give a clip manifest (.jsonl or .parquet)")
    manifest = resolve_path(c.manifest)
    vae_dir = local_dir(c.vae, "cache.vae")
    text_dir = local_dir(c.text_encoder, "cache.text_encoder")
    tok_dir = resolve_path(c.tokenizer) if c.tokenizer else text_dir

    clips, problems = read_clip_manifest(manifest, on_error=c.on_bad_input)
    if not clips:
        raise ConfigError(f"{manifest}: no usable clips" + (f" ({len(problems)} bad lines)" if problems else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    record_or_check(out_dir / SETTINGS_FILE, cache_settings(cfg, manifest, vae_dir, text_dir, tok_dir),
                    what="this cache was")

    num_shards = math.ceil(len(clips) / c.shard_size)
    mine = list(range(rank, num_shards, world_size))
    todo = [k for k in mine if not _record_path(out_dir, k).exists()]
    _clean_own_leftovers(out_dir, todo)
    result = {"out": str(out_dir), "rank": rank, "world_size": world_size, "clips": len(clips),
              "manifest_problems": len(problems), "shards_total": num_shards, "shards_mine": len(mine),
              "shards_done_before": len(mine) - len(todo), "shards_written": 0, "clips_encoded": 0,
              "clips_skipped": 0}
    if device is None:
        device = pick_device()
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    dtype = DTYPES[c.dtype]
    compute_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    vae = text = decoder = None
    if todo:
        vae = DiffusersVAE(vae_dir, device, compute_dtype)
        try:
            vae.latent_shape(c.frames, c.height, c.width)
        except ValueError as exc:
            raise ConfigError(f"cache.frames / cache.height / cache.width: {exc}") from None
        text = TextEncoder(text_dir, tok_dir, device, compute_dtype, c.text_max_length)
        spec = SamplingSpec(fps=c.fps, frames=c.frames, height=c.height, width=c.width, resize=c.resize)
        decoder = ClipDecoder(spec, c.decoder, device=device, workers=c.workers, batch_size=c.batch_size,
                              on_error=c.on_bad_input)
        log.info("cache: rank %d/%d, %d of %d shards to write (%d done before), %s, vae=%s, text=%s",
                 rank, world_size, len(todo), len(mine), len(mine) - len(todo), decoder.describe(),
                 vae.class_name, text.class_name)
    bar = tqdm(total=sum(len(clips[k * c.shard_size:(k + 1) * c.shard_size]) for k in todo), unit="clip",
               desc=f"cache[rank {rank}]", disable=not cfg.train.progress or not todo, dynamic_ncols=True, leave=False)
    try:
        for k in todo:
            shard_clips = clips[k * c.shard_size:(k + 1) * c.shard_size]
            failed_before = len(decoder.failures)
            kept, latents = [], []
            for batch in decoder.iter_batches(shard_clips, c.batch_size):
                if batch:
                    z = vae.encode(torch.stack([x for _, x in batch]))
                    kept.extend(clip for clip, _ in batch)
                    latents.extend(z.cpu().unbind(0))
                bar.update(len(batch))
            skipped = [f.to_dict() for f in decoder.failures[failed_before:]]
            bar.update(len(skipped))
            emb = mask = None
            if kept:
                parts = [text.encode([clip.caption for clip in kept[i:i + c.batch_size]])
                         for i in range(0, len(kept), c.batch_size)]
                emb, mask = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            _write_shard(out_dir, k, kept, latents, emb, mask, dtype, skipped)
            result["shards_written"] += 1
            result["clips_encoded"] += len(kept)
            result["clips_skipped"] += len(skipped)
    finally:
        bar.close()
        if decoder is not None:
            result["decoders_used"] = dict(decoder.used)
            decoder.close()
    index = _finish(out_dir, num_shards, world_size, vae_dir, cfg)
    result["index"] = str(index) if index else None
    result["seconds"] = round(time.time() - t0, 2)
    if index is None:
        log.info("cache: rank %d done; index.json is written once the other ranks' shards are complete", rank)
    return result


def _finish(out_dir: Path, num_shards: int, world_size: int, vae_dir: Path, cfg: RunConfig):
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's shards are on disk after this
    c = cfg.cache
    vae_class, norm, temporal = vae_facts(vae_dir)
    meta = {"dtype": c.dtype, "fps": c.fps, "frames": c.frames, "height": c.height, "width": c.width,
            "vae": str(vae_dir), "vae_class": vae_class, "latent_norm": norm, "temporal_compression": temporal,
            "text_encoder": str(resolve_path(c.text_encoder))}
    for k in range(num_shards):
        path = _record_path(out_dir, k)
        record = json.loads(path.read_text()) if path.exists() else {}
        if record.get("rows"):
            with safe_open(str(out_dir / record["file"]), "pt") as f:
                meta["latent_shape"] = list(f.get_slice("latents").get_shape()[1:])
                meta["text_shape"] = list(f.get_slice("text_emb").get_shape()[1:])
            break
    return write_index_if_complete(out_dir, num_shards, meta)


