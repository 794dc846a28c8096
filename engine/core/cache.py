"""The response cache of cacheable requests: LRU with a TTL, single-flight, apart per user.

A request marked ``cache`` is a read that may be shared: identical ones (same
user, recipient and payload bytes) run once.  While one runs, the others join
it (single-flight, counted as ``deduplicated``); once it answered, its value is
kept for its TTL (``ENGINE_CACHE_TTL_S`` or the request's ``cache_ttl_s``) in
an LRU of ``ENGINE_CACHE_SIZE`` entries and served from there (``hits``).
Errors are never kept.  The user is part of every key, so no entry is ever
served to another user.  Values are kept as the handler's raw msgpack bytes
and decoded per caller, so no caller can change what another one gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from engine.batches import MAX_CACHE_TTL_S as MAX_TTL_S

CacheKey = tuple[str, str, bytes]
"""(user, recipient, digest of the payload bytes)."""

_HEAP_SLACK = 64  # stale expiry records tolerated before the heap is rebuilt


def cache_key(user: str, recipient: str, payload: msgspec.Raw) -> CacheKey:
    """The key of a cacheable request; a 256-bit digest stands for the payload bytes."""
    return user, recipient, hashlib.blake2b(memoryview(payload), digest_size=32).digest()


class ResponseCache:
    """LRU + TTL store of raw responses, and the requests in flight for each key."""

    def __init__(
        self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if size < 0 or not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"need size >= 0 and 0 < ttl_s <= {MAX_TTL_S}, got {size}, {ttl_s}")
        self.size = size
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, msgspec.Raw]] = OrderedDict()
        self._expiry: list[tuple[float, CacheKey]] = []  # a heap; may hold stale records
        self.flights: dict[CacheKey, asyncio.Task[msgspec.Raw]] = {}
        self.hits = 0
        self.misses = 0  # requests that ran (each led a flight)
        self.deduplicated = 0  # requests that joined a running identical one
        self.evicted = 0  # dropped by the size bound (least recently used first)
        self.expired = 0

    def __len__(self) -> int:
        self.purge()
        return len(self._entries)

    # -- the store ---------------------------------------------------------------
    def purge(self) -> None:
        """Drop every expired entry (called on each use, so memory follows the TTLs)."""
        now = self.clock()
        heap, entries = self._expiry, self._entries
        while heap and heap[0][0] <= now:
            at, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and entry[0] == at:
                del entries[key]
                self.expired += 1

    def cached(self, key: CacheKey) -> msgspec.Raw | None:
        """The live value for ``key`` (a hit, now the most recently used), else None."""
        self.purge()
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: CacheKey, value: msgspec.Raw, ttl_s: float | None = None) -> None:
        if self.size == 0:
            return
        self.purge()
        at = self.clock() + (self.ttl_s if ttl_s is None else ttl_s)
        entries = self._entries
        entries[key] = (at, value)
        entries.move_to_end(key)
        heapq.heappush(self._expiry, (at, key))
        while len(entries) > self.size:
            entries.popitem(last=False)
            self.evicted += 1
        if len(self._expiry) > 2 * len(entries) + _HEAP_SLACK:
            self._expiry = [(at, k) for k, (at, _) in entries.items()]
            heapq.heapify(self._expiry)

    def clear(self, user: str | None = None) -> int:
        """Forget the entries of ``user`` (every entry when None); returns how many."""
        self.purge()
        if user is None:
            n = len(self._entries)
            self._entries.clear()
            self._expiry.clear()
            return n
        gone = [k for k in self._entries if k[0] == user]
        for k in gone:
            del self._entries[k]
        return len(gone)

    # -- single-flight -----------------------------------------------------------
    def flight(self, key: CacheKey) -> asyncio.Task[msgspec.Raw] | None:
        """The identical request running now, if any (joining it counts as deduplicated)."""
        task = self.flights.get(key)
        if task is not None:
            self.deduplicated += 1
        return task

    def lead(
        self,
        key: CacheKey,
        ttl_s: float | None,
        run: Coroutine[Any, Any, msgspec.Raw],
    ) -> asyncio.Task[msgspec.Raw]:
        """Run ``run`` as the flight of ``key``; its value is cached once it succeeds.

        The flight is a task of its own: a caller that stops waiting (a client
        gone) leaves it running for the others, who wait on it with ``shield``.
        """
        self.misses += 1
        task = asyncio.ensure_future(run)
        self.flights[key] = task

        def landed(t: asyncio.Task[msgspec.Raw]) -> None:
            if self.flights.get(key) is t:
                del self.flights[key]
            if t.cancelled() or t.exception() is not None:  # errors are never cached
                return
            self.put(key, t.result().copy(), ttl_s)  # a copy: not the whole return frame

        task.add_done_callback(landed)
        return task

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self),
            "hits": self.hits,
            "misses": self.misses,
            "deduplicated": self.deduplicated,
            "evicted": self.evicted,
            "expired": self.expired,
            "in_flight": len(self.flights),
        }


async def shared(
    cache: ResponseCache,
    key: CacheKey,
    ttl_s: float | None,
    run: Callable[[], Coroutine[Any, Any, msgspec.Raw]],
) -> tuple[msgspec.Raw, str]:
    """The value for ``key``: from the cache, from an identical running request, or by
    running ``run()``; with how it came: ``"cached"``, ``"deduplicated"`` or ``"executed"``."""
    value = cache.cached(key)
    if value is not None:
        return value, "cached"
    task = cache.flight(key)
    if task is not None:
        return await asyncio.shield(task), "deduplicated"
    return await asyncio.shield(cache.lead(key, ttl_s, run())), "executed"
