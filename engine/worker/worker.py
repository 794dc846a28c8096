"""A worker process: drains its shard's lanes and delivers on its own uvloop loop.

Flow: the reader fetches frames (highest lane first) while fewer than
``window`` messages are unsettled, decodes each frame as one batch and queues
every message on its (lane, recipient) FIFO.  Sync handlers are called inline
by a dispatcher loop over the ready queue; async handlers run on a fixed pool
of ``delivery_concurrency`` coroutines (never a task per message).  Settled
messages are reported on the return ring; a frame is committed in its lane
only after the report that covers it is published, so a crash can repeat
work but never lose or miscount it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.backoff import backoff_s
from engine.config import Config
from engine.errors import CodecError, EngineError, Reject, Retry
from engine.exitcodes import ChildExit
from engine.worker.delivery import (
    DEAD_LETTERED,
    DELIVERED,
    EXPIRED,
    FrameTrack,
    Pending,
    RecipientLane,
)
from engine.worker.sinks import Sink
from ipc.codec import DECODE_ERRORS, Kind, Message, decode, decode_batch
from ipc.control import Histogram, StatsSnapshot, WorkerFailed, WorkerReady, send_control
from ipc.records import (
    DeadLetter,
    FrameDone,
    Redelivered,
    Reply,
    ReturnRecord,
    WorkerStarted,
    encode_records,
)
from ipc.ring import RingConsumer, RingProducer
from ipc.shard import (
    LANES,
    SLOT_ACTIVE,
    SLOT_FRAME_END,
    SLOT_INDEX,
    SLOT_LANE,
    SLOT_PID,
    ShardMemory,
    ShardSpec,
)

FRAMES_PER_ROUND = 4  # frames fetched (and, for sync sinks, delivered) between yields
# A sync handler runs on the loop: after this long without yielding, the rest of a
# batch goes through the queue so signals, heartbeats and stats are never held up
# by a slow handler (a 10 ms handler would otherwise hold the loop for a whole round).
YIELD_AFTER_NS = 5_000_000
MAX_SALVAGE_COUNT = 1 << 16  # more messages than any batch frame the dispatcher writes
WORKER_RECURSION_LIMIT = 4000  # > the dispatcher's default 1000 plus the loop's frames
monotonic_ns = time.monotonic_ns
_LANE_RANGE = range(LANES)
WORKER_COUNTERS = (
    "delivered",
    "failed_attempts",
    "retried",
    "dead_lettered",
    "expired",
    "redelivered",
    "batches",
    "fetched",
    "replies",
)
"""What a worker counts and reports in its StatsSnapshot; the monitor sums these."""
_OUTCOMES = ("delivered", "dead_lettered", "expired")


async def _probe() -> None:
    return None


_coro = _probe()
_Coroutine = type(_coro)
_coro.close()


def _awaitable(result: object) -> bool:
    """Whether a sink's result must be awaited (the common coroutine case checked first)."""
    return type(result) is _Coroutine or inspect.isawaitable(result)


RECORDS_PER_FRAME = 512
_encoder = msgspec.msgpack.Encoder()
_NIL = msgspec.Raw(b"\xc0")


@dataclass
class WorkerPlan:
    """What the monitor tells a (re)spawned worker about its shard's history."""

    careful: bool = False  # deliver the redelivery window one by one, recording each
    quarantine: set[tuple[int, int, int]] = field(default_factory=set)  # (lane, end, index)
    crashes: int = 0


def window_for(config: Config) -> int:
    """Messages a worker may hold fetched and uncommitted: bounds memory and redelivery."""
    return max(4 * config.delivery_concurrency, 2 * config.batch_size)


