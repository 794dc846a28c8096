"""The monitor process: parent of the workers, respawner, stats aggregator.

It forks workers (it runs no threads and no event loop, so fork is safe),
notices a death at once through process sentinels and a stall by heartbeat
age, and respawns the worker on the same rings so it resumes at ``committed``.
Crashes that keep a lane's ``committed`` in place are counted; from
``poison_max_crashes - 1`` on the respawned worker delivers its redelivery
window one message at a time, recording each in its slot, so the crash that
reaches the limit names the message to quarantine as a ``worker_crash``.
A worker that cannot boot at start fails the engine's start (no respawn storm).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import multiprocess
import psutil
from multiprocess.connection import wait

from engine.backoff import backoff_s
from engine.config import Config
from engine.exitcodes import ChildExit
from engine.procutil import die_with_parent
from engine.worker.main import worker_main
from engine.worker.state import WORKER_COUNTERS, WorkerPlan
from ipc.control import (
    Command,
    Histogram,
    MonitorReport,
    StatsSnapshot,
    WorkerFailed,
    WorkerInfo,
    WorkerReady,
    WorkerRecycled,
    recv_control,
    send_control,
)
from ipc.shard import (
    LANES,
    SLOT_ACTIVE,
    SLOT_FRAME_END,
    SLOT_INDEX,
    SLOT_LANE,
    ShardMemory,
    ShardSpec,
)

BOOT_TIMEOUT_S = 60.0
KILL_GRACE_S = 1.0
TICK_S = 0.1
RELOAD = "reload"  # the recycle reason of a rolling restart (SIGHUP, Engine.reload)


@dataclass
class WorkerSlot:
    """Everything the monitor remembers about one shard's worker across respawns."""

    index: int
    shard: ShardMemory
    proc: Any = None
    conn: Any = None
    pid: int = 0
    restarts: int = 0
    ready: bool = False
    stopping: bool = False
    kill_sent_at: float = 0.0
    last_beat: int = -1
    last_beat_at: float = 0.0
    lane_crashes: list[int] = field(default_factory=lambda: [0] * LANES)
    last_committed: tuple[int, ...] = ()
    last_fetched: tuple[int, ...] = ()
    quarantine: set[tuple[int, int, int]] = field(default_factory=set)
    boot_failures: int = 0
    respawn_at: float = 0.0
    plan: WorkerPlan = field(default_factory=WorkerPlan)
    latest: StatsSnapshot | None = None
    retired: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORKER_COUNTERS, 0))
    retired_start: Histogram = field(default_factory=Histogram)
    retired_settle: Histogram = field(default_factory=Histogram)
    ps: Any = None
    rss: int = 0
    error: str = ""  # why the last process could not boot; cleared once one is ready
    recycled: int = 0
    recycle_pid: int = 0  # the process asked to exit gracefully, 0 when none
    message_limit: int = 0  # this process's jittered ENGINE_MAX_MESSAGES_PER_WORKER


