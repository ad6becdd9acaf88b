"""``vidpo label``: per-segment labels of a pairs directory, resumable batch by batch; ``vidpo judge-eval``.

The labelling loop is a producer and a consumer: a reader thread reads (and converts) the frames of the next
batches into a bounded queue while the labeller works on the current one, so a VLM's requests are in flight
while frames are read. Labelled pairs are appended to ``labels.partial.jsonl`` batch by batch, so a rerun
(after a kill, or a VLM server outage) labels only what is left; the VLM's replies are also kept one by one in
``vlm_answers.jsonl`` (``vidpo.labeling.answer_cache``), so even a batch cut short asks nothing twice.
``manifest.jsonl`` (the pairs with their labels, the status of each label as ``label_status``, and the VLM's raw
answers of both orders as ``vlm_answers``) is written at the end and ``label.json`` records the label statistics
and the throughput (comparisons per second, request latency p50 / p95, requests in flight). The labeller is
chosen by ``label.labeler`` (``vidpo.labeling``: oracle | human | vlm | critic).

**Failed comparisons** (status ``failed``: no reply, an HTTP error, a missing human label) are not ties. Their
pairs' rows in ``labels.partial.jsonl`` say so, and a rerun asks exactly those (segment by segment: what was
judged before is kept; a VLM's answer cache makes its questions free). Each row counts the failed comparisons
of its pair over every attempt (``failures``), killed attempts included, so ``label.json`` reports
``failed_comparisons_total`` next to what is still failed (``failed_comparisons``). While a comparison is still
failed, ``labels.partial.jsonl`` stays for the next run; when more than ``label.max_failed_fraction`` of them
are failed at the end, the run ends with an error and writes no ``manifest.jsonl``.

**Under torchrun** every rank labels a share of the pairs: the pairs still to label are cut into the batches one
process would make, and batch i goes to rank i mod world size, so each batch, and so each label (a critic's
floating point too), is the one process's. Any rank reads any pair from the shared folder, whichever rank generated
it, so every comparison stays within its pair's prompt. Each rank appends to files of its own
(``labels.partial.r{rank}.jsonl``, ``vlm_answers.r{rank}.jsonl``: concurrent appends to one file are not atomic
on network filesystems) and reads every rank's, so a rerun with another number of ranks resumes the same way.
Rank 0 merges them into ``manifest.jsonl`` and ``label.json``; a VLM's ``concurrency`` is shared out over the
ranks, so the server sees as many requests in flight as with one process.

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
import torch.distributed as dist
from tqdm import tqdm

from vidpo.config import RunConfig, resolve_path
from vidpo.data.domains import Domain
from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE, ShardReader, read_manifest, validate_records, write_manifest
from vidpo.data.video_io import PairFrames
from vidpo.evaluation.judge_eval import judge_agreement, markdown_report
from vidpo.labeling import (
    STATUS_FAILED,
    HumanLabelFile,
    Labeler,
    LabelingError,
    LabelResult,
    PairBatch,
    VLMLabeler,
    build_labeler,
    majority_vote,
    status_counts,
)
from vidpo.labeling.answer_cache import AnswerCache, answer_files, answers_file
from vidpo.training.modeling import build_domain, run_segment_ids
from vidpo.utils import atomic, preemption
from vidpo.utils.provenance import digest, record_or_check
from vidpo.utils.seeding import derive_seed

log = logging.getLogger("vidpo")

PARTIAL_FILE = "labels.partial.jsonl"
SUMMARY_FILE = "label.json"
SETTINGS_FILE = "label_settings.json"
# VLM settings that change how a question travels, not what it asks or how its answer is read.
_VLM_TRANSPORT = ("base_url", "api_key_env", "timeout_s", "max_retries", "retry_backoff_s", "concurrency",
                  "cache_answers", "on_error")
PREFETCH_BATCHES = 2
"""Batches of frames the reader thread keeps ready ahead of the labeller."""


def partial_file(rank: int = 0, world_size: int = 1) -> str:
    """The partial labels file one process appends to (``PARTIAL_FILE`` alone, one per rank under torchrun)."""
    return PARTIAL_FILE if world_size <= 1 else f"labels.partial.r{rank}.jsonl"


def partial_files(pairs_dir: Path) -> list[Path]:
    """Every partial labels file of ``pairs_dir``: the one-process file and each rank's, whatever the ranks."""
    stem = "labels.partial.r"
    return sorted(p for p in pairs_dir.glob("labels.partial*.jsonl") if p.name == PARTIAL_FILE
                  or (p.name.startswith(stem) and p.name[len(stem):-len(".jsonl")].isdigit()))


