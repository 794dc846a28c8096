"""What comes back from the workers: the dispatcher's reader of every return ring.

Return rings carry ``FrameDone`` reports (the only source of the settled
counts, so ``submitted == delivered + dead_lettered + expired + in_flight``
holds at every moment), replies for requests and dead letters.  Apart from
the dispatcher's writing side because it shares nothing with it but the
counts: it runs from the return eventfd's callback, never awaits, and owns
the acked positions, the dead letters and the futures of pending requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from engine.config import Config
from engine.core.deadletters import DeadLetterStore
from engine.core.events import EventLog
from engine.errors import CodecError, EngineClosed, EngineError, RequestFailed
from engine.logs import suppressed_note
from engine.worker.failures import FailureLog
from ipc.records import (
    AttemptFailed,
    DeadLetter,
    Deferred,
    FrameDone,
    Redelivered,
    Reply,
    WorkerStarted,
    decode_records,
)
from ipc.ring import RingConsumer
from ipc.shard import LANES, EngineWakeups, ShardMemory

log = logging.getLogger("engine.dispatcher")
failures_log = logging.getLogger("engine.delivery")
DEAD_LETTER_LOG_INTERVAL_S = 10.0  # one ERROR line per (recipient, reason, exception type)
DEAD_LETTER_LINES_PER_S = 20  # and at most this many a second over all keys
REDELIVERY_LOG_DELAY_S = 0.5  # a respawn's redeliveries come a frame at a time: one line


class Returns:
    """Owns the consumer end of every return ring and what its records settle."""

    def __init__(
        self,
        config: Config,
        shards: list[ShardMemory],
        wakeups: EngineWakeups,
        counts: dict[str, int],
        events: EventLog | None = None,
    ) -> None:
        self.wakeups = wakeups
        self.events = events if events is not None else EventLog()
        self.letter_log = FailureLog(DEAD_LETTER_LOG_INTERVAL_S, DEAD_LETTER_LINES_PER_S)
        self.last_error = [""] * len(shards)  # per worker: its latest reported failure
        self.redelivered = [0] * len(shards)  # not logged yet
        self._redelivery_timer: asyncio.TimerHandle | None = None
        self.counts = counts  # the dispatcher's, shared: it counts submitted, this settled
        self.consumers: list[RingConsumer] = [s.return_consumer() for s in shards]
        # Per (shard, lane): the ring position up to which every frame is reported settled.
        self.acked: list[list[int]] = [[r.committed for r in s.lanes] for s in shards]
        self.lane_settled = [0] * LANES
        self.futures: dict[int, asyncio.Future[Any]] = {}
        # Cluster mode keeps its letters in Redis: nothing to restore from the file there.
        restore = bool(config.dlq_restore) and not config.broker
        self.dead = DeadLetterStore(config.dlq_max, config.dlq_path, restore)
        # Dead letters whose frame is not reported settled yet, per shard (see DeadLetter).
        self.provisional: list[list[DeadLetter]] = [[] for _ in shards]
        # Messages handed back for a long retry whose frame is not reported yet, per
        # shard, and who takes them (and hears of progress) once it is: the dispatcher's
        # ``Deferrals``.
        self.deferred: list[list[Deferred]] = [[] for _ in shards]
        self.on_deferred: Callable[[int, Deferred], None] = _refuse_deferred
        self.on_progress: Callable[[], None] | None = None
        self.settled_event = asyncio.Event()
        self.progress_event = asyncio.Event()  # replaced and set whenever a frame settles
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(wakeups.return_ready.fd, self.on_returns)

    def on_returns(self) -> None:
        self.wakeups.return_ready.clear()
        for shard, consumer in enumerate(self.consumers):
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
        if self.on_progress is not None:
            self.on_progress()
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
            if self.deferred[shard]:
                self._settle_deferred(shard, rec.lane, rec.end, keep=fresh)
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
                fut.set_result(rec.value)  # raw msgpack: the caller decodes (or caches) it
            else:
                fut.set_exception(RequestFailed(rec.error))
        elif isinstance(rec, DeadLetter):
            if rec.frame_end > self.acked[shard][rec.lane]:
                self.provisional[shard].append(rec)
            # else: its frame was reported settled before; this is a redelivery's echo
        elif isinstance(rec, Deferred):
            if rec.frame_end > self.acked[shard][rec.lane]:
                self.deferred[shard].append(rec)
            # else: its frame was reported before; this is a redelivery's echo
        elif isinstance(rec, Redelivered):
            self.counts["redelivered"] += rec.count
            self.redelivered[shard] += rec.count
            if self._redelivery_timer is None:
                self._redelivery_timer = self.loop.call_later(
                    REDELIVERY_LOG_DELAY_S, self._log_redeliveries
                )
        elif isinstance(rec, AttemptFailed):
            self._log_attempt(shard, rec)
        elif isinstance(rec, WorkerStarted):
            # The previous worker died before reporting these letters' frames: those
            # frames are delivered again, and the new outcomes are the ones that count.
            self.provisional[shard].clear()
            self.deferred[shard].clear()

    def _settle_letters(self, shard: int, lane: int, end: int, keep: bool) -> None:
        """Store (``keep``) or drop the provisional letters of frames up to ``end`` in ``lane``."""
        waiting: list[DeadLetter] = []
        for dl in self.provisional[shard]:
            if dl.lane == lane and dl.frame_end <= end:
                if keep and self.dead.add(dl):
                    self._log_letter(shard, dl)
            else:
                waiting.append(dl)
        self.provisional[shard] = waiting

    def _settle_deferred(self, shard: int, lane: int, end: int, keep: bool) -> None:
        """Hand over (``keep``) or drop the provisional deferrals of frames up to ``end``."""
        waiting: list[Deferred] = []
        for rec in self.deferred[shard]:
            if rec.lane == lane and rec.frame_end <= end:
                if keep:
                    self.on_deferred(shard, rec)
            else:
                waiting.append(rec)
        self.deferred[shard] = waiting

    def _log_attempt(self, shard: int, rec: AttemptFailed) -> None:
        """The WARNING line of a failed attempt (the worker rate-limited them already)."""
        self.last_error[shard] = f"{rec.exc_type}: {rec.error}"
        retry = (
            f"retry in {rec.retry_in_s:.3g}s"
            if rec.retry_in_s >= 0
            else "no retry: it expires first"
        )
        fields: dict[str, Any] = {
            "worker": shard,
            "message_id": rec.message_id,
            "recipient": rec.recipient,
            "attempt": rec.attempt,
            "max_attempts": rec.max_attempts,
            "retry_in_s": round(rec.retry_in_s, 3),
            "exc_type": rec.exc_type,
            "error": rec.error,
            "suppressed": rec.suppressed,
        }
        if rec.traceback and failures_log.isEnabledFor(logging.DEBUG):
            fields["traceback"] = rec.traceback
        failures_log.warning(
            "message %d to %r failed (attempt %d/%d), %s: %s: %s%s",
            rec.message_id,
            rec.recipient,
            rec.attempt,
            rec.max_attempts,
            retry,
            rec.exc_type,
            rec.error,
            suppressed_note(rec.suppressed),
            extra=fields,
        )

    def _log_letter(self, shard: int, dl: DeadLetter) -> None:
        """The ERROR line (and event) of a stored dead letter, with its traceback; rate-limited."""
        msg = dl.message
        exc_type = dl.error.partition(":")[0] if dl.reason == "max_attempts" else ""
        if dl.error:
            self.last_error[shard] = dl.error
        held = self.letter_log.allow((msg.recipient, dl.reason, exc_type))
        if held is None:
            return
        self.events.emit(
            "dead_letter",
            "error",
            f"message {msg.id} to {msg.recipient!r} dead-lettered ({dl.reason}) after "
            f"{dl.attempts} attempt(s): {dl.error}{suppressed_note(held)}",
            worker=shard,
            message_id=msg.id,
            recipient=msg.recipient,
            reason=dl.reason,
            attempts=dl.attempts,
            error=dl.error,
            suppressed=held,
            traceback=dl.traceback,
        )

    def _log_redeliveries(self) -> None:
        self._redelivery_timer = None
        for shard, count in enumerate(self.redelivered):
            if count:
                self.redelivered[shard] = 0
                # Never silent: the handler sees these messages a second time.
                self.events.emit(
                    "redelivered",
                    "warning",
                    f"worker {shard} delivers again {count:,} messages that a previous worker "
                    "process fetched and never settled (at least once; "
                    f"{self.counts['redelivered']:,} redelivered in all)",
                    worker=shard,
                    redelivered=count,
                )

    def in_flight(self) -> int:
        c = self.counts
        return c["submitted"] - c["delivered"] - c["dead_lettered"] - c["expired"]

    def close(self) -> None:
        """Stop reading, fail the requests still waiting for a reply, close the store."""
        self.loop.remove_reader(self.wakeups.return_ready.fd)
        if self._redelivery_timer is not None:
            self._redelivery_timer.cancel()
            self._log_redeliveries()
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(EngineClosed("the engine stopped before the reply came"))
        self.futures.clear()
        self.dead.close()


def _refuse_deferred(shard: int, rec: Deferred) -> None:
    raise EngineError(f"worker {shard} handed back message {rec.message.id} with nobody to hold it")
