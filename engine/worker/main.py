"""A worker process: drains its shard's lanes and delivers on its own uvloop loop.

Flow: the reader fetches frames (highest lane first) while fewer than
``window`` messages are unsettled, decodes each frame as one batch and queues
every message on its (lane, recipient) FIFO.  Sync handlers are called inline
by a dispatcher loop over the ready queue; async handlers run on a fixed pool
of ``delivery_concurrency`` coroutines (never a task per message).  Settled
messages are reported on the return ring; a frame is committed in its lane
only after the report that covers it is published, so a crash can repeat
work but never lose or miscount it.

This module holds the process: ``worker_main`` (what the monitor forks), and
``Worker``, which starts the loops, beats the heartbeat, sends stats and stops.
The work itself is layered below it, each layer in its own module:
``state`` (shared state, plan, counters), ``lanes`` (ready queues), ``commit``
(return records, commits), ``settle`` (outcomes, retries, TTL), ``runners``
(calling the sink) and ``fetch`` (the rings).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.config import Config
from engine.errors import EngineError
from engine.exitcodes import ChildExit
from engine.procutil import WORKER_STOP, die_with_parent, ignore_group_signals, start_stamp
from engine.worker.fetch import Fetching
from engine.worker.state import WorkerPlan
from ipc.control import StatsSnapshot, WorkerFailed, WorkerReady, send_control
from ipc.shard import SLOT_PID, SLOT_PID_START, ShardMemory, ShardSpec

WORKER_RECURSION_LIMIT = 4000  # > the dispatcher's default 1000 plus the loop's frames
# The cyclic GC's youngest generation is collected after this many container
# allocations (CPython's default is 700).  A worker allocates a few per message
# (Pending, a recipient's FIFO, the handler's coroutine and future), nearly none
# of them in cycles, so at the default it ran a collection every ~100 messages,
# ~1 µs per async delivery.  Startup objects are frozen out of the collector too.
WORKER_GC_THRESHOLD = 20_000


class WorkerCrashed(EngineError):
    """Raised inside a worker when one of its core loops failed; the process exits."""


class Worker(Fetching):
    """The delivery engine of one shard, inside its worker process."""

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
        self.flush_latencies()
        return StatsSnapshot(
            worker=self.index,
            pid=os.getpid(),
            counters=dict(self.counters),
            latency_start=self.lat_start,
            latency_settle=self.lat_settle,
            sent_ns=time.monotonic_ns(),
            backlog=self.backlog(),
        )

    def backlog(self) -> list[tuple[str, int]]:
        """The ENGINE_BACKLOG_TOP recipients holding the most fetched, unsettled messages.

        Queued, in delivery or waiting for a retry; once per stats interval, so a
        scan of the recipients costs nothing on the hot path.
        """
        top = self.config.backlog_top
        if not top:
            return []
        held: dict[str, int] = {}
        for lane in self.lanes:
            for recipient, st in lane.items():
                held[recipient] = held.get(recipient, 0) + len(st.queue) + st.busy
        return heapq.nlargest(top, held.items(), key=lambda item: item[1])

    async def run(self, send: Callable[[Any], None]) -> None:
        loop = asyncio.get_running_loop()
        self.fatal = loop.create_future()
        stop = asyncio.Event()

        def on_stop() -> None:
            # Stop fetching at once, not a few loop iterations later when `run` resumes:
            # a recycled worker should hand back its ring promptly.
            self.stopping = True
            stop.set()

        # Only the monitor's WORKER_STOP stops a worker; the group's SIGTERM and SIGINT are
        # ignored (`worker_main`), as the dispatcher acts on them and then tells the monitor.
        loop.add_signal_handler(WORKER_STOP, on_stop)
        # Blocked since the fork (the monitor blocks it): one sent while we booted is
        # pending and arrives now, to the handler, instead of killing a half-started worker.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {WORKER_STOP})
        tasks: list[asyncio.Task[None]] = []
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
    ignore_group_signals()  # inherited from the monitor already; said here as well
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
    # The stamp first: a reader that sees this pid also sees its stamp (x86-64 stores are ordered).
    shard.slot_idx[SLOT_PID_START] = start_stamp(os.getpid())
    shard.slot_idx[SLOT_PID] = os.getpid()
    worker = Worker(index, shard, config, sink, plan)
    import uvloop

    gc.freeze()  # modules, the handler, the worker's state: never garbage, never scanned again
    gc.set_threshold(WORKER_GC_THRESHOLD, *gc.get_threshold()[1:])
    try:
        uvloop.run(worker.run(send))
    finally:
        sink.close()
