"""`WorkerSlot`: what the monitor remembers about one shard's worker, and what a death means.

Apart from the monitor's loop (`engine.core.monitor`) because this state
outlives every worker process: restarts, crash counts per lane, the quarantine
of poison messages, the counters of retired processes, and the `WorkerPlan`
the next process starts with.  The loop decides when a worker is spawned or
has died; a slot decides what that death means and when to respawn.

Crashes that keep a lane's ``committed`` in place are counted; from
``poison_max_crashes - 1`` on, the respawned worker delivers its redelivery
window one message at a time, recording each in its slot, so the crash that
reaches the limit names the message to quarantine as a ``worker_crash`` --
unless the lane holds a corrupt frame header (``Ring.find_corrupt``), which the
next worker then skips (``WorkerPlan.corrupt``).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from engine.backoff import backoff_s
from engine.exitcodes import ChildExit
from engine.worker.state import WORKER_COUNTERS, WorkerPlan
from ipc.control import Histogram, StatsSnapshot
from ipc.shard import LANES, SLOT_ACTIVE, SLOT_FRAME_END, SLOT_INDEX, SLOT_LANE, ShardMemory


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
    kill_sent_at: float = 0.0
    kill_escalated: bool = False  # SIGKILL after a stall's SIGTERM was announced
    last_beat: int = -1
    last_beat_at: float = 0.0
    lane_crashes: list[int] = field(default_factory=lambda: [0] * LANES)
    last_committed: tuple[int, ...] = ()
    last_fetched: tuple[int, ...] = ()
    quarantine: set[tuple[int, int, int]] = field(default_factory=set)
    corrupt: set[tuple[int, int]] = field(default_factory=set)  # (lane, position): skip it
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

    def started(self, proc: Any, conn: Any, message_limit: int) -> None:
        """A new process ``proc`` (its pipe ``conn``) now serves this slot; it is not ready yet."""
        self.proc, self.conn, self.pid = proc, conn, proc.pid
        self.ready = False
        self.kill_sent_at = 0.0
        self.kill_escalated = False
        self.last_beat = self.shard.lanes[0].heartbeat
        self.last_beat_at = time.monotonic()
        self.message_limit = message_limit
        try:
            self.ps = psutil.Process(proc.pid)
            self.ps.cpu_percent(None)
        except psutil.Error:
            self.ps = None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the slot's process, unless it is already gone.

        Only while ``proc`` is set: until the monitor reaps its child, the pid
        cannot name another process; once reaped, ``pid`` is history and may
        belong to anyone, so nothing is sent.
        """
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def died(self, code: int, now: float, poison_max_crashes: int) -> str:
        """Account for the death of the slot's process (exit ``code``); schedule the respawn.

        Returns why it could not boot when it died before it was ready (for the
        monitor to report), "" otherwise.
        """
        self.restarts += 1
        if not self.ready:
            # Any death before ready is a boot failure (an import that exits hard too):
            # back off, never a respawn storm, and say why.
            self.boot_failures += 1
            delay = backoff_s(self.boot_failures, 0.1, 5.0, jitter="none")
            if code != ChildExit.BOOT_FAILED or not self.error:
                self.error = f"exited with code {code} before it was ready"
            self.respawn_at = now + delay
            return f"worker {self.index} cannot boot: {self.error}; retrying in {delay:.1f}s"
        if self.recycle_pid == self.pid and code == 0:
            # A requested exit (reload, recycle): not a crash, history starts over.
            self.lane_crashes = [0] * LANES
            self.last_committed = self.last_fetched = ()
            self.plan = WorkerPlan(quarantine=set(self.quarantine), corrupt=set(self.corrupt))
        else:
            self.count_crash(poison_max_crashes)
        crashes = max(self.lane_crashes)
        # Repeated crashes at one place back off (never a respawn storm on 2 cores).
        self.respawn_at = now + (
            backoff_s(crashes - 1, 0.05, 5.0, jitter="none") if crashes > 1 else 0.0
        )
        return ""

    def count_crash(self, limit: int) -> None:
        """Count a crash per lane; at ``limit`` quarantine the message it died on."""
        shard = self.shard
        committed = shard.committed()
        fetched = tuple(r.read_pos for r in shard.lanes)
        for lane, ring in enumerate(shard.lanes):
            pending = ring.write_pos > committed[lane]
            # "The same crash again": since the last crash the lane settled nothing
            # beyond what the crashed worker had fetched, so the culprit is still
            # among those messages (settling some of them does not clear suspicion).
            same = bool(self.last_committed) and committed[lane] <= self.last_fetched[lane]
            self.lane_crashes[lane] = (self.lane_crashes[lane] + 1 if same else 1) if pending else 0
        self.last_committed = committed
        self.last_fetched = fetched
        idx = shard.slot_idx
        for lane, ring in enumerate(shard.lanes):
            if self.lane_crashes[lane] >= limit:
                # A corrupt frame header kills every reader that reaches it: it is the
                # culprit, even if a delivery was running in the lane when the reader died
                # (that message is not quarantined for this crash).
                bad = ring.find_corrupt(committed[lane])
                if bad is not None:
                    self.corrupt.add((lane, bad))
                    self.lane_crashes[lane] = 0
        crashes = max(self.lane_crashes)
        if idx[SLOT_ACTIVE]:
            lane = int(idx[SLOT_LANE])
            if self.lane_crashes[lane] >= limit:
                self.quarantine.add((lane, int(idx[SLOT_FRAME_END]), int(idx[SLOT_INDEX])))
                self.lane_crashes[lane] = 0
            idx[SLOT_ACTIVE] = 0
        self.plan = WorkerPlan(
            careful=crashes >= max(1, limit - 1),
            quarantine=set(self.quarantine),
            crashes=crashes,
            corrupt=set(self.corrupt),
        )

    def retire_stats(self) -> None:
        """Fold the last snapshot of a process that is gone into the slot's retired totals."""
        snap, self.latest = self.latest, None
        if snap is None:
            return
        for k, v in snap.counters.items():
            self.retired[k] = self.retired.get(k, 0) + v
        self.retired_start.merge(snap.latency_start)
        self.retired_settle.merge(snap.latency_settle)
