"""Cluster mode (Redis Streams) against the embedded engine and against Dramatiq on the same Redis.

Group ``cluster``: one private ``redis-server`` (AOF on, ``appendfsync everysec``),
100-byte payloads to 1,000 recipients, per handler (no-op, 1 ms I/O), side by side
and round by round with the order rotating:

- ``ringway`` -- cluster mode with **2 nodes**: node A is an `Engine` in this
  process (the messages are submitted through it, ``submit_many``), node B an
  ``engine serve --broker`` process; 1 worker each; msgs/s from the first submit
  until both nodes delivered every message;
- ``cluster_1_node`` -- cluster mode, one in-process node with 2 workers;
- ``embedded`` -- the embedded engine, 2 workers, no Redis;
- ``dramatiq`` -- Dramatiq's RedisBroker on the same server, ``dramatiq`` workers
  with 2 processes x 8 threads, 4 sending threads, done when the queue's message
  hash is empty (every message acked).

Each side also reports p50/p99 submit -> handler-start latency (Ringway: the
workers' histograms, for 2 nodes the worse node's; Dramatiq: wall clock) and
Redis commands per message: the INFO commandstats delta over the run divided by
the messages (commands run inside Lua scripts included; the nodes' heartbeats,
renewals and idle reads during the run too).  Speed is reported, never asserted;
every message delivered is.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
import redis

from bench.ratios import Tables, note, record_rates, side_by_side
from engine import Config, Engine
from ipc.codec import pack_payload
from tests.broker.redis_proc import RedisServer, running_redis
from tests.integration.service_proc import REPO, ServiceProc, start_service

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

TITLE = "cluster"
RECIPIENTS = [f"Agent-{i}" for i in range(1000)]
PAYLOAD = pack_payload(b"x" * 100)
PARTITIONS = 16
STATS_INTERVAL_S = 0.1
DONE_TIMEOUT_S = 300.0
REPORT_WAIT_S = 3.0
DRAMATIQ_PROCESSES, DRAMATIQ_THREADS, DRAMATIQ_SENDERS = 2, 8, 4
HANDLERS = {"noop": "bench.handlers:noop", "io_1ms": "bench.handlers:io_1ms"}


@dataclass
class Run:
    """One timed run of one side."""

    messages: int
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    ops_per_msg: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds


def sizes(benchmark: BenchmarkFixture, handler: str) -> tuple[int, int, int]:
    """(Ringway messages, Dramatiq messages, rounds): tiny in the default run."""
    if not benchmark.enabled:
        return 2_000, 300, 1
    return (200_000, 10_000, 3) if handler == "noop" else (100_000, 5_000, 3)


def items(n: int) -> list[tuple[str, msgspec.Raw]]:
    return [(RECIPIENTS[i % len(RECIPIENTS)], PAYLOAD) for i in range(n)]


def command_calls(r: redis.Redis) -> int:
    """Every command Redis executed so far (INFO commandstats, scripts' inner calls too)."""
    stats: dict[str, Any] = r.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("bench-redis")) as srv:
        yield srv


def node_config(url: str, namespace: str, handler: str, workers: int) -> Config:
    return Config.from_env(
        {},
        broker=url,
        namespace=namespace,
        partitions=PARTITIONS,
        workers=workers,
        handler=handler,
        node_id=f"{namespace}-a",
        stats_interval_s=STATS_INTERVAL_S,
        broker_read_count=64,
    )


async def _fresh_stats(eng: Engine, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + REPORT_WAIT_S
    stats = eng.stats()
    while time.monotonic() < deadline and stats["latency_start_s"]["count"] < n:
        await asyncio.sleep(STATS_INTERVAL_S / 2)
        stats = eng.stats()
    return stats


async def _owned(eng: Engine) -> int:
    return len(eng.stats()["cluster"]["leases"]["owned"])


async def _wait(check: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.05)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)