def read_partials(pairs_dir: Path, own: Optional[Path] = None) -> dict[str, dict]:
    """The rows of every partial file of ``pairs_dir`` by pair id. Where files disagree on a pair (a retry by a run
    with another number of ranks), the row with fewer failed comparisons wins, then the one with more attempts
    counted: a retry keeps what was judged before, so it is never worse. Only ``own`` (the file this process
    appends to) has a torn last line cut off; another rank may be appending to its own file."""
    rows: dict[str, dict] = {}
    for path in partial_files(pairs_dir):
        for pair_id, row in read_partial(path, repair=path == own).items():
            old = rows.get(pair_id)
            if old is None or (old["status"].count(STATUS_FAILED), -old["failures"]) > \
                    (row["status"].count(STATUS_FAILED), -row["failures"]):
                rows[pair_id] = row
    return rows


def build_run_labeler(cfg: RunConfig, world, pairs_dir: Optional[str | Path] = None, *, rank: int = 0,
                      world_size: int = 1) -> Labeler:
    """The recipe's labeller; a VLM keeps its replies in ``pairs_dir/vlm_answers.jsonl`` (``cache_answers``; one
    file per rank under torchrun, each reading all) and, under torchrun, asks ``concurrency / world_size`` at a
    time per rank (at least one)."""
    kind = cfg.label.labeler
    if kind == "oracle":
        return build_labeler("oracle", world=world, tie_margin=cfg.label.tie_margin, mode=cfg.label.granularity)
    if kind == "human":
        return build_labeler("human", path=str(resolve_path(cfg.label.human_file)), on_missing=cfg.label.on_error,
                             on_error=cfg.label.on_error)
    if kind == "vlm":
        vlm = dataclasses.replace(cfg.label.vlm, on_error=cfg.label.on_error,
                                  concurrency=max(1, math.ceil(cfg.label.vlm.concurrency / world_size)))
        cache = None
        if pairs_dir is not None and vlm.cache_answers:
            cache = AnswerCache(Path(pairs_dir) / answers_file(rank, world_size), read_also=answer_files(pairs_dir))
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
    """pair_id -> {"pair_id", "labels", "video_label", "status", "failures"[, "orders"][, "messages"]} for every
    record (resumed ones included): ``status`` per segment, ``failures`` the pair's failed comparisons over
    every attempt, ``messages`` the lines about its failed or unparseable segments."""

    failed: int = 0
    """Comparisons of this pass that failed (status ``failed``)."""

    retried: int = 0
    """Comparisons that had failed in an earlier attempt and were asked again by this pass."""

    messages: list = field(default_factory=list)
    """One line per failed or unparseable comparison of this pass."""

    throughput: dict = field(default_factory=dict)
    """Comparisons per second of this pass and, for a VLM, its requests (``RequestStats.summary``)."""

    def counts(self) -> dict:
        """Comparisons by status over every row (``ok``, ``tie``, ``unparseable``, ``failed``)."""
        return status_counts([row["status"] for row in self.rows.values()])

    def failures_total(self) -> int:
        """Failed comparisons over every attempt, counted per pair in its rows."""
        return sum(row["failures"] for row in self.rows.values())

    def first_failure(self, order: list[str]) -> Optional[str]:
        """The first message about a still-failed comparison, in the pair order ``order``."""
        for pair_id in order:
            row = self.rows.get(pair_id)
            if row is not None and STATUS_FAILED in row["status"]:
                messages = row.get("messages", [])
                return next((m for m in messages if "fail" in m), messages[0] if messages else None)
        return None


def _with_status(row: dict) -> dict:
    """A partial row with ``status`` and ``failures`` (rows written before statuses were all judged)."""
    if "status" not in row:
        row["status"] = ["ok" if v else "tie" for v in row["labels"]]
    row.setdefault("failures", 0)
    return row


