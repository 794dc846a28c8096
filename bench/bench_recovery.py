"""Worker-failure recovery: SIGKILL a worker mid-run; nothing may be lost.

``worker-recovery``: 2 workers, a no-op handler (``bench.handlers:stamped_noop``,
which notes when each process first delivers).  A third of the messages is
submitted; once half of those are delivered the worker of shard 0 (its pid
from ``Engine.stats()["workers"]``) gets SIGKILL and the rest is submitted.
Reported: the run's msgs/s, ``lost`` (submitted - delivered - dead-lettered -
expired after the drain: must be 0, asserted), ``redelivered``, kill -> the
respawned worker's first handler call (``first_delivery_s``) and kill -> the
dispatcher holding settle reports for everything the dead worker had fetched
(``caught_up_s``).

Baselines, killed the same way at the same point: multiprocessing.Queue
feeding 2 processes and a 2-process ProcessPoolExecutor.  Neither redelivers,
so what the killed process held is lost; a multiprocessing.Queue consumer
killed while holding the queue's lock also hangs the survivors (``hung``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
import uvloop

from bench import handlers
from bench.bench_engine import CASES, DRAIN_TIMEOUT_S, check_settled, make_config, make_items
from bench.design_baselines import KillRun, measure_mpqueue_kill, measure_pool_kill
from bench.engine_baselines import Item
from bench.ratios import RINGWAY, Tables, note, record_rates, side_by_side
from engine import Engine
from ipc.codec import Priority

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

HANDLER = "bench.handlers:stamped_noop"
MESSAGES = 600_000  # about 1-1.5 s here
SMOKE_MESSAGES = 6_000
KILL_AT = 1 / 6  # of all messages delivered: half of the first third
SLICE = 4_096  # messages per submit_many after the kill
POLL_S = 0.001  # how often the kill condition and the catch-up are checked (sleeping)
PROCESSES = 2


class RecoveryRun(msgspec.Struct, frozen=True):
    """One Ringway run with a worker SIGKILLed in the middle."""

    messages: int
    seconds: float
    msgs_per_s: float
    lost: int
    redelivered: int
    first_delivery_s: float  # kill -> the respawned worker's first handler call
    caught_up_s: float  # kill -> settle reports cover everything the dead worker fetched
    killed_pid: int
    new_pid: int


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(POLL_S)


async def ringway_kill(items: list[Item], stamp_dir: Path) -> RecoveryRun:
    n = len(items)
    first = n // 3
    async with Engine(HANDLER, make_config(CASES["noop_python"])) as eng:
        workers = eng.config.workers
        await _until(lambda: len(eng.stats()["workers"]) == workers, "the first worker report")
        victim = eng.stats()["workers"][0]
        shard, pid = victim["worker"], victim["pid"]
        assert eng.dispatcher is not None
        acked = eng.dispatcher.acked[shard]
        t0 = time.perf_counter()
        await eng.submit_many(items[:first])
        await _until(lambda: eng.stats()["delivered"] >= KILL_AT * n, "deliveries before the kill")
        fetched = eng.shards[shard].lanes[Priority.NORMAL].read_pos  # what the victim held
        os.kill(pid, signal.SIGKILL)
        killed_ns = time.monotonic_ns()

        async def catch_up() -> float:
            await _until(lambda: acked[Priority.NORMAL] >= fetched, "the catch-up")
            return (time.monotonic_ns() - killed_ns) / 1e9

        caught_up = asyncio.create_task(catch_up())
        for start in range(first, n, SLICE):  # yielding between slices, as a live producer
            await eng.submit_many(items[start : start + SLICE])  # would: the catch-up
            await asyncio.sleep(0)  # poll and the return rings' reader get their turn
        drained = await eng.drain(timeout=DRAIN_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        stats = eng.stats()
        check_settled(stats, n, drained)
        caught_up_s = await caught_up
        await _until(lambda: eng.stats()["workers"][shard]["pid"] != pid, "the respawn report")
        new_pid = eng.stats()["workers"][shard]["pid"]
    stamp = stamp_dir / str(new_pid)
    assert stamp.exists(), f"the respawned worker {new_pid} never delivered"
    first_delivery_s = (int(stamp.read_text()) - killed_ns) / 1e9
    lost = n - stats["delivered"] - stats["dead_lettered"] - stats["expired"]
    return RecoveryRun(
        n, seconds, n / seconds, lost, stats["redelivered"], first_delivery_s, caught_up_s,
        pid, new_pid,
    )  # fmt: skip


def _ms(values: list[float]) -> str:
    return (
        f"{statistics.median(values) * 1e3:.1f} ms (rounds {[round(v * 1e3, 1) for v in values]})"
    )


@pytest.mark.benchmark(group="worker-recovery")
def test_worker_recovery(
    benchmark: BenchmarkFixture,
    group_tables: Tables,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(handlers.STAMP_DIR_ENV, str(tmp_path))  # inherited by the workers
    n = SMOKE_MESSAGES if benchmark.disabled else MESSAGES
    items = make_items(n)
    handler = handlers.noop
    sides: dict[str, Callable[[], Any]] = {
        RINGWAY: lambda: uvloop.run(ringway_kill(items, tmp_path)),
        "mpqueue": lambda: measure_mpqueue_kill(handler, items, PROCESSES, KILL_AT),
        "process_pool": lambda: measure_pool_kill(handler, items, PROCESSES, KILL_AT),
    }
    runs = side_by_side(benchmark, sides, 1 if benchmark.disabled else 3)
    ring: list[RecoveryRun] = runs[RINGWAY]
    base: dict[str, list[KillRun]] = {s: runs[s] for s in ("mpqueue", "process_pool")}
    title = "worker-recovery"
    record_rates(
        benchmark, group_tables, title, f"SIGKILL 1 of {PROCESSES} workers", runs,
        lost={side: [r.lost for r in rs] for side, rs in runs.items()},
        redelivered=[r.redelivered for r in ring],
        first_delivery_s=[r.first_delivery_s for r in ring],
        caught_up_s=[r.caught_up_s for r in ring],
        hung={side: [r.hung for r in rs] for side, rs in base.items()},
        messages=n,
    )  # fmt: skip
    note(benchmark, group_tables, title,
         f"ringway: lost {[r.lost for r in ring]}, redelivered {[r.redelivered for r in ring]},"
         f" kill -> first delivery {_ms([r.first_delivery_s for r in ring])},"
         f" kill -> caught up {_ms([r.caught_up_s for r in ring])}")  # fmt: skip
    for side, rs in base.items():
        note(benchmark, group_tables, title,
             f"{side}: lost {[r.lost for r in rs]} of {n:,}, survivors hung"
             f" {[r.hung for r in rs]} (no redelivery)")  # fmt: skip
    for r in ring:
        assert r.lost == 0
        assert r.new_pid != r.killed_pid
