"""One writer per output folder: an exclusive lock on ``DIR/.vidpo.lock``.

Every verb that writes a folder (``--out``, and the pairs folder of ``vidpo label``) holds the lock of that
folder while it runs, so two commands never write one folder at once (a second resumes from the first's
half-written checkpoints, or its cleanup deletes what the first is writing). The lock is ``fcntl.flock``:
the operating system drops it when the holder exits, however it exits, so a lock left by a killed run is
simply taken by the next one (which logs whose it was). The file holds the holder's record (pid, host,
command line, start time) for the message a refused writer prints; it is emptied on release and never
deleted (deleting a lock file lets two processes lock two different files of the same name).

The lock is re-entrant within a process: ``vidpo run`` holds its folder and its stages take it again.
Under torchrun, rank 0 holds it for the job; the other ranks take no lock (``RANK`` in the environment).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

LOCK_FILE = ".vidpo.lock"

log = logging.getLogger("vidpo")

_held: dict[str, list] = {}   # resolved folder -> [open lock file, depth]
_guard = threading.Lock()
_command_line: Optional[str] = None


def set_command_line(text: str) -> None:
    """What the records of this process's locks name as its command (the CLI: ``vidpo VERB ...``)."""
    global _command_line
    _command_line = text


class FolderLocked(RuntimeError):
    """Another live process holds the folder's lock; the message names it (pid, host, command)."""


def holder_of(directory: str | os.PathLike) -> Optional[dict]:
    """The record of the process that holds (or last held without releasing) ``directory``'s lock, or None."""
    try:
        text = (Path(directory) / LOCK_FILE).read_text()
    except OSError:
        return None
    try:
        record = json.loads(text) if text.strip() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def describe(record: Optional[dict]) -> str:
    if not record:
        return "another process (no record yet)"
    return (f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')} "
            f"({record.get('command')})")


def _record(command: Optional[str]) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": command or _command_line or " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _acquire(directory: Path, command: Optional[str]):
    directory.mkdir(parents=True, exist_ok=True)
    fh = open(directory / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        record = None
        for _ in range(20):   # the holder writes its record right after it locks
            record = holder_of(directory)
            if record:
                break
            time.sleep(0.05)
        raise FolderLocked(f"{directory} is in use by {describe(record)}; wait for it to finish, or use "
                           "another output folder") from None
    except BaseException:
        fh.close()
        raise
    previous = holder_of(directory)
    if previous:   # its holder ended without releasing it (killed, crashed): the OS freed the flock
        log.warning("taking over the lock of %s left by %s, which is no longer running", directory,
                    describe(previous))
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(_record(command)) + "\n")
    fh.flush()
    return fh


def _release(fh) -> None:
    try:
        fh.seek(0)
        fh.truncate()   # an empty record: released cleanly (a record left behind means its holder died)
        fh.flush()
    except OSError:
        pass   # a full or vanished disk must not hide the error that ends the run
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, *, command: Optional[str] = None,
                rank: Optional[int] = None) -> Iterator[Path]:
    """Hold ``directory``'s exclusive lock for the block (creating the folder); raise FolderLocked naming the
    holder when another live process has it. ``command`` goes into the record (default: what the CLI set with
    ``set_command_line``, else this process's command line); ``rank`` (default ``$RANK``, 0 outside torchrun):
    ranks other than 0 take no lock."""
    directory = Path(directory)
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if rank != 0:
        yield directory
        return
    key = str(directory.resolve())
    with _guard:
        entry = _held.get(key)
        if entry is None:
            entry = _held[key] = [_acquire(directory, command), 0]
        entry[1] += 1
    try:
        yield directory
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                _release(entry[0])


def holds(directory: str | os.PathLike) -> bool:
    """Whether this process holds ``directory``'s lock."""
    return str(Path(directory).resolve()) in _held
