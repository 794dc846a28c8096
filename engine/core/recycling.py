"""Graceful worker restarts: a rolling reload, and workers over their RSS or message limit.

Apart from the monitor's loop because it is one policy with state of its own
(the queue of requested restarts): which worker to restart when, so that
capacity never drops by more than one worker during a reload.  A restarted
worker gets WORKER_STOP (SIGUSR1), its graceful stop: it fetches nothing more,
settles what it holds and exits 0; the loop then respawns it like any other.
"""

from __future__ import annotations

import random
from typing import Any

from engine.config import Config
from engine.core.worker_slot import WorkerSlot
from engine.procutil import WORKER_STOP
from ipc.control import WorkerRecycled, send_control

RELOAD = "reload"  # the recycle reason of a rolling restart (SIGHUP, Engine.reload)


class Recycler:
    """Queues graceful restarts by reason and starts them when capacity allows."""

    def __init__(self, slots: list[WorkerSlot], config: Config, conn: Any) -> None:
        self.slots = slots
        self.config = config
        self.conn = conn  # to the dispatcher, which logs each restart
        # Graceful restarts wait here and run one at a time, so capacity never drops
        # by more than one worker (a rolling restart, as gunicorn does on HUP).
        self.queue: dict[int, str] = {}

    def reload(self) -> None:
        """Queue a rolling restart of every worker."""
        for slot in self.slots:
            self.queue.setdefault(slot.index, RELOAD)

    def check_limits(self) -> None:
        """Queue a graceful restart for workers over the RSS or message limit."""
        max_rss = self.config.max_worker_rss_bytes
        for slot in self.slots:
            if slot.proc is None or not slot.ready or slot.recycle_pid:
                continue
            if max_rss and slot.rss > max_rss:
                self.queue.setdefault(slot.index, f"rss {slot.rss} > {max_rss} bytes")
            settled = slot.latest.counters.get("delivered", 0) if slot.latest else 0
            if slot.message_limit and settled >= slot.message_limit:
                self.queue.setdefault(
                    slot.index, f"{settled} messages >= limit {slot.message_limit}"
                )

    def advance(self, stopping: bool) -> None:
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
        for index, reason in list(self.queue.items()):
            slot = self.slots[index]
            rolling = reason == RELOAD
            if stopping or slot.recycle_pid or (rolling and busy):
                continue
            del self.queue[index]
            if slot.proc is None or not slot.ready:
                continue  # dead or booting: its next process starts fresh anyway
            slot.recycle_pid = slot.pid
            slot.recycled += 1
            send_control(self.conn, WorkerRecycled(worker=index, pid=slot.pid, reason=reason))
            # The worker's graceful stop: fetch nothing more, settle, exit 0.
            slot.signal(WORKER_STOP)
            busy = busy or rolling


def jittered(limit: int) -> int:
    """``limit`` plus up to 10% random jitter, so workers do not all restart at once."""
    return limit + random.randint(0, limit // 10) if limit else 0
