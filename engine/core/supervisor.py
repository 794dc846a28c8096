"""`MonitorSupervisor`: the engine's side of the monitor process.

Apart from `Engine` because the monitor has a lifecycle of its own: it is
started, watched on the engine's loop (its sentinel and its control pipe),
restarted when it dies, once every worker of the old one is gone (one consumer
per ring, always), and stopped, gracefully or fast.  The engine reads what it
learns here: the latest `MonitorReport`, the restart count, the last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from engine.backoff import backoff_s
from engine.config import Config
from engine.core.events import EventLog
from engine.errors import EngineClosed, EngineStartError
from engine.procutil import (
    context,
    exit_reason,
    group_signals_blocked,
    is_same_process,
    signal_if_same,
)
from ipc.control import (
    Command,
    MonitorEvent,
    MonitorReport,
    WorkerFailed,
    WorkerReady,
    WorkerRecycled,
    recv_control,
    send_control,
)
from ipc.shard import SLOT_PID, SLOT_PID_START, ShardMemory

MONITOR_RESTART_LIMIT = 5
log = logging.getLogger("engine")


class MonitorSupervisor:
    """Starts, watches, restarts and stops the monitor process of one engine."""

    def __init__(self, config: Config, handler: Any, events: EventLog | None = None) -> None:
        self.config = config
        self.handler = handler
        self.events = events if events is not None else EventLog()
        self.shards: list[ShardMemory] = []
        self.proc: Any = None
        self.conn: Any = None
        self.restarts = 0
        self.error = ""  # why the monitor is not running, "" while it is
        self.report: MonitorReport | None = None
        self.ready_workers: set[int] = set()
        self.stopping = False
        self._boot: asyncio.Future[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None

    async def start(self, shards: list[ShardMemory]) -> None:
        """Start the monitor on ``shards``; returns once every worker is ready."""
        self.shards = shards
        await self._start()

    async def _start(self) -> None:
        from engine.core.monitor import monitor_main

        loop = asyncio.get_running_loop()
        ctx = context(self.config.start_method)
        here, there = ctx.Pipe(duplex=True)
        self.ready_workers.clear()
        self._boot = loop.create_future()
        proc = ctx.Process(
            target=monitor_main,
            args=([s.spec for s in self.shards], self.config, self.handler, there, os.getpid()),
            name="ringway-monitor",
        )
        with group_signals_blocked():  # until the monitor ignores them itself
            proc.start()
        there.close()
        self.proc, self.conn = proc, here
        loop.add_reader(here.fileno(), self._on_message)
        loop.add_reader(proc.sentinel, self._on_exit)
        await self._boot

    def _on_message(self) -> bool:
        """Handle one message from the monitor; False once the pipe is closed."""
        try:
            msg = recv_control(self.conn)
        except (EOFError, OSError):
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(self.conn.fileno())
            return False
        boot = self._boot
        if isinstance(msg, MonitorReport):
            self.report = msg
        elif isinstance(msg, WorkerReady):
            self.ready_workers.add(msg.worker)
            if boot is not None and not boot.done() and len(self.ready_workers) == len(self.shards):
                boot.set_result(None)
        elif isinstance(msg, WorkerFailed):
            if boot is not None and not boot.done():
                boot.set_exception(
                    EngineStartError(f"worker {msg.worker} failed to start: {msg.error}")
                )
            else:
                self.events.emit(
                    "worker_boot_failed", "error", msg.error, worker=msg.worker, error=msg.error
                )
        elif isinstance(msg, WorkerRecycled):
            self.events.emit(
                "worker_recycled",
                "info",
                f"restarting worker {msg.worker} (pid {msg.pid}) gracefully: {msg.reason}",
                worker=msg.worker,
                pid=msg.pid,
                reason=msg.reason,
            )
        elif isinstance(msg, MonitorEvent):
            self.events.emit(msg.event, msg.level, msg.message, worker=msg.worker, **msg.detail)
        return True

    def reload(self) -> None:
        """Ask the monitor for a rolling restart of the workers (see `Engine.reload`)."""
        if self.conn is None:
            raise EngineClosed("the monitor is not running")
        send_control(self.conn, Command(op="reload"))

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        proc = self.proc
        loop.remove_reader(proc.sentinel)
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(self.conn.fileno())
        proc.join(1)  # the sentinel fired: it has exited, reap it
        with contextlib.suppress(OSError, EOFError):
            # A WorkerFailed may still be in the pipe; at EOF poll() stays true, so stop there.
            while self.conn.poll() and self._on_message():
                pass
        boot = self._boot
        if boot is not None and not boot.done():
            boot.set_exception(
                EngineStartError(
                    f"the monitor exited with code {proc.exitcode} before the workers were ready"
                )
            )
            return
        if self.stopping:
            return
        self.restarts += 1
        how = exit_reason(proc.exitcode)
        if self.restarts > MONITOR_RESTART_LIMIT:
            self.error = f"monitor died {self.restarts} times; not restarted"
            self.events.emit(
                "monitor_died", "error", f"the monitor (pid {proc.pid}) {how}; {self.error}"
            )
            return  # stats() reports it; the rings keep every message for a restart
        self.events.emit(
            "monitor_died",
            "error",
            f"the monitor (pid {proc.pid}) {how}; restarting it once its workers are gone "
            f"(restart {self.restarts} of at most {MONITOR_RESTART_LIMIT})",
            pid=proc.pid,
            exit_code=proc.exitcode,
            restarts=self.restarts,
        )
        self._restart_task = loop.create_task(self._restart())

    @property
    def gave_up(self) -> bool:
        """No monitor restart is running or coming: it died or failed too often."""
        task = self._restart_task
        return self.restarts >= MONITOR_RESTART_LIMIT and (task is None or task.done())

    async def _restart(self) -> None:
        """Start a new monitor once every worker of the dead one is gone (one consumer per ring)."""
        self.conn.close()
        # The old workers are no children of ours, and once their monitor is gone
        # anyone may reap them: a pid is theirs only while its start time matches.
        workers = [
            (int(s.slot_idx[SLOT_PID]), int(s.slot_idx[SLOT_PID_START])) for s in self.shards
        ]
        deadline = asyncio.get_running_loop().time() + 10
        while any(is_same_process(pid, stamp) for pid, stamp in workers):
            if asyncio.get_running_loop().time() > deadline:
                for pid, stamp in workers:
                    signal_if_same(pid, stamp, signal.SIGKILL)
            await asyncio.sleep(0.01)
        try:
            await self._start()
        except Exception as exc:
            # Never silently run without a monitor: record why, and try again later.
            self.error = f"monitor restart {self.restarts} failed: {exc}"
            log.exception("%s", self.error)
            if self.stopping or self.restarts >= MONITOR_RESTART_LIMIT:
                return
            await asyncio.sleep(backoff_s(self.restarts, 0.2, 5.0, jitter="none"))
            self.restarts += 1
            await self._restart()
        else:
            self.error = ""
            self.events.emit(
                "monitor_restarted",
                "warning",
                f"the monitor is back (pid {self.proc.pid}) with {len(self.shards)} workers",
                pid=self.proc.pid,
                restarts=self.restarts,
            )

    async def stop(self, fast: bool = False) -> None:
        """Stop the monitor, and with it the workers, for good (no restart after this).

        ``fast`` has the monitor kill the workers instead of letting them settle
        what they hold.  The monitor's final report is kept in ``report``.
        """
        self.stopping = True
        if self._restart_task is not None and not self._restart_task.done():
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart_task
        proc, conn = self.proc, self.conn
        if proc is None:
            return
        loop = asyncio.get_running_loop()
        for fd in (proc.sentinel, conn.fileno()):
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(fd)
        if proc.exitcode is None:
            with contextlib.suppress(OSError):
                send_control(conn, Command(op="stop", arg="fast" if fast else ""))
            await loop.run_in_executor(None, proc.join, self.config.shutdown_timeout_s + 10)
            if proc.exitcode is None:
                proc.kill()
                await loop.run_in_executor(None, proc.join, 10)
        with contextlib.suppress(OSError, EOFError):
            while conn.poll():
                msg = recv_control(conn)
                if isinstance(msg, MonitorReport):
                    self.report = msg
        conn.close()
