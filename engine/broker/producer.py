"""The producer side of a node: messages into partition streams, acked once Redis has them.

Natural batching, as in the dispatcher: callers append their encoded messages
to per-partition buffers and wait; one flusher at a time turns everything
buffered into stream entries (up to ENGINE_BATCH_SIZE messages each) and
sends them in one pipeline (``transaction=False``).  A caller's future
resolves when every entry holding its messages has its XADD reply, so an ack
means "in Redis" (and, with ``appendfsync always``, on its disk).  One flush
at a time keeps each partition's entries in submission order.

Messages with a ``dedup_key`` go through `scripts.PRODUCE`, which remembers
the key (per recipient) for ENGINE_DEDUP_WINDOW_S with ``SET NX EX`` in the
same script as the XADD: a producer that re-sends after a lost reply gets the
first message's id back and nothing is queued twice.

A connection error mid-pipeline leaves unknown which XADDs landed: the flush is
sent again (at least once; a dedup_key makes the repeat harmless).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.backoff import backoff_s
from engine.broker import scripts
from engine.broker.connection import TRANSIENT
from engine.broker.entries import FIELD_HEADER, FIELD_MESSAGES, header
from engine.broker.partitions import Keys, Partitioner
from engine.core.dispatcher import array_header
from engine.errors import EngineClosed, QueueFull

if TYPE_CHECKING:
    from engine.core.dispatcher import Outgoing

log = logging.getLogger("engine.broker")
ENTRY_MAX_BYTES = 1 << 20  # an entry also becomes ring frames on the owner: keep it moderate
FLUSH_MAX_ENTRIES = 512  # entries per pipeline round trip


@dataclass(eq=False)
class Call:
    """One caller's messages: resolved when every entry holding them was added."""

    ids: list[int]
    remaining: int
    future: asyncio.Future[None]
    entries: list[tuple[int, bytes]] = field(default_factory=list)  # (partition, entry id)


@dataclass(eq=False)
class Item:
    data: bytes
    dedup: bytes  # the dedup key in Redis, b"" for none
    msg_id: int
    call: Call
    index: int
    notify: bool


@dataclass(eq=False)
class Entry:
    partition: int
    items: list[Item]
    notify: bool
    dedup: bool


