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
from collections import deque
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
from engine.core.builder import array_header
from engine.errors import EngineClosed, QueueFull

if TYPE_CHECKING:
    from engine.core.builder import Outgoing

log = logging.getLogger("engine.broker")
ENTRY_MAX_BYTES = 1 << 20  # an entry also becomes ring frames on the owner: keep it moderate
FLUSH_MAX_ENTRIES = 512  # entries per pipeline round trip


@dataclass(eq=False)
class Call:
    """One caller's messages: resolved when every entry holding them was added."""

    ids: list[int]
    remaining: int  # segments not yet wholly in Redis
    future: asyncio.Future[None]
    entries: list[tuple[int, bytes]] = field(default_factory=list)  # (partition, entry id)


@dataclass(eq=False)
class Segment:
    """The messages of one call for one partition, in order; entries take slices of it."""

    call: Call
    datas: list[bytes]
    notify: bool
    positions: list[int] | None = None  # dedup only: index in call.ids of each message
    keys: list[bytes] | None = None  # dedup only: the Redis dedup key of each (b"" = none)
    taken: int = 0  # messages cut into entries so far
    added: int = 0  # messages whose entry Redis has


@dataclass(eq=False)
class Entry:
    partition: int
    notify: bool
    pieces: list[tuple[Segment, int, int]] = field(default_factory=list)  # (segment, start, end)

    @property
    def dedup(self) -> bool:
        return any(seg.keys is not None for seg, _, _ in self.pieces)


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
        self.buffers: dict[int, deque[Segment]] = {}  # partition -> segments in order
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
        call = Call([o[0] for o in outs], 0, loop.create_future())
        if dedup and dedup_key and self.dedup_window:
            segments = self._dedup_segments(call, outs, dedup_key, notify)
        else:
            groups: dict[int, list[bytes]] = {}
            cached, part = self.partition_of.cache.get, self.partition_of
            for _, recipient, _, data in outs:
                p = cached(recipient)
                if p is None:
                    p = part(recipient)
                datas = groups.get(p)
                if datas is None:
                    datas = groups[p] = []
                datas.append(data)
            segments = {p: Segment(call, datas, notify) for p, datas in groups.items()}
        call.remaining = len(segments)
        buffers = self.buffers
        for p, seg in segments.items():
            queue = buffers.get(p)
            if queue is None:
                queue = buffers[p] = deque()
            queue.append(seg)
        self.idle.clear()
        self.wakeup.set()
        await call.future
        self.counts["accepted"] += len(outs)
        return call.ids, call.entries

    def _dedup_segments(
        self, call: Call, outs: list[Outgoing], dedup_key: str, notify: bool
    ) -> dict[int, Segment]:
        segments: dict[int, Segment] = {}
        for index, (_, recipient, _, data) in enumerate(outs):
            p = self.partition_of(recipient)
            seg = segments.get(p)
            if seg is None:
                seg = segments[p] = Segment(call, [], notify, [], [])
            assert seg.positions is not None and seg.keys is not None
            seg.datas.append(data)
            seg.positions.append(index)
            seg.keys.append(self.keys.dedup(p, recipient, dedup_key))
        return segments

    async def wait_idle(self) -> None:
        """Until everything queued so far is in Redis (or failed)."""
        await self.idle.wait()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for queue in self.buffers.values():
            for seg in queue:
                if not seg.call.future.done():
                    seg.call.future.set_exception(
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
        """Cut buffered messages into entries, at most FLUSH_MAX_ENTRIES of them.

        An entry holds at most ENGINE_BATCH_SIZE messages and about ENTRY_MAX_BYTES,
        from one partition, in order; settle-notified and plain messages never share
        one (the notice is per entry).
        """
        entries: list[Entry] = []
        count_cap = self.batch_size
        for p in list(self.buffers):
            queue = self.buffers[p]
            while queue and len(entries) < FLUSH_MAX_ENTRIES:
                entry = Entry(p, queue[0].notify)
                n = size = 0
                while queue and n < count_cap:
                    seg = queue[0]
                    if seg.notify != entry.notify:
                        break
                    datas, start = seg.datas, seg.taken
                    end = min(len(datas), start + count_cap - n)
                    for i in range(start, end):
                        size += len(datas[i])
                        if size > ENTRY_MAX_BYTES and i + n > start:
                            end = i
                            break
                    if end == start:
                        break
                    entry.pieces.append((seg, start, end))
                    n += end - start
                    seg.taken = end
                    if end < len(datas):
                        break  # the entry is full
                    queue.popleft()
                entries.append(entry)
            if queue:
                break  # FLUSH_MAX_ENTRIES reached: the rest goes in the next round trip
            del self.buffers[p]
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
        pieces = entry.pieces
        if not entry.dedup:
            n = sum(end - start for _, start, end in pieces)
            if len(pieces) == 1:
                seg, start, end = pieces[0]
                body = b"".join(seg.datas[start:end])
            else:
                body = b"".join(d for seg, start, end in pieces for d in seg.datas[start:end])
            pipe.xadd(stream, {FIELD_MESSAGES: array_header(n) + body, FIELD_HEADER: head})
            return
        keys: list[Any] = [stream]
        args: list[Any] = [self.dedup_window, head, 0]
        for seg, start, end in pieces:
            for i in range(start, end):
                key = seg.keys[i] if seg.keys is not None else b""
                if key:
                    keys.append(key)
                mid = seg.call.ids[seg.positions[i]] if seg.positions is not None else 0
                args += [1 if key else 0, mid, seg.datas[i]]
                args[2] += 1
        scripts.produce.queue(pipe, keys, args)

    def _done(self, entry: Entry, result: Any) -> None:
        if entry.dedup:
            eid = result[0]
            flat = [(seg, i) for seg, start, end in entry.pieces for i in range(start, end)]
            for j in range(1, len(result), 2):
                seg, i = flat[int(result[j]) - 1]
                assert seg.positions is not None
                seg.call.ids[seg.positions[i]] = int(result[j + 1])
                self.counts["deduplicated"] += 1
        else:
            eid = result
        if eid:
            self.counts["entries"] += 1
        for seg, start, end in entry.pieces:
            call = seg.call
            if (
                eid
                and entry.notify
                and (not call.entries or call.entries[-1] != (entry.partition, eid))
            ):
                call.entries.append((entry.partition, eid))
            seg.added += end - start
            if seg.added == len(seg.datas):
                call.remaining -= 1
                if call.remaining == 0 and not call.future.done():
                    call.future.set_result(None)

    def _fail(self, entries: list[Entry], exc: BaseException) -> None:
        for entry in entries:
            for seg, _, _ in entry.pieces:
                if not seg.call.future.done():
                    seg.call.future.set_exception(exc)
