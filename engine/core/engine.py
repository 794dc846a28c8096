"""`Engine`: the embedded engine.  Owns the shared memory, the dispatcher and the monitor.

``async with Engine(handler, config) as eng`` runs the dispatcher on the
caller's event loop; ``with Engine(handler, config) as eng`` runs it on a
private uvloop thread and returns a blocking facade with the same method
names (`engine.core.sync`).  The engine's process creates every segment and
unlinks them all on exit, also after an exception or a crash of the monitor or
a worker.  This module holds the lifecycle; the message API is the base class
`EngineAPI` (`engine.core.api`), the monitor's care `MonitorSupervisor`
(`engine.core.supervisor`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from engine.config import Config
from engine.core.api import EngineAPI
from engine.core.cache import ResponseCache
from engine.core.cluster import Cluster
from engine.core.dedup import DedupWindow
from engine.core.dispatcher import Dispatcher
from engine.core.events import EventLog
from engine.core.supervisor import MonitorSupervisor
from engine.core.sync import LoopThread, SyncEngine
from engine.errors import DrainTimeout, EngineError
from ipc.codec import Message, Priority
from ipc.control import MonitorReport
from ipc.shard import EngineWakeups, ShardMemory, shard_bytes
from ipc.shm import EngineLock, check_shm_space, new_engine_prefix, sweep_stale_segments

T = TypeVar("T")
Handler = str | Callable[[Message], Any] | None
log = logging.getLogger("engine")


class Engine(EngineAPI):
    """A running Ringway engine: dispatcher here, a monitor process, N worker processes."""

    def __init__(
        self, handler: Handler = None, config: Config | None = None, *, abandon_ok: bool = False
    ) -> None:
        self.handler = handler
        self.config = config if config is not None else Config.from_env()
        # Leaving ``async with`` / ``with`` raises DrainTimeout when the stop abandoned
        # messages, unless the caller accepts that loss here.
        self.abandon_ok = abandon_ok
        self.abandoned = 0  # submitted and never settled when the engine stopped
        self._stop_reason = ""
        self.lock: EngineLock | None = None
        self.shards: list[ShardMemory] = []
        self.wakeups: EngineWakeups | None = None
        self.dispatcher: Dispatcher | None = None
        self.events = EventLog()  # worker deaths, respawns, dead letters, ...: logged, kept
        self.supervisor = MonitorSupervisor(self.config, handler, self.events)
        cfg = self.config
        self.cache = ResponseCache(cfg.cache_size, cfg.cache_ttl_s)
        self.dedup = DedupWindow(cfg.dedup_window_s, cfg.dedup_max) if cfg.dedup_window_s else None
        self._host = LoopThread()  # the loop thread of ``with Engine(...)``
        self.cluster: Cluster | None = None  # cluster mode (ENGINE_BROKER): the node

    # What the monitor supervisor learns, under the names callers know.
    @property
    def monitor(self) -> Any:
        """The monitor process (a ``multiprocess`` Process), None before start."""
        return self.supervisor.proc

    @property
    def report(self) -> MonitorReport | None:
        """The monitor's latest report (workers, counters, latencies)."""
        return self.supervisor.report

    @property
    def monitor_restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def monitor_error(self) -> str:
        """Why the monitor is not running; empty while it is."""
        return self.supervisor.error

    # -- start / stop ------------------------------------------------------------
    async def start(self) -> None:
        if self.config.broker and self.cluster is None:
            from engine.core.cluster import load_cluster

            # Before the monitor starts: the node wraps the workers' sink in its lease fence.
            self.cluster = load_cluster(self)
            # The node fenced the workers' sink (handler and config): spawn them with it.
            self.supervisor.handler, self.supervisor.config = self.handler, self.config
        cfg = self.config
        sweep_stale_segments()
        check_shm_space(cfg.workers * shard_bytes(cfg.ring_bytes, cfg.return_ring_bytes))
        prefix = new_engine_prefix()
        # Held before the first segment exists and until the last is gone: the proof,
        # for another engine's sweep, that these segments are in use (ipc.shm).
        self.lock = EngineLock.acquire(prefix)
        try:
            self.wakeups = EngineWakeups.create()
            for i in range(cfg.workers):
                self.shards.append(
                    ShardMemory.create(
                        prefix, i, self.wakeups, cfg.ring_bytes, cfg.return_ring_bytes
                    )
                )
            self.dispatcher = Dispatcher(cfg, self.shards, self.wakeups, self.events)
            await self.supervisor.start(self.shards)
            if self.cluster is not None:
                await self.cluster.start()
        except BaseException:
            if self.cluster is not None:
                await self.cluster.stop(0, fast=True)
            await self._teardown()
            raise

    def reload(self) -> None:
        """Restart the workers one at a time, gracefully (re-imports a ``module:function`` handler).

        Each worker stops fetching, settles what it holds and exits; its successor
        resumes at the ring's committed position, so nothing is lost or repeated.
        """
        self._dispatcher()
        self.supervisor.reload()

    async def stop(self, timeout: float | None = None, *, fast: bool = False) -> int:
        """Stop accepting, drain within the shutdown timeout, stop processes, unlink memory.

        ``fast`` skips the drain and kills the workers instead of letting them
        settle what they hold (a second Ctrl-C); unsettled messages are then lost.
        Returns how many messages were abandoned (submitted, never settled), also
        in ``stats()["abandoned"]`` and logged at ERROR when not 0.
        """
        if self.dispatcher is None or self.supervisor.stopping:
            return self.abandoned
        wait = self.config.shutdown_timeout_s if timeout is None else timeout
        monitor_up = self.monitor is not None and self.monitor.exitcode is None
        self._stop_reason = "the stop was interrupted"
        try:
            if self.cluster is not None:
                # Settle and ack what the node holds, give its partitions back, leave.
                await self.cluster.stop(wait, fast)
            if fast:
                self._stop_reason = "fast stop"
            elif not monitor_up:
                self._stop_reason = f"the monitor was down: {self.monitor_error or 'it exited'}"
            elif await self.dispatcher.drain(wait):
                self._stop_reason = "the workers did not settle them after the drain"
            else:
                self._stop_reason = f"the drain timed out after {wait:g}s"
        finally:
            self.dispatcher.closed = True
            await self._teardown(fast)
        if self.abandoned:
            held = self.dispatcher.deferrals.held
            if held:
                # Never silent: these waited for a long retry out of the rings.
                self._stop_reason += f"; {held} of them held for a retry (stats: deferred)"
            log.error(
                "stopped with %d unsettled messages abandoned (%s)",
                self.abandoned,
                self._stop_reason,
                extra={"abandoned": self.abandoned, "deferred": held},
            )
        return self.abandoned

    async def _teardown(self, fast: bool = False) -> None:
        """Stop the monitor (and so the workers), then release every segment and fd."""
        try:
            await self.supervisor.stop(fast)
        finally:
            if self.dispatcher is not None:
                try:
                    # What the workers settled while they stopped is on the return
                    # rings still: read it before counting what was abandoned.
                    self.dispatcher.returns.on_returns()
                finally:
                    self.abandoned = self.dispatcher.in_flight()
                    self.dispatcher.close()
                # Let cancelled flushes unwind before their rings are unmapped below.
                await asyncio.gather(*self.dispatcher.tasks, return_exceptions=True)
            for shard in self.shards:
                shard.close()
                shard.close_wakeups()
            self.shards.clear()
            if self.wakeups is not None:
                self.wakeups.close()
                self.wakeups = None
            if self.lock is not None:
                self.lock.release()  # last: every segment is unlinked by now
                self.lock = None

    def _check_abandoned(self, leaving_on_error: bool) -> None:
        """Raise DrainTimeout on leaving the ``with`` block if messages were abandoned.

        Not over an exception already leaving the block (the ERROR line has the
        count), and not when the caller passed ``abandon_ok=True``.
        """
        if self.abandoned and not self.abandon_ok and not leaving_on_error:
            raise DrainTimeout(self.abandoned, self._stop_reason)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        await self.stop()
        self._check_abandoned(exc_type is not None)

    # -- sync facade -------------------------------------------------------------
    def __enter__(self) -> SyncEngine:
        self._host.start(self.start)
        return SyncEngine(self, self._host)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._host.stop(self.stop)
        self._check_abandoned(exc_type is not None)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine's loop thread and wait for it (sync facade)."""
        return self._host.call(coro)


__all__ = ["Engine", "EngineError", "Priority", "SyncEngine"]
