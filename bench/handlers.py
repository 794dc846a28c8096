"""Handlers for the engine benchmark, importable as ``bench.handlers:<name>`` in every worker.

``cpu_50us`` spins a pure-Python loop calibrated once, at first import, to take
about 50 µs on an idle core.  The loop count is put in the environment
(``RINGWAY_BENCH_CPU_LOOPS``), so worker processes started afterwards inherit it
and every process (the benchmark's own, where the single-process baseline runs,
and each worker) spins the same loop: a worker that calibrated itself while the
machine was busy would otherwise get a shorter loop and look faster.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

LOOPS_ENV = "RINGWAY_BENCH_CPU_LOOPS"
TARGET_S = 50e-6  # what one cpu_50us call should cost
IO_DELAY_S = 0.001  # what one io_1ms call awaits
_PROBE_LOOPS = 20_000  # ~1 ms per probe here: long enough to time, short enough to repeat
_PROBES = 15  # the fastest probe is the one least disturbed by other processes


def _spin(loops: int) -> int:
    x = 0
    for i in range(loops):
        x += i ^ 0x5A
    return x


def calibrate(target_s: float = TARGET_S) -> int:
    """Loop count for ``target_s`` of _spin on this machine (fastest of several probes)."""
    best = min(_timed(_PROBE_LOOPS) for _ in range(_PROBES))
    return max(1, round(_PROBE_LOOPS * target_s / best))


def _timed(loops: int) -> float:
    t0 = time.perf_counter()
    _spin(loops)
    return time.perf_counter() - t0


def _loops_from_env() -> int:
    text = os.environ.get(LOOPS_ENV, "")
    if text.isdigit() and int(text) > 0:
        return int(text)
    loops = calibrate()
    os.environ[LOOPS_ENV] = str(loops)  # inherited by the engine's processes
    return loops


CPU_LOOPS = _loops_from_env()


def cpu_cost_s(repeats: int = 200) -> float:
    """What one cpu_50us call costs now, in this process (median of ``repeats``)."""
    times = sorted(_timed(CPU_LOOPS) for _ in range(repeats))
    return times[len(times) // 2]


def noop(msg: Any) -> None:
    """A trivial sync handler: what the engine costs around the handler call."""
    return None


def cpu_50us(msg: Any) -> int:
    """About 50 µs of pure Python (holds the GIL throughout, like real CPU-bound work).

    Returns the loop count, so a request() can check a worker spins the same loop.
    """
    _spin(CPU_LOOPS)
    return CPU_LOOPS


async def io_1ms(msg: Any) -> None:
    """An I/O-bound handler: one 1 ms await, as a network call would be."""
    await asyncio.sleep(IO_DELAY_S)


STAMP_DIR_ENV = "RINGWAY_BENCH_STAMP_DIR"
_stamped = False


def stamped_noop(msg: Any) -> None:
    """A no-op that notes when its process first delivered: ``$STAMP_DIR/<pid>`` holds the ns.

    The recovery benchmark reads the respawned worker's file to time kill -> next
    delivery (CLOCK_MONOTONIC is machine-wide on Linux); one flag check per call.
    """
    global _stamped  # noqa: PLW0603 - once per process, on purpose
    if not _stamped:
        _stamped = True
        now = time.monotonic_ns()
        folder = os.environ.get(STAMP_DIR_ENV)
        if folder:
            with open(os.path.join(folder, str(os.getpid())), "w") as f:
                f.write(str(now))
