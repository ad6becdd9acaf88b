"""A labelling page for people: ``pairs/index.html`` shows each pair's two videos and collects per-segment choices.

``write_pair_viewer(pairs_dir, records, segment_seconds, fps)`` writes one self-contained page (inline CSS and
JavaScript, no network) beside the decoded videos of a pairs directory (``vidpo.stages.decode.decode_pairs``
writes them). Per pair: the two videos side by side (A = ``first``, B = ``second``; HTML5 ``<video>`` with
controls, muted, looping, ``preload="none"`` so nothing loads before it is played), the caption (escaped), and a
bar under the videos with one cell per DenseDPO segment (its seconds, a button playing that stretch of both
videos, and an A / B / tie choice). Segments are those the labellers use (``vidpo.data.segments.segment_ids``
over the latent frames, mapped back onto pixel seconds), so the exported labels have the count ``vidpo label``
expects. Choices are pre-filled from the records' ``labels`` (when their count matches) and kept in the
browser's localStorage as they are made, so a reload loses nothing.

**Export.** "export labels" downloads ``labels.jsonl`` in the format ``label.labeler: human`` reads
(``vidpo.labeling.human``): one line per pair whose every segment is chosen, in page order,
``{"pair_id":"train-000003","labels":[1,-1,0]}`` (+1: A, the first video, is better; -1: B; 0: tie). Pairs with
some segments unchosen are left out and named in the status line; pairs with none are counted. The lines are
built by the pure function ``buildLabelsJsonl(pairs, choices)`` between the ``BEGIN buildLabelsJsonl`` / ``END
buildLabelsJsonl`` markers (``pairs``: ``[{id, segments}]``, ``choices``: per pair an array of 1 / -1 / 0 / null;
returns ``{text, exported, partial, unlabelled}``), which the tests run under Node.

**Many pairs.** Pairs are split into pages of ``page_size`` (all in one file, the others ``hidden``; the choices
of every page are exported together), and the pair list the exporter needs is embedded once as JSON
(``<script type="application/json" id="vidpo-data">``: ``pairs`` of ``{id, segments}``, ``pages``, ``key``).
"""
from __future__ import annotations

import hashlib
import html
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from vidpo.data.pairs import MANIFEST_FILE, PAIRS_FILE, PairDataError, PairRecord, read_manifest
from vidpo.data.segments import num_segments, segment_ids
from vidpo.data.video_io import frames_name, tensor_shapes, video_name
from vidpo.utils import atomic

log = logging.getLogger("vidpo")

VIEWER_FILE = "index.html"
KEYS = (("first", "A"), ("second", "B"))
CHOICES = ((1, "A"), (-1, "B"), (0, "tie"))


def segment_spans(latent_frames: int, fps: float, segment_seconds: float,
                  temporal_compression: int = 1) -> list[tuple[float, float]]:
    """``[(start_s, end_s)]`` per segment: the pixel seconds covered by each segment's latent frames (latent frame
    0 is pixel frame 0, latent frame j > 0 pixel frames ``k (j - 1) + 1 .. k j``)."""
    ids = segment_ids(latent_frames, fps, segment_seconds, temporal_compression)
    k, spans, ids_list = int(temporal_compression), [], ids.tolist()
    for s in range(num_segments(ids)):
        first, last = ids_list.index(s), len(ids_list) - 1 - ids_list[::-1].index(s)
        start = 0 if first == 0 else k * (first - 1) + 1
        spans.append((start / fps, (k * last + 1) / fps))
    return spans


