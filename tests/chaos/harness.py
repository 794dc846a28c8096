"""Shared machinery of the chaos scenarios: configs, paced producers, process and RSS
sampling, stats polling, scale.

The default scale (``CHAOS_SCALE`` unset or ``full``) runs the issue's sizes --
1,000,000 messages under kills, 100,000,000 ring publications -- and the whole suite
still fits in a few minutes on a shared 2-core machine.  ``CHAOS_SCALE=quick`` cuts
those two for fast local iteration.  Reports say which scale produced them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psutil

from engine import Config, Engine
from ipc.shm import list_segments

HANDLERS = "tests.chaos.handlers"
SCALE = os.environ.get("CHAOS_SCALE", "full")
if SCALE not in ("full", "quick"):
    raise ValueError(f"CHAOS_SCALE must be full or quick, got {SCALE!r}")
STATS_TIMEOUT_S = 20.0  # liveness bound for a monitor report to show something

_SIZES: dict[str, dict[str, int]] = {
    # scenario 1: messages streamed while a worker is SIGKILLed every second
    "kill_messages": {"full": 1_000_000, "quick": 200_000},
    # scenario 11: index publications through the ring's 8-byte stores
    "ring_publications": {"full": 100_000_000, "quick": 10_000_000},
}


def size(name: str) -> int:
    """The size of ``name`` at the current CHAOS_SCALE."""
    return _SIZES[name][SCALE]


def chaos_config(**overrides: Any) -> Config:
    """Fast heartbeats and stats so faults show within a tick; no ENGINE_* from the shell."""
    settings: dict[str, Any] = {
        "workers": 2,
        "stall_timeout_s": 1.0,
        "heartbeat_interval_s": 0.1,
        "stats_interval_s": 0.1,
        "shutdown_timeout_s": 20.0,
    }
    settings.update(overrides)
    return Config.from_env(env={}, **settings)


class Plan:
    """Builds messages with unique uids and per-recipient seqs, and remembers what was accepted."""

    def __init__(self) -> None:
        self.next_uid = 1
        self.next_seq: dict[str, int] = {}
        self.accepted: dict[int, tuple[str, int]] = {}

    def make(self, recipient: str, opts: dict[str, Any] | None = None) -> tuple[str, list[Any]]:
        """A (recipient, payload) pair; ``accept`` it once the engine took it."""
        uid = self.next_uid
        self.next_uid += 1
        seq = self.next_seq.get(recipient, 0)
        self.next_seq[recipient] = seq + 1
        return recipient, [uid, seq, opts] if opts else [uid, seq]

    def accept(self, item: tuple[str, list[Any]]) -> None:
        recipient, body = item
        self.accepted[body[0]] = (recipient, body[1])


async def paced_stream(
    eng: Engine, plan: Plan, recipients: Sequence[str], total: int, rate: float, chunk: int = 2000
) -> None:
    """Submit ``total`` messages round-robin over ``recipients`` at about ``rate`` per second.

    Pacing makes the stream last long enough for the faults the test injects; when the
    engine is slower than ``rate`` the stream simply takes longer (submit waits).
    """
    start = time.monotonic()
    n = 0
    while n < total:
        items = [
            plan.make(recipients[(n + i) % len(recipients)]) for i in range(min(chunk, total - n))
        ]
        await eng.submit_many(items)
        for item in items:
            plan.accept(item)
        n += len(items)
        ahead = start + n / rate - time.monotonic()
        await asyncio.sleep(max(ahead, 0.0))


# -- processes ---------------------------------------------------------------------------
def _is_resource_tracker(p: psutil.Process) -> bool:
    return "resource_tracker" in " ".join(p.cmdline())


def descendants(root: int | None = None) -> list[psutil.Process]:
    """Live descendants of ``root`` (default: us), minus multiprocess's resource tracker.

    The "spawn" start method keeps one resource-tracker process per parent for the
    parent's lifetime; it is not an engine process.
    """
    out = []
    try:
        kids = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for p in kids:
        try:
            if p.status() == psutil.STATUS_ZOMBIE or _is_resource_tracker(p):
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(p)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def own_segments() -> list[str]:
    return list_segments(f"ringway-{os.getpid()}-")


def leftovers(timeout: float = 10.0) -> tuple[list[str], list[str]]:
    """Our segments and engine processes still there after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (own_segments() or descendants()) and time.monotonic() < deadline:
        time.sleep(0.05)
    procs = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in descendants()]
    return own_segments(), procs


