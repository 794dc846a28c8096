"""Per-message delivery state inside a worker: frames, pending messages, recipient FIFOs.

Plain records with ``__slots__``, apart from the worker's layers (``state``,
``lanes``, ``settle``, ...) that all use them, so each of those can import them
without importing the others.
"""

from __future__ import annotations

from collections import deque

from ipc.codec import Message

# Outcome codes of a message that leaves the worker (DEFERRED: handed back to the dispatcher).
DELIVERED, DEAD_LETTERED, EXPIRED, DEFERRED = 0, 1, 2, 3


class FrameTrack:
    """One input frame (a batch): its ring end position and how many messages remain."""

    __slots__ = ("counts", "end", "fetched_ns", "lane", "remaining")

    def __init__(self, lane: int, end: int, remaining: int, fetched_ns: int = 0) -> None:
        self.lane = lane
        self.end = end
        self.remaining = remaining
        self.fetched_ns = fetched_ns  # monotonic: how long it has held its lane's commits
        self.counts = [0, 0, 0, 0]  # delivered, dead-lettered, expired, deferred


class Pending:
    """A fetched message on its way to settlement."""

    __slots__ = ("frame", "index", "msg", "state")

    def __init__(self, msg: Message, frame: FrameTrack, index: int) -> None:
        self.msg = msg
        self.frame = frame
        self.index = index
        self.state: RecipientLane | None = None


class RecipientLane:
    """FIFO of one recipient within one priority lane, with its in-flight count.

    ``avail`` counts this lane's entries in the worker's ready queue, so a
    recipient is never offered more than ``limit - busy`` times at once.
    """

    __slots__ = ("avail", "busy", "key", "queue")

    def __init__(self, key: tuple[int, str]) -> None:
        self.key = key
        self.queue: deque[Pending] = deque()
        self.busy = 0
        self.avail = 0

    def wants_slot(self, limit: int) -> bool:
        return self.avail < len(self.queue) and self.busy + self.avail < limit

    def idle(self) -> bool:
        return not self.queue and self.busy == 0 and self.avail == 0
