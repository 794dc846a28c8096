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
from engine.worker.delivery import DEAD_LETTERED, DELIVERED, EXPIRED, Pending
from engine.worker.failures import bounded, describe, format_traceback
from engine.worker.lanes import Lanes
from ipc.codec import Kind, Message
from ipc.records import AttemptFailed, DeadLetter, Reply

monotonic_ns = time.monotonic_ns
_OUTCOMES = ("delivered", "dead_lettered", "expired")
_encoder = msgspec.msgpack.Encoder()


class Settling(Lanes, Committing):
    """Outcomes of deliveries: replies, retries and their timers, dead letters, settling."""

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
            self.out.append(Reply(msg.correlation_id, False, NIL, error))
        else:
            self.out.append(Reply(msg.correlation_id, True, value))
        self.counters["replies"] += 1

    def fail(self, p: Pending, exc: BaseException) -> None:
        msg = p.msg
        if isinstance(exc, Reject):
            self.dead_letter(p, "rejected", bounded(exc.reason), format_traceback(exc))
            return
        self.counters["failed_attempts"] += 1
        attempts = msg.attempt + 1
        if attempts >= self.config.retry_max_attempts:
            error = f"{type(exc).__name__}: {describe(exc)}"
            self.dead_letter(p, "max_attempts", error, format_traceback(exc))
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
                describe(exc),
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
        self.settle(p, EXPIRED, now)

    def dead_letter(self, p: Pending, reason: str, error: str, tb: str = "") -> None:
        msg = p.msg
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
