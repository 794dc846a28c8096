"""The dispatcher: shards messages into per-(worker, lane) batches and writes them to the rings.

Natural batching: a message is encoded once (``engine.core.builder``) and
appended to its (shard, lane) buffer; a buffer is written to its ring as one
frame when it holds ``batch_size`` messages, or when the event loop has run
out of other work (``call_soon``; with ``ENGINE_BATCH_LINGER_S`` > 0, at most
that long after the buffer's first message).  Only one coroutine writes to a
ring at a time, so each ring keeps exactly one producer even with many
submitters.  What comes back on the return rings is read by ``Returns``
(``engine.core.returns``), which the dispatcher owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

from engine.config import Config
from engine.core.builder import MessageBuilder, Outgoing, pack_frames
from engine.core.deferrals import Deferrals
from engine.core.events import EventLog
from engine.core.returns import Returns
from engine.core.sharding import Sharder
from engine.errors import EngineClosed, QueueFull
from ipc.codec import Priority
from ipc.records import DEFERRED_OVERHEAD
from ipc.ring import SPACE_RECHECK_S, RingProducer
from ipc.shard import LANES, EngineWakeups, ShardMemory

log = logging.getLogger("engine.dispatcher")


class Dispatcher:
    """Owns the producer end of every lane ring, and the reader of every return ring."""

    def __init__(
        self,
        config: Config,
        shards: list[ShardMemory],
        wakeups: EngineWakeups,
        events: EventLog | None = None,
    ) -> None:
        self.config = config
        self.shards = shards
        self.wakeups = wakeups
        self.shard_of = Sharder(len(shards))
        # A frame holds a batch; the largest frame a lane ring takes, minus its array header
        # (and room for a worker to hand the message back for a long retry).
        self.max_frame_bytes = shards[0].lanes[0].max_payload
        self.builder = MessageBuilder(config, self.max_frame_bytes - 5 - DEFERRED_OVERHEAD)
        self.producers: list[list[RingProducer]] = [s.lane_producers() for s in shards]
        self.buffers: list[list[list[bytes]]] = [[[] for _ in range(LANES)] for _ in shards]
        self.pending_flush = False
        self.tasks: set[asyncio.Task[None]] = set()
        # One writer per ring, but rings independent: a full lane of one worker never
        # holds up the others.
        self.lane_locks = [[asyncio.Lock() for _ in range(LANES)] for _ in shards]
        self.space_event = asyncio.Event()
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
                "deferrals",
            ),
            0,
        )
        self.lane_submitted = [0] * LANES
        self.recipients: dict[str, None] = {}
        self.topics: dict[str, dict[str, None]] = {}
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.returns = Returns(config, shards, wakeups, self.counts, events)
        if self.returns.dead.max_id:
            # Restored letters keep their ids: new messages are numbered above them.
            self.builder.ids = itertools.count(self.returns.dead.max_id + 1)
        # Messages written to each (shard, lane) ring so far, and the recipients held out
        # of the rings for a long retry (``engine.core.deferrals``).
        self.written = [[0] * LANES for _ in shards]
        self.deferrals = Deferrals(
            shards[0].lanes[0].capacity,
            self.counts,
            self.returns.lane_settled,
            self.returns.acked,
            self.buffers,
            self.written,
            self.producers,
            self._schedule_flush,
        )
        self.holding = self.deferrals.holding
        self.returns.on_deferred = self.deferrals.hand_back
        self.returns.on_progress = self.deferrals.progress
        self.loop.add_reader(wakeups.lane_space.fd, self.on_space)
        # The Engine, its stats and tests reach these through the dispatcher: the
        # builder's and the return reader's own objects and bound methods, not copies.
        self.options = self.builder.options
        self.default_options = self.builder.default_options
        self.build = self.builder.build
        self.build_many = self.builder.build_many
        self.ids = self.builder.ids
        self.acked = self.returns.acked
        self.lane_settled = self.returns.lane_settled
        self.futures = self.returns.futures
        self.dead = self.returns.dead
        self.in_flight = self.returns.in_flight

    # -- queueing ----------------------------------------------------------------
    def _append(self, out: Outgoing) -> list[bytes]:
        if self.closed:
            raise EngineClosed("the engine is not running; submit inside `async with Engine(...)`")
        mid, recipient, lane, data = out
        shard = self.shard_of(recipient)
        buf = self.buffers[shard][lane]
        self.counts["submitted"] += 1
        self.lane_submitted[lane] += 1
        if self.holding and (lane, recipient) in self.holding:
            self.deferrals.hold(shard, mid, lane, recipient, data)
            return buf
        buf.append(data)
        return buf

    async def enqueue(self, out: Outgoing) -> None:
        await self.room(out)
        await self.backpressure(self._append(out))

    async def room(self, out: Outgoing) -> None:
        """Wait until ``out`` may be queued: a parked recipient's FIFO is bounded."""
        if self.holding and (out[2], out[1]) in self.holding:
            await self.deferrals.wait_room(out[2], out[1], len(out[3]))

    def queue(self, out: Outgoing) -> list[bytes]:
        """Queue ``out`` now, without waiting (after `room`); its lane's buffer, for `backpressure`.

        For a caller that must know whether a message was queued when it is
        cancelled (a replay): queued is from here, not from the end of `enqueue`.
        """
        return self._append(out)

    async def backpressure(self, buf: list[bytes]) -> None:
        """Backpressure after queueing: a full batch is written before the caller goes on.

        A cancel while it waits leaves what is queued to a scheduled flush.
        """
        if len(buf) < self.config.batch_size:
            self._schedule_flush()
            return
        try:
            await self.flush(buf)
        except BaseException:
            self._schedule_flush()
            raise

    async def enqueue_many(self, outs: list[Outgoing]) -> None:
        """Queue many messages; only full batches are written on the way (fewer, fuller frames)."""
        if self.closed:
            raise EngineClosed("the engine is not running; submit inside `async with Engine(...)`")
        size = self.config.batch_size
        buffers, shard_of, lane_submitted = self.buffers, self.shard_of, self.lane_submitted
        cached = shard_of.cache.get
        holding = self.holding
        self.counts["submitted"] += len(outs)
        appended = 0
        try:
            for mid, recipient, lane, data in outs:
                shard = cached(recipient)
                if shard is None:
                    shard = shard_of(recipient)
                if holding and (lane, recipient) in holding:
                    await self.deferrals.wait_room(lane, recipient, len(data))
                    if (lane, recipient) in holding:  # else released while it waited
                        self.deferrals.hold(shard, mid, lane, recipient, data)
                        lane_submitted[lane] += 1
                        appended += 1
                        continue
                buf = buffers[shard][lane]
                buf.append(data)
                lane_submitted[lane] += 1
                appended += 1
                if len(buf) >= size:
                    await self._flush_lane(shard, lane, size)  # what flush(buf) would do
        finally:
            # Cancelled while a flush waited: what was not appended was never submitted.
            self.counts["submitted"] -= len(outs) - appended
            self._schedule_flush()

    def enqueue_nowait(self, out: Outgoing) -> None:
        """Queue one message now, or raise QueueFull and queue nothing."""
        if self.closed:
            raise EngineClosed("the engine is not running; submit inside `async with Engine(...)`")
        _, recipient, lane, data = out
        shard = self.shard_of(recipient)
        buf = self.buffers[shard][lane]
        if self.holding and (lane, recipient) in self.holding:
            self.deferrals.check_room(lane, recipient, len(data))  # or QueueFull
            self._append(out)
            return
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
        for frame, n in pack_frames(buf, self.config.batch_size, self.max_frame_bytes):
            if not producer.offer((frame,)):
                break
            written += n
            self.counts["batches"] += 1
        del buf[:written]
        self.written[shard][lane] += written
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
        if self.closed:
            # Stopped: the drain is over and what is still buffered is counted as
            # abandoned; the rings are about to be unmapped, never write to them now.
            return
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
                frame, n = pack_frames(buf[:size], size, self.max_frame_bytes)[0]
                # Remove only after the write: a cancelled flush loses nothing.
                await self._write(self.producers[shard][lane], frame)
                del buf[:n]
                self.written[shard][lane] += n
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

    # -- settling ----------------------------------------------------------------
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
        acked, busy = self.acked, self.deferrals.busy
        # A message handed back for a long retry is settled in its ring but not yet
        # delivered: wait for the lane's held and released ones as well.
        while any(acked[s][lane] < pos or busy(s, lane) for s, lane, pos in marks):
            if self.closed:
                raise EngineClosed("the engine stopped before the messages settled")
            # The cap re-checks in case a wake-up raced the event swap.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.returns.progress_event.wait(), 0.1)

    # -- draining and closing ----------------------------------------------------
    async def drain(self, timeout: float | None) -> bool:
        """Wait until every submitted message is settled; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            return False
        while self.in_flight() > 0:
            self.returns.settled_event.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                # The short cap re-checks the rings in case a wake-up raced the clear.
                await asyncio.wait_for(
                    self.returns.settled_event.wait(), min(remaining or 0.1, 0.1)
                )
            except TimeoutError:
                self.returns.on_returns()
        return True

    def close(self) -> None:
        self.closed = True
        self.loop.remove_reader(self.wakeups.lane_space.fd)
        for task in list(self.tasks):
            task.cancel()  # blocked flushes end here, before their rings are unmapped
        self.deferrals.close()
        self.returns.close()
