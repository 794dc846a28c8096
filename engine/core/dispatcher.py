"""The dispatcher: shards messages into per-(worker, lane) batches and reads what comes back.

Natural batching: a message is encoded once and appended to its (shard, lane)
buffer; a buffer is written to its ring as one frame when it holds
``batch_size`` messages, or when the event loop has run out of other work
(``call_soon``; with ``ENGINE_BATCH_LINGER_S`` > 0, at most that long after
the buffer's first message).  Only one coroutine writes to the rings at a
time, so each ring keeps exactly one producer even with many submitters.

Return rings carry ``FrameDone`` reports (the only source of the settled
counts, so ``submitted == delivered + dead_lettered + expired + in_flight``
holds at every moment), replies for requests and dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from engine.config import Config
from engine.core.deadletters import DeadLetterStore
from engine.core.sharding import Sharder
from engine.errors import CodecError, EngineClosed, FrameTooLargeError, QueueFull, RequestFailed
from ipc.codec import Kind, Priority, check_raw, pack_payload, parse_kind, parse_priority
from ipc.records import (
    DeadLetter,
    FrameDone,
    Redelivered,
    Reply,
    WorkerStarted,
    decode_records,
)
from ipc.ring import SPACE_RECHECK_S, RingConsumer, RingProducer
from ipc.shard import LANES, EngineWakeups, ShardMemory

_PRIORITIES: dict[object, Priority] = {p.name.lower(): p for p in Priority} | {
    p: p for p in Priority
}
_KINDS: dict[object, Kind] = {k.name.lower(): k for k in Kind} | {k: k for k in Kind}
monotonic_ns = time.monotonic_ns
MAX_TTL_S = 31_536_000  # one year, as ENGINE_DEFAULT_TTL_S allows
_U16 = struct.Struct(">H")
log = logging.getLogger("engine.dispatcher")
_U32 = struct.Struct(">I")


class Options(NamedTuple):
    """Validated options shared by the messages of one submit call."""

    priority: Priority
    kind: Kind
    ttl_ns: int
    sender: str
    correlation_id: int
    reply_to: str
    tags: tuple[str, ...]
    metadata: dict[str, str]
    dedup_key: str


Outgoing = tuple[int, str, int, bytes]
"""A validated, encoded message: (id, recipient, lane, data); a plain tuple, cheap to make."""


_encode = msgspec.msgpack.Encoder().encode
_EMPTY: dict[str, str] = {}


def _checked_extras(
    sender: object,
    reply_to: object,
    dedup_key: object,
    correlation_id: object,
    tags: Iterable[str],
    metadata: dict[str, str] | None,
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Type-check the optional fields here, so a bad one never poisons a worker's batch."""
    for name, value in (("sender", sender), ("reply_to", reply_to), ("dedup_key", dedup_key)):
        if type(value) is not str:
            raise ValueError(f"{name} must be a string, got {value!r}")
    if type(correlation_id) is not int or not 0 <= correlation_id < 1 << 63:
        raise ValueError(f"correlation_id must be an integer in [0, 2**63), got {correlation_id!r}")
    tag_tuple = tuple(tags)
    if not all(type(t) is str for t in tag_tuple):
        raise ValueError(f"tags must be strings, got {tag_tuple!r}")
    meta = dict(metadata or {})
    if not all(type(k) is str and type(v) is str for k, v in meta.items()):
        raise ValueError(f"metadata must map strings to strings, got {meta!r}")
    return tag_tuple, meta


def _frames(items: list[bytes], size: int, max_bytes: int) -> list[tuple[bytes, int]]:
    """Pack encoded messages into batch frames of at most ``size`` items and ``max_bytes``.

    Returns (frame, number of messages in it) pairs.
    """
    frames: list[tuple[bytes, int]] = []
    start, total = 0, 5
    for i, item in enumerate(items):
        if i > start and (i - start >= size or total + len(item) > max_bytes):
            frames.append((array_header(i - start) + b"".join(items[start:i]), i - start))
            start, total = i, 5
        total += len(item)
    n = len(items) - start
    frames.append((array_header(n) + b"".join(items[start:]), n))
    return frames


