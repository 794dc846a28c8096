"""Cross-process wake-ups over Linux eventfd.

An eventfd is a kernel counter: every ``signal`` adds to it and one ``clear``
resets it, so any number of signals between two waits coalesce into one
wake-up and none is lost.  A consumer with nothing to read waits on it (with
``select.poll`` or ``loop.add_reader``) instead of spinning.

An :class:`EventFd` crosses a process boundary as a duplicated descriptor
(``multiprocess.reduction.DupFd``), so it works with the fork, forkserver and
spawn start methods alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
from typing import Any

from ipc.errors import EngineError


class EventFd:
    """A non-blocking eventfd; ``signal`` never blocks, ``wait`` sleeps in the kernel."""

    __slots__ = ("_closed", "fd")

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd if fd is not None else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False

    def signal(self) -> None:
        """Wake the waiter (adds 1 to the counter; coalesces with pending signals)."""
        # BlockingIOError means the counter is at its maximum: a wake-up is
        # already pending, so nothing is lost.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, 1)

    def clear(self) -> bool:
        """Reset the counter; True if any signal was pending."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        return True

    def wait(self, timeout: float | None) -> bool:
        """Sleep until signalled or ``timeout`` seconds pass; True if signalled.

        The pending signal is consumed, so the caller must re-check its condition
        after every return (the signal may predate the data it re-checks).
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        if not poller.poll(ms):
            return False
        return self.clear()

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Await a signal on the running loop via ``add_reader``; True if signalled."""
        if self.clear():
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def _ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(self.fd, _ready)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return self.clear()
        finally:
            loop.remove_reader(self.fd)
        return self.clear()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        from multiprocess import reduction  # only needed when crossing processes

        if self._closed:
            raise EngineError("cannot send a closed EventFd to another process")
        return (_rebuild_eventfd, (reduction.DupFd(self.fd),))

    def __repr__(self) -> str:
        return f"EventFd(fd={self.fd})"


def _rebuild_eventfd(dup: Any) -> EventFd:
    return EventFd(dup.detach())
