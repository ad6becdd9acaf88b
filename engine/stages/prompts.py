"""The prompt-embedding cache: every prompt of a prompt set embedded once by the model's own text encoder.

``encode_prompts(cfg, prompt_set, text_encoder, out_dir)`` writes the directory that
``vidpo.data.prompts.PromptEmbeddings`` reads (the layout is in that module's docstring):

1. ``settings.json`` first: the text encoder (its directory, tokenizer and class), the sequence length, the
   storage dtype, the shard size, the default negative prompt and the sha1 of the prompts (ids, texts, own
   negative prompts: ``PromptSet.digest``). A rerun with other settings is refused with a ``ConfigError``
   naming the keys that differ: it would mix embeddings of different encoders or prompts.
2. Shard ``k`` embeds prompts ``k*S .. k*S+S-1`` (``S = prompts.shard_size``) in batches of
   ``prompts.batch_size``; its safetensors file is written, then its record, each atomically
   (``vidpo.utils.atomic``). A shard whose record exists is complete and never redone, so a killed run rerun
   with the same arguments finishes the rest.
3. The distinct negative prompts (the default ``prompts.negative_prompt`` first, then the prompts' own in
   order of first use) are one more job, numbered after the shards.
4. Rank ``r`` of ``N`` takes jobs ``r, r + N, ...``; whichever rank finds every job complete writes
   ``index.json`` (after a barrier when a process group is up).

The text encoder is any object with ``encode(list[str]) -> (emb float32 (n, L, D), mask bool (n, L))`` and the
attributes ``max_length`` and ``class_name`` (``vidpo.models.text_encoder.TextEncoder``); this stage never
loads one itself. ``embed_prompts`` is the whole step for a run: it picks the directory (``prompts.cache``
keyed by the settings, else inside the run), encodes what is missing and returns the reader.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

from vidpo.config import ConfigError, RunConfig, resolve_path
from vidpo.data.prompts import (
    EMB_FORMAT,
    EMB_INDEX,
    EMB_NEGATIVES,
    EMB_SETTINGS,
    PromptEmbeddings,
    PromptError,
    PromptSet,
    emb_shard_stem,
    read_prompt_file,
)
from vidpo.utils import atomic
from vidpo.utils.provenance import record_or_check

log = logging.getLogger("vidpo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RUN_SUBDIR = "prompt_embeddings"


def load_prompts(cfg: RunConfig) -> PromptSet:
    """The prompt set of ``prompts.path``, read and checked in full (``PromptError`` naming file:line)."""
    if not cfg.prompts.path:
        raise ConfigError("'prompts.path' is not set: give a prompt file (.txt, one prompt per line, or .jsonl)")
    return read_prompt_file(resolve_path(cfg.prompts.path))


def sequence_length(cfg: RunConfig, text_encoder) -> int:
    """Tokens per embedding: the encoder's ``max_length`` (whoever builds the encoder picks the family's or the
    release's length: ``vidpo.models.pipeline_dir``), which must equal ``prompts.max_sequence_length`` when set."""
    want, have = cfg.prompts.max_sequence_length, int(text_encoder.max_length)
    if want is not None and want != have:
        raise ConfigError(f"prompts.max_sequence_length = {want}, but the text encoder was built with max_length "
                          f"{have}: build it with {want}, or leave prompts.max_sequence_length unset")
    return have


def negative_texts(cfg: RunConfig, prompt_set: PromptSet) -> list[str]:
    """The distinct negative prompts: the default first, then the prompts' own in order of first use."""
    texts = [cfg.prompts.negative_prompt]
    for p in prompt_set:
        if p.negative_prompt is not None and p.negative_prompt not in texts:
            texts.append(p.negative_prompt)
    return texts


def _encoder_facts(text_encoder) -> dict:
    model = getattr(text_encoder, "model", None)
    tokenizer = getattr(text_encoder, "tokenizer", None)
    directory = getattr(text_encoder, "directory", None) or getattr(model, "name_or_path", None)
    tok_dir = getattr(text_encoder, "tokenizer_dir", None) or getattr(tokenizer, "name_or_path", None)
    return {"text_encoder": str(directory) if directory else None, "tokenizer": str(tok_dir) if tok_dir else None,
            "encoder_class": getattr(text_encoder, "class_name", type(text_encoder).__name__),
            "masked": getattr(text_encoder, "masked", None)}