class Worker:
    """The delivery engine of one shard, inside its worker process."""

    def __init__(
        self, index: int, shard: ShardMemory, config: Config, sink: Sink, plan: WorkerPlan
    ) -> None:
        self.index = index
        self.shard = shard
        self.config = config
        self.sink = sink
        self.plan = plan
        self.deliver_fn = sink.deliver
        self.is_async = sink.is_async
        self.limit = config.recipient_concurrency
        self.window = window_for(config)
        self.timeout_ns = int(config.handler_timeout_s * 1e9)
        self.rng = random.Random()
        # Redelivery window: what the previous worker of this shard had fetched.
        self.redeliver_until = [r.read_pos for r in shard.lanes]
        self.consumers: list[RingConsumer] = shard.lane_consumers()
        self.returns: RingProducer = shard.return_producer()
        self.frames: list[deque[FrameTrack]] = [deque() for _ in range(LANES)]
        self.lanes: list[dict[str, RecipientLane]] = [{} for _ in range(LANES)]
        self.ready: list[deque[RecipientLane]] = [deque() for _ in range(LANES)]
        self.due: deque[Pending] = deque()  # retries whose backoff ended
        self.unsettled = 0
        self.out: list[ReturnRecord] = [WorkerStarted(os.getpid())]
        self.commit_dirty = [False] * LANES
        self.higher_streak = 0
        self.fetch_streak = 0  # frames fetched from higher lanes while a lower one waited
        self.stopping = False
        self.round_start = 0
        # True while a flush waits for return-ring space: settled frames cannot be
        # committed then, so fetching pauses too (else a lagging dispatcher would let
        # the redelivery window, fetched but uncommitted, grow past the window).
        self.returns_waiting = False
        self.counters = dict.fromkeys(WORKER_COUNTERS, 0)
        self.lat_start = Histogram()
        self.lat_settle = Histogram()
        self.wake = asyncio.Event()  # space in the window, or all settled (reader, stop)
        # Idle runners park on their own future and are woken one at a time: one Event
        # for the whole pool woke every idle coroutine on every settle (~5 us each).
        self.idle_runners: deque[asyncio.Future[None]] = deque()
        self.flush_wanted = asyncio.Event()
        self.flush_lock = asyncio.Lock()
        self.side_tasks: set[asyncio.Task[None]] = set()
        self.fatal: asyncio.Future[None]  # made in run(), on the worker's own loop
        self.careful_left = 0

    # -- fetching --------------------------------------------------------------
    def fetch(self, max_frames: int = FRAMES_PER_ROUND) -> int:
        """Take up to ``max_frames`` frames, one at a time from the highest non-empty lane.

        Rescanning from the top after every frame keeps priority strict even when
        a frame's deliveries take long.  Returns the frames taken; fewer than
        ``max_frames`` means the lanes are empty or the window is full.
        """
        taken = 0
        consumers = self.consumers
        rings = self.shard.lanes
        self.round_start = monotonic_ns()
        while (
            taken < max_frames
            and self.unsettled < self.window
            and not self.returns_waiting
            and not self.stopping
        ):
            if monotonic_ns() - self.round_start > YIELD_AFTER_NS:
                return max_frames  # a full round: the reader yields, then fetches on

            order: Iterable[int] = _LANE_RANGE
            if self.fetch_streak >= self.config.starvation_limit:
                # Starvation guard at fetch level too: a flood in a high lane must not
                # keep a lower lane's frames out of the window for ever.
                order = reversed(_LANE_RANGE)
                self.fetch_streak = 0
            for lane in order:
                frames, ends = consumers[lane].drain(max_frames=1)
                if frames:
                    lower = any(rings[x].pending_bytes() for x in range(lane + 1, LANES))
                    self.fetch_streak = self.fetch_streak + 1 if lower else 0
                    self._accept(lane, frames[0], ends[0])
                    taken += 1
                    break
            else:
                break
        return taken

    def _alone(self, lane: int) -> bool:
        """True if no other lane has work waiting (fetched or not): the fast path may run."""
        if self.due:
            return False
        for other in range(LANES):
            if other != lane and (self.ready[other] or self.shard.lanes[other].pending_bytes()):
                return False
        return True

    def _accept(self, lane: int, frame: bytes, end: int) -> int:
        try:
            msgs = decode_batch(frame)
            bad: list[tuple[int, str]] = []
        except CodecError:
            msgs, bad = _salvage(frame)
        track = FrameTrack(lane, end, len(msgs) + len(bad))
        self.frames[lane].append(track)
        for index, error in bad:
            # Never crash on a frame (it would come back after every respawn): the
            # undecodable message is dead-lettered and its neighbours delivered.
            self.unsettled += 1
            self.dead_letter(Pending(Message(id=0, recipient=""), track, index), "malformed", error)
        self.counters["batches"] += 1
        self.counters["fetched"] += len(msgs)
        redelivery = end <= self.redeliver_until[lane]
        if redelivery:
            self.counters["redelivered"] += len(msgs)
            self.out.append(Redelivered(len(msgs)))
            if self.plan.careful:
                self.careful_left += len(msgs)
        if not msgs:
            self._maybe_commit(track)
            return 0
        if not self.is_async and not (redelivery and self.plan.careful) and self._alone(lane):
            self._deliver_now(track, msgs)
            return len(msgs)
        states = self.lanes[lane]
        ready = self.ready[lane]
        limit = self.limit
        for i, msg in enumerate(msgs):
            p = Pending(msg, track, i)
            st = states.get(msg.recipient)
            if st is None:
                st = states[msg.recipient] = RecipientLane((lane, msg.recipient))
            p.state = st
            st.queue.append(p)
            if st.wants_slot(limit):
                st.avail += 1
                ready.append(st)
        self.unsettled += len(msgs)
        self.wake.set()
        self._wake_runner()
        return len(msgs)

    def _deliver_now(self, track: FrameTrack, msgs: list[Message]) -> None:
        """Sync sinks: deliver a fetched batch right here, in order, one call each.

        The fast path for the common case; a message whose recipient already has
        a backlog (a retry holding its lane) joins that FIFO instead, and a failed
        delivery goes through the general retry path.
        """
        lane = track.lane
        states = self.lanes[lane]
        deliver = self.deliver_fn
        record_start, record_settle = self.lat_start.record, self.lat_settle.record
        quarantine = self.plan.quarantine
        counts = track.counts
        self.unsettled += len(msgs)
        delivered = 0
        deadline = self.round_start + YIELD_AFTER_NS
        for i, msg in enumerate(msgs):
            if msg.recipient in states or (quarantine and (lane, track.end, i) in quarantine):
                self._queue(Pending(msg, track, i), lane)
                continue
            now = monotonic_ns()
            if now > deadline or self.stopping:
                # Out of time: the rest waits in the queue for the inline runner,
                # which yields between messages when they are slow.
                for j in range(i, len(msgs)):
                    self._queue(Pending(msgs[j], track, j), lane)
                break
            if msg.expires_ns and now >= msg.expires_ns:
                p = Pending(msg, track, i)
                self.settle(p, EXPIRED, now)
                continue
            created = msg.created_ns
            if created:
                record_start(now - created)
            try:
                result = deliver(msg)
            except Exception as exc:
                p = Pending(msg, track, i)
                st = states[msg.recipient] = RecipientLane((lane, msg.recipient))
                st.busy = 1  # the retry holds the recipient's lane
                p.state = st
                self.fail(p, exc)
                continue
            if _awaitable(result):
                # A plain function returned an awaitable: finish it in order, holding
                # the recipient's lane, like a retry.
                p = Pending(msg, track, i)
                st = states[msg.recipient] = RecipientLane((lane, msg.recipient))
                st.busy = 1
                p.state = st
                self._spawn(self._finish_awaitable(p, result))
                continue
            if msg.kind == Kind.REQUEST and msg.correlation_id:
                self._reply(msg, result)
            delivered += 1
            if created:
                record_settle(monotonic_ns() - created)
        counts[DELIVERED] += delivered
        track.remaining -= delivered
        self.unsettled -= delivered
        self.counters["delivered"] += delivered
        if track.remaining == 0:
            self._maybe_commit(track)
        if self.out:
            self.flush_wanted.set()

    async def _finish_awaitable(self, p: Pending, result: Any) -> None:
        try:
            value = await result
        except Exception as exc:
            self.fail(p, exc)
        else:
            self.finish(p, value)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.side_tasks.add(task)
        task.add_done_callback(self.side_tasks.discard)

    def _queue(self, p: Pending, lane: int) -> None:
        st = self.lanes[lane].get(p.msg.recipient)
        if st is None:
            st = self.lanes[lane][p.msg.recipient] = RecipientLane((lane, p.msg.recipient))
        p.state = st
        st.queue.append(p)
        if st.wants_slot(self.limit):
            st.avail += 1
            self.ready[lane].append(st)
        self.wake.set()
        self._wake_runner()

    def _wake_runner(self, every: bool = False) -> None:
        """Hand new work to one idle runner (``every``: wake them all, e.g. to exit)."""
        idle = self.idle_runners
        while idle:
            fut = idle.popleft()
            if not fut.done():
                fut.set_result(None)
                if not every:
                    return

    # -- choosing the next message ---------------------------------------------
    def next_pending(self) -> Pending | None:
        """Retries first, then the highest ready lane, with the starvation guard."""
        if self.due:
            return self.due.popleft()
        ready = self.ready
        nonempty = [lane for lane in _LANE_RANGE if ready[lane]]
        if not nonempty:
            return None
        chosen = nonempty[0]
        if len(nonempty) == 1:
            self.higher_streak = 0
        elif self.higher_streak >= self.config.starvation_limit:
            chosen = nonempty[-1]  # the lowest waiting lane gets its turn
            self.higher_streak = 0
        else:
            self.higher_streak += 1
        st = ready[chosen].popleft()
        st.avail -= 1
        p = st.queue.popleft()
        st.busy += 1
        return p

    # -- delivering ------------------------------------------------------------
    def start_delivery(self, p: Pending) -> Any:
        """Run the pre-checks and call the sink; returns an awaitable or a sentinel."""
        msg = p.msg
        now = time.monotonic_ns()
        if msg.expires_ns and now >= msg.expires_ns:
            self._careful_skip(p)
            self.settle(p, EXPIRED, now)
            return _SETTLED
        if (p.frame.lane, p.frame.end, p.index) in self.plan.quarantine:
            self._careful_skip(p)
            self.dead_letter(p, "worker_crash", f"worker crashed {self.plan.crashes} times on it")
            return _SETTLED
        if msg.created_ns:
            self.lat_start.record(now - msg.created_ns)
        return now

    def finish(self, p: Pending, result: Any) -> None:
        msg = p.msg
        if msg.kind == Kind.REQUEST and msg.correlation_id:
            self._reply(msg, result)
        self.settle(p, DELIVERED, monotonic_ns())

    def _reply(self, msg: Message, result: Any) -> None:
        try:
            value = msgspec.Raw(_encoder.encode(result))
        except (TypeError, msgspec.EncodeError) as exc:
            error = f"reply not encodable: {exc}"
            self.out.append(Reply(msg.correlation_id, False, _NIL, error))
        else:
            self.out.append(Reply(msg.correlation_id, True, value))
        self.counters["replies"] += 1

    def fail(self, p: Pending, exc: BaseException) -> None:
        msg = p.msg
        if isinstance(exc, Reject):
            self.dead_letter(p, "rejected", exc.reason)
            return
        self.counters["failed_attempts"] += 1
        attempts = msg.attempt + 1
        if attempts >= self.config.retry_max_attempts:
            self.dead_letter(p, "max_attempts", f"{type(exc).__name__}: {exc}")
            return
        if isinstance(exc, Retry) and exc.after is not None:
            delay = exc.after
        else:
            cfg = self.config
            delay = backoff_s(
                msg.attempt, cfg.retry_backoff_base_s, cfg.retry_backoff_max_s, rng=self.rng
            )
        msg.attempt = attempts
        due_ns = time.monotonic_ns() + int(delay * 1e9)
        if msg.expires_ns and due_ns >= msg.expires_ns:
            # It would expire before its retry: never deliver it again, settle at expiry.
            self._after(msg.expires_ns, self._expire_due, p)
            return
        self.counters["retried"] += 1
        self._after(due_ns, self._retry_due, p)

    def _after(self, due_ns: int, callback: Callable[[Pending, int], None], p: Pending) -> None:
        """Run ``callback(p, due_ns)`` no earlier than ``due_ns`` on the monotonic clock.

        uvloop's timers have millisecond resolution and may fire up to 1 ms early,
        so callbacks re-check the clock and re-arm (a retry is never early, and a
        message is never delivered just before its TTL ends instead of expiring).
        """
        delay = max(0.0, (due_ns - time.monotonic_ns()) / 1e9)
        asyncio.get_running_loop().call_later(delay + 0.001, callback, p, due_ns)

    def _retry_due(self, p: Pending, due_ns: int) -> None:
        if time.monotonic_ns() < due_ns:
            self._after(due_ns, self._retry_due, p)
            return
        self.due.append(p)
        self._wake_runner()

    def _expire_due(self, p: Pending, due_ns: int) -> None:
        now = time.monotonic_ns()
        if now < due_ns:
            self._after(due_ns, self._expire_due, p)
            return
        self.settle(p, EXPIRED, now)

    def dead_letter(self, p: Pending, reason: str, error: str) -> None:
        msg = p.msg
        now = time.monotonic_ns()
        track = p.frame
        self.out.append(DeadLetter(msg, reason, msg.attempt + 1, error, now, track.lane, track.end))
        if msg.kind == Kind.REQUEST and msg.correlation_id:
            self.out.append(Reply(msg.correlation_id, False, _NIL, f"{reason}: {error}"))
        self.settle(p, DEAD_LETTERED, now)

    def settle(self, p: Pending, outcome: int, now: int) -> None:
        track = p.frame
        track.counts[outcome] += 1
        track.remaining -= 1
        self.counters[_OUTCOMES[outcome]] += 1
        if p.msg.created_ns:
            self.lat_settle.record(now - p.msg.created_ns)
        self.unsettled -= 1
        st = p.state
        if st is not None:
            st.busy -= 1
            if st.wants_slot(self.limit):
                st.avail += 1
                self.ready[st.key[0]].append(st)
                self._wake_runner()
            elif st.idle():
                del self.lanes[st.key[0]][st.key[1]]
        if track.remaining == 0:
            self._maybe_commit(track)
        if self.out:
            self.flush_wanted.set()  # replies and dead letters go out this tick
        self.wake.set()
        if self.stopping and self.unsettled == 0:
            self._wake_runner(every=True)  # nothing left: let them all return

    def _maybe_commit(self, track: FrameTrack) -> None:
        frames = self.frames[track.lane]
        if frames and frames[0] is track:
            self.commit_dirty[track.lane] = True
            self.flush_wanted.set()

    # -- reporting and committing ------------------------------------------------
    async def flusher(self) -> None:
        """Publish return records, then commit the frames they cover (never before)."""
        while True:
            await self.flush_wanted.wait()
            self.flush_wanted.clear()
            await self.flush()
            if self.stopping and self.unsettled == 0 and not self.out:
                return

    async def flush(self) -> None:
        """Serialised: two concurrent flushes could publish FrameDone out of order."""
        async with self.flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        commits: list[tuple[int, int]] = []
        for lane in range(LANES):
            if not self.commit_dirty[lane]:
                continue
            self.commit_dirty[lane] = False
            frames = self.frames[lane]
            end = -1
            while frames and frames[0].remaining == 0:
                t = frames.popleft()
                d, x, e = t.counts
                self.out.append(FrameDone(lane, t.end, d, x, e))
                end = t.end
            if end >= 0:
                commits.append((lane, end))
        if self.out:
            records, self.out = self.out, []
            chunks = self._return_frames(records)
            done = self.returns.offer(chunks)
            if done < len(chunks):
                self.returns_waiting = True
                try:
                    await self.returns.write_async(chunks[done:])
                finally:
                    self.returns_waiting = False
                    self.wake.set()  # the reader may fetch again
        for lane, end in commits:
            self.consumers[lane].commit(end)

    def _return_frames(self, records: list[ReturnRecord]) -> list[bytes]:
        """Encode records into frames that fit the return ring (by count and by bytes)."""
        limit = self.returns.ring.max_payload // 2
        frames: list[bytes] = []
        chunk: list[ReturnRecord] = []
        size = 0
        for original in records:
            rec = original
            one = len(encode_records([rec]))
            if one > limit:
                rec = _shrunk(rec, one, limit)
                one = len(encode_records([rec]))
            if chunk and (len(chunk) >= RECORDS_PER_FRAME or size + one > limit):
                frames.append(encode_records(chunk))
                chunk, size = [], 0
            chunk.append(rec)
            size += one
        if chunk:
            frames.append(encode_records(chunk))
        return frames

    # -- loops -----------------------------------------------------------------
    async def reader(self) -> None:
        lane_ready = self.shard.spec.lane_ready
        beat = self.shard.lanes[0].beat
        while not self.stopping:
            full_round = self.fetch() >= FRAMES_PER_ROUND
            beat()  # progress is a sign of life too, whatever the timer's luck on a busy host
            if self.out:
                self.flush_wanted.set()
            if full_round and self.unsettled < self.window and not self.returns_waiting:
                await asyncio.sleep(0)  # more is waiting: let the flusher and heartbeat run
            elif self.unsettled >= self.window or self.returns_waiting:
                self.wake.clear()
                await self.wake.wait()  # settles make room
            else:
                await lane_ready.wait_async(self.config.heartbeat_interval_s)

    async def _next_delivery(self) -> tuple[Pending, int] | None:
        """The next message for the sink and its start time (ns); None once stopped and settled.

        Shared by both runners: waits for work, and settles expired or quarantined
        messages itself without handing them out.
        """
        while True:
            p = self.next_pending()
            if p is None:
                if self.stopping and self.unsettled == 0:
                    self._wake_runner(every=True)
                    return None
                parked = asyncio.get_running_loop().create_future()
                self.idle_runners.append(parked)
                await parked
                continue
            if self.idle_runners and (self.due or any(self.ready)):
                self._wake_runner()  # more work than this runner: pass the baton on
            started = self.start_delivery(p)
            if started is not _SETTLED:
                self._mark(p)
                return p, started

    async def inline_runner(self) -> None:
        """Sync sinks: deliver in order on the loop, no coroutine per message."""
        deliver = self.deliver_fn
        done = 0
        last_yield = monotonic_ns()
        while (job := await self._next_delivery()) is not None:
            p = job[0]
            try:
                result = deliver(p.msg)
                if _awaitable(result):
                    # A plain function returned an awaitable (e.g. a partial of an
                    # async def): await it here, in order, rather than drop it.
                    result = await result
            except Exception as exc:
                self.fail(p, exc)
            else:
                self.finish(p, result)
            self._unmark()
            done += 1
            if done & 255 == 0 or monotonic_ns() - last_yield > YIELD_AFTER_NS:
                await asyncio.sleep(0)  # let the reader, flusher, heartbeat and signals run
                last_yield = monotonic_ns()

    async def pool_runner(self, slot: list[int]) -> None:
        """One of the fixed pool of async deliverers; ``slot[0]`` holds its deadline."""
        deliver = self.deliver_fn
        task = asyncio.current_task()
        assert task is not None
        while (job := await self._next_delivery()) is not None:
            p, started = job
            slot[0] = started + self.timeout_ns
            try:
                result = deliver(p.msg)
                if _awaitable(result):
                    result = await result
            except asyncio.CancelledError as exc:
                if slot[1] == 1:
                    self.fail(p, TimeoutError(f"handler exceeded {self.config.handler_timeout_s}s"))
                elif task.cancelling():
                    raise  # a real cancellation (shutdown)
                else:
                    self.fail(p, exc)  # the handler raised it itself: a failure like any other
            except Exception as exc:
                self.fail(p, exc)
            else:
                self.finish(p, result)
            finally:
                slot[0] = 0
                if slot[1]:
                    slot[1] = 0
                    task.uncancel()
            # Not in `finally`: a BaseException that kills the process must leave the
            # slot marked, so the monitor can name the message that killed it.
            self._unmark()

    def _mark(self, p: Pending) -> None:
        """Careful mode: record the delivery in the slot so a crash names its message."""
        if self.careful_left and p.frame.end <= self.redeliver_until[p.frame.lane]:
            idx = self.shard.slot_idx
            idx[SLOT_LANE] = p.frame.lane
            idx[SLOT_FRAME_END] = p.frame.end
            idx[SLOT_INDEX] = p.index
            idx[SLOT_ACTIVE] = 1
            self.careful_left -= 1

    def _careful_skip(self, p: Pending) -> None:
        """A window message settled without a delivery still counts towards leaving careful mode."""
        if self.careful_left and p.frame.end <= self.redeliver_until[p.frame.lane]:
            self.careful_left -= 1
            self._unmark()

    def _unmark(self) -> None:
        if not self.plan.careful:
            return
        self.shard.slot_idx[SLOT_ACTIVE] = 0
        if self.is_async and self.careful_left == 0 and len(self.slots) == 1 and self.plan.careful:
            self.plan.careful = False
            self._grow_pool(self.config.delivery_concurrency - 1)

    def _grow_pool(self, n: int) -> None:
        for _ in range(n):
            slot = [0, 0]
            task = asyncio.ensure_future(self.pool_runner(slot))
            task.add_done_callback(self._core_done)
            self.slots.append((task, slot))

    def _core_done(self, task: asyncio.Task[None]) -> None:
        """Any core task that ends with an error (pool grown later included) fails the worker."""
        if not task.cancelled() and task.exception() is not None and not self.fatal.done():
            self.fatal.set_exception(task.exception() or RuntimeError("task failed"))

    async def watchdog(self, slots: list[tuple[asyncio.Task[None], list[int]]]) -> None:
        """Cancel deliveries past the handler timeout: one timer for the whole pool."""
        period = min(self.config.handler_timeout_s / 4, 0.25)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic_ns()
            for task, slot in slots:
                if slot[0] and now > slot[0] and slot[1] == 0:
                    slot[1] = 1
                    task.cancel()

    async def heartbeat(self, send: Callable[[Any], None]) -> None:
        ring = self.shard.lanes[0]
        stats_every = self.config.stats_interval_s
        tick = min(self.config.heartbeat_interval_s, stats_every)  # neither runs late
        next_stats = 0.0
        while True:
            ring.beat()
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + stats_every
                send(self.snapshot())
            await asyncio.sleep(tick)

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(
            worker=self.index,
            pid=os.getpid(),
            counters=dict(self.counters),
            latency_start=self.lat_start,
            latency_settle=self.lat_settle,
            sent_ns=time.monotonic_ns(),
        )

    async def run(self, send: Callable[[Any], None]) -> None:
        loop = asyncio.get_running_loop()
        self.fatal = loop.create_future()
        stop = asyncio.Event()

        def on_stop() -> None:
            # Stop fetching at once, not a few loop iterations later when `run` resumes:
            # a recycled worker should hand back its ring promptly.
            self.stopping = True
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, on_stop)
        loop.add_signal_handler(signal.SIGINT, on_stop)
        tasks: list[asyncio.Task[None]] = []
        self.slots: list[tuple[asyncio.Task[None], list[int]]] = []
        if self.is_async:
            # Careful mode starts one deliverer; the pool grows once the
            # redelivery window is settled (see _unmark).
            self._grow_pool(1 if self.plan.careful else self.config.delivery_concurrency)
            tasks.append(asyncio.ensure_future(self.watchdog(self.slots)))
        else:
            tasks.append(asyncio.ensure_future(self.inline_runner()))
        reader = asyncio.ensure_future(self.reader())
        flusher = asyncio.ensure_future(self.flusher())
        beat = asyncio.ensure_future(self.heartbeat(send))
        send(WorkerReady(worker=self.index, pid=os.getpid()))
        stopper = asyncio.ensure_future(stop.wait())
        for t in (reader, flusher, beat, *tasks):
            t.add_done_callback(self._core_done)
        waiting: set[asyncio.Future[Any]] = {stopper, self.fatal}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if self.fatal.done():
            # A broken loop must not idle on as a "healthy" worker: exit, so the
            # monitor respawns it and the frames it held are delivered again.
            raise WorkerCrashed(f"worker {self.index} task failed") from self.fatal.exception()
        # Graceful stop: fetch nothing more, settle what we hold, report, exit.
        self.stopping = True
        reader.cancel()
        self.wake.set()
        self._wake_runner(every=True)
        self.flush_wanted.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.shutdown_timeout_s):
                while self.unsettled:
                    self.wake.clear()
                    await self.wake.wait()
                await self.flush()
        for t in (*tasks, *(t for t, _ in self.slots), flusher, beat):
            t.cancel()
        send(self.snapshot())