def read_partial(path: Path, repair: bool = True) -> dict[str, dict]:
    """The rows of a partial labels file by pair id (a later row of a pair wins: a retry); a line torn by a kill
    is skipped (that pair is labelled again) and, with ``repair``, cut off, so that the next append starts on a
    line of its own."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as handle:
            handle.truncate(end)
    for line in data[:end].decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
            done[row["pair_id"]] = _with_status(row)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue  # a damaged line: that pair is labelled again
    return done


def _merged_row(pair_id: str, result: LabelResult, i: int, status: list[str], messages: list[str],
                orders: Optional[list], before: Optional[dict]) -> tuple[dict, int]:
    """The row of pair ``i`` of ``result``; a retried pair keeps every segment judged before (``before``) and
    takes the new result only where it had failed. Returns the row and its newly failed comparisons."""
    labels = [int(v) for v in result.labels[i]]
    status = list(status)
    own = [m for m in messages if repr(pair_id) in m]
    if before is not None:
        for s, old in enumerate(before["status"]):
            if old != STATUS_FAILED:
                labels[s], status[s] = before["labels"][s], old
                if orders is not None and before.get("orders") is not None:
                    orders[s] = before["orders"][s]
        kept = [m for m in before.get("messages", []) if "fail" not in m]
        own = kept + [m for m in own if m not in kept]
    failed_now = sum(v == STATUS_FAILED for v in status)
    row = {"pair_id": pair_id, "labels": labels, "video_label": int(majority_vote(torch.tensor([labels]))[0]),
           "status": status, "failures": (before["failures"] if before is not None else 0) + failed_now}
    if orders is not None:
        row["orders"] = orders
    if own:
        row["messages"] = own
    return row, failed_now


def label_records(labeler: Labeler, reader: PairFrames, records: list, segment_ids: torch.Tensor, fps: float, *,
                  batch_size: int = 64, partial_path: Optional[Path] = None, progress: bool = False,
                  prefetch: int = PREFETCH_BATCHES, done: Optional[dict] = None, rank: int = 0,
                  world_size: int = 1) -> LabelRun:
    """Label ``records`` batch by batch (frames read ahead by a ``BatchReader``); rows already labelled (``done``,
    default: those of ``partial_path``) are kept (their failed comparisons are asked again), new ones appended to
    ``partial_path``. A VLM's rows carry the raw answers of both orders. With ``world_size`` > 1 this process takes
    batches ``rank``, ``rank + world_size``, ... of the ones a single process would make (``done`` must then be
    the same on every rank: ``read_partials`` before a barrier)."""
    run = LabelRun(rows=dict(done) if done is not None else
                   (read_partial(partial_path) if partial_path is not None else {}))
    todo = [r for r in records if r.pair_id not in run.rows or STATUS_FAILED in run.rows[r.pair_id]["status"]]
    idle_rounds = 0   # rounds of batches the other ranks label after this one's last
    if world_size > 1:
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        idle_rounds = math.ceil(len(batches) / world_size) - len(batches[rank::world_size])
        todo = [r for batch in batches[rank::world_size] for r in batch]

    def stop_agreed() -> bool:
        """A stop signal to any rank stops every rank after the same round of batches: one collective per round
        (a rank whose batches ran out joins the remaining rounds' calls), so no rank waits at the final barrier
        for a rank that stopped."""
        return preemption.agreed() if world_size > 1 else preemption.requested()
    run.retried = sum(run.rows[r.pair_id]["status"].count(STATUS_FAILED) for r in todo if r.pair_id in run.rows)
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
            statuses = result.statuses()
            if result.status is None and result.failed:
                raise LabelingError(f"labeller {labeler.name!r} reported {result.failed} failed comparisons "
                                    "without saying which (LabelResult.status)")
            run.messages += result.messages
            lines = []
            for i, r in enumerate(recs):
                row, failed = _merged_row(r.pair_id, result, i, statuses[i], result.messages,
                                          orders[i] if orders is not None else None, run.rows.get(r.pair_id))
                run.failed += failed
                run.rows[r.pair_id] = row
                lines.append(json.dumps(row) + "\n")
            if handle is not None:
                handle.write("".join(lines))
                handle.flush()
            if stop_agreed():   # a stop signal: this batch is on disk (or in run.rows), stop here
                raise preemption.Preempted(f"label stopped after {len(run.rows)} of {len(records)} pairs")
        for _ in range(idle_rounds):   # this rank's batches are done: it only joins the others' agreements
            if stop_agreed():
                raise preemption.Preempted(f"label stopped after {len(run.rows)} of {len(records)} pairs")
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


def _failures_of_finished_runs(pairs_dir: Path) -> int:
    """Failed comparisons of the earlier runs whose partial file is gone (they ended with none failed): their
    ``label.json`` total. While a partial file exists, its rows carry the counts instead."""
    if partial_files(pairs_dir) or not (pairs_dir / SUMMARY_FILE).exists():
        return 0
    try:
        return int(json.loads((pairs_dir / SUMMARY_FILE).read_text()).get("failed_comparisons_total", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0   # an unreadable old summary: it is rewritten below


def label_settings(cfg: RunConfig) -> dict:
    """What decides a pairs folder's labels (recorded in ``label_settings.json``): the labeller, its segments and
    tie rules, and the settings of the labeller in use (the VLM's question and answer form, not its transport;
    the critic's checkpoint and rules; the human labels file)."""
    label = cfg.label
    settings = {"labeler": label.labeler, "segment_seconds": label.segment_seconds,
                "temporal_compression": label.temporal_compression, "tie_margin": label.tie_margin,
                "granularity": label.granularity}
    if label.labeler == "vlm" and label.vlm is not None:
        vlm = {k: v for k, v in dataclasses.asdict(label.vlm).items() if k not in _VLM_TRANSPORT}
        settings.update(vlm_model=label.vlm.model, vlm=digest(vlm))
    elif label.labeler == "critic":
        settings.update(critic_checkpoint=cfg.critic.checkpoint, critic=digest(
            {k: getattr(cfg.critic, k) for k in ("tie_margin", "min_confidence", "granularity")}))
    elif label.labeler == "human":
        settings["human_file"] = label.human_file
    return settings


def check_label_settings(cfg: RunConfig, pairs_dir: str | Path) -> None:
    """Refuse (``SettingsMismatch`` naming the keys) labels of ``pairs_dir`` made with other label settings: what a
    resumed run would otherwise keep. A folder labelled before settings were recorded passes."""
    path = Path(pairs_dir) / SETTINGS_FILE
    if path.exists():
        record_or_check(path, label_settings(cfg), what="labels",
                        remedy="label again from scratch (`vidpo label --overwrite`, or `vidpo run --overwrite`)")


def _merge_ranks(run: LabelRun, pairs_dir: Path, world_size: int) -> LabelRun:
    """Rank 0's view of a labelling done by ``world_size`` ranks: every rank's rows (from their partial files,
    on disk once every rank is past the barrier) and the pass's counts, messages and throughput summed over
    the ranks (wall time: the slowest rank's). Collective: every rank calls it; the others get their own run."""
    mine = {"failed": run.failed, "retried": run.retried, "messages": run.messages, "throughput": run.throughput}
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() != 0:   # only rank 0 reads the partial files: it deletes them once the manifest is written
        return run
    merged = LabelRun(rows=read_partials(pairs_dir), failed=sum(g["failed"] for g in gathered),
                      retried=sum(g["retried"] for g in gathered),
                      messages=[m for g in gathered for m in g["messages"]])
    parts = [g["throughput"] for g in gathered]
    pairs, comparisons = sum(t["pairs"] for t in parts), sum(t["comparisons"] for t in parts)
    wall = max(t["wall_s"] for t in parts)
    merged.throughput = {"pairs": pairs, "comparisons": comparisons, "wall_s": wall,
                         "comparisons_per_s": comparisons / wall if wall > 0 and comparisons else None,
                         "waited_for_frames_s": max(t["waited_for_frames_s"] for t in parts),
                         "ranks": world_size, "per_rank": parts}
    return merged


def label_pairs(cfg: RunConfig, pairs_dir: str | Path, *, batch_size: Optional[int] = None,
                domain: Optional[Domain] = None, overwrite: bool = False, rank: int = 0,
                world_size: int = 1) -> Optional[dict]:
    """Label every pair of ``pairs_dir/pairs.jsonl`` per segment; write ``manifest.jsonl``. The labeller sees
    pixels: the decoded frames of a latent model's pairs (``vidpo.stages.decode``), the pairs themselves for a
    pixel-space one; its segments are ``label.segment_seconds`` of the domain's videos (default: the shapes
    world's). A partial labelling of ``pairs_dir`` is resumed only if it was made with the same label settings
    (``label_settings``; ``overwrite`` discards it). More than ``label.max_failed_fraction`` of the comparisons
    failed: a ``LabelingError`` after ``label.json`` is written (no manifest; a rerun asks the failed ones again).

    Under torchrun (``world_size`` > 1, the process group up) every rank calls it and labels its share of the
    batches (module docstring); rank 0 writes the manifest and ``label.json`` and returns the statistics, the
    other ranks return None."""
    pairs_dir = Path(pairs_dir)
    ranked = world_size > 1
    batch_size = batch_size or cfg.label.batch_size

    def barrier() -> None:
        if ranked:
            dist.barrier()

    records, problems = read_manifest(pairs_dir / PAIRS_FILE, need_labels=False, on_error=cfg.pref.on_bad_pair)
    records, shard_problems = validate_records(records, ShardReader(pairs_dir), cfg.pref.on_bad_pair)
    problems += shard_problems
    domain = domain if domain is not None else build_domain(cfg)
    seg = run_segment_ids(cfg, domain, pixels=True)
    if overwrite and rank == 0:
        for path in partial_files(pairs_dir):
            path.unlink(missing_ok=True)
    barrier()
    if partial_files(pairs_dir):   # a resumed labelling keeps what the partial files hold: only if made the same way
        check_label_settings(cfg, pairs_dir)
    earlier = _failures_of_finished_runs(pairs_dir)
    partial_path = pairs_dir / partial_file(rank, world_size)
    done = read_partials(pairs_dir, own=partial_path)
    labeler = build_run_labeler(cfg, getattr(domain, "world", None), pairs_dir, rank=rank, world_size=world_size)
    barrier()   # every rank has read the same rows (and answers) before any appends: they agree on what is left
    if rank == 0:
        atomic.write_json(pairs_dir / SETTINGS_FILE, label_settings(cfg))
    run = label_records(labeler, PairFrames(pairs_dir), records, seg, domain.fps, batch_size=batch_size,
                        partial_path=partial_path, progress=cfg.train.progress and rank == 0, done=done, rank=rank,
                        world_size=world_size)
    if ranked:
        barrier()   # every rank's rows are on disk
        run = _merge_ranks(run, pairs_dir, world_size)
        if rank != 0:
            barrier()   # until rank 0 has written the manifest (or refused the labels)
            return None
    try:
        return _finish_labels(cfg, pairs_dir, records, problems, seg, run, earlier)
    finally:
        barrier()


def _finish_labels(cfg: RunConfig, pairs_dir: Path, records: list, problems: list, seg: torch.Tensor, run: LabelRun,
                   earlier: int) -> dict:
    """``manifest.jsonl`` and ``label.json`` from the rows of ``run`` (or the error of too many failed)."""
    counts = run.counts() if records else status_counts([])
    comparisons = len(records) * (int(seg.max()) + 1)
    failed_now = counts[STATUS_FAILED]
    all_labels = torch.tensor([run.rows[r.pair_id]["labels"] for r in records]) if records else torch.zeros(0, 1)
    stats = {"pairs": len(records), "segments": int(seg.max()) + 1, "labeler": cfg.label.labeler,
             "tie_fraction": float((all_labels == 0).double().mean()) if records else None,
             "first_better_fraction": float((all_labels > 0).double().mean()) if records else None,
             "comparisons": comparisons, "status_counts": counts,
             "failed_comparisons": failed_now,
             "failed_fraction": failed_now / comparisons if comparisons else 0.0,
             "failed_comparisons_total": earlier + run.failures_total(),
             "failed_this_run": run.failed, "retried_comparisons": run.retried,
             "unparseable_comparisons": counts["unparseable"],
             "skipped_pairs": len(problems), "throughput": run.throughput,
             "problems": (problems + run.messages)[:50]}
    limit = cfg.label.max_failed_fraction
    if comparisons and failed_now > limit * comparisons:
        first = run.first_failure([r.pair_id for r in records]) or "(no message)"
        error = (f"{pairs_dir}: {failed_now} of {comparisons} comparisons failed ({failed_now / comparisons:.0%}, "
                 f"more than label.max_failed_fraction = {limit:g}); first: {first}. The labels made are kept in "
                 f"{PARTIAL_FILE} (one file per rank under torchrun): rerun `vidpo label` to ask only the failed ones "
                 "again")
        stats["error"] = error
        atomic.write_json(pairs_dir / SUMMARY_FILE, stats)
        raise LabelingError(error)
    labelled = []
    for r in records:
        row = run.rows[r.pair_id]
        r.labels, r.video_label, r.label_status = row["labels"], row["video_label"], row["status"]
        r.segment_seconds, r.label_source = cfg.label.segment_seconds, cfg.label.labeler
        if "orders" in row:
            r.extra["vlm_answers"] = row["orders"]
        labelled.append(r)
    write_manifest(pairs_dir / MANIFEST_FILE, labelled)
    if not failed_now:   # while a comparison is failed, the partial files are what the next run retries
        for path in partial_files(pairs_dir):
            path.unlink(missing_ok=True)
    atomic.write_json(pairs_dir / SUMMARY_FILE, stats)
    rate = run.throughput.get("comparisons_per_s")
    log.info("label: %d pairs, %d segments each, tie fraction %.3f, %d unparseable answers (ties), %d failed "
             "comparisons (%d over all attempts), %d pairs skipped%s", stats["pairs"], stats["segments"],
             stats["tie_fraction"] or 0.0, counts["unparseable"], failed_now, stats["failed_comparisons_total"],
             len(problems), f", {rate:.2f} comparisons/s" if rate else "")
    if failed_now:
        log.warning("label: %d comparisons failed (first: %s); they are not ties: training masks them, and a "
                    "rerun of `vidpo label` asks them again", failed_now,
                    run.first_failure([r.pair_id for r in records]))
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
        failed = [bool(r.failed_segments()) for r in records]
        meta["judge"] = "+".join(sorted({r.label_source or "?" for r in records}))
        meta["failed_comparisons"] = sum(r.failed_segments() for r in records)
    else:
        labeler = build_run_labeler(cfg, getattr(domain, "world", None), pairs_dir)
        out.mkdir(parents=True, exist_ok=True)
        partial = out / PARTIAL_FILE
        run = label_records(labeler, PairFrames(pairs_dir), records, seg, domain.fps, batch_size=batch_size,
                            partial_path=partial, progress=cfg.train.progress)
        rows = [run.rows[r.pair_id] for r in records]
        atomic.write_text(out / JUDGE_LABELS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
        failed = [STATUS_FAILED in row["status"] for row in rows]
        if not any(failed):   # else the partial file is what a rerun asks again
            partial.unlink(missing_ok=True)
        judge = torch.tensor([row["labels"] for row in rows], dtype=torch.int64)
        orders = [row["orders"] for row in rows] if all("orders" in row for row in rows) else None
        meta.update(judge=cfg.label.labeler, failed_comparisons=run.counts()[STATUS_FAILED],
                    failed_comparisons_total=run.failures_total(), throughput=run.throughput,
                    problems=run.messages[:20])
        if cfg.label.labeler == "vlm":
            meta["model"] = cfg.label.vlm.model
    # A failed comparison is no judgement: its pairs are left out of the agreement (not counted as judge ties).
    meta["pairs_with_failed_comparisons"] = sum(failed)
    if any(failed):
        keep = [i for i, f in enumerate(failed) if not f]
        if not keep:
            raise LabelingError(f"{pairs_dir}: every pair people labelled has a failed comparison of the judge "
                                f"({meta['failed_comparisons']} failed); rerun to ask them again")
        judge, human = judge[keep], human[keep]
        orders = [orders[i] for i in keep] if orders is not None else None
    report = judge_agreement(judge, human, orders, resamples=resamples,
                             seed=derive_seed(cfg.seed, "judge-eval", "bootstrap"))
    report = {"judge": meta.pop("judge"), **report, **meta}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / JUDGE_REPORT_JSON, report)
    atomic.write_text(out / JUDGE_REPORT_MD, markdown_report(report))
    return report
