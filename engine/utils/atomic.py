"""Atomic writes: nothing a run writes is ever seen half-written.

Every file goes to a temporary name in the same directory and is renamed over the final name
(``os.replace`` is atomic on POSIX within one file system); directories (checkpoints, shards) are filled
under a temporary name and renamed when complete. A crash leaves either the old state or the new one,
plus at most a ``*.tmp-*`` leftover that readers ignore and the next writer removes. A temporary name
carries its writer's pid (``NAME.tmp-PID``, ``NAME.tmp-PID-XXXX`` for directories), and cleanup removes only
the temporaries of dead processes and its own: never what another live process is writing.

A write that fails because the disk is full raises ``DiskFull`` (an ``OSError`` with ``errno.ENOSPC``) naming
the file, whatever the writer (Python, torch's zip writer, safetensors) said.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

TMP_MARK = ".tmp-"
_OWNER = re.compile(re.escape(TMP_MARK) + r"(\d+)(?:-|$)")


class DiskFull(OSError):
    """A write failed for lack of space; ``filename`` is the file it was writing."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, "no space left on device (the disk is full)", str(path))


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from or during) is a full disk: torch's zip writer and
    safetensors turn ``ENOSPC`` into errors of their own."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def tmp_owner(name: str) -> int | None:
    """The pid in a temporary name (``NAME.tmp-PID[-...]``), or None for a name without one."""
    match = _OWNER.search(name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's live process
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, DiskFull):
            raise DiskFull(path) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def torch_save(obj, path: str | os.PathLike) -> None:
    # through a Python file: torch's own file writer loses the errno of a failed write ("unexpected pos")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a directory under a temporary name; rename it to ``path`` once the block completes.
    An existing ``path`` is replaced (moved aside, then deleted after the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except DiskFull as exc:   # named by the file's final path, not its temporary one
        inner = Path(exc.filename)
        raise DiskFull(path / inner.relative_to(tmp) if inner.is_relative_to(tmp) else inner) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_leftovers(directory: str | os.PathLike) -> int:
    """Remove the ``*.tmp-*`` leftovers of crashed writers (and of this process); a temporary whose writer is
    still running on this host is left alone. Returns how many were removed."""
    directory = Path(directory)
    if not directory.exists():
        return 0
    removed = 0
    for p in directory.iterdir():
        owner = tmp_owner(p.name)
        if TMP_MARK in p.name and (owner is None or owner == os.getpid() or not _alive(owner)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed += 1
    return removed


def clear_folder(directory: str | os.PathLike, *, keep: tuple[str, ...] = ()) -> int:
    """Remove everything in ``directory`` but the entries named in ``keep`` (a run started over); returns how
    many entries were removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for p in directory.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed += 1
    return removed