_SETTLED = object()


def _shrunk(rec: ReturnRecord, size: int, limit: int) -> ReturnRecord:
    """A record too big for the return ring, without its bulk (and saying so)."""
    note = f"(a {size:,}-byte record exceeds the return ring's {limit:,}-byte limit)"
    if isinstance(rec, Reply):
        return Reply(rec.correlation_id, False, _NIL, f"reply too large {note}")
    if isinstance(rec, DeadLetter):
        msg = msgspec.structs.replace(rec.message, payload=_NIL)
        error = f"{rec.error} [payload dropped {note}]"
        return DeadLetter(msg, rec.reason, rec.attempts, error, rec.at_ns, rec.lane, rec.frame_end)
    return rec


def _salvage(frame: bytes) -> tuple[list[Message], list[tuple[int, str]]]:
    """Decode a batch message by message: the good ones, and (index, error) for the rest.

    A frame that cannot even be split into messages has each of its messages (the
    count is in the array header) dead-lettered, so the frame settles and the
    worker never dies on it (it would meet the same frame after every respawn).
    """
    try:
        items = msgspec.msgpack.decode(frame, type=list[msgspec.Raw])
    except _SALVAGE_ERRORS as exc:
        error = f"undecodable frame of {len(frame)} bytes: {type(exc).__name__}: {exc}"
        return [], [(i, error) for i in range(max(1, _array_length(frame)))]
    good: list[Message] = []
    bad: list[tuple[int, str]] = []
    for i, item in enumerate(items):
        try:
            good.append(decode(item))
        except CodecError as exc:
            bad.append((i, str(exc)))
    return good, bad


