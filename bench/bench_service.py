"""Client process -> service over loopback TCP (and HTTP), against the embedded engine.

The service runs as its own process (``engine serve``, mock sink with no delay,
2 workers); this process is the client.  Measured in one run, side by side:

- ``tcp_submit_many``: `engine.client.AsyncClient.submit_many` of the whole run
  (frames of 1,000, pipelined); msgs/s from the first submit until the service
  reports every message delivered.
- ``tcp_ack_latency``: one 1,000-message frame at a time, each awaited: the
  round trip from submit to ack (the messages are in a ring), p50/p99.
- ``http_post``: ``POST /v1/messages`` with arrays of 1,000 messages, 4 requests
  in flight (aiohttp client).
- ``embedded``: the same messages through ``Engine.submit_many`` in this process,
  no sockets (the baseline: what the ingress costs is the ratio).

Speed is reported, never asserted; correctness (every message delivered) is.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop
from pytest_benchmark.fixture import BenchmarkFixture

from engine import Config, Engine
from engine.client import AsyncClient
from tests.integration.service_proc import ServiceProc, running_service

FRAME = 1_000
AGENTS = [f"Agent-{i}" for i in range(1, 10)]
PAYLOAD = msgspec.Raw(msgspec.msgpack.encode({"n": 1, "text": "x" * 60}))  # ~80 bytes


def sizes(benchmark: BenchmarkFixture) -> tuple[int, int]:
    """(messages per run, rounds): tiny in the default test run, real with --benchmark-enable."""
    if not benchmark.enabled:
        return 20_000, 1
    return 500_000, 3


def items(n: int) -> list[tuple[str, msgspec.Raw]]:
    return [(AGENTS[i % len(AGENTS)], PAYLOAD) for i in range(n)]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    tmp: Path = tmp_path_factory.mktemp("bench-service")
    with running_service(tmp, ENGINE_SINK="mock", ENGINE_WORKERS="2") as svc:
        yield svc


def _wait_delivered(svc: ServiceProc, target: int) -> dict[str, Any]:
    return svc.wait_stats(lambda s: s["delivered"] >= target and s["in_flight"] == 0)


async def _tcp_run(url: str, batch: list[tuple[str, msgspec.Raw]]) -> float:
    async with AsyncClient(url) as client:
        started = time.perf_counter()
        await client.submit_many(batch)
        await client.flush()
        return time.perf_counter() - started


async def _ack_latencies(url: str, batch: list[tuple[str, msgspec.Raw]]) -> list[float]:
    out = []
    async with AsyncClient(url) as client:
        for i in range(0, len(batch), FRAME):
            t = time.perf_counter()
            await client.submit_many(batch[i : i + FRAME])
            out.append(time.perf_counter() - t)
    return out


async def _http_run(base: str, n: int) -> float:
    import aiohttp

    body = msgspec.json.encode(
        [{"recipient": AGENTS[i % len(AGENTS)], "payload": {"n": i}} for i in range(FRAME)]
    )
    sem = asyncio.Semaphore(4)
    async with aiohttp.ClientSession() as session:

        async def post() -> None:
            async with (
                sem,
                session.post(
                    f"{base}/v1/messages", data=body, headers={"Content-Type": "application/json"}
                ) as resp,
            ):
                assert resp.status == 202, await resp.text()
                assert len((await resp.json())["ids"]) == FRAME

        started = time.perf_counter()
        await asyncio.gather(*(post() for _ in range(n // FRAME)))
        return time.perf_counter() - started


async def _embedded_run(batch: list[tuple[str, msgspec.Raw]]) -> float:
    config = Config.from_env(env={}, sink="mock", workers=2)
    async with Engine(None, config) as eng:
        started = time.perf_counter()
        await eng.submit_many(batch)
        assert await eng.drain(120)
        elapsed = time.perf_counter() - started
        assert eng.stats()["delivered"] == len(batch)
    return elapsed


@pytest.mark.benchmark(group="service-ingress")
def test_service_ingress(benchmark: BenchmarkFixture, service: ServiceProc) -> None:
    n, rounds = sizes(benchmark)
    batch = items(n)
    rates: dict[str, list[float]] = {"tcp": [], "http": [], "embedded": []}
    ack_ms: list[float] = []

    def one_round() -> None:
        before = service.stats()["delivered"]
        submitted = time.perf_counter()
        uvloop.run(_tcp_run(service.url, batch))
        _wait_delivered(service, before + n)
        rates["tcp"].append(n / (time.perf_counter() - submitted))
        before += n
        acks = uvloop.run(_ack_latencies(service.url, batch[: min(n, 50 * FRAME)]))
        ack_ms.extend(a * 1e3 for a in acks)
        before += min(n, 50 * FRAME)
        _wait_delivered(service, before)
        started = time.perf_counter()
        uvloop.run(_http_run(service.http_url, n // 5))
        _wait_delivered(service, before + n // 5 // FRAME * FRAME)
        rates["http"].append(n // 5 // FRAME * FRAME / (time.perf_counter() - started))
        rates["embedded"].append(n / uvloop.run(_embedded_run(batch)))

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ack_sorted = sorted(ack_ms)
    benchmark.extra_info.update(
        {
            "messages": n,
            "tcp_msgs_per_s": round(med["tcp"]),
            "http_msgs_per_s": round(med["http"]),
            "embedded_msgs_per_s": round(med["embedded"]),
            "tcp_over_embedded": round(med["tcp"] / med["embedded"], 3),
            "ack_frame_p50_ms": round(ack_sorted[len(ack_sorted) // 2], 3),
            "ack_frame_p99_ms": round(ack_sorted[int(len(ack_sorted) * 0.99)], 3),
            "rounds_tcp": [round(r) for r in rates["tcp"]],
        }
    )
    print(f"\nservice-ingress: {benchmark.extra_info}")
    stats = service.stats()
    assert stats["in_flight"] == 0
    assert stats["submitted"] == stats["delivered"], stats
