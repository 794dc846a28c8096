"""The monitor process: parent of the workers, respawner, stats aggregator.

It forks workers (it runs no threads and no event loop, so fork is safe),
notices a death at once through process sentinels and a stall by heartbeat
age, and respawns the worker on the same rings so it resumes at ``committed``.
A worker that cannot boot at start fails the engine's start (no respawn storm).
This module is the loop: spawn, boot, read, stalls, report, commands, stop.
What a death means (crash counts, poison quarantine, backoff) is in
`engine.core.worker_slot`; graceful restarts (reload, limits) in
`engine.core.recycling`.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import signal
import time
import traceback
from typing import Any

import multiprocess
import psutil
from multiprocess.connection import wait

from engine.config import Config
from engine.core.recycling import Recycler, jittered
from engine.core.worker_slot import WorkerSlot
from engine.exitcodes import ChildExit
from engine.procutil import WORKER_STOP, die_with_parent, exit_reason, ignore_group_signals
from engine.worker.main import worker_main
from engine.worker.state import WORKER_COUNTERS
from ipc.control import (
    Command,
    EventLevel,
    Histogram,
    MonitorEvent,
    MonitorReport,
    StatsSnapshot,
    WorkerFailed,
    WorkerInfo,
    WorkerReady,
    recv_control,
    send_control,
)
from ipc.shard import ShardMemory, ShardSpec

BOOT_TIMEOUT_S = 60.0
KILL_GRACE_S = 1.0
TICK_S = 0.1


class Monitor:
    """The monitor's state and loop: one `WorkerSlot` per shard, the pipe to the dispatcher."""

    def __init__(self, specs: list[ShardSpec], config: Config, handler: Any, conn: Any) -> None:
        self.config = config
        self.handler = handler
        self.conn = conn  # to the dispatcher
        self.ctx = multiprocess.get_context("fork")
        self.slots = [WorkerSlot(s.index, ShardMemory.attach(s)) for s in specs]
        self.stopping = False
        self.next_report = 0.0
        self.recycler = Recycler(self.slots, config, conn)

    # -- lifecycle --------------------------------------------------------------
    def spawn(self, slot: WorkerSlot) -> None:
        here, there = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=worker_main,
            args=(
                slot.index,
                slot.shard.spec,
                self.config,
                self.handler,
                slot.plan,
                there,
                os.getpid(),
            ),
            name=f"ringway-worker-{slot.index}",
            daemon=False,
        )
        proc.start()
        there.close()
        slot.started(proc, here, jittered(self.config.max_messages_per_worker))

    def boot(self) -> bool:
        """Start every worker and wait until each is ready; False if one cannot boot."""
        for slot in self.slots:
            self.spawn(slot)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not all(s.ready for s in self.slots):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.report_failure(-1, f"workers not ready after {BOOT_TIMEOUT_S}s")
                return False
            for obj in wait(
                [s.conn for s in self.slots if not s.ready] + [s.proc.sentinel for s in self.slots],
                remaining,
            ):
                for slot in self.slots:
                    if obj is slot.conn:
                        msg = self.read(slot)
                        if isinstance(msg, WorkerFailed):
                            self.report_failure(slot.index, msg.error)
                            return False
                    elif obj == slot.proc.sentinel:
                        slot.proc.join(1.0)  # reaped, so exitcode is set (not None)
                        msg = self.read(slot) if slot.conn.poll() else None
                        error = (
                            msg.error
                            if isinstance(msg, WorkerFailed)
                            else (
                                f"worker {slot.index} exited with code {slot.proc.exitcode} "
                                f"before it was ready"
                            )
                        )
                        self.report_failure(slot.index, error)
                        return False
        return True

    def report_failure(self, index: int, error: str) -> None:
        send_control(self.conn, WorkerFailed(worker=max(index, 0), pid=os.getpid(), error=error))

    def event(
        self, type_: str, level: EventLevel, message: str, worker: int, **detail: Any
    ) -> None:
        """One line for the dispatcher's log and its event listeners (see engine.core.events)."""
        msg = MonitorEvent(event=type_, level=level, message=message, worker=worker, detail=detail)
        send_control(self.conn, msg)

    def read(self, slot: WorkerSlot) -> Any:
        try:
            msg = recv_control(slot.conn)
        except (EOFError, OSError):
            return None
        if isinstance(msg, WorkerReady):
            slot.ready = True
            slot.boot_failures = 0
            slot.error = ""
            send_control(self.conn, msg)
            if slot.restarts:
                self.event(
                    "worker_respawned",
                    "info",
                    f"worker {slot.index} is back (pid {msg.pid}, restart {slot.restarts})",
                    slot.index,
                    pid=msg.pid,
                    restarts=slot.restarts,
                )
        elif isinstance(msg, WorkerFailed):
            slot.error = msg.error
        elif isinstance(msg, StatsSnapshot):
            slot.latest = msg
        return msg

    def on_death(self, slot: WorkerSlot) -> None:
        """Reap a dead worker, keep its last stats, say what happened and schedule its respawn."""
        slot.proc.join()
        code = slot.proc.exitcode
        while slot.conn.poll():
            if self.read(slot) is None:
                break
        slot.conn.close()
        held = _unsettled(slot.latest)
        was_ready, pid = slot.ready, slot.pid
        requested = slot.recycle_pid == pid and code == 0
        slot.retire_stats()
        slot.proc = None
        if self.stopping:
            return
        quarantined = len(slot.quarantine)
        corrupt = set(slot.corrupt)
        now = time.monotonic()
        failure = slot.died(code, now, self.config.poison_max_crashes)
        if failure:
            self.report_failure(slot.index, failure)
        elif was_ready and not requested:
            lanes, committed = slot.shard.lanes, slot.shard.committed()
            uncommitted = sum(r.read_pos - c for r, c in zip(lanes, committed, strict=True))
            delay = max(0.0, slot.respawn_at - now)
            held = held if uncommitted else 0  # the last report is up to an interval old
            what = (
                f"it held {uncommitted:,} bytes of fetched, unsettled frames (about {held:,} "
                "messages at its last report), delivered again by its successor"
                if uncommitted
                else "it held nothing unsettled"
            )
            self.event(
                "worker_died",
                "warning",
                f"worker {slot.index} (pid {pid}) {exit_reason(code)}; {what}; "
                f"respawn in {delay:.2f}s",
                slot.index,
                pid=pid,
                exit_code=code,
                held_messages=held,
                uncommitted_bytes=uncommitted,
                respawn_in_s=round(delay, 3),
                restarts=slot.restarts,
            )
        if len(slot.quarantine) > quarantined:
            lane, end, index = max(slot.quarantine, key=lambda q: q[1])
            self.event(
                "poison_quarantined",
                "error",
                f"worker {slot.index} died {self.config.poison_max_crashes} times on the "
                f"message at lane {lane}, frame end {end}, index {index}: it is quarantined "
                "and will be dead-lettered as worker_crash",
                slot.index,
                lane=lane,
                frame_end=end,
                index=index,
            )

        for lane, position in sorted(slot.corrupt - corrupt):
            self.event(
                "corrupt_frame_quarantined",
                "error",
                f"worker {slot.index} died {self.config.poison_max_crashes} times at a corrupt "
                f"frame header at position {position} of lane {lane}: the frame is skipped and "
                "its messages dead-lettered as malformed",
                slot.index,
                lane=lane,
                position=position,
            )

    def check_stalls(self, now: float) -> None:
        for slot in self.slots:
            if slot.proc is None or not slot.ready:
                continue
            beat = slot.shard.lanes[0].heartbeat
            if beat != slot.last_beat:
                slot.last_beat, slot.last_beat_at = beat, now
                continue
            age = now - slot.last_beat_at
            if slot.kill_sent_at == 0.0 and age > self.config.stall_timeout_s:
                slot.kill_sent_at = now
                self.event(
                    "worker_stalled",
                    "warning",
                    f"worker {slot.index} (pid {slot.pid}) sent no heartbeat for {age:.1f}s "
                    f"(ENGINE_STALL_TIMEOUT_S={self.config.stall_timeout_s:g}): "
                    "stop signal (SIGUSR1)",
                    slot.index,
                    pid=slot.pid,
                    heartbeat_age_s=round(age, 3),
                )
                slot.signal(WORKER_STOP)  # it stops at once if its loop runs again in time
            elif slot.kill_sent_at and now - slot.kill_sent_at > KILL_GRACE_S:
                if not slot.kill_escalated:
                    slot.kill_escalated = True
                    self.event(
                        "worker_stalled",
                        "warning",
                        f"worker {slot.index} (pid {slot.pid}) still there {KILL_GRACE_S:g}s "
                        "after the stop signal (SIGUSR1): SIGKILL",
                        slot.index,
                        pid=slot.pid,
                        heartbeat_age_s=round(age, 3),
                    )
                slot.signal(signal.SIGKILL)

    # -- reporting ---------------------------------------------------------------
    def report(self) -> MonitorReport:
        counters = dict.fromkeys(WORKER_COUNTERS, 0)
        start, settle = Histogram(), Histogram()
        infos = []
        now = time.monotonic()
        for slot in self.slots:
            delivered = slot.retired.get("delivered", 0)
            for k, v in slot.retired.items():
                counters[k] = counters.get(k, 0) + v
            start.merge(slot.retired_start)
            settle.merge(slot.retired_settle)
            if slot.latest is not None:
                for k, v in slot.latest.counters.items():
                    counters[k] = counters.get(k, 0) + v
                delivered += slot.latest.counters.get("delivered", 0)
                start.merge(slot.latest.latency_start)
                settle.merge(slot.latest.latency_settle)
            cpu, rss = 0.0, 0
            if slot.ps is not None and slot.proc is not None:
                try:
                    cpu = slot.ps.cpu_percent(None)
                    rss = slot.ps.memory_info().rss
                except psutil.Error:
                    pass
            slot.rss = rss
            infos.append(
                WorkerInfo(
                    worker=slot.index,
                    pid=slot.pid,
                    alive=slot.proc is not None and slot.ready,
                    restarts=slot.restarts,
                    cpu_percent=cpu,
                    rss_bytes=rss,
                    delivered=delivered,
                    beat_age_s=now - slot.last_beat_at,
                    recycled=slot.recycled,
                    error=slot.error,
                )
            )
        backlog = heapq.nlargest(
            self.config.backlog_top,
            (b for s in self.slots if s.latest is not None for b in s.latest.backlog),
            key=lambda item: item[1],
        )
        return MonitorReport(
            monitor_pid=os.getpid(),
            workers=infos,
            counters=counters,
            latency_start=start,
            latency_settle=settle,
            sent_ns=time.monotonic_ns(),
            backlog=backlog,
        )

    # -- main loop -----------------------------------------------------------------
    def run(self) -> int:
        if not self.boot():
            self.stop_all(graceful=False)
            return ChildExit.BOOT_FAILED
        while True:
            waitables: list[Any] = [self.conn]
            for slot in self.slots:
                if slot.proc is not None:
                    waitables += [slot.conn, slot.proc.sentinel]
            for obj in wait(waitables, TICK_S):
                if obj is self.conn:
                    if not self.command():
                        return 0
                    continue
                for slot in self.slots:
                    if slot.proc is None:
                        continue
                    if obj is slot.conn:
                        self.read(slot)
                    elif obj == slot.proc.sentinel:
                        self.on_death(slot)
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is None and not self.stopping and now >= slot.respawn_at:
                    self.spawn(slot)
            self.check_stalls(now)
            if now >= self.next_report:
                self.next_report = now + self.config.stats_interval_s
                send_control(self.conn, self.report())
                self.recycler.check_limits()
            self.recycler.advance(self.stopping)

    def command(self) -> bool:
        """Handle one dispatcher command; False once the monitor should exit."""
        try:
            msg = recv_control(self.conn)
        except (EOFError, OSError):
            self.stop_all(graceful=False)
            return False
        if isinstance(msg, Command):
            if msg.op == "stop":
                self.stop_all(graceful=msg.arg != "fast")
                send_control(self.conn, self.report())
                return False
            if msg.op == "snapshot":
                send_control(self.conn, self.report())
            elif msg.op == "reload":
                self.recycler.reload()
        return True

    # -- stopping --------------------------------------------------------------------
    def stop_all(self, graceful: bool) -> None:
        self.stopping = True
        live = [s for s in self.slots if s.proc is not None]
        for slot in live:
            slot.signal(WORKER_STOP if graceful else signal.SIGKILL)
        deadline = time.monotonic() + (self.config.shutdown_timeout_s + 2 if graceful else 5)
        for slot in live:
            slot.proc.join(max(0.0, deadline - time.monotonic()))
            if slot.proc.exitcode is None:
                slot.signal(signal.SIGKILL)
                slot.proc.join(5)
            while slot.conn.poll():
                if self.read(slot) is None:
                    break
            slot.retire_stats()
            slot.proc = None


