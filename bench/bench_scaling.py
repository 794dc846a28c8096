"""How Ringway's throughput moves with its knobs, each case side by side with the baselines.

Groups (each case a fresh engine per round, 3 rounds, the order of the sides
rotating round by round; ``extra_info["msgs_per_s"]`` is Ringway's median):

- ``worker-scaling``: ENGINE_WORKERS 1, 2, 3, 5 for a no-op and a ~50 µs
  CPU-bound handler; the process baselines get as many processes.
- ``batch-size``: ENGINE_BATCH_SIZE 1 ... 256 (no-op handler); the process
  baselines put chunks of the same size.
- ``delivery-concurrency``: ENGINE_DELIVERY_CONCURRENCY 1 ... 2048 with an
  ``async def`` handler that awaits 1 ms.
- ``recipients``: few recipients against many, and ENGINE_RECIPIENT_CONCURRENCY
  1 (strict order) against 8, with the same 1 ms handler.

Baselines: the original design's sequential broker (bench.engine_baselines),
its 5x20x10 asyncio design, and multiprocessing.Queue / ProcessPoolExecutor
feeding N processes (bench.design_baselines).  Speed is reported, never
asserted; with benchmarks disabled every case runs once at a tiny size and
still checks that every message was handled.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import pytest
import uvloop

from bench import handlers
from bench.bench_engine import CASES, Case, EngineRun, cpu_by_role, engine_run, make_items
from bench.design_baselines import (
    AsyncioDesignBroker,
    measure_mpqueue_workers,
    measure_process_pool,
)
from bench.engine_baselines import BaselineRun, Item, measure_priority_queue
from bench.ratios import RINGWAY, Rated, Tables, note, record_rates, side_by_side

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

ROUNDS = 3
WORKER_COUNTS = (1, 2, 3, 5)
BATCH_SIZES = (1, 5, 10, 20, 50, 100, 256)
CONCURRENCIES = (1, 10, 50, 100, 512, 2048)
# (recipients, ENGINE_RECIPIENT_CONCURRENCY): one recipient in order, the same with 8 in
# flight, then ever more recipients in order.
RECIPIENT_CASES = ((1, 1), (1, 8), (10, 1), (100, 1), (10_000, 1))
IO_RATE_PER_SLOT = 900  # msgs/s one 1 ms await delivers here, overhead included
IO_SECONDS = 1.5  # what an I/O-bound Ringway run should last at full size
SMOKE_IO_SECONDS = 0.05
SMOKE_IO_MAX = 1_000  # the pools fill at once; more would only cost time

# Full-run messages per side (about 0.5-2 s each here); compare msgs/s, not totals.
SCALING_SIZES: dict[str, dict[str, int]] = {
    "noop_python": {
        RINGWAY: 400_000, "sequential": 200_000, "asyncio_5x20x10": 100_000,
        "mpqueue": 400_000, "process_pool": 400_000,
    },
    "cpu_50us": {
        RINGWAY: 40_000, "sequential": 10_000, "asyncio_5x20x10": 10_000,
        "mpqueue": 40_000, "process_pool": 40_000,
    },
}  # fmt: skip
SMOKE_SIZES = {"noop_python": (2_000, 500), "cpu_50us": (400, 100)}  # Ringway, baselines
IO_BASELINE_SIZES = {"sequential": 500, "asyncio_5x20x10": 20_000}  # 1 ms each, one at a time
SMOKE_IO_BASELINE = 20


def ringway_side(case: Case, items: list[Item], **overrides: Any) -> Callable[[], EngineRun]:
    """A fresh engine per call, configured by ``overrides`` (Config field names)."""
    return lambda: uvloop.run(engine_run(case, items, **overrides))


def design_sides(
    handler: Callable[..., Any], sizes: dict[str, int], items: list[Item]
) -> dict[str, Callable[[], BaselineRun]]:
    """The original design's two single-process shapes, with ``sizes[side]`` messages each."""
    seq, asy = items[: sizes["sequential"]], items[: sizes["asyncio_5x20x10"]]
    return {
        "sequential": lambda: uvloop.run(measure_priority_queue(handler, seq)),
        "asyncio_5x20x10": lambda: uvloop.run(
            measure_priority_queue(handler, asy, AsyncioDesignBroker)
        ),
    }


