"""``--chaos``: SIGKILL a random worker at a fixed interval while the run goes on.

Victims come from the monitor's latest report (``Engine.stats()["workers"]``)
and are killed only if psutil confirms the pid is still a child of the
engine's monitor: a report may name a worker that has just died, and its pid
could already belong to an unrelated process on a shared machine.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import psutil

from engine import Engine
from engine.stress.metrics import MetricsCollector


def _is_worker(pid: int, monitor_pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.ppid() == monitor_pid and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_random_worker(eng: Engine, rng: random.Random) -> int | None:
    """SIGKILL one live worker of ``eng``; returns its pid, or None if none qualified."""
    monitor_pid = getattr(eng.monitor, "pid", None)
    if not monitor_pid:
        return None
    live: list[int] = [w["pid"] for w in eng.stats()["workers"] if w["alive"] and w["pid"] > 0]
    candidates = [pid for pid in live if _is_worker(pid, monitor_pid)]
    if not candidates:
        return None
    pid = rng.choice(candidates)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return pid


async def chaos_loop(
    eng: Engine, interval_s: float, metrics: MetricsCollector, rng: random.Random
) -> None:
    """Kill a worker every ``interval_s`` until cancelled; counts kills and misses."""
    next_at = time.monotonic() + interval_s
    while True:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        next_at += interval_s
        pid = kill_random_worker(eng, rng)
        metrics.count("chaos_kills" if pid is not None else "chaos_no_victim")
