"""``vidpo label``: per-segment labels of a pairs directory, resumable batch by batch; ``vidpo judge-eval``.

The labelling loop is a producer and a consumer: a reader thread reads (and converts) the frames of the next
batches into a bounded queue while the labeller works on the current one, so a VLM's requests are in flight
while frames are read. Labelled pairs are appended to ``labels.partial.jsonl`` batch by batch, so a rerun
(after a kill, or a VLM server outage) labels only what is left; the VLM's replies are also kept one by one in
``vlm_answers.jsonl`` (``vidpo.labeling.answer_cache``), so even a batch cut short asks nothing twice.
``manifest.jsonl`` (the pairs with their labels, and the VLM's raw answers of both orders as ``vlm_answers``)
is written at the end and ``label.json`` records the label statistics and the throughput (comparisons per
second, request latency p50 / p95, requests in flight). The labeller is chosen by ``label.labeler``
(``vidpo.labeling``: oracle | human | vlm | critic).

``judge_eval_pairs`` labels the pairs that people labelled with the recipe's labeller (or takes the labels
already in the manifest) and measures the agreement (``vidpo.evaluation.judge_eval``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from vidpo.config import RunConfig, resolve_path
from vidpo.data.domains import Domain
from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE, ShardReader, read_manifest, validate_records, write_manifest
from vidpo.data.video_io import PairFrames
from vidpo.evaluation.judge_eval import judge_agreement, markdown_report
from vidpo.labeling import HumanLabelFile, Labeler, LabelingError, PairBatch, VLMLabeler, build_labeler
from vidpo.labeling.answer_cache import ANSWERS_FILE, AnswerCache
from vidpo.training.modeling import build_domain, run_segment_ids
from vidpo.utils import atomic
from vidpo.utils.seeding import derive_seed

log = logging.getLogger("vidpo")

PARTIAL_FILE = "labels.partial.jsonl"
SUMMARY_FILE = "label.json"
PREFETCH_BATCHES = 2
"""Batches of frames the reader thread keeps ready ahead of the labeller."""


def build_run_labeler(cfg: RunConfig, world, pairs_dir: Optional[str | Path] = None) -> Labeler:
    """The recipe's labeller; a VLM keeps its replies in ``pairs_dir/vlm_answers.jsonl`` (``cache_answers``)."""
    kind = cfg.label.labeler
    if kind == "oracle":
        return build_labeler("oracle", world=world, tie_margin=cfg.label.tie_margin, mode=cfg.label.granularity)
    if kind == "human":
        return build_labeler("human", path=str(resolve_path(cfg.label.human_file)), on_missing=cfg.label.on_error,
                             on_error=cfg.label.on_error)
    if kind == "vlm":
        vlm = dataclasses.replace(cfg.label.vlm, on_error=cfg.label.on_error)
        cache = AnswerCache(Path(pairs_dir) / ANSWERS_FILE) if pairs_dir is not None and vlm.cache_answers else None
        return build_labeler("vlm", config=vlm, cache=cache)
    return build_labeler(kind, cfg=cfg, world=world)


def _cond_ids(records) -> Optional[torch.Tensor]:
    """The toy world's structured conditions of the records (what its oracle reads), or None for prompt sets."""
    if any(not r.cond_ids for r in records):
        return None
    return torch.tensor([r.cond_ids for r in records], dtype=torch.long)


# ----- the producer: frames read ahead on a thread ------------------------------------------------------
_END = object()


