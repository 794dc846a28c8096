"""Process plumbing shared by the monitor and workers: parent-death signals, start methods,
which signals each process acts on, and signalling a pid only while it is still ours."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import multiprocess
import psutil

from engine.exitcodes import ChildExit

_PR_SET_PDEATHSIG = 1

GROUP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What ``timeout``, ``kill -- -PGID``, systemd and a terminal send to every process of the
group.  Only the dispatcher acts on them; the monitor and the workers ignore them and stop
when the dispatcher tells them to, so a group-wide signal is one stop, not a crash of each."""

WORKER_STOP = signal.SIGUSR1
"""The monitor's request to one worker: fetch nothing more, settle what you hold, exit 0.
Not SIGTERM: a group's SIGTERM reaches the workers too, and must not stop them."""


@contextlib.contextmanager
def group_signals_blocked() -> Iterator[None]:
    """Block GROUP_SIGNALS in this thread while a child starts, which inherits the mask.

    The child ignores them once it runs (`ignore_group_signals`); until then a
    group-wide signal waits, blocked, instead of killing it half-started.  Here a
    signal that arrived meanwhile is delivered when the block ends, so none is lost.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_group_signals() -> None:
    """In the monitor or a worker: ignore GROUP_SIGNALS (pending ones are discarded), unblock."""
    for sig in GROUP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


def start_stamp(pid: int) -> int:
    """When ``pid`` started (ms since the epoch, psutil's create_time): with the pid, its identity.

    A pid alone names a process only while its parent has not reaped it; after
    that the kernel may give it to any new process.
    """
    return round(psutil.Process(pid).create_time() * 1000)


def is_same_process(pid: int, stamp: int) -> bool:
    """True while ``pid`` is the live (not zombie) process that had ``stamp`` (`start_stamp`)."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        return round(proc.create_time() * 1000) == stamp and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def signal_if_same(pid: int, stamp: int, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process that had ``stamp``.

    The pidfd is opened first and the identity checked after: if the pid still
    has the stamp then, the pidfd names that same process, so the signal cannot
    reach a newcomer that took the pid in between.  Returns whether it was sent.
    """
    if pid <= 0:
        return False
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not is_same_process(pid, stamp):
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            return False
        return True
    finally:
        os.close(fd)


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