class Monitor:
    def __init__(self, specs: list[ShardSpec], config: Config, handler: Any, conn: Any) -> None:
        self.config = config
        self.handler = handler
        self.conn = conn  # to the dispatcher
        self.ctx = multiprocess.get_context("fork")
        self.slots = [WorkerSlot(s.index, ShardMemory.attach(s)) for s in specs]
        self.stopping = False
        self.next_report = 0.0
        # Graceful restarts wait here and run one at a time, so capacity never drops
        # by more than one worker (a rolling restart, as gunicorn does on HUP).
        self.recycle_queue: dict[int, str] = {}

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
        slot.proc, slot.conn, slot.pid = proc, here, proc.pid
        slot.ready = False
        slot.kill_sent_at = 0.0
        slot.last_beat = slot.shard.lanes[0].heartbeat
        slot.last_beat_at = time.monotonic()
        slot.message_limit = _jittered(self.config.max_messages_per_worker)
        try:
            slot.ps = psutil.Process(proc.pid)
            slot.ps.cpu_percent(None)
        except psutil.Error:
            slot.ps = None

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
        elif isinstance(msg, WorkerFailed):
            slot.error = msg.error
        elif isinstance(msg, StatsSnapshot):
            slot.latest = msg
        return msg

    def on_death(self, slot: WorkerSlot) -> None:
        """Account for a dead worker and schedule its respawn."""
        slot.proc.join()
        code = slot.proc.exitcode
        while slot.conn.poll():
            if self.read(slot) is None:
                break
        slot.conn.close()
        self.retire_stats(slot)
        slot.proc = None
        if self.stopping:
            return
        slot.restarts += 1
        now = time.monotonic()
        if not slot.ready:
            # Any death before ready is a boot failure (an import that exits hard too):
            # back off, never a respawn storm, and say why.
            slot.boot_failures += 1
            delay = backoff_s(slot.boot_failures, 0.1, 5.0, jitter="none")
            if code != ChildExit.BOOT_FAILED or not slot.error:
                slot.error = f"exited with code {code} before it was ready"
            self.report_failure(
                slot.index,
                f"worker {slot.index} cannot boot: {slot.error}; retrying in {delay:.1f}s",
            )
            slot.respawn_at = now + delay
            return
        if slot.recycle_pid == slot.pid and code == 0:
            # A requested exit (reload, recycle): not a crash, history starts over.
            slot.lane_crashes = [0] * LANES
            slot.last_committed = slot.last_fetched = ()
            slot.plan = WorkerPlan(quarantine=set(slot.quarantine))
        else:
            self.count_crash(slot)
        crashes = max(slot.lane_crashes)
        # Repeated crashes at one place back off (never a respawn storm on 2 cores).
        slot.respawn_at = now + (
            backoff_s(crashes - 1, 0.05, 5.0, jitter="none") if crashes > 1 else 0.0
        )

    def count_crash(self, slot: WorkerSlot) -> None:
        shard = slot.shard
        committed = shard.committed()
        fetched = tuple(r.read_pos for r in shard.lanes)
        for lane, ring in enumerate(shard.lanes):
            pending = ring.write_pos > committed[lane]
            # "The same crash again": since the last crash the lane settled nothing
            # beyond what the crashed worker had fetched, so the culprit is still
            # among those messages (settling some of them does not clear suspicion).
            same = bool(slot.last_committed) and committed[lane] <= slot.last_fetched[lane]
            slot.lane_crashes[lane] = (slot.lane_crashes[lane] + 1 if same else 1) if pending else 0
        slot.last_committed = committed
        slot.last_fetched = fetched
        idx = shard.slot_idx
        limit = self.config.poison_max_crashes
        crashes = max(slot.lane_crashes)
        if idx[SLOT_ACTIVE]:
            lane = int(idx[SLOT_LANE])
            if slot.lane_crashes[lane] >= limit:
                slot.quarantine.add((lane, int(idx[SLOT_FRAME_END]), int(idx[SLOT_INDEX])))
                slot.lane_crashes[lane] = 0
            idx[SLOT_ACTIVE] = 0
        slot.plan = WorkerPlan(
            careful=crashes >= max(1, limit - 1), quarantine=set(slot.quarantine), crashes=crashes
        )

    def retire_stats(self, slot: WorkerSlot) -> None:
        snap, slot.latest = slot.latest, None
        if snap is None:
            return
        for k, v in snap.counters.items():
            slot.retired[k] = slot.retired.get(k, 0) + v
        slot.retired_start.merge(snap.latency_start)
        slot.retired_settle.merge(snap.latency_settle)

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
                _signal(slot.pid, signal.SIGTERM)
            elif slot.kill_sent_at and now - slot.kill_sent_at > KILL_GRACE_S:
                _signal(slot.pid, signal.SIGKILL)

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
        return MonitorReport(
            monitor_pid=os.getpid(),
            workers=infos,
            counters=counters,
            latency_start=start,
            latency_settle=settle,
            sent_ns=time.monotonic_ns(),
        )

    # -- main loop -----------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the dispatcher decides when to stop
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
                self.check_limits()
            self.advance_recycling()

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
                for slot in self.slots:
                    self.recycle_queue.setdefault(slot.index, RELOAD)
        return True

    # -- graceful restarts ----------------------------------------------------------
    def check_limits(self) -> None:
        """Queue a graceful restart for workers over the RSS or message limit."""
        max_rss = self.config.max_worker_rss_bytes
        for slot in self.slots:
            if slot.proc is None or not slot.ready or slot.recycle_pid:
                continue
            if max_rss and slot.rss > max_rss:
                self.recycle_queue.setdefault(slot.index, f"rss {slot.rss} > {max_rss} bytes")
            settled = slot.latest.counters.get("delivered", 0) if slot.latest else 0
            if slot.message_limit and settled >= slot.message_limit:
                self.recycle_queue.setdefault(
                    slot.index, f"{settled} messages >= limit {slot.message_limit}"
                )

    def advance_recycling(self) -> None:
        """Start queued graceful restarts: a reload one worker at a time, limits at once.

        A rolling reload waits until the previous worker's successor is ready, so
        capacity drops by one worker at most; a worker over a limit is replaced as
        soon as it is noticed (their jittered limits rarely coincide).
        """
        busy = False
        for slot in self.slots:
            if slot.recycle_pid:
                if slot.proc is None or slot.pid == slot.recycle_pid or not slot.ready:
                    busy = True  # still draining, or its successor is still booting
                else:
                    slot.recycle_pid = 0
        for index, reason in list(self.recycle_queue.items()):
            slot = self.slots[index]
            rolling = reason == RELOAD
            if self.stopping or slot.recycle_pid or (rolling and busy):
                continue
            del self.recycle_queue[index]
            if slot.proc is None or not slot.ready:
                continue  # dead or booting: its next process starts fresh anyway
            slot.recycle_pid = slot.pid
            slot.recycled += 1
            send_control(self.conn, WorkerRecycled(worker=index, pid=slot.pid, reason=reason))
            # SIGTERM is the worker's graceful stop: fetch nothing more, settle, exit 0.
            _signal(slot.pid, signal.SIGTERM)
            busy = busy or rolling

    def stop_all(self, graceful: bool) -> None:
        self.stopping = True
        live = [s for s in self.slots if s.proc is not None]
        for slot in live:
            _signal(slot.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = time.monotonic() + (self.config.shutdown_timeout_s + 2 if graceful else 5)
        for slot in live:
            slot.proc.join(max(0.0, deadline - time.monotonic()))
            if slot.proc.exitcode is None:
                _signal(slot.pid, signal.SIGKILL)
                slot.proc.join(5)
            while slot.conn.poll():
                if self.read(slot) is None:
                    break
            self.retire_stats(slot)
            slot.proc = None


def _jittered(limit: int) -> int:
    """``limit`` plus up to 10% random jitter, so workers do not all restart at once."""
    return limit + random.randint(0, limit // 10) if limit else 0


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def monitor_main(
    specs: list[ShardSpec], config: Config, handler: Any, conn: Any, dispatcher_pid: int
) -> None:
    """Entry point of the monitor process.

    A bug here must not leave the process joining workers that are blocked writing
    to it (multiprocessing's exit handler would wait for them for ever): print the
    error, kill the workers and exit, so the dispatcher sees the exit and restarts us.
    """
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