def write_pair_viewer(pairs_dir: str | os.PathLike, records: Optional[Sequence[PairRecord]], segment_seconds: float,
                      fps: float, *, temporal_compression: Optional[int] = None, page_size: int = 25,
                      title: Optional[str] = None) -> Path:
    """Write ``pairs_dir/index.html`` for ``records`` (None: the directory's ``manifest.jsonl``, else its
    ``pairs.jsonl``) and return its path. Every record's two videos must exist (PairDataError otherwise).

    Latent frames and the temporal compression come from the record's frames shard; without one, from the latent
    shard and ``temporal_compression`` (default 1, a pixel-space model), which also overrides the frames'."""
    pairs_dir = Path(pairs_dir)
    if page_size < 1:
        raise ValueError(f"write_pair_viewer: page_size must be >= 1, got {page_size}")
    if records is None:
        path = pairs_dir / MANIFEST_FILE
        records, _ = read_manifest(path if path.exists() else pairs_dir / PAIRS_FILE, need_labels=False)
    missing = [name for r in records for name in (video_name(r.pair_id, key) for key, _ in KEYS)
               if not (pairs_dir / name).is_file()]
    if missing:
        raise PairDataError(f"{pairs_dir / missing[0]}: missing ({len(missing)} videos missing in all); write them "
                            "with vidpo.stages.decode.decode_pairs first")
    timing = _Timing(pairs_dir, fps, segment_seconds, temporal_compression)
    entries, sections = [], []
    for i, record in enumerate(records):
        spans = timing.spans(record)
        entries.append({"id": record.pair_id, "segments": len(spans)})
        sections.append(_pair_html(i, i // page_size, record, spans))
    pages = max(1, -(-len(records) // page_size))
    key = hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:16]
    data = json.dumps({"pairs": entries, "pages": pages, "key": key}).replace("</", "<\\/")
    title = title or f"vidpo pairs: {pairs_dir.resolve().name}"
    page = (_PAGE.replace("@@TITLE@@", html.escape(title))
            .replace("@@SUMMARY@@", html.escape(f"{len(records)} pairs, {pages} page(s) of {page_size}; "
                                                f"segments of {segment_seconds:g} s at {fps:g} fps"))
            .replace("@@DATA@@", data).replace("@@SECTIONS@@", "\n".join(sections)))
    out = pairs_dir / VIEWER_FILE
    atomic.write_text(out, page)
    log.info("pair viewer: %d pairs -> %s", len(records), out)
    return out


class _Timing:
    """Segment spans per record, from its shard's frame counts (cached per shard)."""

    def __init__(self, pairs_dir: Path, fps: float, segment_seconds: float, temporal_compression: Optional[int]):
        self.pairs_dir, self.fps, self.segment_seconds = pairs_dir, fps, segment_seconds
        self.temporal_compression = temporal_compression
        self._shards: dict[str, list[tuple[float, float]]] = {}

    def spans(self, record: PairRecord) -> list[tuple[float, float]]:
        if record.shard not in self._shards:
            frames = self.pairs_dir / frames_name(record.shard)
            if frames.is_file():
                _, metadata = tensor_shapes(frames)
                latent_frames = int(metadata["latent_frames"])
                k = self.temporal_compression or int(metadata["temporal_compression"])
            else:
                shapes, _ = tensor_shapes(self.pairs_dir / record.shard)
                latent_frames, k = shapes["first"][2], self.temporal_compression or 1
            self._shards[record.shard] = segment_spans(latent_frames, self.fps, self.segment_seconds, k)
        return self._shards[record.shard]


def _pair_html(i: int, page: int, record: PairRecord, spans: list[tuple[float, float]]) -> str:
    esc = html.escape
    labels = record.labels if record.labels is not None and len(record.labels) == len(spans) else None
    if record.labels is not None and labels is None:
        log.warning("pair viewer: pair %s has %d labels but %d segments; not pre-filled", record.pair_id,
                    len(record.labels), len(spans))
    videos = "".join(
        f'<figure><figcaption>{side} <small>({key})</small></figcaption>'
        f'<video src="{esc(video_name(record.pair_id, key))}" data-i="{i}" data-side="{side}" controls muted loop '
        f'playsinline preload="none"></video></figure>' for key, side in KEYS)
    total = spans[-1][1]
    cells = []
    for s, (start, end) in enumerate(spans):
        radios = "".join(
            f'<label><input type="radio" class="choice" name="p{i}s{s}" value="{value}" data-i="{i}" data-s="{s}"'
            f'{" checked" if labels is not None and labels[s] == value else ""}> {text}</label>'
            for value, text in CHOICES)
        cells.append(f'<div class="cell" data-s="{s}" data-start="{start:.4f}" data-end="{end:.4f}" '
                     f'style="flex-grow:{(end - start) / total:.4f}"><div class="seg">'
                     f'<button type="button" class="play" data-i="{i}" data-start="{start:.4f}" '
                     f'data-end="{end:.4f}" title="play this segment of both videos">&#9654;</button> '
                     f'{s + 1}: {start:.2f}&ndash;{end:.2f} s</div><div class="radios">{radios}</div></div>')
    meta = [f"mode {record.mode}"] + ([f"eta {record.eta:g}"] if record.eta is not None else []) + (
        [f"labels from {record.label_source}"] if labels is not None and record.label_source else [])
    return (f'<section class="pair" id="pair-{i}" data-i="{i}" data-page="{page}" data-pair="{esc(record.pair_id)}" '
            f'data-segments="{len(spans)}"{" hidden" if page else ""}>'
            f'<h2>#{i + 1} <code>{esc(record.pair_id)}</code> <small>{esc(", ".join(meta))}</small></h2>'
            f'<p class="caption">{esc(record.caption)}</p><div class="videos">{videos}</div>'
            f'<div class="bar">{"".join(cells)}</div><div class="tools" data-i="{i}">'
            '<button type="button" data-all="1">all A</button><button type="button" data-all="-1">all B</button>'
            '<button type="button" data-all="0">all tie</button><button type="button" data-all="clear">clear'
            '</button><button type="button" data-both="1">&#9654; both</button></div></section>')


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>@@TITLE@@</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1000px; padding: 0 12px 60px; color: #222; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: 8px 0; z-index: 1; }
header button { margin-right: 4px; }
#status { margin-left: 8px; color: #555; }
section.pair { border-bottom: 1px solid #ddd; padding: 12px 0; }
h2 { font-size: 15px; margin: 0 0 4px; } h2 small { color: #777; font-weight: normal; }
.caption { margin: 0 0 8px; font-size: 15px; }
.videos { display: flex; gap: 12px; }
figure { flex: 1; margin: 0; max-width: 480px; }
figcaption { font-weight: bold; }
video { width: 100%; background: #000; image-rendering: pixelated; }
.bar { display: flex; gap: 2px; margin-top: 6px; }
.cell { flex-basis: 0; min-width: 110px; background: #eef; border: 1px solid #99b; padding: 3px; }
.cell.now { background: #ffd; border-color: #cc6; }
.seg { font-size: 12px; color: #333; white-space: nowrap; }
.radios label { margin-right: 6px; white-space: nowrap; }
.tools { margin-top: 4px; } .tools button { font-size: 12px; }
</style></head>
<body>
<header><strong>@@TITLE@@</strong> <small>@@SUMMARY@@</small><br>
<button type="button" id="prev">&larr; prev</button><span id="pageinfo"></span>
<button type="button" id="next">next &rarr;</button>
<button type="button" id="export">export labels</button><span id="status"></span></header>
<p><small>A is the first video of each pair, B the second. Choose per segment which is better (tie: neither);
"export labels" downloads labels.jsonl for <code>label.labeler: human</code> (pairs with every segment chosen).
Choices are kept in this browser until exported.</small></p>
<main>
@@SECTIONS@@
</main>
<script type="application/json" id="vidpo-data">@@DATA@@</script>
<script>
"use strict";
// BEGIN buildLabelsJsonl
// The human-labels file (label.labeler: human) of the pairs whose every segment is chosen.
// pairs: [{id: string, segments: number}]; choices: per pair an array of 1 (A, the first video, better), -1 (B),
// 0 (tie) or null (not chosen). Returns {text, exported, partial, unlabelled}: text holds one line per fully
// labelled pair, {"pair_id":"...","labels":[1,-1,0]}, in the order of pairs; partial lists the ids of pairs with
// some but not all segments chosen (left out); unlabelled counts the pairs with none.
function buildLabelsJsonl(pairs, choices) {
  var lines = [], partial = [], unlabelled = 0;
  for (var i = 0; i < pairs.length; i++) {
    var row = choices[i] || [], labels = [];
    for (var s = 0; s < pairs[i].segments; s++) {
      var v = row[s];
      if (v === 1 || v === -1 || v === 0) labels.push(v);
    }
    if (labels.length === pairs[i].segments) lines.push(JSON.stringify({pair_id: pairs[i].id, labels: labels}));
    else if (labels.length === 0) unlabelled++;
    else partial.push(pairs[i].id);
  }
  return {text: lines.map(function (l) { return l + "\\n"; }).join(""), exported: lines.length, partial: partial,
          unlabelled: unlabelled};
}
// END buildLabelsJsonl

var DATA = JSON.parse(document.getElementById("vidpo-data").textContent);
var PAIRS = DATA.pairs, STORE = "vidpo-viewer:" + DATA.key, page = 0;

function currentChoices() {
  var choices = PAIRS.map(function (p) { return new Array(p.segments).fill(null); });
  document.querySelectorAll("input.choice:checked").forEach(function (el) {
    choices[Number(el.dataset.i)][Number(el.dataset.s)] = Number(el.value);
  });
  return choices;
}
function setChoice(i, s, value) {
  var els = document.getElementsByName("p" + i + "s" + s);
  for (var k = 0; k < els.length; k++) els[k].checked = value !== null && Number(els[k].value) === value;
}
function save() {
  try { localStorage.setItem(STORE, JSON.stringify(currentChoices())); } catch (e) { /* storage off: fine */ }
}
function restore() {
  var saved = null;
  try { saved = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (e) { return; }
  if (!Array.isArray(saved) || saved.length !== PAIRS.length) return;
  saved.forEach(function (row, i) {
    if (Array.isArray(row) && row.length === PAIRS[i].segments) row.forEach(function (v, s) { setChoice(i, s, v); });
  });
}
function status(text) { document.getElementById("status").textContent = text; }
function showPage(p) {
  page = Math.max(0, Math.min(DATA.pages - 1, p));
  document.querySelectorAll("section.pair").forEach(function (sec) {
    var on = Number(sec.dataset.page) === page;
    if (!on && !sec.hidden) sec.querySelectorAll("video").forEach(function (v) { v.pause(); });
    sec.hidden = !on;
  });
  document.getElementById("pageinfo").textContent = " page " + (page + 1) + " / " + DATA.pages + " ";
  if (history.replaceState) history.replaceState(null, "", "#page-" + (page + 1));
  window.scrollTo(0, 0);
}
function exportLabels() {
  var result = buildLabelsJsonl(PAIRS, currentChoices());
  var url = URL.createObjectURL(new Blob([result.text], {type: "application/x-ndjson"}));
  var a = document.createElement("a");
  a.href = url; a.download = "labels.jsonl";
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  var note = result.exported + " pairs exported";
  if (result.partial.length) note += "; " + result.partial.length + " partly labelled left out: " +
    result.partial.slice(0, 5).join(", ") + (result.partial.length > 5 ? ", ..." : "");
  if (result.unlabelled) note += "; " + result.unlabelled + " unlabelled";
  status(note);
}
function videosOf(i) { return document.querySelectorAll('video[data-i="' + i + '"]'); }
var playRuns = 0;
function playSpan(i, start, end) {
  var videos = videosOf(i), token = String(++playRuns);
  videos.forEach(function (v) {
    v.currentTime = start; v.dataset.stop = end; v.dataset.run = token;
    var played = v.play(); if (played && played.catch) played.catch(function () {});
  });
  function watch() {
    var busy = false;
    videos.forEach(function (v) {
      if (v.dataset.run !== token || v.dataset.stop === undefined) return;  // a newer click took over
      var wrapped = v.currentTime < start - 0.05;  // a looping video jumped back to 0 at its end
      if (wrapped || v.currentTime >= end || v.paused) {
        v.pause(); delete v.dataset.stop;
        if (wrapped) v.currentTime = Math.max(start, end - 0.001);
      } else busy = true;
    });
    if (busy) requestAnimationFrame(watch);
  }
  requestAnimationFrame(watch);
}
document.addEventListener("change", function (ev) { if (ev.target.classList.contains("choice")) save(); });
document.addEventListener("click", function (ev) {
  var t = ev.target;
  if (t.id === "prev") showPage(page - 1);
  else if (t.id === "next") showPage(page + 1);
  else if (t.id === "export") exportLabels();
  else if (t.classList.contains("play")) playSpan(t.dataset.i, Number(t.dataset.start), Number(t.dataset.end));
  else if (t.dataset.all !== undefined) {
    var i = Number(t.parentNode.dataset.i), value = t.dataset.all === "clear" ? null : Number(t.dataset.all);
    for (var s = 0; s < PAIRS[i].segments; s++) setChoice(i, s, value);
    save();
  } else if (t.dataset.both !== undefined) {
    videosOf(t.parentNode.dataset.i).forEach(function (v) {
      delete v.dataset.stop; v.currentTime = 0;
      var played = v.play(); if (played && played.catch) played.catch(function () {});
    });
  }
});
document.addEventListener("timeupdate", function (ev) {
  var v = ev.target;
  if (v.dataset.side !== "A") return;
  document.querySelectorAll('#pair-' + v.dataset.i + ' .cell').forEach(function (cell) {
    var on = v.currentTime >= Number(cell.dataset.start) && v.currentTime < Number(cell.dataset.end);
    cell.classList.toggle("now", on);
  });
}, true);
restore();
var hashPage = /^#page-(\\d+)$/.exec(location.hash);
showPage(hashPage ? Number(hashPage[1]) - 1 : 0);
</script>
</body></html>
"""