def process_sides(
    handler: Callable[..., Any],
    items_mpq: list[Item],
    items_pool: list[Item],
    procs: int,
    chunk: int,
) -> dict[str, Callable[[], BaselineRun]]:
    """multiprocessing.Queue and ProcessPoolExecutor with ``procs`` processes, ``chunk``-sized."""
    return {
        "mpqueue": lambda: measure_mpqueue_workers(handler, items_mpq, procs, chunk),
        "process_pool": lambda: measure_process_pool(handler, items_pool, procs, chunk),
    }


def check_handled(runs: dict[str, list[Any]]) -> None:
    """Every baseline handled every message (engine runs check themselves: check_settled)."""
    for side, rs in runs.items():
        for r in rs:
            if isinstance(r, BaselineRun):
                assert r.handled == r.messages, f"{side} handled {r.handled} of {r.messages}"


def ringway_runs(runs: Mapping[str, list[Any]]) -> list[EngineRun]:
    """Ringway's side of a side-by-side run (``ringway_side`` made it)."""
    return cast(list[EngineRun], runs[RINGWAY])


def engine_extra(runs: dict[str, list[Any]]) -> dict[str, Any]:
    """Where Ringway's CPU went (cores busy per role, median of rounds)."""
    ring = ringway_runs(runs)
    return {"cpu_cores": {role: c for role, (c, _) in cpu_by_role(ring).items()}}


def io_messages(slots: int, smoke: bool) -> int:
    """Messages for about IO_SECONDS of an I/O run with ``slots`` 1 ms awaits in flight."""
    seconds = SMOKE_IO_SECONDS if smoke else IO_SECONDS
    return max(
        50, min(SMOKE_IO_MAX if smoke else 200_000, round(slots * IO_RATE_PER_SLOT * seconds))
    )


def rounds_of(benchmark: BenchmarkFixture) -> int:
    return 1 if benchmark.disabled else ROUNDS


@pytest.mark.benchmark(group="worker-scaling")
@pytest.mark.parametrize("workers", WORKER_COUNTS)
@pytest.mark.parametrize("workload", list(SCALING_SIZES))
def test_worker_scaling(
    benchmark: BenchmarkFixture, group_tables: Tables, workload: str, workers: int
) -> None:
    case = CASES[workload]
    handler = case.baseline_handler
    if benchmark.disabled:
        n, nb = SMOKE_SIZES[workload]
        sizes = dict.fromkeys(SCALING_SIZES[workload], nb) | {RINGWAY: n}
    else:
        sizes = SCALING_SIZES[workload]
    items = make_items(max(sizes.values()))
    sides: dict[str, Callable[[], Rated]] = {
        RINGWAY: ringway_side(case, items[: sizes[RINGWAY]], workers=workers),
        **design_sides(handler, sizes, items),
        **process_sides(
            handler, items[: sizes["mpqueue"]], items[: sizes["process_pool"]], workers, 256
        ),
    }
    runs = side_by_side(benchmark, sides, rounds_of(benchmark))
    title = f"worker-scaling ({workload})"
    record_rates(
        benchmark, group_tables, title, f"{workers} workers", runs,
        workers=workers, workload=workload, messages=sizes, **engine_extra(runs),
    )  # fmt: skip
    if workers == WORKER_COUNTS[-1]:
        note(benchmark, group_tables, title, "mpqueue / process_pool: as many processes as Ringway"
             " has workers, chunks of 256; sequential, asyncio_5x20x10: one process")  # fmt: skip
    check_handled(runs)
    for r in ringway_runs(runs):
        assert r.worker_loops == ([handlers.CPU_LOOPS] * workers if case.check_loops else [])


