"""``vidpo label``: per-segment labels of a pairs directory, resumable batch by batch.

Labelled pairs are appended to ``labels.partial.jsonl`` batch by batch, so a rerun (after a kill, or a VLM
server outage) labels only what is left; ``manifest.jsonl`` (the pairs with their labels) is written at the
end and ``label.json`` records the label statistics. The labeller is chosen by ``label.labeler``
(``vidpo.labeling``: oracle | human | vlm | critic).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from vidpo.config import RunConfig, resolve_path
from vidpo.data.domains import Domain
from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE, ShardReader, read_manifest, validate_records, write_manifest
from vidpo.data.video_io import PairFrames
from vidpo.labeling import PairBatch, build_labeler
from vidpo.training.modeling import build_domain, run_segment_ids
from vidpo.utils import atomic

log = logging.getLogger("vidpo")


def build_run_labeler(cfg: RunConfig, world):
    kind = cfg.label.labeler
    if kind == "oracle":
        return build_labeler("oracle", world=world, tie_margin=cfg.label.tie_margin, mode=cfg.label.granularity)
    if kind == "human":
        return build_labeler("human", path=str(resolve_path(cfg.label.human_file)), on_missing=cfg.label.on_error,
                             on_error=cfg.label.on_error)
    if kind == "vlm":
        return build_labeler("vlm", config=dataclasses.replace(cfg.label.vlm, on_error=cfg.label.on_error))
    return build_labeler(kind, cfg=cfg, world=world)


def _cond_ids(records) -> Optional[torch.Tensor]:
    """The toy world's structured conditions of the records (what its oracle reads), or None for prompt sets."""
    if any(not r.cond_ids for r in records):
        return None
    return torch.tensor([r.cond_ids for r in records], dtype=torch.long)


def label_pairs(cfg: RunConfig, pairs_dir: str | Path, *, batch_size: int = 64,
                domain: Optional[Domain] = None) -> dict:
    """Label every pair of ``pairs_dir/pairs.jsonl`` per segment; write ``manifest.jsonl``. The labeller sees
    pixels: the decoded frames of a latent model's pairs (``vidpo.stages.decode``), the pairs themselves for a
    pixel-space one; its segments are ``label.segment_seconds`` of the domain's videos (default: the shapes
    world's)."""
    pairs_dir = Path(pairs_dir)
    records, problems = read_manifest(pairs_dir / PAIRS_FILE, need_labels=False, on_error=cfg.pref.on_bad_pair)
    records, shard_problems = validate_records(records, ShardReader(pairs_dir), cfg.pref.on_bad_pair)
    problems += shard_problems
    reader = PairFrames(pairs_dir)
    domain = domain if domain is not None else build_domain(cfg)
    labeler = build_run_labeler(cfg, getattr(domain, "world", None))
    seg = run_segment_ids(cfg, domain, pixels=True)
    partial_path = pairs_dir / "labels.partial.jsonl"
    done: dict[str, dict] = {}
    if partial_path.exists():
        for line in partial_path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[row["pair_id"]] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill: that pair is labelled again
    todo = [r for r in records if r.pair_id not in done]
    failed = 0
    messages: list[str] = []
    with open(partial_path, "a") as fh:
        for start in tqdm(range(0, len(todo), batch_size), desc="label", disable=not cfg.train.progress, leave=False):
            recs = todo[start:start + batch_size]
            batch = PairBatch(first=torch.stack([reader.get(r, "first") for r in recs]).float(),
                              second=torch.stack([reader.get(r, "second") for r in recs]).float(),
                              captions=[r.caption for r in recs], pair_ids=[r.pair_id for r in recs],
                              segment_ids=seg, cond_ids=_cond_ids(recs), fps=domain.fps)
            result = labeler.label(batch)
            failed += result.failed
            messages += result.messages
            for i, r in enumerate(recs):
                row = {"pair_id": r.pair_id, "labels": [int(v) for v in result.labels[i]],
                       "video_label": int(result.video_labels[i])}
                done[r.pair_id] = row
                fh.write(json.dumps(row) + "\n")
            fh.flush()
    labelled = []
    for r in records:
        row = done[r.pair_id]
        r.labels, r.video_label = row["labels"], row["video_label"]
        r.segment_seconds, r.label_source = cfg.label.segment_seconds, cfg.label.labeler
        labelled.append(r)
    write_manifest(pairs_dir / MANIFEST_FILE, labelled)
    partial_path.unlink(missing_ok=True)
    all_labels = torch.tensor([r.labels for r in labelled]) if labelled else torch.zeros(0, 1)
    stats = {"pairs": len(labelled), "segments": int(seg.max()) + 1, "labeler": cfg.label.labeler,
             "tie_fraction": float((all_labels == 0).double().mean()) if labelled else None,
             "first_better_fraction": float((all_labels > 0).double().mean()) if labelled else None,
             "failed_comparisons": failed, "skipped_pairs": len(problems), "problems": (problems + messages)[:50]}
    atomic.write_json(pairs_dir / "label.json", stats)
    log.info("label: %d pairs, %d segments each, tie fraction %.3f, %d failed comparisons, %d pairs skipped",
             stats["pairs"], stats["segments"], stats["tie_fraction"] or 0.0, failed, len(problems))
    return stats