def _unsettled(snap: StatsSnapshot | None) -> int:
    """Messages a worker had fetched and not settled when it last sent its stats."""
    if snap is None:
        return 0
    c = snap.counters
    settled = c.get("delivered", 0) + c.get("dead_lettered", 0) + c.get("expired", 0)
    return c.get("fetched", 0) - settled


def monitor_main(
    specs: list[ShardSpec], config: Config, handler: Any, conn: Any, dispatcher_pid: int
) -> None:
    """Entry point of the monitor process.

    A bug here must not leave the process joining workers that are blocked writing
    to it (multiprocessing's exit handler would wait for them for ever): print the
    error, kill the workers and exit, so the dispatcher sees the exit and restarts us.
    """
    # The group's SIGTERM/SIGINT/SIGHUP are the dispatcher's to act on: it drains, then
    # sends "stop".  Blocked since the fork (`group_signals_blocked`), ignored from here.
    ignore_group_signals()
    # Forked workers inherit the block and lift it once their handler is installed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {WORKER_STOP})
    die_with_parent(dispatcher_pid)
    monitor = Monitor(specs, config, handler, conn)
    try:
        code = monitor.run()
    except BaseException:
        traceback.print_exc()
        with contextlib.suppress(BaseException):
            monitor.stop_all(graceful=False)
        os._exit(ChildExit.CRASHED)
    os._exit(code)