class Producer:
    """Buffers, batches and XADDs the messages this node accepts."""

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        node: str,
        batch_size: int,
        dedup_window_s: float,
        closed: Callable[[], bool],
    ) -> None:
        self.client = client
        self.keys = keys
        self.node = node
        self.batch_size = batch_size
        self.dedup_window = int(dedup_window_s) if dedup_window_s >= 1 else 0
        if 0 < dedup_window_s < 1:
            self.dedup_window = 1  # EX takes whole seconds; never shorter than asked
        self.closed = closed
        self.partition_of = Partitioner(keys.partitions)
        self.buffers: dict[int, list[Item]] = {}  # partition -> items in submission order
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None
        self.counts = {"accepted": 0, "entries": 0, "deduplicated": 0, "flush_retries": 0}

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._flusher())

    async def send(
        self, outs: list[Outgoing], dedup_key: str, *, notify: bool = False, dedup: bool = True
    ) -> tuple[list[int], list[tuple[int, bytes]]]:
        """Queue ``outs`` and wait until Redis has them; the ids and the entries that hold them.

        A message whose dedup_key was seen within the window is not queued again:
        its place in the ids holds the first message's id.
        """
        if self.closed():
            raise EngineClosed("the cluster node is not running")
        if not outs:
            return [], []
        loop = asyncio.get_running_loop()
        call = Call([o[0] for o in outs], len(outs), loop.create_future())
        use_dedup = bool(dedup and dedup_key and self.dedup_window)
        keys, part = self.keys, self.partition_of
        for index, (mid, recipient, _, data) in enumerate(outs):
            p = part(recipient)
            key = keys.dedup(p, recipient, dedup_key) if use_dedup else b""
            self.buffers.setdefault(p, []).append(Item(data, key, mid, call, index, notify))
        self.idle.clear()
        self.wakeup.set()
        await call.future
        self.counts["accepted"] += len(outs)
        return call.ids, call.entries

    async def wait_idle(self) -> None:
        """Until everything queued so far is in Redis (or failed)."""
        await self.idle.wait()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for items in self.buffers.values():
            for item in items:
                if not item.call.future.done():
                    item.call.future.set_exception(
                        EngineClosed("the cluster node stopped before Redis had the message")
                    )
        self.buffers.clear()

    # -- the flusher --------------------------------------------------------------
    async def _flusher(self) -> None:
        while True:
            if not self.buffers:
                self.idle.set()
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            entries = self._take_entries()
            await self._add(entries)

    def _take_entries(self) -> list[Entry]:
        """Cut buffered messages into entries, at most FLUSH_MAX_ENTRIES of them."""
        entries: list[Entry] = []
        size_cap, count_cap = ENTRY_MAX_BYTES, self.batch_size
        for p in list(self.buffers):
            items = self.buffers[p]
            start = 0
            while start < len(items) and len(entries) < FLUSH_MAX_ENTRIES:
                notify = items[start].notify
                end, size = start, 0
                while end < len(items) and end - start < count_cap:
                    item = items[end]
                    if end > start and (size + len(item.data) > size_cap or item.notify != notify):
                        break
                    size += len(item.data)
                    end += 1
                chunk = items[start:end]
                entries.append(Entry(p, chunk, notify, any(i.dedup for i in chunk)))
                start = end
            if start >= len(items):
                del self.buffers[p]
            else:
                self.buffers[p] = items[start:]
                break
        return entries

    async def _add(self, entries: list[Entry]) -> None:
        """XADD ``entries`` in one pipeline; retries what failed until Redis answers."""
        attempt = 0
        todo = entries
        while todo:
            if self.closed():
                self._fail(todo, EngineClosed("the cluster node stopped before Redis answered"))
                return
            pipe = self.client.pipeline(transaction=False)
            for entry in todo:
                self._queue(pipe, entry)
            try:
                results = await pipe.execute(raise_on_error=False)
            except TRANSIENT as exc:
                self.counts["flush_retries"] += 1
                if attempt == 0 or attempt % 20 == 0:
                    log.warning("XADD of %d entries failed, retrying: %s", len(todo), exc)
                await asyncio.sleep(backoff_s(attempt, 0.05, 1.0))
                attempt += 1
                continue
            retry: list[Entry] = []
            for entry, result in zip(todo, results, strict=True):
                if isinstance(result, TRANSIENT):
                    retry.append(entry)
                elif isinstance(result, ResponseError):
                    # OOM, WRONGTYPE...: Redis refuses it; the callers learn why.
                    self._fail([entry], QueueFull(f"Redis refused the entry: {result}"))
                elif isinstance(result, Exception):
                    self._fail([entry], result)
                else:
                    self._done(entry, result)
            if retry:
                await asyncio.sleep(backoff_s(attempt, 0.05, 1.0))
                attempt += 1
            todo = retry

    def _queue(self, pipe: Any, entry: Entry) -> None:
        stream = self.keys.streams[entry.partition]
        head = header(self.node, entry.notify)
        if not entry.dedup:
            frame = array_header(len(entry.items)) + b"".join(i.data for i in entry.items)
            pipe.xadd(stream, {FIELD_MESSAGES: frame, FIELD_HEADER: head})
            return
        keys: list[Any] = [stream]
        args: list[Any] = [self.dedup_window, head, len(entry.items)]
        for item in entry.items:
            if item.dedup:
                keys.append(item.dedup)
            args += [1 if item.dedup else 0, item.msg_id, item.data]
        scripts.produce.queue(pipe, keys, args)

    def _done(self, entry: Entry, result: Any) -> None:
        if entry.dedup:
            eid = result[0]
            for j in range(1, len(result), 2):
                item = entry.items[int(result[j]) - 1]
                item.call.ids[item.index] = int(result[j + 1])
                self.counts["deduplicated"] += 1
        else:
            eid = result
        if eid:
            self.counts["entries"] += 1
        calls: dict[int, Call] = {}
        for item in entry.items:
            item.call.remaining -= 1
            calls[id(item.call)] = item.call
        for call in calls.values():
            if eid and entry.notify:
                call.entries.append((entry.partition, eid))
            if call.remaining == 0 and not call.future.done():
                call.future.set_result(None)

    def _fail(self, entries: list[Entry], exc: BaseException) -> None:
        for entry in entries:
            for item in entry.items:
                if not item.call.future.done():
                    item.call.future.set_exception(exc)