# -- the sides -------------------------------------------------------------------------------
async def embedded_run(handler: str, n: int) -> Run:
    cfg = Config.from_env({}, workers=2, stats_interval_s=STATS_INTERVAL_S)
    async with Engine(handler, cfg) as eng:
        batch = items(n)
        t0 = time.perf_counter()
        await eng.submit_many(batch)
        assert await eng.drain(DONE_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        stats = await _fresh_stats(eng, n)
    assert stats["delivered"] == n
    lat = stats["latency_start_s"]
    return Run(n, seconds, _ms(lat["p50"]), _ms(lat["p99"]), 0.0)


async def cluster_one_run(url: str, handler: str, n: int) -> Run:
    r = redis.Redis.from_url(url)
    async with Engine(handler, node_config(url, "c1", handler, workers=2)) as eng:
        await _wait(lambda: _is(eng, PARTITIONS), "one node holding every partition")
        batch = items(n)
        calls0 = command_calls(r)
        t0 = time.perf_counter()
        await eng.submit_many(batch)
        await _wait(lambda: _delivered(eng, n), "delivery", DONE_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        ops = (command_calls(r) - calls0) / n
        stats = await _fresh_stats(eng, n)
    r.close()
    lat = stats["latency_start_s"]
    return Run(n, seconds, _ms(lat["p50"]), _ms(lat["p99"]), ops)


async def _is(eng: Engine, owned: int) -> bool:
    return await _owned(eng) == owned


async def _delivered(eng: Engine, n: int) -> bool:
    return bool(eng.stats()["delivered"] >= n)


async def cluster_two_run(url: str, handler: str, n: int, tmp: Path) -> Run:
    """Node A in process (submits), node B a service process; 1 worker each."""
    r = redis.Redis.from_url(url)
    b = start_service(
        tmp,
        ENGINE_BROKER=url,
        ENGINE_NAMESPACE="c2",
        ENGINE_PARTITIONS=str(PARTITIONS),
        ENGINE_WORKERS="1",
        ENGINE_HANDLER=handler,
        ENGINE_NODE_ID="c2-b",
        ENGINE_STATS_INTERVAL_S=str(STATS_INTERVAL_S),
        ENGINE_BROKER_READ_COUNT="64",
    )
    try:
        async with Engine(handler, node_config(url, "c2", handler, workers=1)) as eng:
            half = PARTITIONS // 2
            await _wait(lambda: _is(eng, half), "node A holding half the partitions")
            await _wait(lambda: _b_owns(b, half), "node B holding half the partitions")
            batch = items(n)
            calls0 = command_calls(r)
            t0 = time.perf_counter()
            await eng.submit_many(batch)

            async def both() -> bool:
                return bool(eng.stats()["delivered"] + b.stats()["delivered"] >= n)

            await _wait(both, "delivery on both nodes", DONE_TIMEOUT_S)
            seconds = time.perf_counter() - t0
            ops = (command_calls(r) - calls0) / n
            a_stats = await _fresh_stats(eng, eng.stats()["delivered"])
            b_stats = await asyncio.to_thread(_b_fresh_stats, b)
    finally:
        b.stop()
        r.close()
    split = [a_stats["delivered"], b_stats["delivered"]]
    assert sum(split) == n, split
    p50 = max(s["latency_start_s"]["p50"] for s in (a_stats, b_stats))
    p99 = max(s["latency_start_s"]["p99"] for s in (a_stats, b_stats))
    return Run(n, seconds, _ms(p50), _ms(p99), ops, {"delivered_by_node": split})


async def _b_owns(b: ServiceProc, owned: int) -> bool:
    stats = await asyncio.to_thread(b.stats)
    return len(stats["cluster"]["leases"]["owned"]) == owned


def _b_fresh_stats(b: ServiceProc) -> dict[str, Any]:
    deadline = time.monotonic() + REPORT_WAIT_S
    stats = b.stats()
    while time.monotonic() < deadline and stats["latency_start_s"]["count"] < stats["delivered"]:
        time.sleep(STATS_INTERVAL_S / 2)
        stats = b.stats()
    return stats


class Dramatiq:
    """Dramatiq workers on the benchmark's Redis (started once per handler case)."""

    def __init__(self, url: str, out: Path) -> None:
        if shutil.which("python3") is None:
            pytest.skip("no python3 for the dramatiq workers")
        self.url = url
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        env = os.environ | {
            "RINGWAY_BENCH_DRAMATIQ_URL": url,
            "RINGWAY_BENCH_DRAMATIQ_OUT": str(out),
            "PYTHONPATH": str(REPO),
        }
        os.environ["RINGWAY_BENCH_DRAMATIQ_URL"] = url  # this process sends with the same broker
        os.environ["RINGWAY_BENCH_DRAMATIQ_OUT"] = str(out)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dramatiq", "bench.dramatiq_actors",
             "--processes", str(DRAMATIQ_PROCESSES), "--threads", str(DRAMATIQ_THREADS)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        from bench import dramatiq_actors

        self.actors = dramatiq_actors
        self.r = redis.Redis.from_url(url)
        self._wait_workers()

    def _wait_workers(self) -> None:
        """Until every worker process answered one message (they import, then consume)."""
        self.run("noop", 50)

    def run(self, name: str, n: int) -> Run:
        actor = getattr(self.actors, name)
        for f in self.out.glob("*.lat"):
            f.write_bytes(b"")  # truncated, not unlinked: the workers append through open fds
        msgs_key = f"dramatiq:{self.actors.QUEUE}.msgs"
        calls0 = command_calls(self.r)
        t0 = time.perf_counter()
        share = [
            n // DRAMATIQ_SENDERS + (i < n % DRAMATIQ_SENDERS) for i in range(DRAMATIQ_SENDERS)
        ]
        senders = [
            threading.Thread(target=lambda k=k: [actor.send(time.time()) for _ in range(k)])
            for k in share
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        deadline = time.monotonic() + DONE_TIMEOUT_S
        while self.r.hlen(msgs_key) or self.r.llen(f"dramatiq:{self.actors.QUEUE}"):
            assert time.monotonic() < deadline, "dramatiq did not finish"
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
        ops = (command_calls(self.r) - calls0) / n
        lat = sorted(float(x) for f in self.out.glob("*.lat") for x in f.read_text().split() if x)
        assert len(lat) == n, (len(lat), n)
        p50 = lat[len(lat) // 2]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return Run(n, seconds, _ms(p50), _ms(p99), ops)

    def close(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.r.close()


@pytest.mark.parametrize("handler", ["noop", "io_1ms"])
def test_cluster(
    benchmark: BenchmarkFixture,
    group_tables: Tables,
    server: RedisServer,
    tmp_path: Path,
    handler: str,
) -> None:
    if not benchmark.enabled and handler != "noop":
        pytest.skip("smoke run: io_1ms runs with --benchmark-enable (noop covers the code)")
    n, n_dramatiq, rounds = sizes(benchmark, handler)
    spec = HANDLERS[handler]
    dq = Dramatiq(server.url, tmp_path / "dramatiq")
    try:
        sides: dict[str, Callable[[], Run]] = {
            "ringway": lambda: asyncio.run(cluster_two_run(server.url, spec, n, tmp_path)),
            "cluster_1_node": lambda: asyncio.run(cluster_one_run(server.url, spec, n)),
            "embedded": lambda: asyncio.run(embedded_run(spec, n)),
            "dramatiq": lambda: dq.run(handler, n_dramatiq),
        }
        runs = side_by_side(benchmark, sides, rounds)
    finally:
        dq.close()
    details = {
        side: {
            "p50_ms": statistics.median(r.p50_ms or 0 for r in rs),
            "p99_ms": statistics.median(r.p99_ms or 0 for r in rs),
            "redis_ops_per_msg": round(statistics.median(r.ops_per_msg for r in rs), 4),
            "messages": rs[0].messages,
            **({"extra": [r.extra for r in rs]} if any(r.extra for r in rs) else {}),
        }
        for side, rs in runs.items()
    }
    record_rates(benchmark, group_tables, TITLE, handler, runs, details=details)
    for side, d in details.items():
        note(
            benchmark,
            group_tables,
            TITLE,
            f"{handler} {side}: p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, "
            f"{d['redis_ops_per_msg']} Redis commands/msg",
        )


KNOBS = {  # side -> (ENGINE_PARTITIONS, ENGINE_BROKER_READ_COUNT, ENGINE_BATCH_SIZE)
    "ringway": (64, 16, 256),  # the defaults
    "partitions_16": (16, 16, 256),
    "read_count_4": (64, 4, 256),
    "read_count_64": (64, 64, 256),
    "batch_size_1024": (64, 16, 1024),
}


async def knob_run(url: str, n: int, partitions: int, read_count: int, batch: int) -> Run:
    """One in-process node (2 workers, no-op sink) with the given knobs, on its own namespace."""
    r = redis.Redis.from_url(url)
    ns = f"k{partitions}-{read_count}-{batch}"
    cfg = Config.from_env(
        {},
        broker=url,
        namespace=ns,
        partitions=partitions,
        workers=2,
        sink="null",
        node_id=ns,
        broker_read_count=read_count,
        batch_size=batch,
        stats_interval_s=STATS_INTERVAL_S,
    )
    async with Engine(None, cfg) as eng:
        await _wait(lambda: _is(eng, partitions), "one node holding every partition")
        batch_items = items(n)
        calls0 = command_calls(r)
        t0 = time.perf_counter()
        await eng.submit_many(batch_items)
        await _wait(lambda: _delivered(eng, n), "delivery", DONE_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        ops = (command_calls(r) - calls0) / n
        stats = await _fresh_stats(eng, n)
    r.close()
    lat = stats["latency_start_s"]
    return Run(n, seconds, _ms(lat["p50"]), _ms(lat["p99"]), ops)


def test_cluster_knobs(
    benchmark: BenchmarkFixture, group_tables: Tables, server: RedisServer
) -> None:
    """One node, null sink: what ENGINE_PARTITIONS, the read count and the entry size trade."""
    if not benchmark.enabled:
        pytest.skip("smoke run: the knob comparison runs with --benchmark-enable")
    n = 100_000
    sides: dict[str, Callable[[], Run]] = {
        side: lambda k=knobs: asyncio.run(knob_run(server.url, n, *k))
        for side, knobs in KNOBS.items()
    }
    runs = side_by_side(benchmark, sides, 3)
    title = "cluster knobs (1 node, null sink; ringway = P 64, read 16, batch 256)"
    record_rates(benchmark, group_tables, title, "knobs", runs)
    for side, rs in runs.items():
        note(
            benchmark,
            group_tables,
            title,
            f"{side} {KNOBS[side]}: p50 {statistics.median(r.p50_ms or 0 for r in rs)} ms, "
            f"p99 {statistics.median(r.p99_ms or 0 for r in rs)} ms, "
            f"{statistics.median(r.ops_per_msg for r in rs):.4f} Redis commands/msg",
        )
