"""The whole engine against the original single-process design, per kind of handler.

Group ``engine-workloads``: 10,000 recipients, 100-byte payloads, 2 workers.
Each case runs Ringway and its baseline (bench.engine_baselines: one asyncio
PriorityQueue, one sequential consumer) side by side in the same test, round by
round with the order rotating, and reports the median msgs/s of each in
``extra_info``, timed from the first submit to the moment every message is
settled (engine start and stop are outside the clock).  The CPU-bound case adds
a third side, the machine's ceiling: bare processes calling the handler.  pytest-benchmark's own
time column is a whole round (engine start and stop included): compare msgs/s.

``test_latency`` offers 50,000 msgs/s (50 messages every 1 ms tick) and reports
the engine's submit -> handler-start percentiles and each worker's RSS; it checks
that the histogram covers every message and its percentiles are in order.

Speed is reported, never asserted; the tests assert only that every message
was delivered (delivered == submitted, in_flight == 0, nothing dead-lettered or
expired).  With benchmarks disabled (the default run) each case runs once at a
tiny size as a smoke test.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import psutil
import pytest
import uvloop

from bench import handlers
from bench.engine_baselines import (
    BaselineRun,
    EngineSummary,
    Item,
    measure_parallel_ceiling,
    measure_priority_queue,
)
from engine import Config, Engine
from engine.core.sharding import stable_shard
from ipc.codec import Message, pack_payload

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

RECIPIENTS = 10_000
PAYLOAD_BYTES = 100
WORKERS = 2
ROUNDS = 3
DRAIN_TIMEOUT_S = 120.0  # far beyond any healthy run here; a drain this slow is a hang
REPORT_WAIT_S = 3.0  # how long to wait for the monitor's report to cover every message
STATS_INTERVAL_S = 0.1
# The payload is packed once, as Engine.broadcast does: both sides then get the
# same msgspec.Raw and neither pays for packing (about 0.5 µs a message here).
PAYLOAD = pack_payload(b"x" * PAYLOAD_BYTES)


@dataclass(frozen=True)
class Case:
    """One workload: how the engine delivers it, what the baseline calls, and how much."""

    handler: str | None  # "module:function" for the engine's python sink
    sink: str
    mock_delay_s: float
    baseline_handler: Callable[[Message], Any]
    messages: int  # engine, full run
    baseline_messages: int  # baseline, full run (the sequential I/O baseline is slow)
    smoke_messages: int = 2_000
    smoke_baseline_messages: int = 500
    # The handler returns its loop count: ask each worker, so both sides do equal work.
    # Such a case also measures the machine's ceiling: WORKERS bare processes.
    check_loops: bool = False
    # Correctness, not speed: an I/O handler's deliveries must take about its await
    # from handler start to settle, on average (exact sums, see engine_run).
    min_handler_s: float = 0.0


# Half the await: libuv's cached loop clock may end a 1 ms sleep a little early, but
# an await that never happened costs microseconds, not half a millisecond.
_IO_SETTLE = 0.5 * handlers.IO_DELAY_S
# Sizes: about 1-3 s per engine run here; compare msgs/s, not totals.
CASES: dict[str, Case] = {
    "noop_null": Case(None, "null", 0.0, handlers.noop, 400_000, 400_000),
    "noop_python": Case("bench.handlers:noop", "python", 0.0, handlers.noop, 400_000, 400_000),
    "cpu_50us": Case(
        "bench.handlers:cpu_50us", "python", 0.0, handlers.cpu_50us, 60_000, 20_000,
        smoke_messages=1_000, smoke_baseline_messages=200, check_loops=True,
    ),
    "io_mock_1ms": Case(
        None, "mock", handlers.IO_DELAY_S, handlers.io_1ms, 200_000, 500,
        smoke_baseline_messages=20, min_handler_s=_IO_SETTLE,
    ),
    "io_python_1ms": Case(
        "bench.handlers:io_1ms", "python", 0.0, handlers.io_1ms, 200_000, 500,
        smoke_baseline_messages=20, min_handler_s=_IO_SETTLE,
    ),
}  # fmt: skip
LATENCY_RATE = 50_000  # offered msgs/s
LATENCY_TICK_S = 0.001
LATENCY_SECONDS = 3.0
SMOKE_LATENCY_SECONDS = 0.2


class EngineRun(msgspec.Struct, frozen=True):
    """One timed engine run, with where the CPU went during it."""

    messages: int
    seconds: float
    msgs_per_s: float
    submit_s: float  # first submit to the last submit_many return (the producer side)
    cpu_s: dict[str, float]  # CPU seconds per process: dispatcher, monitor, worker0, ...
    # plus "others": the machine's busy CPU seconds less the engine's (noisy neighbours)
    rss_bytes: list[int]  # per worker, after the run
    latency_start_s: dict[str, float]
    latency_settle_s: dict[str, float]
    mean_handler_s: float  # mean handler start -> settle, from the histograms' exact sums
    worker_loops: list[int]  # cpu_50us's loop count as each worker has it (check_loops)


class LatencyRun(msgspec.Struct, frozen=True):
    messages: int
    offered_msgs_per_s: float
    max_tick_lag_s: float
    latency_start_s: dict[str, float]
    rss_steady_bytes: list[int]
    rss_after_bytes: list[int]


def make_items(n: int, recipients: int = RECIPIENTS) -> list[Item]:
    return [(f"Agent-{i % recipients}", PAYLOAD) for i in range(n)]


def make_config(case: Case, **overrides: Any) -> Config:
    """The case's engine configuration; ``overrides`` (other groups' knobs) win."""
    base: dict[str, Any] = {
        "workers": WORKERS,
        "sink": case.sink,
        "mock_delay_s": case.mock_delay_s,
        "stats_interval_s": STATS_INTERVAL_S,
    }
    return Config.from_env(env={}, **(base | overrides))


# -- engine side -------------------------------------------------------------------


def _process_cpu_s(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for role, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[role] = t.user + t.system
    return out


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


def _engine_pids(eng: Engine) -> dict[str, int]:
    """The monitor and the workers, by role (the workers' pids from the monitor's report)."""
    workers = eng.stats()["workers"]
    if len(workers) != eng.config.workers:  # no report yet: the monitor's children are the workers
        children = psutil.Process(eng.monitor.pid).children()
        return {"monitor": eng.monitor.pid} | {
            f"worker{i}": c.pid for i, c in enumerate(sorted(children, key=lambda c: c.pid))
        }
    return {"monitor": eng.monitor.pid} | {f"worker{w['worker']}": w["pid"] for w in workers}


def check_settled(stats: dict[str, Any], n: int, drained: bool) -> None:
    """The only assertions: every message delivered, nothing lost, dead-lettered or stuck."""
    counts = {k: stats[k] for k in ("submitted", "delivered", "dead_lettered", "expired")}
    detail = f"{counts}, in_flight={stats['in_flight']}, workers={stats['workers']}"
    assert drained, f"drain timed out after {DRAIN_TIMEOUT_S}s: {detail}"
    assert stats["submitted"] == n, detail
    assert stats["delivered"] == n, detail
    assert stats["in_flight"] == 0, detail
    assert stats["dead_lettered"] == 0 and stats["expired"] == 0, detail


async def fresh_stats(eng: Engine, settled: int) -> dict[str, Any]:
    """stats() once the monitor's report covers ``settled`` deliveries (or time is up).

    Both histograms must: a worker's snapshot taken while its last deliveries were
    still running counts them as started but not yet settled.
    """
    deadline = time.monotonic() + REPORT_WAIT_S
    stats = eng.stats()
    while time.monotonic() < deadline and (
        stats["latency_start_s"]["count"] < settled or stats["latency_settle_s"]["count"] < settled
    ):
        await asyncio.sleep(STATS_INTERVAL_S / 2)
        stats = eng.stats()
    return stats


async def engine_run(case: Case, items: list[Item], **overrides: Any) -> EngineRun:
    """One timed run on a fresh engine; ``overrides`` are Config fields (workers, batch_size...)."""
    n = len(items)
    async with Engine(case.handler, make_config(case, **overrides)) as eng:
        pids = _engine_pids(eng)
        cpu0 = _process_cpu_s(pids)
        machine0 = _machine_busy_s()
        here0 = time.process_time()
        t0 = time.perf_counter()
        await eng.submit_many(items)
        t_submitted = time.perf_counter()
        drained = await eng.drain(timeout=DRAIN_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        here = time.process_time() - here0
        cpu1 = _process_cpu_s(pids)
        machine = _machine_busy_s() - machine0
        check_settled(eng.stats(), n, drained)
        stats = await fresh_stats(eng, n)
        mean_handler_s = _mean_start_to_settle_s(eng)
        loops = (
            [await eng.request(r, timeout=30) for r in _one_per_shard(eng.config.workers)]
            if case.check_loops
            else []
        )
    cpu_s = {"dispatcher": here} | {r: cpu1[r] - cpu0[r] for r in cpu1 if r in cpu0}
    cpu_s["others"] = max(0.0, machine - sum(cpu_s.values()))
    return EngineRun(
        messages=n,
        seconds=seconds,
        msgs_per_s=n / seconds,
        submit_s=t_submitted - t0,
        cpu_s=cpu_s,
        rss_bytes=[w["rss_bytes"] for w in stats["workers"]],
        latency_start_s=stats["latency_start_s"],
        latency_settle_s=stats["latency_settle_s"],
        mean_handler_s=mean_handler_s,
        worker_loops=loops,
    )


def _one_per_shard(workers: int = WORKERS) -> list[str]:
    """A recipient of each worker (requests to them reach every worker)."""
    found: dict[int, str] = {}
    for i in range(RECIPIENTS):
        found.setdefault(stable_shard(f"Agent-{i}", workers), f"Agent-{i}")
    return [found[k] for k in sorted(found)]


def _mean_start_to_settle_s(eng: Engine) -> float:
    """Mean settle latency minus mean start latency: what one handler call took, on average.

    The histograms keep exact sums (stats() shows only percentiles, bucket midpoints).
    """
    report = eng.report
    if report is None or report.latency_settle.count == 0:
        return 0.0
    start, settle = report.latency_start, report.latency_settle
    return (settle.sum_ns / settle.count - start.sum_ns / max(start.count, 1)) / 1e9


class Paced(NamedTuple):
    """What a paced submission achieved."""

    messages: int
    offered_msgs_per_s: float
    max_tick_lag_s: float  # how far the submitter fell behind its schedule (0 = on time)


async def paced(
    submit_many: Callable[[list[Item]], Awaitable[object]],
    items: list[Item],
    rate: float,
    tick_s: float = LATENCY_TICK_S,
) -> Paced:
    """Submit ``items`` at ``rate`` msgs/s: a slice every tick, sleeping in between (no spin).

    A submitter that falls behind catches up at once (the schedule is absolute), so an
    overloaded side sees the load it was offered, not a politely reduced one.
    """
    per_tick = max(1, round(rate * tick_s))
    lag = 0.0
    start = time.monotonic()
    for k, first in enumerate(range(0, len(items), per_tick)):
        delay = start + k * per_tick / rate - time.monotonic()
        lag = max(lag, -delay)
        await asyncio.sleep(max(delay, 0.0))  # sleep(0) still lets the flush run
        await submit_many(items[first : first + per_tick])
    return Paced(len(items), len(items) / (time.monotonic() - start), lag)


async def engine_latency(seconds: float) -> LatencyRun:
    """Offer LATENCY_RATE msgs/s in ticks; percentiles of submit -> handler start."""
    items = make_items(round(LATENCY_RATE * seconds))
    case = CASES["noop_null"]
    async with Engine(case.handler, make_config(case)) as eng:
        pace = await paced(eng.submit_many, items, LATENCY_RATE)
        lag, offered = pace.max_tick_lag_s, pace.offered_msgs_per_s
        steady = eng.stats()["workers"]  # the latest report, taken under load
        drained = await eng.drain(timeout=DRAIN_TIMEOUT_S)
        check_settled(eng.stats(), len(items), drained)
        stats = await fresh_stats(eng, len(items))
    return LatencyRun(
        messages=len(items),
        offered_msgs_per_s=offered,
        max_tick_lag_s=lag,
        latency_start_s=stats["latency_start_s"],
        rss_steady_bytes=[w["rss_bytes"] for w in steady],
        rss_after_bytes=[w["rss_bytes"] for w in stats["workers"]],
    )


# -- the tests ---------------------------------------------------------------------


def _mib(values: list[int]) -> list[float]:
    return [round(v / (1 << 20), 1) for v in values]


def cpu_by_role(runs: list[EngineRun]) -> dict[str, tuple[float, float]]:
    """Median (cores busy, CPU µs per message) of the dispatcher, all workers, the monitor.

    The dispatcher's figure is this whole process (the submitting code included).
    """

    def role_of(process: str) -> str:
        return "workers" if process.startswith("worker") else process

    per_run: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        totals: dict[str, float] = {}
        for process, cpu in run.cpu_s.items():
            totals[role_of(process)] = totals.get(role_of(process), 0.0) + cpu
        for role, cpu in totals.items():
            per_run.setdefault(role, []).append((cpu / run.seconds, cpu / run.messages * 1e6))
    return {
        role: (
            round(statistics.median(c for c, _ in values), 2),
            round(statistics.median(us for _, us in values), 2),
        )
        for role, values in per_run.items()
    }


@pytest.mark.benchmark(group="engine-workloads")
@pytest.mark.parametrize("name", list(CASES))
def test_workload(benchmark: BenchmarkFixture, engine_summary: EngineSummary, name: str) -> None:
    case = CASES[name]
    smoke = benchmark.disabled
    n = case.smoke_messages if smoke else case.messages
    nb = case.smoke_baseline_messages if smoke else case.baseline_messages
    items = make_items(max(n, nb))
    ring: list[EngineRun] = []
    base: list[BaselineRun] = []

    def engine_side() -> None:
        ring.append(uvloop.run(engine_run(case, items[:n])))

    def baseline_side() -> None:
        base.append(uvloop.run(measure_priority_queue(case.baseline_handler, items[:nb])))

    ceiling: list[BaselineRun] = []

    def ceiling_side() -> None:
        ceiling.append(measure_parallel_ceiling(case.baseline_handler, nb, WORKERS))

    def one_round() -> None:
        sides = [engine_side, baseline_side] + ([ceiling_side] if case.check_loops else [])
        k = len(ring) % len(sides)  # rotate the order, so no side always runs first
        for side in sides[k:] + sides[:k]:
            side()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)  # type: ignore[no-untyped-call]
    ring_rate = statistics.median(r.msgs_per_s for r in ring)
    base_rate = statistics.median(b.msgs_per_s for b in base)
    cpu = cpu_by_role(ring)
    rss = _mib(ring[-1].rss_bytes)
    benchmark.extra_info.update(
        msgs_per_s=ring_rate,
        msgs_per_s_rounds=[r.msgs_per_s for r in ring],
        baseline_msgs_per_s=base_rate,
        baseline_msgs_per_s_rounds=[b.msgs_per_s for b in base],
        ratio=ring_rate / base_rate,
        messages=n,
        baseline_messages=nb,
        submit_s_rounds=[r.submit_s for r in ring],
        cpu_cores={role: c for role, (c, _) in cpu.items()},
        cpu_us_per_msg={role: us for role, (_, us) in cpu.items()},
        cpu_s_rounds=[r.cpu_s for r in ring],
        worker_rss_mib=rss,
        latency_start_s=ring[-1].latency_start_s,
        mean_handler_s=[r.mean_handler_s for r in ring],
        recipients=RECIPIENTS,
        payload_bytes=PAYLOAD_BYTES,
        workers=WORKERS,
    )
    if name == "cpu_50us":
        benchmark.extra_info["handler_cost_s"] = handlers.cpu_cost_s()
    ceiling_rate = statistics.median(c.msgs_per_s for c in ceiling) if ceiling else 0.0
    if ceiling:
        benchmark.extra_info.update(
            ceiling_msgs_per_s=ceiling_rate,
            ceiling_msgs_per_s_rounds=[c.msgs_per_s for c in ceiling],
        )
    print(
        f"\n{name}: ringway {ring_rate:,.0f} msgs/s, baseline {base_rate:,.0f} msgs/s,"
        f" ratio {ring_rate / base_rate:.2f}x; submit {ring[-1].submit_s:.2f}s of"
        f" {ring[-1].seconds:.2f}s; CPU (cores, µs/msg) {cpu}; worker RSS MiB {rss};"
        f" handler start->settle {ring[-1].mean_handler_s * 1e6:.1f} µs mean"
        + (f"; {WORKERS} bare processes {ceiling_rate:,.0f} msgs/s" if ceiling else "")
    )
    for b in base:
        assert b.handled == b.messages == nb
    for r in ring:
        assert r.worker_loops == [handlers.CPU_LOOPS] * (WORKERS if case.check_loops else 0), (
            f"workers spin {r.worker_loops} loops, the baseline {handlers.CPU_LOOPS}"
        )
        settled = r.latency_settle_s["count"]
        assert settled == n, f"the monitor's report covers {settled} of {n} deliveries"
        assert r.mean_handler_s >= case.min_handler_s, (
            f"a delivery took {r.mean_handler_s * 1e3:.3f} ms on average from handler start to"
            f" settle, less than the handler's {handlers.IO_DELAY_S * 1e3:g} ms await: the"
            " engine settled deliveries without awaiting the handler"
        )
    if benchmark.enabled:  # smoke-size figures would only be noise in the summary
        engine_summary.rates[name] = (ring_rate, base_rate)
        engine_summary.cpu[name] = cpu
        if ceiling:
            engine_summary.ceilings[name] = ceiling_rate
        engine_summary.rss_mib[name] = rss


@pytest.mark.benchmark(group="engine-workloads")
def test_latency(benchmark: BenchmarkFixture, engine_summary: EngineSummary) -> None:
    seconds = SMOKE_LATENCY_SECONDS if benchmark.disabled else LATENCY_SECONDS
    runs: list[LatencyRun] = []

    def once() -> None:
        runs.append(uvloop.run(engine_latency(seconds)))

    benchmark.pedantic(once, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    run = runs[-1]
    lat = run.latency_start_s
    summary = {
        "target_msgs_per_s": float(LATENCY_RATE),
        "offered_msgs_per_s": run.offered_msgs_per_s,
        "p50_s": lat["p50"],
        "p95_s": lat["p95"],
        "p99_s": lat["p99"],
        "max_s": lat["max"],
        "max_tick_lag_s": run.max_tick_lag_s,
    }
    benchmark.extra_info.update(
        summary,
        messages=run.messages,
        latency_count=lat["count"],
        worker_rss_steady_mib=_mib(run.rss_steady_bytes),
        worker_rss_after_mib=_mib(run.rss_after_bytes),
    )
    if benchmark.enabled:
        engine_summary.latency = summary
        engine_summary.rss_mib["latency (under load)"] = _mib(run.rss_steady_bytes)
    print(
        f"\nlatency at {run.offered_msgs_per_s:,.0f} msgs/s offered: p50 {lat['p50'] * 1e3:.2f} ms,"
        f" p99 {lat['p99'] * 1e3:.2f} ms, max {lat['max'] * 1e3:.2f} ms"
        f" (histogram count {lat['count']} of {run.messages}); worker RSS MiB"
        f" {_mib(run.rss_steady_bytes)}"
    )
    check_latency_run(run, round(LATENCY_RATE * seconds))


def check_latency_run(run: LatencyRun, messages: int) -> None:
    """What the figures must satisfy to mean anything: a start latency recorded for every
    message (no delivery missing from the histogram), percentiles in order and positive,
    and a memory figure for every worker, under load and after."""
    lat = run.latency_start_s
    assert run.messages == messages, run
    assert lat["count"] == messages, f"start latency of {lat['count']} of {messages} messages"
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], lat
    assert run.offered_msgs_per_s > 0 and run.max_tick_lag_s >= 0, run
    for rss in (run.rss_steady_bytes, run.rss_after_bytes):
        assert len(rss) == WORKERS and all(r > 0 for r in rss), rss
