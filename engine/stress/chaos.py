"""``--chaos``: SIGKILL a random worker at a fixed interval while the run goes on.

Victims come from the monitor's latest report (``Engine.stats()["workers"]``)
and are killed only if psutil confirms the pid is still a child of the
engine's monitor: a report may name a worker that has just died, and its pid
could already belong to an unrelated process on a shared machine.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import psutil

from engine import Engine
from engine.stress.metrics import MetricsCollector


def _worker(pid: int, monitor_pid: int) -> psutil.Process | None:
    """``pid`` as a psutil Process if it is a live child of the monitor, else None."""
    try:
        proc = psutil.Process(pid)
        ours = proc.ppid() == monitor_pid and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return None  # gone, or not ours to look at: no victim
    return proc if ours else None


def kill_random_worker(eng: Engine, rng: random.Random) -> int | None:
    """SIGKILL one live worker of ``eng``; returns its pid, or None if none qualified."""
    monitor_pid = getattr(eng.monitor, "pid", None)
    if not monitor_pid:
        return None
    live: list[int] = [w["pid"] for w in eng.stats()["workers"] if w["alive"] and w["pid"] > 0]
    candidates = [p for p in (_worker(pid, monitor_pid) for pid in live) if p is not None]
    if not candidates:
        return None
    victim = rng.choice(candidates)
    try:
        # psutil checks the start time first: if the pid was reused since, nothing is sent.
        victim.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        return None
    return victim.pid


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
