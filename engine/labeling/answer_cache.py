"""The VLM labeller's replies on disk, so that no question is asked twice.

One JSON object per line, one line per reply the server gave (``vlm_answers.jsonl`` in the pairs directory)::

    {"pair_id": "p000012", "segment": 1, "order": 0, "key": "3f9c..", "content": "B", "finish_reason": "stop"}

keyed by (pair, segment, order, request hash): ``order`` 0 asked with A = first video, 1 with the order swapped;
``key`` is ``vidpo.labeling.vlm_request.request_key`` (the question, the model, every request field, the media
settings), so a changed prompt or model asks again while a rerun, or a changed rule applied to the answers, asks
nothing. The reply text is kept, not the verdict: a better parser re-reads old replies. Only replies are kept (an
unreadable one too: a greedy model would say it again); a timeout or an HTTP error is not, and is asked again.

Writes are appends of one whole line by one ``write`` to a file opened with ``O_APPEND``, so a killed run keeps
every reply it got and loses at most the line being written; on opening, a torn last line (no newline) is cut
off, and unreadable lines are skipped and counted. A later line for the same key wins.

Under torchrun each rank appends to a file of its own (``vlm_answers.r{rank}.jsonl``: appends of several
processes to one file are not atomic on network filesystems) and reads every file of the folder's family
(``answer_files``), so a rerun with another number of ranks asks nothing already answered.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("vidpo")

ANSWERS_FILE = "vlm_answers.jsonl"
MAX_CONTENT_CHARS = 20000
"""Longer replies (a reasoning model's thinking) are cut to their last this-many characters (the answer is at
the end)."""


@dataclass(frozen=True)
class CachedReply:
    """One stored reply."""

    content: str
    finish_reason: Optional[str] = None
    reasoning: bool = False


def answers_file(rank: int = 0, world_size: int = 1) -> str:
    """The file one process appends to: ``vlm_answers.jsonl`` alone, ``vlm_answers.r{rank}.jsonl`` under torchrun."""
    return ANSWERS_FILE if world_size <= 1 else f"vlm_answers.r{rank}.jsonl"


def answer_files(folder: str | os.PathLike) -> list[Path]:
    """Every answers file of ``folder``: the one-process file and each rank's, whatever the number of ranks."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("vlm_answers*.jsonl") if p.name == ANSWERS_FILE
                  or (p.name.startswith("vlm_answers.r") and p.name[len("vlm_answers.r"):-len(".jsonl")].isdigit()))


class AnswerCache:
    """Replies by (pair_id, segment, order, key), loaded from ``read_also`` and ``path`` (the later wins) and
    appended to ``path``; thread-safe."""

    def __init__(self, path: str | os.PathLike, read_also: Sequence[str | os.PathLike] = ()) -> None:
        self.path = Path(path)
        self.bad_lines = 0
        self._lock = threading.Lock()
        self._replies: dict[tuple[str, int, int, str], CachedReply] = {}
        for other in read_also:
            if Path(other) != self.path and Path(other).exists():
                self._load(Path(other), own=False)
        if self.path.exists():
            self._load(self.path, own=True)

    def _load(self, path: Path, own: bool) -> None:
        """Read ``path``'s whole lines; a torn last line is cut off the file this cache appends to (``own``), and
        only skipped in another's: its writer may be appending to it right now."""
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and own:  # a line torn by a kill: cut it off, or the next append would be glued to it
            with open(path, "r+b") as handle:
                handle.truncate(end)
            log.warning("%s: cut a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        for number, line in enumerate(data[:end].decode("utf-8", "replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (str(row["pair_id"]), int(row["segment"]), int(row["order"]), str(row["key"]))
                reply = CachedReply(str(row["content"]), row.get("finish_reason"), bool(row.get("reasoning", False)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                self.bad_lines += 1
                if self.bad_lines == 1:
                    log.warning("%s:%d: unreadable answer line skipped (asked again)", path, number)
                continue
            self._replies[key] = reply

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, pair_id: str, segment: int, order: int, key: str) -> Optional[CachedReply]:
        with self._lock:
            return self._replies.get((pair_id, segment, order, key))

    def put(self, pair_id: str, segment: int, order: int, key: str, reply: CachedReply) -> None:
        """Keep ``reply`` in memory and append it to the file (one line, one write)."""
        content = reply.content[-MAX_CONTENT_CHARS:]
        stored = CachedReply(content, reply.finish_reason, reply.reasoning)
        row = {"pair_id": pair_id, "segment": segment, "order": order, "key": key, "content": content,
               "finish_reason": reply.finish_reason}
        if reply.reasoning:
            row["reasoning"] = True
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                while written < len(line):  # a short write (rare, e.g. a full disk): finish the line
                    written += os.write(fd, line[written:])
            finally:
                os.close(fd)
            self._replies[pair_id, segment, order, key] = stored
