"""What happens after a delivery: success, retry with backoff, TTL expiry, dead letter.

Every message ends in ``settle`` (delivered, dead-lettered or expired) exactly
once; on the way there a failure is retried with full-jitter backoff on a
timer, or dead-lettered, and a request's reply is queued.  Apart from the
runners so the outcome rules read in one place, whichever runner called the sink.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec

from engine.backoff import backoff_s
from engine.errors import Reject, Retry
from engine.worker.commit import NIL, Committing
from engine.worker.delivery import (
    DEAD_LETTERED,
    DEFERRED,
    DELIVERED,
    EXPIRED,
    FrameTrack,
    Pending,
)
from engine.worker.failures import describe, exc_text, format_traceback
from engine.worker.lanes import Lanes
from engine.worker.state import LATENCY_BUFFER, SPARE_LANES
from ipc.codec import Kind, Message
from ipc.records import (
    MAX_ERROR_CHARS,
    AttemptFailed,
    DeadLetter,
    Deferred,
    Reply,
    clip,
    encode_records,
)

monotonic_ns = time.monotonic_ns
_OUTCOMES = ("delivered", "dead_lettered", "expired")
_REQUEST = Kind.REQUEST
_encoder = msgspec.msgpack.Encoder()


class Settling(Lanes, Committing):
    """Outcomes of deliveries: replies, retries and their timers, dead letters, settling."""

    def finish(self, p: Pending, result: Any) -> None:
        msg = p.msg
        if msg.correlation_id and msg.kind == _REQUEST:
            self._reply(msg, result)
        self.settle(p, DELIVERED, monotonic_ns())

    def _reply(self, msg: Message, result: Any) -> None:
        try:
            value = msgspec.Raw(_encoder.encode(result))
        except (TypeError, msgspec.EncodeError) as exc:
            error = f"reply not encodable: {exc}"
            self.out.append(Reply(msg.correlation_id, False, NIL, error))
        else:
            self.out.append(Reply(msg.correlation_id, True, value))
        self.counters["replies"] += 1

    def fail(self, p: Pending, exc: BaseException) -> None:
        msg = p.msg
        if isinstance(exc, Reject):
            self.dead_letter(p, "rejected", exc.reason, format_traceback(exc))
            return
        self.counters["failed_attempts"] += 1
        attempts = msg.attempt + 1
        if attempts >= self.config.retry_max_attempts:
            self.dead_letter(p, "max_attempts", describe(exc), format_traceback(exc))
            return
        if isinstance(exc, Retry) and exc.after is not None:
            delay = exc.after
        else:
            cfg = self.config
            delay = backoff_s(
                msg.attempt, cfg.retry_backoff_base_s, cfg.retry_backoff_max_s, rng=self.rng
            )
        msg.attempt = attempts
        now = time.monotonic_ns()
        due_ns = now + int(delay * 1e9)
        expires_first = bool(msg.expires_ns) and due_ns >= msg.expires_ns
        if min(due_ns, msg.expires_ns or due_ns) - now > self.hold_ns:
            rec = self._hand_back_record(p, due_ns)
            queued = None if rec is None else self._park(p)
            if rec is not None and queued is not None:
                # A long wait would pin the ring (a lane commits in order): the dispatcher
                # holds the message, and the recipient's later ones, until it is due (or
                # expires), so the ring commits past them.
                self._report_failure(msg, exc, -1.0 if expires_first else delay)
                self.counters["retried"] += 1
                self._send_back(p, rec)
                for q, follower in queued:
                    self._careful_skip(q)
                    self._send_back(q, follower)
                return
        if expires_first:
            # It would expire before its retry: never deliver it again, settle at expiry.
            self._report_failure(msg, exc, -1.0)
            self.timed += 1
            self._after(msg.expires_ns, self._expire_due, p)
            return
        self._report_failure(msg, exc, delay)
        self.counters["retried"] += 1
        self.timed += 1
        self._after(due_ns, self._retry_due, p)

    def _report_failure(self, msg: Message, exc: BaseException, retry_in_s: float) -> None:
        """An `AttemptFailed` for the dispatcher's log, if the rate limit lets it through."""
        exc_type = type(exc).__name__
        held = self.failure_log.allow((msg.recipient, exc_type))
        if held is None:
            return
        self.out.append(
            AttemptFailed(
                msg.id,
                msg.recipient,
                msg.attempt,
                self.config.retry_max_attempts,
                retry_in_s,
                exc_type,
                exc_text(exc),
                format_traceback(exc),
                held,
            )
        )

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
        self.timed -= 1
        self.due.append(p)
        self._wake_runner()

    def _expire_due(self, p: Pending, due_ns: int) -> None:
        now = time.monotonic_ns()
        if now < due_ns:
            self._after(due_ns, self._expire_due, p)
            return
        self.timed -= 1
        self.expire(p, now)

    def _park(self, p: Pending) -> list[tuple[Pending, Deferred]] | None:
        """Start handing ``p``'s recipient back; returns its queued messages, to follow ``p``.

        None (the retry then waits in the ring as before) only if the parked set
        would not fit the shard's slot, where the next worker of the shard reads it.
        A queued message too large to hand back stays queued (see ``_follow``).
        """
        key = (p.frame.lane, p.msg.recipient)
        if key not in self.parked:
            if not self.shard.parked_fits(self.parked | {key}):
                return None
            self.parked.add(key)
            self.parked_dirty = True
        st = p.state
        if st is None or not st.queue:
            return []
        out: list[tuple[Pending, Deferred]] = []
        kept: list[Pending] = []
        for q in st.queue:
            rec = self._hand_back_record(q, 0)
            if rec is None:
                kept.append(q)
            else:
                q.state = None
                out.append((q, rec))
        st.queue.clear()
        st.queue.extend(kept)
        ready = self.ready[key[0]]
        for _ in range(st.avail):
            ready.remove(st)
        st.avail = 0  # settling ``p`` offers what was kept again
        return out

    def _follow(self, p: Pending) -> bool:
        """A message of a parked recipient: handed back behind the ones before it.

        False if it is too large for a return-ring frame as a `Deferred` record (a
        message near the lane ring's limit with a smaller ENGINE_RETURN_RING_BYTES):
        then it is delivered in its ring place, ahead of the held ones (README).
        """
        rec = self._hand_back_record(p, 0)
        if rec is None:
            return False
        self._careful_skip(p)
        self._send_back(p, rec)
        return True

    def _parked_hand_back(self, msg: Message, track: FrameTrack, index: int) -> bool:
        """For a message of a parked recipient: True if it was handed back (skip it).

        The dispatcher's written-back head (``released``) unparks the recipient and is
        delivered; a message too large to hand back is delivered in place (`_follow`).
        """
        key = (track.lane, msg.recipient)
        if msg.released:
            self.parked.discard(key)  # the dispatcher wrote back what it held
            self.parked_dirty = True
            return False
        return self._follow(Pending(msg, track, index))

    def _careful_skip(self, p: Pending) -> None:
        """Overridden by the runners (careful mode's count of the redelivery window)."""

    def _hand_back_record(self, p: Pending, due_ns: int) -> Deferred | None:
        """The `Deferred` record of ``p``, or None if no return-ring frame can carry it."""
        rec = Deferred(p.msg, due_ns, p.frame.lane, p.frame.end)
        if len(encode_records([rec])) > self.returns.ring.max_payload:
            return None
        return rec

    def _send_back(self, p: Pending, rec: Deferred) -> None:
        """Hand ``p`` back to the dispatcher and settle it in the ring (the ring moves on)."""
        self.out.append(rec)
        self.settle(p, DEFERRED, time.monotonic_ns())

    def expire(self, p: Pending, now: int) -> None:
        """Settle ``p`` as expired (its TTL ended first: never delivered); a request's
        caller hears so at once instead of at its timeout."""
        msg = p.msg
        if msg.kind == Kind.REQUEST and msg.correlation_id:
            error = "expired: its ttl ended before it could be delivered"
            self.out.append(Reply(msg.correlation_id, False, NIL, error))
        self.settle(p, EXPIRED, now)

    def dead_letter(self, p: Pending, reason: str, error: str, tb: str = "") -> None:
        msg = p.msg
        if not isinstance(error, str):  # Reject(reason) is the handler's value: any type
            error = repr(error)
        error = clip(error, MAX_ERROR_CHARS)  # and any length
        now = time.monotonic_ns()
        track = p.frame
        self.out.append(
            DeadLetter(msg, reason, msg.attempt + 1, error, now, track.lane, track.end, tb)
        )
        if msg.kind == Kind.REQUEST and msg.correlation_id:
            self.out.append(Reply(msg.correlation_id, False, NIL, f"{reason}: {error}"))
        self.settle(p, DEAD_LETTERED, now)

    def settle(self, p: Pending, outcome: int, now: int) -> None:
        track = p.frame
        track.counts[outcome] += 1
        track.remaining -= 1
        if outcome != DEFERRED:
            self.counters[_OUTCOMES[outcome]] += 1
            created = p.msg.created_ns
            if created:
                settles = self.settles_ns
                settles.append(now - created)
                if len(settles) >= LATENCY_BUFFER:
                    self.lat_settle.record_many(settles)
                    settles.clear()
        self.unsettled -= 1
        st = p.state
        if st is not None:
            busy = st.busy = st.busy - 1
            avail, queue = st.avail, st.queue
            if avail < len(queue) and busy + avail < self.limit:  # st.wants_slot(), inlined
                st.avail = avail + 1
                self.ready[st.key[0]].append(st)
                self._wake_runner()
            elif not queue and not busy and not avail:  # st.idle(), inlined
                del self.lanes[st.key[0]][st.key[1]]
                if len(self.spare_lanes) < SPARE_LANES:
                    self.spare_lanes.append(st)  # reused by _accept for the next recipient
        if track.remaining == 0:
            self._maybe_commit(track)
        if self.out:
            self.flush_wanted.set()  # replies and dead letters go out this tick
        self.wake.set()
        if self.stopping and self.unsettled == 0:
            self._wake_runner(every=True)  # nothing left: let them all return