def embedding_settings(cfg: RunConfig, prompt_set: PromptSet, text_encoder) -> dict:
    """What the embeddings depend on (module docstring); a rerun must match it key for key."""
    c = cfg.prompts
    return {"format": EMB_FORMAT, **_encoder_facts(text_encoder), "max_length": sequence_length(cfg, text_encoder),
            "dtype": c.dtype, "shard_size": c.shard_size, "negative_prompt": c.negative_prompt,
            "num_prompts": len(prompt_set), "prompts_sha1": prompt_set.digest()}


def prompt_cache_dir(cfg: RunConfig, settings: dict, run_dir: str | os.PathLike) -> Path:
    """``prompts.cache / <sha1 of the settings, 16 digits>`` when a shared cache is set, else
    ``run_dir / prompt_embeddings``."""
    if cfg.prompts.cache:
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]
        return resolve_path(cfg.prompts.cache) / key
    return Path(run_dir) / RUN_SUBDIR


def _record_path(out_dir: Path, job: int, num_shards: int) -> Path:
    return out_dir / f"{EMB_NEGATIVES if job == num_shards else emb_shard_stem(job)}.json"


def _clean_own_leftovers(out_dir: Path, jobs: Sequence[int], num_shards: int) -> None:
    """Remove temporary files of *this rank's* unfinished jobs only: another rank may be writing its own."""
    mine = {_record_path(out_dir, k, num_shards).stem for k in jobs}
    for p in out_dir.iterdir():
        if atomic.TMP_MARK in p.name and p.name.split(".", 1)[0] in mine:
            p.unlink(missing_ok=True)


def _encode(text_encoder, texts: list[str], batch_size: int, length: int, dtype: torch.dtype, bar):
    embs, masks = [], []
    for i in range(0, len(texts), batch_size):
        emb, mask = text_encoder.encode(texts[i:i + batch_size])
        if emb.dim() != 3 or emb.shape[:2] != (len(texts[i:i + batch_size]), length) or mask.shape != emb.shape[:2]:
            raise ValueError(f"the text encoder returned emb {tuple(emb.shape)} and mask {tuple(mask.shape)} for "
                             f"{len(texts[i:i + batch_size])} prompts; expected (n, {length}, D) and (n, {length})")
        embs.append(emb.to(dtype))
        masks.append(mask.bool())
        bar.update(len(texts[i:i + batch_size]))
    return torch.cat(embs), torch.cat(masks)


def _write(out_dir: Path, stem: str, emb: torch.Tensor, mask: torch.Tensor, record: dict) -> None:
    atomic.save_safetensors({"emb": emb, "mask": mask}, out_dir / f"{stem}.safetensors",
                            metadata={"format": EMB_FORMAT})
    atomic.write_json(out_dir / f"{stem}.json", record)  # last: its presence means the job is complete