class BatchReader:
    """Builds the ``PairBatch`` of each ``batch_size`` records on a thread, at most ``prefetch`` batches ahead of
    the consumer (a bounded queue). Iterating yields ``(records, batch)``; an error of the reader is raised in
    the consumer; ``close`` stops the thread. ``wait_s`` is the time the consumer waited for frames."""

    def __init__(self, records: list, batch_size: int, make_batch: Callable[[list], PairBatch],
                 prefetch: int = PREFETCH_BATCHES) -> None:
        self._records, self._batch_size, self._make_batch = records, batch_size, make_batch
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self.wait_s = 0.0
        self._thread = threading.Thread(target=self._produce, name="vidpo-label-reader", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for start in range(0, len(self._records), self._batch_size):
                recs = self._records[start:start + self._batch_size]
                if not self._put((recs, self._make_batch(recs))):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            start = time.perf_counter()
            item = self._queue.get()
            self.wait_s += time.perf_counter() - start
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ----- the consumer: labelling, resumable -----------------------------------------------------------------
@dataclass
class LabelRun:
    """What one pass of ``label_records`` gives."""

    rows: dict = field(default_factory=dict)
    """pair_id -> {"pair_id", "labels", "video_label"[, "orders"]} for every record (resumed ones included)."""

    failed: int = 0
    """Failed comparisons of this pass (counted ties)."""

    messages: list = field(default_factory=list)
    """One line per failure of this pass."""

    throughput: dict = field(default_factory=dict)
    """Comparisons per second of this pass and, for a VLM, its requests (``RequestStats.summary``)."""


def read_partial(path: Path) -> dict[str, dict]:
    """The rows of a partial labels file by pair id; a line torn by a kill is cut off (that pair is labelled
    again), so that the next append starts on a line of its own."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    for line in data[:end].decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            done[row["pair_id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a damaged line: that pair is labelled again
    return done


def label_records(labeler: Labeler, reader: PairFrames, records: list, segment_ids: torch.Tensor, fps: float, *,
                  batch_size: int = 64, partial_path: Optional[Path] = None, progress: bool = False,
                  prefetch: int = PREFETCH_BATCHES) -> LabelRun:
    """Label ``records`` batch by batch (frames read ahead by a ``BatchReader``); rows already in
    ``partial_path`` are kept, new ones appended to it. A VLM's rows carry the raw answers of both orders."""
    run = LabelRun(rows=read_partial(partial_path) if partial_path is not None else {})
    todo = [r for r in records if r.pair_id not in run.rows]
    is_vlm = isinstance(labeler, VLMLabeler)
    if is_vlm:
        labeler.stats.reset()

    def make_batch(recs) -> PairBatch:
        return PairBatch(first=torch.stack([reader.get(r, "first") for r in recs]).float(),
                         second=torch.stack([reader.get(r, "second") for r in recs]).float(),
                         captions=[r.caption for r in recs], pair_ids=[r.pair_id for r in recs],
                         segment_ids=segment_ids, cond_ids=_cond_ids(recs), fps=fps)

    start = time.perf_counter()
    batches = BatchReader(todo, batch_size, make_batch, prefetch)
    handle = open(partial_path, "a") if partial_path is not None else None
    try:
        for recs, batch in tqdm(batches, total=math.ceil(len(todo) / batch_size), desc="label", disable=not progress,
                                leave=False):
            result, orders = labeler.label_with_orders(batch) if is_vlm else (labeler.label(batch), None)
            run.failed += result.failed
            run.messages += result.messages
            lines = []
            for i, r in enumerate(recs):
                row = {"pair_id": r.pair_id, "labels": [int(v) for v in result.labels[i]],
                       "video_label": int(result.video_labels[i])}
                if orders is not None:
                    row["orders"] = orders[i]
                run.rows[r.pair_id] = row
                lines.append(json.dumps(row) + "\n")
            if handle is not None:
                handle.write("".join(lines))
                handle.flush()
    finally:
        batches.close()
        if handle is not None:
            handle.close()
    wall = time.perf_counter() - start
    comparisons = len(todo) * (int(segment_ids.max()) + 1)
    run.throughput = {"pairs": len(todo), "comparisons": comparisons, "wall_s": round(wall, 6),
                      "comparisons_per_s": comparisons / wall if wall > 0 and comparisons else None,
                      "waited_for_frames_s": round(batches.wait_s, 6)}
    if is_vlm:
        run.throughput.update(labeler.stats.summary(wall), concurrency=labeler.config.concurrency)
    return run


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
    domain = domain if domain is not None else build_domain(cfg)
    labeler = build_run_labeler(cfg, getattr(domain, "world", None), pairs_dir)
    seg = run_segment_ids(cfg, domain, pixels=True)
    partial_path = pairs_dir / PARTIAL_FILE
    run = label_records(labeler, PairFrames(pairs_dir), records, seg, domain.fps, batch_size=batch_size,
                        partial_path=partial_path, progress=cfg.train.progress)
    labelled = []
    for r in records:
        row = run.rows[r.pair_id]
        r.labels, r.video_label = row["labels"], row["video_label"]
        r.segment_seconds, r.label_source = cfg.label.segment_seconds, cfg.label.labeler
        if "orders" in row:
            r.extra["vlm_answers"] = row["orders"]
        labelled.append(r)
    write_manifest(pairs_dir / MANIFEST_FILE, labelled)
    partial_path.unlink(missing_ok=True)
    all_labels = torch.tensor([r.labels for r in labelled]) if labelled else torch.zeros(0, 1)
    stats = {"pairs": len(labelled), "segments": int(seg.max()) + 1, "labeler": cfg.label.labeler,
             "tie_fraction": float((all_labels == 0).double().mean()) if labelled else None,
             "first_better_fraction": float((all_labels > 0).double().mean()) if labelled else None,
             "failed_comparisons": run.failed, "skipped_pairs": len(problems), "throughput": run.throughput,
             "problems": (problems + run.messages)[:50]}
    atomic.write_json(pairs_dir / SUMMARY_FILE, stats)
    rate = run.throughput.get("comparisons_per_s")
    log.info("label: %d pairs, %d segments each, tie fraction %.3f, %d failed comparisons, %d pairs skipped%s",
             stats["pairs"], stats["segments"], stats["tie_fraction"] or 0.0, run.failed, len(problems),
             f", {rate:.2f} comparisons/s" if rate else "")
    return stats


# ----- vidpo judge-eval -------------------------------------------------------------------------------------
JUDGE_LABELS_FILE = "judge_labels.jsonl"
JUDGE_REPORT_JSON = "judge_eval.json"
JUDGE_REPORT_MD = "judge_eval.md"


def _human_labels(path: Path, records: list, num_segments: int) -> tuple[list, torch.Tensor, dict]:
    """The records people labelled, their labels (N, S), and what did not match (pairs of the directory without
    a label, labelled pairs not in it). A bad line of the file is one LabelingError naming ``file:line``."""
    labels_file = HumanLabelFile(path)
    if labels_file.errors():
        raise LabelingError(labels_file.errors()[0])
    kept, rows, missing = [], [], []
    for r in records:
        human = labels_file.records.get(r.pair_id)
        if human is None:
            missing.append(r.pair_id)
            continue
        try:
            rows.append(human.segment_labels(num_segments, f"{path}:{human.line}"))
        except ValueError as err:
            raise LabelingError(str(err)) from None
        kept.append(r)
    if not kept:
        raise LabelingError(f"{path}: labels none of the {len(records)} usable pairs of the pairs directory "
                            f"(labels of another pairs directory?)")
    unknown = sorted(set(labels_file.records) - {r.pair_id for r in records})
    unmatched = {"pairs_without_human_labels": len(missing), "human_labels_without_pairs": len(unknown),
                 "human_labels_without_pairs_first": unknown[:5]}
    return kept, torch.tensor(rows, dtype=torch.int64).reshape(len(kept), num_segments), unmatched


def judge_eval_pairs(cfg: RunConfig, pairs_dir: str | Path, human_file: str | Path, out: str | Path, *,
                     from_manifest: bool = False, resamples: int = 2000, batch_size: int = 64,
                     domain: Optional[Domain] = None) -> dict:
    """Agreement of the recipe's labeller (``label.labeler``, usually the VLM) with the human labels file
    ``human_file`` on the pairs of ``pairs_dir`` that people labelled; writes ``out/judge_eval.json``,
    ``out/judge_eval.md`` and the judge's labels ``out/judge_labels.jsonl``. ``from_manifest``: the judge's
    labels are those already in ``pairs_dir/manifest.jsonl`` (with the VLM's recorded answers), nothing is
    labelled. Resumable: the judge's labels go through ``out/labels.partial.jsonl`` and a VLM's replies through
    the pairs directory's answer cache."""
    pairs_dir, human_file, out = Path(pairs_dir), Path(human_file), Path(out)
    domain = domain if domain is not None else build_domain(cfg)
    seg = run_segment_ids(cfg, domain, pixels=True)
    num_segments = int(seg.max()) + 1
    source = pairs_dir / (MANIFEST_FILE if from_manifest else PAIRS_FILE)
    records, problems = read_manifest(source, need_labels=from_manifest, on_error=cfg.pref.on_bad_pair,
                                      num_segments=num_segments if from_manifest else None)
    if not from_manifest:
        records, shard_problems = validate_records(records, ShardReader(pairs_dir), cfg.pref.on_bad_pair)
        problems += shard_problems
    records, human, unmatched = _human_labels(human_file, records, num_segments)
    meta = {"pairs_dir": str(pairs_dir), "human_file": str(human_file), **unmatched, "skipped_pairs": len(problems),
            "failed_comparisons": 0}
    if from_manifest:
        judge = torch.tensor([r.labels for r in records], dtype=torch.int64)
        orders = [r.extra.get("vlm_answers") for r in records]
        orders = orders if all(o is not None for o in orders) else None
        meta["judge"] = "+".join(sorted({r.label_source or "?" for r in records}))
    else:
        labeler = build_run_labeler(cfg, getattr(domain, "world", None), pairs_dir)
        out.mkdir(parents=True, exist_ok=True)
        partial = out / PARTIAL_FILE
        run = label_records(labeler, PairFrames(pairs_dir), records, seg, domain.fps, batch_size=batch_size,
                            partial_path=partial, progress=cfg.train.progress)
        rows = [run.rows[r.pair_id] for r in records]
        atomic.write_text(out / JUDGE_LABELS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
        partial.unlink(missing_ok=True)
        judge = torch.tensor([row["labels"] for row in rows], dtype=torch.int64)
        orders = [row["orders"] for row in rows] if all("orders" in row for row in rows) else None
        meta.update(judge=cfg.label.labeler, failed_comparisons=run.failed, throughput=run.throughput,
                    problems=run.messages[:20])
        if cfg.label.labeler == "vlm":
            meta["model"] = cfg.label.vlm.model
    report = judge_agreement(judge, human, orders, resamples=resamples,
                             seed=derive_seed(cfg.seed, "judge-eval", "bootstrap"))
    report = {"judge": meta.pop("judge"), **report, **meta}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / JUDGE_REPORT_JSON, report)
    atomic.write_text(out / JUDGE_REPORT_MD, markdown_report(report))
    return report
