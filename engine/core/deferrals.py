"""Messages moved out of the rings for a long retry, held by the dispatcher in recipient order.

A lane commits in ring order, so a message waiting for a retry longer than
``ENGINE_MAX_RETRY_HOLD_S`` would pin its ring until submitters block.  Its worker
hands it back instead (a `Deferred` record, with every later message of the same
recipient and lane it fetches meanwhile) and settles it in the ring, which moves
on.  Once the record's frame is reported (the record is firm), the recipient is
*parked* here: a per-(lane, recipient) FIFO ordered by message id (ids follow
submission order) holds the handed-back messages and every new submit to that
recipient, which therefore never reaches a ring while it is parked.

The FIFO is written back to the ring (the first message flagged ``released``, so
the worker stops handing the recipient back) once its head is due *and* the
lane's reported position passed the last position the dispatcher wrote before it
parked the recipient: every earlier message of the recipient is settled or handed
back by then, so nothing of it can be delivered ahead of the FIFO.  A held message
whose TTL ends is settled here as expired.  Held messages stay in flight (counted
in ``stats()["deferred"]``); a stop drains them or reports them abandoned.  New
submits to a parked recipient get the backpressure its ring would give: at most a
ring's worth of bytes is held for it, then ``submit`` waits (``submit_nowait``
raises QueueFull) until the FIFO goes out.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable

import msgspec

from engine.errors import EngineClosed, QueueFull
from ipc.codec import Message, decode, encode
from ipc.records import Deferred
from ipc.ring import RingProducer

monotonic_ns = time.monotonic_ns
HELD_EXTRA_BYTES = 64  # a handed-back message's fields besides its payload, roughly


class Held:
    """One message held for a parked recipient: handed back by a worker, or submitted."""

    __slots__ = ("data", "due_ns", "expires_ns", "id", "msg", "size")

    def __init__(
        self, mid: int, due_ns: int, expires_ns: int, msg: Message | None, data: bytes, size: int
    ) -> None:
        self.id = mid
        self.due_ns = due_ns
        self.expires_ns = expires_ns
        self.msg = msg  # handed back (its attempt count moved on); None: encoded as submitted
        self.data = data
        self.size = size  # counted against the recipient's room (see ``wait_room``)


class Parked:
    """One (lane, recipient): its held FIFO, and the ring position it must wait for."""

    __slots__ = ("bytes", "entries", "holding", "key", "mark", "shard", "target", "timer")

    def __init__(self, key: tuple[int, str], shard: int) -> None:
        self.key = key
        self.shard = shard
        self.entries: list[Held] = []
        self.bytes = 0  # of the held messages
        self.holding = False  # new submits go to ``entries``, not to the ring
        # The ring position every earlier message of the recipient sits below: known once
        # the dispatcher has written ``target`` messages of the lane (its buffer then).
        self.target = 0
        self.mark: int | None = None
        self.timer: asyncio.TimerHandle | None = None


def _expired(h: Held, now: int) -> bool:
    return bool(h.expires_ns) and h.expires_ns <= now


def _by_id(h: Held) -> int:
    return h.id


class Deferrals:
    """The dispatcher's parked recipients (see the module docstring)."""

    def __init__(
        self,
        room: int,
        counts: dict[str, int],
        lane_settled: list[int],
        acked: list[list[int]],
        buffers: list[list[list[bytes]]],
        written: list[list[int]],
        producers: list[list[RingProducer]],
        schedule_flush: Callable[[], None],
    ) -> None:
        self.room = room  # bytes of submits one parked recipient may hold: a ring's worth
        self.room_event = asyncio.Event()  # replaced and set whenever held bytes go out
        self.counts = counts
        self.lane_settled = lane_settled
        self.acked = acked
        self.buffers = buffers
        self.written = written
        self.producers = producers
        self.schedule_flush = schedule_flush
        self.loop = asyncio.get_running_loop()
        # Parked recipients, and released ones whose last release is not reported yet
        # (``wait_settled`` waits for those too).
        self.parked: dict[tuple[int, str], Parked] = {}
        self.holding: set[tuple[int, str]] = set()  # checked on every submit while not empty
        self.held = 0  # messages held here now: stats()["deferred"]
        self.waiting: set[tuple[int, str]] = set()  # due or released, waiting for the ring
        self.closed = False

    # -- in --------------------------------------------------------------------
    def hand_back(self, shard: int, rec: Deferred) -> None:
        """A firm `Deferred` (its frame is reported): hold the message, park its recipient."""
        msg = rec.message
        msg.payload = msg.payload.copy()  # not a view of the whole return frame
        msg.released = False  # set again on whichever message leads the next release
        p = self._park((rec.lane, msg.recipient), shard)
        size = len(msg.payload) + HELD_EXTRA_BYTES
        h = Held(msg.id, rec.due_ns, msg.expires_ns, msg, b"", size)
        bisect.insort(p.entries, h, key=_by_id)
        p.bytes += size
        self.held += 1
        self.counts["deferrals"] += 1
        self._arm(p)

    def hold(self, shard: int, mid: int, lane: int, recipient: str, data: bytes) -> None:
        """A new submit to a parked recipient: it waits behind the held ones."""
        p = self.parked[(lane, recipient)]
        bisect.insort(p.entries, Held(mid, 0, 0, None, data, len(data)), key=_by_id)
        p.bytes += len(data)
        self.held += 1
        if len(p.entries) == 1:
            self._arm(p)

    def _full(self, lane: int, recipient: str, size: int) -> bool:
        p = self.parked.get((lane, recipient))
        return p is not None and p.holding and p.bytes > 0 and p.bytes + size > self.room

    async def wait_room(self, lane: int, recipient: str, size: int) -> None:
        """Backpressure: a parked recipient holds at most a ring's worth of submits here,
        as its ring would; a submit beyond that waits until some of them go out."""
        while self._full(lane, recipient, size):
            if self.closed:
                raise EngineClosed("the engine stopped while the submit waited")
            await self.room_event.wait()

    def check_room(self, lane: int, recipient: str, size: int) -> None:
        """``wait_room`` for ``submit_nowait``: QueueFull instead of waiting."""
        if self._full(lane, recipient, size):
            p = self.parked[(lane, recipient)]
            raise QueueFull(
                f"recipient {recipient!r} waits for a retry and {p.bytes:,} bytes of its "
                f"messages are held (at most {self.room:,}, a ring's worth)"
            )

    def _freed(self, p: Parked, h: Held) -> None:
        p.bytes -= h.size
        self.held -= 1
        event, self.room_event = self.room_event, asyncio.Event()
        event.set()

    def _park(self, key: tuple[int, str], shard: int) -> Parked:
        p = self.parked.get(key)
        if p is None:
            p = self.parked[key] = Parked(key, shard)
        if not p.holding:
            p.holding = True
            self.holding.add(key)
            self._set_target(p)
        return p

    def _set_target(self, p: Parked) -> None:
        """What the dispatcher has queued for this lane so far must be reported first."""
        lane = p.key[0]
        p.target = self.written[p.shard][lane] + len(self.buffers[p.shard][lane])
        p.mark = None

    # -- out -------------------------------------------------------------------
    def _arm(self, p: Parked) -> None:
        """Wake up when the head of ``p`` is due or expires."""
        if p.timer is not None:
            p.timer.cancel()
            p.timer = None
        if not p.entries or self.closed:
            return
        head = p.entries[0]
        at = head.due_ns
        if head.expires_ns and head.expires_ns < at:
            at = head.expires_ns
        delay = max(0.0, (at - monotonic_ns()) / 1e9)
        # +1 ms: timers may fire up to a millisecond early; `_try` re-checks the clock.
        p.timer = self.loop.call_later(delay + 0.001, self._try, p)

    def _reached(self, p: Parked) -> bool:
        """True once the lane is reported past everything queued before ``p`` parked."""
        shard, lane = p.shard, p.key[0]
        if p.mark is None:
            if self.written[shard][lane] < p.target:
                # Some of it still sits in a buffer (a submit_many yielded before its
                # flush): make sure a flush comes, or nothing would move the release.
                self.schedule_flush()
                return False
            p.mark = self.producers[shard][lane].ring.write_pos
        return self.acked[shard][lane] >= p.mark

    def _try(self, p: Parked) -> None:
        """Expire, release or wait: whatever the head of ``p`` allows now."""
        p.timer = None
        if self.closed:
            return
        now = monotonic_ns()
        entries = p.entries
        # The last one stays even when expired: its release is what unparks the
        # worker's side (`_release`), and the worker settles it as expired.
        while len(entries) > 1 and _expired(entries[0], now):
            self._expire(p, entries.pop(0))
        if not p.holding:
            # Released earlier: only ``wait_settled`` still waits for the ring.
            if self._reached(p):
                self.waiting.discard(p.key)
                del self.parked[p.key]
            else:
                self.waiting.add(p.key)
            return
        if entries and entries[0].due_ns > now and not _expired(entries[0], now):
            self.waiting.discard(p.key)
            self._arm(p)
            return
        if not self._reached(p):
            self.waiting.add(p.key)  # `progress` tries again as reports come in
            return
        self._release(p, now)

    def _release(self, p: Parked, now: int) -> None:
        """Write the due prefix of the FIFO back to the lane's buffer, the first one flagged."""
        shard, (lane, _) = p.shard, p.key
        entries = p.entries
        n = 0
        while n < len(entries) and (entries[n].due_ns <= now or _expired(entries[n], now)):
            n += 1
        out = self.buffers[shard][lane]
        first = True
        for i, h in enumerate(entries[:n]):
            # An expired one is settled here, unless it is the last one held and nothing
            # else carries the `released` flag: the worker's side of the recipient stays
            # parked until a released message reaches it, so that one goes back and the
            # worker settles it as expired (it never delivers an expired message).
            if _expired(h, now) and not (first and i == len(entries) - 1):
                self._expire(p, h)
                continue
            self._freed(p, h)
            if h.msg is not None:
                if first:
                    h.msg.released = True
                out.append(encode(h.msg))
            elif first:
                out.append(encode(msgspec.structs.replace(decode(h.data), released=True)))
            else:
                out.append(h.data)
            first = False
        del entries[:n]
        self.schedule_flush()
        self._set_target(p)  # the released ones go first, so later ones wait for them too
        if entries:
            self._arm(p)  # a later retry of the recipient is not due yet: it stays parked
            self.waiting.discard(p.key)
            return
        p.holding = False
        self.holding.discard(p.key)
        self.waiting.add(p.key)

    def _expire(self, p: Parked, h: Held) -> None:
        """A held message whose TTL ended: settled here, like a worker does, never delivered."""
        self._freed(p, h)
        self.counts["expired"] += 1
        self.lane_settled[p.key[0]] += 1

    def progress(self) -> None:
        """The return rings moved: try the recipients that wait for their lane."""
        if not self.waiting:
            return
        for key in list(self.waiting):
            p = self.parked.get(key)
            if p is None:
                self.waiting.discard(key)
            elif p.timer is None:
                self._try(p)

    def busy(self, shard: int, lane: int) -> bool:
        """True while a message of this lane is held, or released and not reported yet."""
        return any(p.shard == shard and p.key[0] == lane for p in self.parked.values())

    def close(self) -> None:
        self.closed = True
        self.room_event.set()  # a submit waiting for room raises EngineClosed
        for p in self.parked.values():
            if p.timer is not None:
                p.timer.cancel()
                p.timer = None