def all_segments() -> list[str]:
    return list_segments("ringway-")


class RssSampler:
    """Samples the RSS of the dispatcher (us), the monitor and the workers every ``period``.

    The dispatcher's figure includes pytest itself; the growth over the run is what
    shows buffering.
    """

    def __init__(self, eng: Engine, period: float = 0.2) -> None:
        self.eng = eng
        self.period = period
        self.peak: dict[str, int] = {"dispatcher": 0, "monitor": 0, "worker": 0, "total": 0}
        self.first: dict[str, int] = {}
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, int]:
        now = {"dispatcher": psutil.Process().memory_info().rss, "monitor": 0, "worker": 0}
        monitor = getattr(self.eng.monitor, "pid", None)
        total = now["dispatcher"]
        for p in descendants():
            try:
                rss = p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            role = "monitor" if p.pid == monitor else "worker"
            now[role] = max(now[role], rss)  # the largest single worker
            total += rss
        now["total"] = total
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        if not self.first:
            self.first = dict(now)
        self.samples += 1
        return now

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.period)

    def start(self) -> None:
        self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    def report(self) -> dict[str, Any]:
        mib = 1 << 20
        return {
            "peak_mib": {k: round(v / mib, 1) for k, v in self.peak.items()},
            "first_mib": {k: round(v / mib, 1) for k, v in self.first.items()},
            "samples": self.samples,
        }


# -- stats -----------------------------------------------------------------------------
async def wait_stats(
    eng: Engine,
    ok: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = STATS_TIMEOUT_S,
    poll: float = 0.02,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = eng.stats()
        if ok(s):
            return s
        assert time.monotonic() < deadline, f"{what} not seen within {timeout}s; stats: {s}"
        await asyncio.sleep(poll)


def worker_info(s: dict[str, Any], index: int) -> dict[str, Any]:
    (w,) = [w for w in s["workers"] if w["worker"] == index]
    return w


async def all_workers_up(eng: Engine, exclude: Sequence[int] = ()) -> dict[str, Any]:
    """Stats once the monitor reports every worker alive, none of them a pid in ``exclude``."""
    n = eng.config.workers
    return await wait_stats(
        eng,
        lambda s: (
            len(s["workers"]) == n
            and all(w["alive"] and w["pid"] not in exclude for w in s["workers"])
        ),
        f"all {n} workers alive",
    )


def conservation(s: dict[str, Any]) -> dict[str, int]:
    keys = ("submitted", "delivered", "dead_lettered", "expired", "in_flight", "redelivered")
    return {k: s[k] for k in keys} | {
        "failed_attempts": s["failed_attempts"],
        "retried": s["retried"],
        "worker_restarts": sum(w["restarts"] for w in s["workers"]),
        "monitor_restarts": s["monitor"]["restarts"],
    }


def assert_conserved(s: dict[str, Any], submitted: int) -> None:
    assert s["in_flight"] == 0, s
    assert s["submitted"] == submitted, s
    assert s["submitted"] == s["delivered"] + s["dead_lettered"] + s["expired"], s


def sigkill(pid: int) -> int:
    """SIGKILL ``pid``; returns the CLOCK_MONOTONIC ns just before the signal."""
    t = time.monotonic_ns()
    os.kill(pid, signal.SIGKILL)
    return t


def pending_signals(pid: int) -> int:
    """Bitmask of signals pending for ``pid`` (process-wide and thread), from /proc."""
    mask = 0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
            if line.startswith(("ShdPnd:", "SigPnd:")):
                mask |= int(line.split()[1], 16)
    return mask


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        yield box
    finally:
        box["s"] = round(time.monotonic() - t0, 3)