_SALVAGE_ERRORS: tuple[type[Exception], ...] = (*DECODE_ERRORS, ValueError)


def _array_length(frame: bytes) -> int:
    """The element count a msgpack array header announces (0 if it is not one)."""
    if not frame:
        return 0
    head = frame[0]
    if 0x90 <= head <= 0x9F:
        return head & 0x0F
    if head == 0xDC and len(frame) >= 3:
        return int.from_bytes(frame[1:3], "big")
    if head == 0xDD and len(frame) >= 5:
        # A corrupt header must not make us build billions of dead letters.
        return min(int.from_bytes(frame[1:5], "big"), MAX_SALVAGE_COUNT)
    return 0


class WorkerCrashed(EngineError):
    """Raised inside a worker when one of its core loops failed; the process exits."""


def worker_main(
    index: int,
    spec: ShardSpec,
    config: Config,
    handler: Any,
    plan: WorkerPlan,
    conn: Any,
    monitor_pid: int,
) -> None:
    """Entry point of a worker process (forked by the monitor)."""
    from engine.procutil import die_with_parent

    die_with_parent(monitor_pid)
    # Payloads are checked in the dispatcher near the bottom of its stack; here they
    # are decoded deeper down (event loop, runners), so allow what it accepted.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), WORKER_RECURSION_LIMIT))
    from engine.worker.sinks import make_sink

    def send(msg: Any) -> None:
        send_control(conn, msg)

    try:
        sink = make_sink(config, handler)
    except Exception as exc:
        send(WorkerFailed(worker=index, pid=os.getpid(), error=str(exc)))
        os._exit(ChildExit.BOOT_FAILED)
    shard = ShardMemory.attach(spec)
    shard.slot_idx[SLOT_PID] = os.getpid()
    worker = Worker(index, shard, config, sink, plan)
    import uvloop

    try:
        uvloop.run(worker.run(send))
    finally:
        sink.close()
