"""Idempotent submits: a ``dedup_key`` accepted once is not queued again within the window.

A client that reconnects re-sends the frames it got no ack for, and the service
may have queued them before the connection dropped; with a key per message
(``Client(..., idempotent=True)``) the second copy is acked with the first
message's id and never reaches a ring.  Keys are scoped per user (two users'
keys never collide) and remembered for ``ENGINE_DEDUP_WINDOW_S``, at most
``ENGINE_DEDUP_MAX`` of them: past the bound the oldest key is forgotten early
(counted as ``evicted``), so memory stays bounded whatever the clients send.

A key is reserved when its message is built, before the wait for ring space,
so a duplicate arriving meanwhile waits for the first copy instead of racing
it; if queueing the first copy fails, the reservation is dropped and the
duplicate queues itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

Key = tuple[str, str]
"""(user, dedup_key)."""


class Accepted:
    """The first message seen with a key: its id, where it went, and whether it is queued."""

    __slots__ = ("at", "id", "lane", "queued", "recipient", "waiter")

    def __init__(self, mid: int, recipient: str, lane: int, at: float) -> None:
        self.id = mid
        self.recipient = recipient
        self.lane = lane
        self.at = at
        self.queued = False  # True once the message is in the dispatcher's buffers
        self.waiter: asyncio.Future[bool] | None = None

    async def wait(self) -> bool:
        """True once the first copy is queued; False if queueing it failed."""
        if self.queued:
            return True
        if self.waiter is None:
            self.waiter = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self.waiter)

    def _resolve(self, ok: bool) -> None:
        self.queued = ok
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(ok)


class DedupWindow:
    """The keys accepted in the last ``window_s`` seconds, at most ``max_keys`` of them."""

    def __init__(
        self, window_s: float, max_keys: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not window_s > 0 or max_keys < 1:
            raise ValueError(f"need window_s > 0 and max_keys >= 1, got {window_s}, {max_keys}")
        self.window_s = window_s
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[Key, Accepted] = OrderedDict()  # oldest first
        self.suppressed = 0  # messages acked with an earlier message's id
        self.evicted = 0  # keys forgotten before their window ended (the bound)

    def __len__(self) -> int:
        self._expire(self.clock())
        return len(self._keys)

    def _expire(self, now: float) -> None:
        keys = self._keys
        limit = now - self.window_s
        while keys:
            first = next(iter(keys.values()))
            if first.at > limit:
                return
            keys.popitem(last=False)

    def get(self, key: Key) -> Accepted | None:
        """The first message accepted with ``key`` in the window, if any."""
        self._expire(self.clock())
        return self._keys.get(key)

    def split(self, user: str, keys: list[str]) -> tuple[list[int], dict[int, Accepted | int]]:
        """Which items of a call are new: their indices, and for each duplicate what it repeats.

        A duplicate maps to the `Accepted` entry of an earlier call, or to the index
        of the first item of this call with the same key.  Items without a key are new.
        """
        self._expire(self.clock())
        fresh: list[int] = []
        dups: dict[int, Accepted | int] = {}
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if not key:
                fresh.append(i)
                continue
            known = self._keys.get((user, key))
            if known is not None:
                dups[i] = known
            elif key in first:
                dups[i] = first[key]
            else:
                first[key] = i
                fresh.append(i)
        self.suppressed += len(dups)
        return fresh, dups

    def reserve(self, user: str, key: str, mid: int, recipient: str, lane: int) -> Accepted:
        """Remember ``key`` for the message being queued (call `settle` once it is, or not)."""
        now = self.clock()
        self._expire(now)
        keys = self._keys
        while len(keys) >= self.max_keys:
            keys.popitem(last=False)  # its own caller still settles it
            self.evicted += 1
        entry = keys[(user, key)] = Accepted(mid, recipient, lane, now)
        return entry

    def settle(self, user: str, keys: list[str], entries: list[Accepted], ok: bool) -> None:
        """Mark reserved entries queued (``ok``), or forget them: queueing failed."""
        for key, entry in zip(keys, entries, strict=True):
            if not ok and self._keys.get((user, key)) is entry:
                del self._keys[(user, key)]
            entry._resolve(ok)

    def stats(self) -> dict[str, int]:
        return {"keys": len(self), "suppressed": self.suppressed, "evicted": self.evicted}