@pytest.mark.benchmark(group="batch-size")
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_batch_size(benchmark: BenchmarkFixture, group_tables: Tables, batch: int) -> None:
    case = CASES["noop_python"]
    handler = case.baseline_handler
    if benchmark.disabled:
        n, nb = SMOKE_SIZES["noop_python"]
        sizes = dict.fromkeys(SCALING_SIZES["noop_python"], nb) | {RINGWAY: n}
    else:
        # Small batches cost more per message: fewer messages keep the runs ~1-2 s.
        full = min(400_000, 20_000 * batch)
        sizes = SCALING_SIZES["noop_python"] | {
            RINGWAY: full,
            "mpqueue": full,
            "process_pool": min(400_000, 2_000 * batch),
        }
    items = make_items(max(sizes.values()))
    sides: dict[str, Callable[[], Rated]] = {
        RINGWAY: ringway_side(case, items[: sizes[RINGWAY]], batch_size=batch),
        **process_sides(
            handler, items[: sizes["mpqueue"]], items[: sizes["process_pool"]], 2, batch
        ),
        **design_sides(handler, sizes, items),
    }
    runs = side_by_side(benchmark, sides, rounds_of(benchmark))
    record_rates(
        benchmark, group_tables, "batch-size", f"batch {batch}", runs,
        batch=batch, messages=sizes, **engine_extra(runs),
    )  # fmt: skip
    if batch == BATCH_SIZES[-1]:
        note(benchmark, group_tables, "batch-size", "no-op handler, 2 workers; mpqueue and"
             " process_pool: 2 processes, chunks of that size; asyncio_5x20x10: 20")  # fmt: skip
    check_handled(runs)


@pytest.mark.benchmark(group="delivery-concurrency")
@pytest.mark.parametrize("concurrency", CONCURRENCIES)
def test_delivery_concurrency(
    benchmark: BenchmarkFixture, group_tables: Tables, concurrency: int
) -> None:
    case = CASES["io_python_1ms"]
    n = io_messages(2 * concurrency, benchmark.disabled)  # 2 workers
    sizes = IO_BASELINE_SIZES
    if benchmark.disabled:
        sizes = dict.fromkeys(sizes, SMOKE_IO_BASELINE)
    items = make_items(max(n, *sizes.values()))
    sides: dict[str, Callable[[], Rated]] = {
        RINGWAY: ringway_side(case, items[:n], delivery_concurrency=concurrency),
        **design_sides(case.baseline_handler, sizes, items),
    }
    runs = side_by_side(benchmark, sides, rounds_of(benchmark))
    ring = ringway_runs(runs)
    record_rates(
        benchmark, group_tables, "delivery-concurrency", f"{concurrency} per worker", runs,
        delivery_concurrency=concurrency, messages=n,
        worker_rss_mib=[round(b / (1 << 20), 1) for b in ring[-1].rss_bytes],
        **engine_extra(runs),
    )  # fmt: skip
    if concurrency == CONCURRENCIES[-1]:
        note(benchmark, group_tables, "delivery-concurrency", "async def handler awaiting 1 ms,"
             " 2 workers, 10,000 recipients; asyncio_5x20x10 has at most 50 in flight")  # fmt: skip
    check_handled(runs)
    for r in ring:  # every delivery really awaited (see bench_engine's I/O cases)
        assert r.mean_handler_s >= case.min_handler_s, r.mean_handler_s


@pytest.mark.benchmark(group="recipients")
@pytest.mark.parametrize(("recipients", "per_recipient"), RECIPIENT_CASES)
def test_recipients(
    benchmark: BenchmarkFixture, group_tables: Tables, recipients: int, per_recipient: int
) -> None:
    case = CASES["io_python_1ms"]
    # At most recipients x per-recipient in flight, and at most 2 x 512 (the pools).
    n = io_messages(min(recipients * per_recipient, 1024), benchmark.disabled)
    sizes = IO_BASELINE_SIZES
    if benchmark.disabled:
        sizes = dict.fromkeys(sizes, SMOKE_IO_BASELINE)
    items = make_items(max(n, *sizes.values()), recipients)
    sides: dict[str, Callable[[], Rated]] = {
        RINGWAY: ringway_side(case, items[:n], recipient_concurrency=per_recipient),
        **design_sides(case.baseline_handler, sizes, items),
    }
    runs = side_by_side(benchmark, sides, rounds_of(benchmark))
    label = f"{recipients} recipients, {per_recipient} in flight each"
    record_rates(
        benchmark, group_tables, "recipients", label, runs,
        recipients=recipients, recipient_concurrency=per_recipient, messages=n,
        **engine_extra(runs),
    )  # fmt: skip
    if (recipients, per_recipient) == RECIPIENT_CASES[-1]:
        note(benchmark, group_tables, "recipients", "async def handler awaiting 1 ms, 2 workers;"
             " 1 in flight per recipient keeps each recipient's order; sequential keeps one"
             " global order, asyncio_5x20x10 none")  # fmt: skip
    check_handled(runs)
    median = statistics.median(r.mean_handler_s for r in ringway_runs(runs))
    assert median >= case.min_handler_s, median