def encode_prompts(cfg: RunConfig, prompt_set: PromptSet, text_encoder, out_dir: str | os.PathLike, *,
                   rank: int = 0, world_size: int = 1) -> dict:
    """Embed this rank's missing shards of ``prompt_set`` (and the negative prompts when they are its job) into
    ``out_dir`` (module docstring); returns counts, and ``index`` (the path of index.json, or None while other
    ranks' jobs are missing)."""
    t0 = time.time()
    c = cfg.prompts
    out_dir = Path(out_dir)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world size {world_size})")
    if not len(prompt_set):
        raise PromptError(f"no prompts to embed{' from ' + str(prompt_set.source) if prompt_set.source else ''}")
    settings = embedding_settings(cfg, prompt_set, text_encoder)
    length, dtype = settings["max_length"], DTYPES[c.dtype]
    out_dir.mkdir(parents=True, exist_ok=True)
    record_or_check(out_dir / EMB_SETTINGS, settings, what="these prompt embeddings were")

    prompts, negatives = list(prompt_set), negative_texts(cfg, prompt_set)
    neg_index = {text: i for i, text in enumerate(negatives)}
    num_shards = math.ceil(len(prompts) / c.shard_size)
    mine = list(range(rank, num_shards + 1, world_size))  # job num_shards: the negative prompts
    todo = [k for k in mine if not _record_path(out_dir, k, num_shards).exists()]
    _clean_own_leftovers(out_dir, todo, num_shards)

    def rows_of(k: int) -> list:
        return negatives if k == num_shards else prompts[k * c.shard_size:(k + 1) * c.shard_size]

    result = {"out": str(out_dir), "rank": rank, "world_size": world_size, "prompts": len(prompts),
              "negative_prompts": len(negatives), "shards_total": num_shards, "jobs_mine": len(mine),
              "jobs_done_before": len(mine) - len(todo), "shards_written": 0, "prompts_encoded": 0,
              "negatives_written": False}
    if todo:
        log.info("prompts: rank %d/%d, %d of %d jobs to write (%d done before), %d prompts, encoder %s, L=%d, %s",
                 rank, world_size, len(todo), len(mine), len(mine) - len(todo), len(prompts),
                 settings["encoder_class"], length, c.dtype)
    bar = tqdm(total=sum(len(rows_of(k)) for k in todo), unit="prompt", desc=f"prompts[rank {rank}]",
               disable=not cfg.train.progress or not todo, dynamic_ncols=True, leave=False)
    try:
        for k in todo:
            if k == num_shards:
                emb, mask = _encode(text_encoder, negatives, c.batch_size, length, dtype, bar)
                _write(out_dir, EMB_NEGATIVES, emb, mask, {"file": f"{EMB_NEGATIVES}.safetensors", "texts": negatives})
                result["negatives_written"] = True
                continue
            shard = rows_of(k)
            emb, mask = _encode(text_encoder, [p.text for p in shard], c.batch_size, length, dtype, bar)
            stem = emb_shard_stem(k)
            _write(out_dir, stem, emb, mask, {
                "file": f"{stem}.safetensors", "rows": len(shard), "ids": [p.id for p in shard],
                "negatives": [neg_index[c.negative_prompt if p.negative_prompt is None else p.negative_prompt]
                              for p in shard]})
            result["shards_written"] += 1
            result["prompts_encoded"] += len(shard)
    finally:
        bar.close()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's jobs are on disk after this
    index = write_index_if_complete(out_dir, num_shards, settings, prompt_set.source)
    result["index"] = str(index) if index else None
    result["seconds"] = round(time.time() - t0, 2)
    if index is None:
        log.info("prompts: rank %d done; index.json is written once the other ranks' jobs are complete", rank)
    return result


def write_index_if_complete(out_dir: Path, num_shards: int, settings: dict,
                            source: Optional[Path] = None) -> Optional[Path]:
    """Write ``index.json`` when every shard and the negative prompts have their records; else None."""
    records = []
    for k in range(num_shards + 1):
        path = _record_path(out_dir, k, num_shards)
        if not path.exists():
            return None
        records.append(json.loads(path.read_text()))
    *shards, negatives = records
    with safe_open(str(out_dir / shards[0]["file"]), "pt") as f:
        shape = list(f.get_slice("emb").get_shape()[1:])
    index = {"format": EMB_FORMAT, "settings": settings, "source": str(source) if source else None,
             "num_prompts": sum(s["rows"] for s in shards), "shape": shape, "dtype": settings["dtype"],
             "shards": [{key: s[key] for key in ("file", "ids", "negatives")} for s in shards],
             "negatives": negatives}
    path = out_dir / EMB_INDEX
    atomic.write_json(path, index)
    return path


def embed_prompts(cfg: RunConfig, prompt_set: PromptSet, text_encoder, run_dir: str | os.PathLike, *,
                  rank: int = 0, world_size: int = 1) -> PromptEmbeddings:
    """The whole step for a run: encode what is missing into ``prompt_cache_dir`` and return the reader (every
    rank waits for the others when a process group is up; without one, ``world_size`` must be 1)."""
    out_dir = prompt_cache_dir(cfg, embedding_settings(cfg, prompt_set, text_encoder), run_dir)
    result = encode_prompts(cfg, prompt_set, text_encoder, out_dir, rank=rank, world_size=world_size)
    if result["index"] is None:
        raise PromptError(f"{out_dir}: other ranks' prompt shards are missing (run every rank, or world_size=1)")
    return PromptEmbeddings(out_dir)
