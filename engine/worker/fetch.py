"""Fetching: frames from the lane rings into the worker, highest lane first.

The reader takes frames while fewer than ``window`` messages are unsettled (and
uncommitted, unless a retry or a slow delivery holds a lane) and no flush waits for return-ring
space, rescanning from the top lane after each frame (with a fetch-level
starvation guard), decodes a frame as one batch and queues its messages, or
hands them to the sync fast path.  A frame that does not decode is salvaged
message by message, so the worker never dies on it.
Apart from delivery because this is the side that faces the rings.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

import msgspec

from engine.errors import CodecError
from engine.worker.delivery import DEFERRED, FrameTrack, Pending, RecipientLane
from engine.worker.lanes import _LANE_RANGE
from engine.worker.runners import YIELD_AFTER_NS, Runners
from engine.worker.state import HOLD_NS
from ipc.codec import DECODE_ERRORS, Message, decode, decode_batch
from ipc.errors import CorruptFrameError
from ipc.records import Redelivered
from ipc.shard import LANES

FRAMES_PER_ROUND = 4  # frames fetched (and, for sync sinks, delivered) between yields
MAX_SALVAGE_COUNT = 1 << 16  # more messages than any batch frame the dispatcher writes
monotonic_ns = time.monotonic_ns


class Fetching(Runners):
    """The reader: fetch frames, accept their messages, wake the runners."""

    def fetch(self, max_frames: int = FRAMES_PER_ROUND) -> int:
        """Take up to ``max_frames`` frames, one at a time from the highest non-empty lane.

        Rescanning from the top after every frame keeps priority strict even when
        a frame's deliveries take long.  Returns the frames taken; fewer than
        ``max_frames`` means the lanes are empty or the window is full.
        """
        taken = 0
        consumers = self.consumers
        rings = self.shard.lanes
        ready = self.ready
        sync = not self.is_async
        self.round_start = monotonic_ns()
        while taken < max_frames and not self.window_full() and not self.stopping:
            if monotonic_ns() - self.round_start > YIELD_AFTER_NS:
                return max_frames  # a full round: the reader yields, then fetches on

            order: Iterable[int] = _LANE_RANGE
            if self.fetch_streak >= self.config.starvation_limit:
                # Starvation guard at fetch level too: a flood in a high lane must not
                # keep a lower lane's frames out of the window for ever.
                order = reversed(_LANE_RANGE)
                self.fetch_streak = 0
            for lane in order:
                if sync and ready[lane] and rings[lane].pending_bytes():
                    # Sync sinks: this lane has a ready backlog (a frame the fast path
                    # ran out of time on).  Its next frame would join the backlog and
                    # the lane would stay on the queued path for good: let the inline
                    # runner drain it first (the reader waits for its settles), then
                    # fetch on.
                    self.backlog_hold = True
                    return taken
                try:
                    frames, ends = consumers[lane].drain(max_frames=1)
                except CorruptFrameError as exc:
                    if (lane, exc.position) not in self.plan.corrupt:
                        raise  # the worker dies; the monitor counts it (poison accounting)
                    self._skip_corrupt(lane, exc)
                    taken += 1
                    break
                if frames:
                    lower = any(rings[x].pending_bytes() for x in range(lane + 1, LANES))
                    self.fetch_streak = self.fetch_streak + 1 if lower else 0
                    self._accept(lane, frames[0], ends[0])
                    taken += 1
                    break
            else:
                break
        return taken

    def _skip_corrupt(self, lane: int, exc: CorruptFrameError) -> None:
        """Quarantine the frame behind a corrupt header the monitor named (``plan.corrupt``).

        The ring moves past it (see `RingConsumer.skip_corrupt`); its messages are
        dead-lettered as ``malformed``: whole when its payload still decodes (only the
        length was hit), else as many anonymous letters as its array header announces.
        Settled like any frame, so the dispatcher's counts stay whole.
        """
        start = exc.position
        end, data = self.consumers[lane].skip_corrupt(start, _FRAME_STARTS)
        msgs = _recover(data)
        count = len(msgs) if msgs else max(1, _array_length(data))
        error = (
            f"corrupt frame header {exc.header:#x} at position {start} of lane {lane}: "
            f"skipped {end - start:,} bytes up to position {end} ("
            + (f"its {count} messages decoded)" if msgs else "its messages could not be decoded)")
        )
        track = FrameTrack(lane, end, count)
        self.frames[lane].append(track)
        self.uncommitted += count
        self.unsettled += count
        self.counters["batches"] += 1
        self.counters["frames_skipped"] += 1
        for i in range(count):
            msg = msgs[i] if msgs else Message(id=0, recipient="")
            self.dead_letter(Pending(msg, track, i), "malformed", error)

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
        track = FrameTrack(lane, end, len(msgs) + len(bad), self.round_start)
        self.frames[lane].append(track)
        self.uncommitted += track.remaining
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
        parked = self.parked
        if not self.is_async and not (redelivery and self.plan.careful) and self._alone(lane):
            self._deliver_now(track, msgs)
            return len(msgs)
        states = self.lanes[lane]
        ready = self.ready[lane]
        limit = self.limit
        spare = self.spare_lanes
        for i, msg in enumerate(msgs):
            p = Pending(msg, track, i)
            if parked and (lane, msg.recipient) in parked:
                self.unsettled += 1  # settled (as deferred) if handed back
                if self._parked_hand_back(msg, track, i):
                    continue
                self.unsettled -= 1  # released, or too large to hand back: delivered here
            recipient = msg.recipient
            st = states.get(recipient)
            if st is None:
                if spare:  # an idle FIFO settle gave back: no new object and deque
                    st = spare.pop()
                    st.key = (lane, recipient)
                else:
                    st = RecipientLane((lane, recipient))
                states[recipient] = st
            p.state = st
            queue = st.queue
            queue.append(p)
            avail = st.avail
            if avail < len(queue) and st.busy + avail < limit:  # st.wants_slot(limit), inlined
                st.avail = avail + 1
                ready.append(st)
        self.unsettled += len(msgs) - track.counts[DEFERRED]
        self.wake.set()
        self._wake_runner()
        return len(msgs)

    async def reader(self) -> None:
        """Fetch a round, then yield, wait for room in the window, or sleep on the lanes."""
        lane_ready = self.shard.spec.lane_ready
        beat = self.shard.lanes[0].beat
        while not self.stopping:
            full_round = self.fetch() >= FRAMES_PER_ROUND
            beat()  # progress is a sign of life too, whatever the timer's luck on a busy host
            if self.out:
                self.flush_wanted.set()
            if self.backlog_hold:
                # A sync lane's backlog drains first; its settles wake the reader (the
                # inline runner may be awaiting an awaitable: no spinning meanwhile).
                self.backlog_hold = False
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.heartbeat_interval_s):
                        await self.wake.wait()
            elif full_round and not self.window_full():
                await asyncio.sleep(0)  # more is waiting: let the flusher and heartbeat run
            elif self.window_full():
                self.wake.clear()
                if self.unsettled >= self.window or self.returns_waiting:
                    await self.wake.wait()  # settles make room
                else:
                    # Only the uncommitted bound: commits make room, and so does time
                    # (a head frame held past HOLD_NS no longer bounds fetching).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(HOLD_NS / 1e9):
                            await self.wake.wait()
            else:
                await lane_ready.wait_async(self.config.heartbeat_interval_s)


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
_FRAME_STARTS = frozenset((*range(0x90, 0xA0), 0xDC, 0xDD))
"""First bytes of a batch frame: a msgpack array header (what the dispatcher writes)."""


def _recover(data: bytes) -> list[Message]:
    """The messages of a skipped frame's payload if it still decodes whole (its zero
    padding, up to 7 bytes, cut), else []."""
    for pad in range(8):
        if pad and (len(data) < pad or data[-pad] != 0):
            break
        try:
            return decode_batch(data[: len(data) - pad])
        except CodecError:
            continue
    return []


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
