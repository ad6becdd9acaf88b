"""Stopping a long verb cleanly when the cluster asks: SLURM's ``--signal`` before the time limit, or a
preemption's SIGTERM.

While ``handling_signals()`` is active (the CLI wraps ``train``, ``generate``, ``label``, ``run`` and
``iterate`` in it), SIGUSR1 and SIGTERM only set a flag. The stages look at it at their safe points and stop
there by raising ``Preempted``, with their progress on disk:

* ``vidpo train``: after an optimizer step it writes a checkpoint and stops (``vidpo.training.trainer``);
* ``vidpo generate``: between shards (a shard is written whole or not at all), before ``pairs.jsonl``;
* ``vidpo label``: after a batch's labels are appended to ``labels.partial.jsonl``.

The CLI then exits with ``EXIT_CODE`` (75, ``EX_TEMPFAIL`` of sysexits.h: "try again later"), and the same
command run again resumes where it stopped: the stages resume on their own (checkpoints, complete shards,
the partial labels file). 75 is neither success (a job script must not start the next stage) nor a crash.

Under torchrun every rank must stop at the same step, or the others wait forever in the next collective:
``agreed()`` all-reduces the flag (MAX) over the default process group, so one rank's signal stops them all at
the same point. Repeated signals change nothing (SLURM and torchrun may both pass one on); the process is
still killed when the grace time runs out (torchrun's ``--shutdown-timeout``, SLURM's KillWait).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("vidpo")

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_CODE = 75

_requested = threading.Event()


class Preempted(Exception):
    """A stage stopped at a safe point because a stop signal arrived; rerunning the command resumes it."""


def requested() -> bool:
    """Whether a stop signal arrived in this process (while ``handling_signals`` was active)."""
    return _requested.is_set()


def request() -> None:
    """Ask the running stage to stop at its next safe point, as a signal would."""
    _requested.set()


def agreed(device: Optional[torch.device] = None) -> bool:
    """``requested()`` of any rank: under torch.distributed a MAX all-reduce of the flag over the default
    group (every rank must call it at the same point), else this process's flag. ``device``: where the flag
    tensor lives (default: the current CUDA device under NCCL, the CPU otherwise)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return requested()
    if device is None:
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flag = torch.tensor([1.0 if requested() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _on_signal(signum, frame) -> None:
    if not _requested.is_set():
        log.warning("%s received: stopping at the next safe point (checkpoint / shard / batch)",
                    signal.Signals(signum).name)
    _requested.set()


@contextlib.contextmanager
def handling_signals(enabled: bool = True) -> Iterator[None]:
    """SIGUSR1 and SIGTERM set the flag instead of ending the process, inside the block (main thread only;
    elsewhere, or with ``enabled`` False, nothing changes). The previous handlers and a clear flag are
    restored on leaving."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _requested.clear()