def array_header(n: int) -> bytes:
    """msgpack array header, so pre-encoded messages concatenate into one batch frame."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + _U16.pack(n)
    return b"\xdd" + _U32.pack(n)


class Dispatcher:
    """Owns the producer end of every lane ring and the consumer end of every return ring."""

    def __init__(self, config: Config, shards: list[ShardMemory], wakeups: EngineWakeups) -> None:
        self.config = config
        self.shards = shards
        self.wakeups = wakeups
        self.shard_of = Sharder(len(shards))
        # A frame holds a batch; the largest frame a lane ring takes, minus its array header.
        self.max_frame_bytes = shards[0].lanes[0].max_payload
        self.max_message_bytes = self.max_frame_bytes - 5
        self.producers: list[list[RingProducer]] = [s.lane_producers() for s in shards]
        self.returns: list[RingConsumer] = [s.return_consumer() for s in shards]
        self.buffers: list[list[list[bytes]]] = [[[] for _ in range(LANES)] for _ in shards]
        self.pending_flush = False
        self.tasks: set[asyncio.Task[None]] = set()
        # One writer per ring, but rings independent: a full lane of one worker never
        # holds up the others.
        self.lane_locks = [[asyncio.Lock() for _ in range(LANES)] for _ in shards]
        self.space_event = asyncio.Event()
        self.ids = itertools.count(1)
        self.acked: list[list[int]] = [[r.committed for r in s.lanes] for s in shards]
        self.counts = dict.fromkeys(
            (
                "submitted",
                "delivered",
                "dead_lettered",
                "expired",
                "redelivered",
                "batches",
                "replies_unmatched",
                "return_errors",
            ),
            0,
        )
        self.lane_submitted = [0] * LANES
        self.lane_settled = [0] * LANES
        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.dead = DeadLetterStore(config.dlq_max, config.dlq_path)
        # Dead letters whose frame is not reported settled yet, per shard (see DeadLetter).
        self.provisional: list[list[DeadLetter]] = [[] for _ in shards]
        self.recipients: dict[str, None] = {}
        self.topics: dict[str, dict[str, None]] = {}
        self.settled_event = asyncio.Event()
        self.progress_event = asyncio.Event()  # replaced and set whenever a frame settles
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(wakeups.return_ready.fd, self.on_returns)
        self.loop.add_reader(wakeups.lane_space.fd, self.on_space)
        self.default_options = self.options()

    # -- building and queueing ---------------------------------------------------
    def options(
        self,
        *,
        priority: str | int | Priority = Priority.NORMAL,
        ttl: float | None = None,
        kind: str | int | Kind = Kind.DIRECT,
        sender: str = "",
        correlation_id: int = 0,
        reply_to: str = "",
        tags: Iterable[str] = (),
        metadata: dict[str, str] | None = None,
        dedup_key: str = "",
    ) -> Options:
        """Validate the per-message options once (a batch shares them)."""
        prio = _PRIORITIES.get(priority)
        if prio is None or type(priority) is bool:
            prio = parse_priority(priority)
        knd = _KINDS.get(kind)
        if knd is None or type(kind) is bool:
            knd = parse_kind(kind)
        if ttl is None:
            ttl = self.config.default_ttl_s
        elif type(ttl) not in (int, float) or not 0 <= ttl <= MAX_TTL_S:
            raise ValueError(f"ttl must be a number of seconds in [0, {MAX_TTL_S}], got {ttl!r}")
        if not (
            tags == ()
            and metadata is None
            and type(sender) is str
            and type(reply_to) is str
            and type(dedup_key) is str
            and type(correlation_id) is int
        ):
            tags, metadata = _checked_extras(
                sender, reply_to, dedup_key, correlation_id, tags, metadata
            )
        return Options(prio, knd, int(ttl * 1e9), sender, correlation_id, reply_to,
                       tuple(tags), metadata or _EMPTY, dedup_key)  # fmt: skip

    def build(self, recipient: str, payload: Any, **options: Any) -> Outgoing:
        """Validate and encode one message (see ``build_many``)."""
        opts = self.options(**options) if options else self.default_options
        return self.build_many(((recipient, payload),), opts)[0]

    def build_many(
        self, items: Iterable[tuple[str, Any]], opts: Options, *, raw_checked: bool = False
    ) -> list[Outgoing]:
        """Encode messages that share ``opts``; all or nothing (raises before any is queued).

        The encoded form is a plain tuple in Message's field order, which msgspec
        encodes to exactly the bytes of the array-like Message, without building one.
        ``raw_checked``: every ``msgspec.Raw`` payload came out of a msgspec decode
        (the ingress's frames), which checked its structure, so the batch frame
        cannot be spoiled; bad UTF-8 inside fails that message's ``body()`` only.
        """
        prio, knd, ttl_ns, sender, cid, reply_to, tags, meta, dedup = opts
        ids, enc, limit = self.ids, _encode, self.max_message_bytes
        out: list[Outgoing] = []
        for recipient, payload in items:
            if type(recipient) is not str or not recipient:
                raise ValueError(f"recipient must be a non-empty string, got {recipient!r}")
            if type(payload) is msgspec.Raw:
                if not raw_checked:
                    check_raw(payload)  # a bad Raw would spoil its whole batch frame
                raw = payload
            else:
                raw = pack_payload(payload)
            created = monotonic_ns()
            mid = next(ids)
            data = enc(
                (mid, recipient, sender, knd, prio, raw, created,
                 created + ttl_ns if ttl_ns else 0, 0, cid, reply_to, tags, meta, dedup)
            )  # fmt: skip
            if len(data) > limit:
                raise FrameTooLargeError(
                    f"message to {recipient!r} encodes to {len(data):,} bytes; a ring of "
                    f"ENGINE_RING_BYTES={self.config.ring_bytes:,} carries at most "
                    f"{limit:,} per message"
                )
            out.append((mid, recipient, prio, data))
        return out

    def _append(self, out: Outgoing) -> list[bytes]:
        if self.closed:
            raise EngineClosed("the engine is not running; submit inside `async with Engine(...)`")
        _, recipient, lane, data = out
        buf = self.buffers[self.shard_of(recipient)][lane]
        buf.append(data)
        self.counts["submitted"] += 1
        self.lane_submitted[lane] += 1
        return buf

    async def enqueue(self, out: Outgoing) -> None:
        buf = self._append(out)
        if len(buf) >= self.config.batch_size:
            await self.flush(buf)
        else:
            self._schedule_flush()

    async def enqueue_many(self, outs: list[Outgoing]) -> None:
        """Queue many messages; only full batches are written on the way (fewer, fuller frames)."""
        if self.closed:
            raise EngineClosed("the engine is not running; submit inside `async with Engine(...)`")
        size = self.config.batch_size
        buffers, shard_of, lane_submitted = self.buffers, self.shard_of, self.lane_submitted
        cached = shard_of.cache.get
        self.counts["submitted"] += len(outs)
        appended = 0
        try:
            for _, recipient, lane, data in outs:
                shard = cached(recipient)
                buf = buffers[shard_of(recipient) if shard is None else shard][lane]
                buf.append(data)
                lane_submitted[lane] += 1
                appended += 1
                if len(buf) >= size:
                    await self.flush(buf)
        finally:
            # Cancelled while a flush waited: what was not appended was never submitted.
            self.counts["submitted"] -= len(outs) - appended
            self._schedule_flush()

    def enqueue_nowait(self, out: Outgoing) -> None:
        """Queue one message now, or raise QueueFull and queue nothing."""
        if self.closed:
            raise EngineClosed("the engine is not running; submit inside `async with Engine(...)`")
        _, recipient, lane, _ = out
        shard = self.shard_of(recipient)
        buf = self.buffers[shard][lane]
        if len(buf) + 1 < self.config.batch_size:
            self._append(out)
            self._schedule_flush()
            return
        lane_name = Priority(lane).name.lower()
        producer = self.producers[shard][lane]
        if self.lane_locks[shard][lane].locked():
            # A flush is waiting for ring space: writing past it would reorder.
            raise QueueFull(
                f"lane {lane_name} of worker {shard} is full "
                f"({len(buf)} messages waiting for ring space)"
            )
        # The buffered messages are accepted already: write what fits of them, frame by
        # frame; the new one is queued only if that makes room for it in the buffer.
        written = 0
        for frame, n in _frames(buf, self.config.batch_size, self.max_frame_bytes):
            if not producer.offer((frame,)):
                break
            written += n
            self.counts["batches"] += 1
        del buf[:written]
        if len(buf) + 1 >= self.config.batch_size:
            raise QueueFull(
                f"lane {lane_name} of worker {shard} is full ({len(buf)} messages "
                f"waiting, {producer.ring.used_bytes():,} of {producer.ring.capacity:,} "
                f"ring bytes in use)"
            )
        self._append(out)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self.pending_flush:
            self.pending_flush = True
            linger = self.config.batch_linger_s
            if linger > 0:
                self.loop.call_later(linger, self._flush_soon)
            else:
                self.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self.pending_flush = False
        for shard, lanes in enumerate(self.buffers):
            for lane, buf in enumerate(lanes):
                if buf and not self.lane_locks[shard][lane].locked():
                    # One task per lane, so a full ring delays only its own lane.
                    task = self.loop.create_task(self._flush_lane(shard, lane, 1))
                    self.tasks.add(task)  # keep a reference (the loop holds weak ones)
                    task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("flushing a lane failed", exc_info=task.exception())
        if any(b for lanes in self.buffers for b in lanes):
            self._schedule_flush()  # anything left behind a lane that was busy

    async def flush(self, only: list[bytes] | None = None) -> None:
        """Write every non-empty buffer (or just ``only``'s full batches) as frames.

        Waits, never drops, while a ring is full; lanes are flushed independently.
        """
        if only is not None:
            for shard, lanes in enumerate(self.buffers):
                for lane, buf in enumerate(lanes):
                    if buf is only:
                        await self._flush_lane(shard, lane, self.config.batch_size)
                        return
            return
        jobs = [
            self._flush_lane(shard, lane, 1)
            for shard, lanes in enumerate(self.buffers)
            for lane, buf in enumerate(lanes)
            if buf
        ]
        await asyncio.gather(*jobs)

    async def _flush_lane(self, shard: int, lane: int, minimum: int) -> None:
        """Write frames from one buffer while it holds at least ``minimum`` messages."""
        size = self.config.batch_size
        buf = self.buffers[shard][lane]
        async with self.lane_locks[shard][lane]:
            while buf and len(buf) >= minimum:
                frame, n = _frames(buf[:size], size, self.max_frame_bytes)[0]
                # Remove only after the write: a cancelled flush loses nothing.
                await self._write(self.producers[shard][lane], frame)
                del buf[:n]
                self.counts["batches"] += 1

    async def _write(self, producer: RingProducer, frame: bytes) -> None:
        """Write one frame, waiting for space on the engine-wide space eventfd.

        Every waiting lane wakes on each signal and retries (the eventfd has one
        reader, this dispatcher; ``loop.add_reader`` allows one callback per fd).
        """
        if producer.offer((frame,)):
            return
        while True:
            event = self.space_event
            producer.request_space(True)
            try:
                if producer.offer((frame,)):
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), SPACE_RECHECK_S)
                if producer.offer((frame,)):
                    return
            finally:
                producer.request_space(False)

    def on_space(self) -> None:
        self.wakeups.lane_space.clear()
        event, self.space_event = self.space_event, asyncio.Event()
        event.set()  # wakes every waiter of this generation

    # -- return rings -----------------------------------------------------------
    def on_returns(self) -> None:
        self.wakeups.return_ready.clear()
        for shard, consumer in enumerate(self.returns):
            frames, _ = consumer.drain()
            if not frames:
                continue
            for frame in frames:
                try:
                    records = decode_records(frame)
                except CodecError:
                    self.counts["return_errors"] += 1
                    log.exception("undecodable return frame from worker %d", shard)
                    continue
                for rec in records:
                    try:
                        self._record(shard, rec)
                    except Exception:  # one bad record must not drop the ones after it
                        self.counts["return_errors"] += 1
                        log.exception("cannot process a return record from worker %d", shard)
            consumer.commit()
        if self.in_flight() == 0:
            self.settled_event.set()
        event, self.progress_event = self.progress_event, asyncio.Event()
        event.set()

    def _record(self, shard: int, rec: Any) -> None:
        if isinstance(rec, FrameDone):
            acked = self.acked[shard]
            fresh = rec.end > acked[rec.lane]  # else: a report repeated by a respawned worker
            if self.provisional[shard]:
                self._settle_letters(shard, rec.lane, rec.end, keep=fresh)
            if fresh:
                acked[rec.lane] = rec.end
                self.counts["delivered"] += rec.delivered
                self.counts["dead_lettered"] += rec.dead_lettered
                self.counts["expired"] += rec.expired
                self.lane_settled[rec.lane] += rec.delivered + rec.dead_lettered + rec.expired
        elif isinstance(rec, Reply):
            fut = self.futures.pop(rec.correlation_id, None)
            if fut is None or fut.done():
                self.counts["replies_unmatched"] += 1
            elif rec.ok:
                fut.set_result(msgspec.msgpack.decode(rec.value))
            else:
                fut.set_exception(RequestFailed(rec.error))
        elif isinstance(rec, DeadLetter):
            if rec.frame_end > self.acked[shard][rec.lane]:
                self.provisional[shard].append(rec)
            # else: its frame was reported settled before; this is a redelivery's echo
        elif isinstance(rec, Redelivered):
            self.counts["redelivered"] += rec.count
        elif isinstance(rec, WorkerStarted):
            # The previous worker died before reporting these letters' frames: those
            # frames are delivered again, and the new outcomes are the ones that count.
            self.provisional[shard].clear()

    def _settle_letters(self, shard: int, lane: int, end: int, keep: bool) -> None:
        """Store (``keep``) or drop the provisional letters of frames up to ``end`` in ``lane``."""
        waiting: list[DeadLetter] = []
        for dl in self.provisional[shard]:
            if dl.lane == lane and dl.frame_end <= end:
                if keep:
                    self.dead.add(dl)
            else:
                waiting.append(dl)
        self.provisional[shard] = waiting

    async def settle_marks(self, outs: list[Outgoing]) -> list[tuple[int, int, int]]:
        """Write ``outs`` to their rings; (shard, lane, ring position) each must be acked past.

        Lanes settle strictly in ring order, so once a lane's acked position
        reaches the mark, every one of these messages in that lane is settled.
        """
        await self.flush()
        touched = {(self.shard_of(recipient), lane) for _, recipient, lane, _ in outs}
        return [(s, lane, self.producers[s][lane].ring.write_pos) for s, lane in touched]

    async def wait_settled(self, marks: list[tuple[int, int, int]]) -> None:
        """Return once every (shard, lane, position) mark is settled (see ``settle_marks``)."""
        acked = self.acked
        while any(acked[s][lane] < pos for s, lane, pos in marks):
            if self.closed:
                raise EngineClosed("the engine stopped before the messages settled")
            # The cap re-checks in case a wake-up raced the event swap.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress_event.wait(), 0.1)

    def in_flight(self) -> int:
        c = self.counts
        return c["submitted"] - c["delivered"] - c["dead_lettered"] - c["expired"]

    async def drain(self, timeout: float | None) -> bool:
        """Wait until every submitted message is settled; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            return False
        while self.in_flight() > 0:
            self.settled_event.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                # The short cap re-checks the rings in case a wake-up raced the clear.
                await asyncio.wait_for(self.settled_event.wait(), min(remaining or 0.1, 0.1))
            except TimeoutError:
                self.on_returns()
        return True

    def close(self) -> None:
        self.closed = True
        self.loop.remove_reader(self.wakeups.return_ready.fd)
        self.loop.remove_reader(self.wakeups.lane_space.fd)
        for task in list(self.tasks):
            task.cancel()  # blocked flushes end here, before their rings are unmapped
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(EngineClosed("the engine stopped before the reply came"))
        self.futures.clear()
        self.dead.close()
