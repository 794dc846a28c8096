"""The state one worker keeps, and what the monitor and the worker agree on.

``WorkerState`` builds every attribute the worker's concerns share (rings,
per-lane queues, counters, events), so each of them reads it as plain
``self.x`` with no indirection on the hot path.  The concerns are layered on
top of it as classes, each using only the layers below it, and combine into
one object (one ``__init__``, here):

    WorkerState <- Lanes, Committing <- Settling <- Runners <- Fetching <- Worker
                   lanes  commit        settle      runners    fetch       main

The plan, the counters and ``window_for`` (which the monitor uses too) live
here, at the bottom: the state is built from them, and ``main`` sits on top of
every layer, so they could not live there without an import cycle.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

from engine.config import Config
from engine.worker.delivery import FrameTrack, Pending, RecipientLane
from engine.worker.failures import FailureLog
from engine.worker.sinks import Sink
from ipc.control import Histogram
from ipc.records import ReturnRecord, WorkerStarted
from ipc.ring import RingConsumer, RingProducer
from ipc.shard import LANES, ShardMemory

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
    "frames_skipped",
)
"""What a worker counts and reports in its StatsSnapshot; the monitor sums these."""
LATENCY_BUFFER = 256
"""Latencies buffered before they are counted into a histogram in one call."""
SPARE_LANES = 1024
"""Idle recipient FIFOs kept for reuse (an async worker makes and drops one per message)."""
"""Latencies buffered before they are counted into a histogram in one call."""


@dataclass
class WorkerPlan:
    """What the monitor tells a (re)spawned worker about its shard's history."""

    careful: bool = False  # deliver the redelivery window one by one, recording each
    quarantine: set[tuple[int, int, int]] = field(default_factory=set)  # (lane, end, index)
    crashes: int = 0
    corrupt: set[tuple[int, int]] = field(default_factory=set)  # (lane, position) to skip


HOLD_NS = 100_000_000
"""A frame holding its lane's commits longer than this (a slow delivery) stops bounding
fetching by uncommitted messages; a younger one will settle soon, so the reader waits."""


def window_for(config: Config) -> int:
    """Messages a worker may hold fetched and uncommitted: bounds memory and redelivery."""
    return max(4 * config.delivery_concurrency, 2 * config.batch_size)


class WorkerState:
    """Everything one shard's worker holds; the layers above only add behaviour."""

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
        self.spare_lanes: list[RecipientLane] = []  # idle FIFOs for reuse (settle, _accept)
        self.unsettled = 0
        # Fetched and not yet committed (settled ones included: a lane commits in
        # frame order).  Fetching also stops at ``window`` of these, so a crash
        # redelivers at most a window and a frame, unless a message waits on a
        # retry or expiry timer (``timed``) or a frame has held its lane's commits
        # for HOLD_NS (a slow delivery): then the frames behind it settle and only
        # ``unsettled`` bounds fetching, so one slow recipient never stalls the
        # others (README: where duplicates come from).
        self.uncommitted = 0
        self.timed = 0
        self.backlog_hold = False  # fetch held back for a sync lane's backlog (reader waits)
        # (lane, recipient) pairs whose messages are handed back to the dispatcher, in
        # order, while one of them waits out a long retry there (settle: _park); kept in
        # the shard's slot so the next worker of the shard goes on where this one stops.
        self.parked: set[tuple[int, str]] = shard.load_parked()
        self.parked_dirty = False
        self.hold_ns = (
            int(config.max_retry_hold_s * 1e9) if not config.broker else 1 << 62
        )  # cluster mode: an entry is acked once its frame settles, so nothing leaves a ring
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
        self.failure_log = FailureLog()  # which failed attempts are reported (rate limit)
        self.lat_start = Histogram()
        self.lat_settle = Histogram()
        # Latencies waiting to be counted: ``record_many`` per LATENCY_BUFFER of them
        # costs a fraction of one ``record`` each (see ``flush_latencies``).
        self.starts_ns: list[int] = []
        self.settles_ns: list[int] = []
        self.wake = asyncio.Event()  # space in the window, or all settled (reader, stop)
        # Idle runners park on their own future and are woken one at a time: one Event
        # for the whole pool woke every idle coroutine on every settle (~5 us each).
        self.idle_runners: deque[asyncio.Future[None]] = deque()
        self.flush_wanted = asyncio.Event()
        self.flush_lock = asyncio.Lock()
        self.side_tasks: set[asyncio.Task[None]] = set()
        self.fatal: asyncio.Future[None]  # made in run(), on the worker's own loop
        self.careful_left = 0
        # The async pool: (task, [deadline_ns, timed_out]) per deliverer (see runners).
        self.slots: list[tuple[asyncio.Task[None], list[int]]] = []

    def flush_latencies(self) -> None:
        """Count the buffered latencies into the histograms (before every snapshot)."""
        if self.starts_ns:
            self.lat_start.record_many(self.starts_ns)
            self.starts_ns.clear()
        if self.settles_ns:
            self.lat_settle.record_many(self.settles_ns)
            self.settles_ns.clear()

    def window_full(self) -> bool:
        """True while the reader must not fetch: the window is taken or returns wait."""
        if self.unsettled >= self.window or self.returns_waiting:
            return True
        if self.uncommitted < self.window or self.timed:
            return False
        heads = [f[0].fetched_ns for f in self.frames if f]
        return bool(heads) and time.monotonic_ns() - min(heads) < HOLD_NS
