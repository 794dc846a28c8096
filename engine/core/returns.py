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
from typing import Any

from engine.config import Config
from engine.core.deadletters import DeadLetterStore
from engine.errors import CodecError, EngineClosed, RequestFailed
from engine.logs import LogLimiter, suppressed_note
from ipc.records import (
    DeadLetter,
    FrameDone,
    Redelivered,
    Reply,
    WorkerStarted,
    decode_records,
)
from ipc.ring import RingConsumer
from ipc.shard import LANES, EngineWakeups, ShardMemory

log = logging.getLogger("engine.dispatcher")
REDELIVERY_LOG_INTERVAL_S = 5.0  # a respawn redelivers frame by frame: one line per worker


class Returns:
    """Owns the consumer end of every return ring and what its records settle."""

    def __init__(
        self,
        config: Config,
        shards: list[ShardMemory],
        wakeups: EngineWakeups,
        counts: dict[str, int],
    ) -> None:
        self.wakeups = wakeups
        self.counts = counts  # the dispatcher's, shared: it counts submitted, this settled
        self.consumers: list[RingConsumer] = [s.return_consumer() for s in shards]
        # Per (shard, lane): the ring position up to which every frame is reported settled.
        self.acked: list[list[int]] = [[r.committed for r in s.lanes] for s in shards]
        self.lane_settled = [0] * LANES
        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.dead = DeadLetterStore(config.dlq_max, config.dlq_path)
        # Dead letters whose frame is not reported settled yet, per shard (see DeadLetter).
        self.provisional: list[list[DeadLetter]] = [[] for _ in shards]
        self.settled_event = asyncio.Event()
        self.progress_event = asyncio.Event()  # replaced and set whenever a frame settles
        self.redelivery_log = LogLimiter(REDELIVERY_LOG_INTERVAL_S)
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
                fut.set_result(rec.value)  # raw msgpack: the caller decodes (or caches) it
            else:
                fut.set_exception(RequestFailed(rec.error))
        elif isinstance(rec, DeadLetter):
            if rec.frame_end > self.acked[shard][rec.lane]:
                self.provisional[shard].append(rec)
            # else: its frame was reported settled before; this is a redelivery's echo
        elif isinstance(rec, Redelivered):
            self.counts["redelivered"] += rec.count
            held = self.redelivery_log.allow(shard)
            if held is not None:
                # Never silent: the handler sees these messages a second time.
                log.warning(
                    "worker %d delivers again %d messages that a previous worker process "
                    "fetched and never settled (at least once; %d redelivered in all)%s",
                    shard,
                    rec.count,
                    self.counts["redelivered"],
                    suppressed_note(held),
                    extra={"worker": shard, "redelivered": rec.count},
                )
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

    def in_flight(self) -> int:
        c = self.counts
        return c["submitted"] - c["delivered"] - c["dead_lettered"] - c["expired"]

    def close(self) -> None:
        """Stop reading, fail the requests still waiting for a reply, close the store."""
        self.loop.remove_reader(self.wakeups.return_ready.fd)
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(EngineClosed("the engine stopped before the reply came"))
        self.futures.clear()
        self.dead.close()
