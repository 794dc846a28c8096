"""Process plumbing shared by the monitor and workers: parent-death signals, start methods."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from typing import Any

import multiprocess

from engine.exitcodes import ChildExit

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` when our parent exits, so no process is orphaned.

    The check after prctl closes the race where the parent died before it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os._exit(ChildExit.ORPHANED)


def exit_reason(code: int | None) -> str:
    """``exited with code 70`` or ``was killed by SIGKILL`` (a negative exit code)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def context(method: str) -> Any:
    """The multiprocess context for ``method``; "auto" forks only when that is safe.

    Forking a process that runs threads can deadlock the child on a lock held by
    a thread that does not exist there; with an event loop or threads running,
    "auto" uses forkserver instead (closures still travel, pickled with dill).
    """
    if method == "auto":
        method = "fork" if threading.active_count() == 1 and not _loop_running() else "spawn"
    return multiprocess.get_context(method)


def _loop_running() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
