"""Calling the sink: the sync fast path, the inline runner, the async pool and its watchdog.

Sync sinks are called on the loop: a freshly fetched batch straight away when
nothing else waits (``_deliver_now``), else by one inline runner over the ready
queues.  Async sinks run on a fixed pool of ``delivery_concurrency``
coroutines (never a task per message), with one watchdog timer enforcing the
handler timeout for the whole pool.  Careful mode (after a crash in the
redelivery window) records each delivery in the shard's slot so the monitor can
name the message that killed the worker.  Apart from fetching and settling:
this is where time goes, and where the loop must still yield.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

from engine.worker.delivery import DELIVERED, FrameTrack, Pending, RecipientLane
from engine.worker.settle import Settling
from engine.worker.state import LATENCY_BUFFER
from ipc.codec import Kind, Message
from ipc.shard import SLOT_ACTIVE, SLOT_FRAME_END, SLOT_INDEX, SLOT_LANE

# A sync handler runs on the loop: after this long without yielding, the rest of a
# batch goes through the queue so signals, heartbeats and stats are never held up
# by a slow handler (a 10 ms handler would otherwise hold the loop for a whole round).
YIELD_AFTER_NS = 5_000_000
monotonic_ns = time.monotonic_ns


async def _probe() -> None:
    return None


_coro = _probe()
_Coroutine = type(_coro)
_coro.close()


_PLAIN: frozenset[type] = frozenset({int, float, str, bytes, bool, list, dict, tuple})
"""Result types that are never awaitable: no ABC check for them."""
_REQUEST = Kind.REQUEST


def _awaitable(result: object) -> bool:
    """Whether a sink's result must be awaited (callers check ``is not None`` first).

    The coroutine case and the plain types are decided by type alone;
    ``inspect.isawaitable`` (an ABC instance check) only for anything else.
    """
    kind = type(result)
    return kind is _Coroutine or (kind not in _PLAIN and inspect.isawaitable(result))


_SETTLED = object()
"""What ``start_delivery`` returns for a message it settled itself (expired, quarantined)."""


class Runners(Settling):
    """Delivering: the fast path, the inline runner, the async pool, careful mode."""

    def _deliver_now(self, track: FrameTrack, msgs: list[Message]) -> None:
        """Sync sinks: deliver a fetched batch right here, in order, one call each.

        The fast path for the common case; a message whose recipient already has
        a backlog (a retry holding its lane) joins that FIFO instead, and a failed
        delivery goes through the general retry path.  Latencies are collected
        for the frame and recorded once: a delivery's settle time is the next
        clock read (the following message's start, or the end of the frame), so
        each message costs one clock read, not two.
        """
        lane = track.lane
        states = self.lanes[lane]
        deliver = self.deliver_fn
        quarantine = self.plan.quarantine
        parked = self.parked
        self.unsettled += len(msgs)
        delivered = 0
        deadline = self.round_start + YIELD_AFTER_NS
        starts: list[int] = []
        settles: list[int] = []
        settling = 0  # created_ns of the delivery whose settle time the next clock read is
        for i, msg in enumerate(msgs):
            if parked and (lane, msg.recipient) in parked and self._parked_hand_back(msg, track, i):
                continue  # handed back, behind its elders
            if msg.recipient in states or (quarantine and (lane, track.end, i) in quarantine):
                self._queue(Pending(msg, track, i), lane)
                continue
            now = monotonic_ns()
            if settling:
                settles.append(now - settling)
                settling = 0
            if now > deadline or self.stopping:
                # Out of time: the rest waits in the queue for the inline runner,
                # which yields between messages when they are slow (a parked
                # recipient's are handed back behind its elders, as above).
                for j in range(i, len(msgs)):
                    m = msgs[j]
                    if (
                        parked
                        and (lane, m.recipient) in parked
                        and self._parked_hand_back(m, track, j)
                    ):
                        continue
                    self._queue(Pending(m, track, j), lane)
                break
            expires = msg.expires_ns
            if expires and now >= expires:
                self.expire(Pending(msg, track, i), now)
                continue
            created = msg.created_ns
            if created:
                starts.append(now - created)
            try:
                result = deliver(msg)
            except Exception as exc:
                p = Pending(msg, track, i)
                st = states[msg.recipient] = RecipientLane((lane, msg.recipient))
                st.busy = 1  # the retry holds the recipient's lane
                p.state = st
                self.fail(p, exc)
                continue
            if result is not None and _awaitable(result):
                # A plain function returned an awaitable: finish it in order, holding
                # the recipient's lane, like a retry.
                p = Pending(msg, track, i)
                st = states[msg.recipient] = RecipientLane((lane, msg.recipient))
                st.busy = 1
                p.state = st
                self._spawn(self._finish_awaitable(p, result))
                continue
            if msg.correlation_id and msg.kind == _REQUEST:
                self._reply(msg, result)
            delivered += 1
            settling = created
        if settling:
            settles.append(monotonic_ns() - settling)
        if starts:
            self.lat_start.record_many(starts)
        if settles:
            self.lat_settle.record_many(settles)
        track.counts[DELIVERED] += delivered
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

    def start_delivery(self, p: Pending) -> Any:
        """Pre-checks before a delivery: the start time (ns), or _SETTLED if it settled here."""
        msg = p.msg
        now = monotonic_ns()
        expires = msg.expires_ns
        if expires and now >= expires:
            self._careful_skip(p)
            self.expire(p, now)
            return _SETTLED
        quarantine = self.plan.quarantine
        if quarantine and (p.frame.lane, p.frame.end, p.index) in quarantine:
            self._careful_skip(p)
            self.dead_letter(p, "worker_crash", f"worker crashed {self.plan.crashes} times on it")
            return _SETTLED
        created = msg.created_ns
        if created:
            starts = self.starts_ns
            starts.append(now - created)
            if len(starts) >= LATENCY_BUFFER:
                self.lat_start.record_many(starts)
                starts.clear()
        return now

    def _take(self) -> tuple[Pending, int] | None:
        """The next message for the sink and its start time (ns), if one is ready now.

        Settles expired or quarantined messages itself without handing them out.
        Plain code, no await: a runner with work waiting takes it without a
        coroutine call, and waits (``_next_delivery``) only when there is none.
        """
        while (p := self.next_pending()) is not None:
            if self.idle_runners and (self.due or any(self.ready)):
                self._wake_runner()  # more work than this runner: pass the baton on
            started = self.start_delivery(p)
            if started is not _SETTLED:
                self._mark(p)
                return p, started
        return None

    async def _next_delivery(self) -> tuple[Pending, int] | None:
        """The next message for the sink and its start time (ns); None once stopped and settled.

        Shared by both runners: waits for work (see ``_take``).
        """
        while True:
            job = self._take()
            if job is not None:
                return job
            if self.stopping and self.unsettled == 0:
                self._wake_runner(every=True)
                return None
            parked = asyncio.get_running_loop().create_future()
            self.idle_runners.append(parked)
            await parked

    async def inline_runner(self) -> None:
        """Sync sinks: deliver in order on the loop, no coroutine per message."""
        deliver = self.deliver_fn
        done = 0
        last_yield = monotonic_ns()
        take, wait = self._take, self._next_delivery
        while (job := take() or await wait()) is not None:
            p = job[0]
            try:
                result = deliver(p.msg)
                if result is not None and _awaitable(result):
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
        take, wait = self._take, self._next_delivery
        timeout_ns = self.timeout_ns
        while (job := take() or await wait()) is not None:
            p, started = job
            slot[0] = started + timeout_ns
            try:
                result = deliver(p.msg)
                if type(result) is _Coroutine or (result is not None and _awaitable(result)):
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
