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
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from engine.config import Config
from engine.core.api import EngineAPI
from engine.core.dispatcher import Dispatcher
from engine.core.events import EventLog
from engine.core.supervisor import MonitorSupervisor
from engine.core.sync import LoopThread, SyncEngine
from engine.errors import EngineError
from ipc.codec import Message, Priority
from ipc.control import MonitorReport
from ipc.shard import EngineWakeups, ShardMemory, shard_bytes
from ipc.shm import check_shm_space, new_engine_prefix, sweep_stale_segments

T = TypeVar("T")
Handler = str | Callable[[Message], Any] | None


class Engine(EngineAPI):
    """A running Ringway engine: dispatcher here, a monitor process, N worker processes."""

    def __init__(self, handler: Handler = None, config: Config | None = None) -> None:
        self.handler = handler
        self.config = config if config is not None else Config.from_env()
        self.shards: list[ShardMemory] = []
        self.wakeups: EngineWakeups | None = None
        self.dispatcher: Dispatcher | None = None
        self.events = EventLog()  # worker deaths, respawns, dead letters, ...: logged, kept
        self.supervisor = MonitorSupervisor(self.config, handler, self.events)
        self._host = LoopThread()  # the loop thread of ``with Engine(...)``

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
        cfg = self.config
        sweep_stale_segments()
        check_shm_space(cfg.workers * shard_bytes(cfg.ring_bytes, cfg.return_ring_bytes))
        prefix = new_engine_prefix()
        self.wakeups = EngineWakeups.create()
        try:
            for i in range(cfg.workers):
                self.shards.append(
                    ShardMemory.create(
                        prefix, i, self.wakeups, cfg.ring_bytes, cfg.return_ring_bytes
                    )
                )
            self.dispatcher = Dispatcher(cfg, self.shards, self.wakeups, self.events)
            await self.supervisor.start(self.shards)
        except BaseException:
            await self._teardown()
            raise

    def reload(self) -> None:
        """Restart the workers one at a time, gracefully (re-imports a ``module:function`` handler).

        Each worker stops fetching, settles what it holds and exits; its successor
        resumes at the ring's committed position, so nothing is lost or repeated.
        """
        self._dispatcher()
        self.supervisor.reload()

    async def stop(self, timeout: float | None = None, *, fast: bool = False) -> None:
        """Stop accepting, drain within the shutdown timeout, stop processes, unlink memory.

        ``fast`` skips the drain and kills the workers instead of letting them
        settle what they hold (a second Ctrl-C); unsettled messages are then lost.
        """
        if self.dispatcher is None or self.supervisor.stopping:
            return
        wait = self.config.shutdown_timeout_s if timeout is None else timeout
        try:
            if not fast and self.monitor is not None and self.monitor.exitcode is None:
                await self.dispatcher.drain(wait)
        finally:
            self.dispatcher.closed = True
            await self._teardown(fast)

    async def _teardown(self, fast: bool = False) -> None:
        """Stop the monitor (and so the workers), then release every segment and fd."""
        try:
            await self.supervisor.stop(fast)
        finally:
            if self.dispatcher is not None:
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

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sync facade -------------------------------------------------------------
    def __enter__(self) -> SyncEngine:
        self._host.start(self.start)
        return SyncEngine(self, self._host)

    def __exit__(self, *exc: object) -> None:
        self._host.stop(self.stop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the engine's loop thread and wait for it (sync facade)."""
        return self._host.call(coro)


__all__ = ["Engine", "EngineError", "Priority", "SyncEngine"]
