"""The benchmarks' own checks can fail: each is fed a result that is wrong in its way.

A benchmark that only compares its result with the request it echoes, or asserts
nothing of its own, passes whatever the engine does.  These tests hand each check
a broken result (a consumer that stopped halfway, lanes that do not overtake, a
histogram that misses deliveries) and expect it to refuse it.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from bench.bench_engine import WORKERS, LatencyRun, check_latency_run
from bench.bench_priority_latency import check_priority_order
from bench.bench_ring import check_results
from engine.stress.ringdemo import (
    RingResult,
    Side,
    Workload,
    _ring_producer,
    check_ids,
    fork_safe_context,
    measure_ring,
    run_pair,
)
from ipc.codec import decode_batch
from ipc.ring import Ring, RingConsumer, RingSpec
from ipc.shm import new_engine_prefix
from ipc.wake import EventFd

MESSAGES = 2_000  # a few hundred KB: the producer never waits for the half-read ring


def half_consumer(work: Workload, spec: RingSpec, barrier: Any) -> Side:
    """Reads frames until it has half the messages, then reports as if done: a transport
    that lost the rest."""
    ring = Ring.attach(spec.name)
    try:
        consumer = RingConsumer(ring, spec.data_ready, spec.space_ready)
        barrier.wait()
        got = read = 0
        while got < work.messages // 2:
            frames, _ = consumer.drain()
            if not frames:
                consumer.wait(1.0)
            for frame in frames:
                got = check_ids(decode_batch(frame), got)
                read += len(frame)
                if got >= work.messages // 2:
                    break
        return Side(time.monotonic_ns(), got, read)
    finally:
        ring.close()


def measure_with(consumer: Any) -> RingResult:
    ring = Ring.create(new_engine_prefix() + "check", 1 << 22)
    spec = RingSpec(ring.segment.name, EventFd(), EventFd())
    try:
        work = Workload(MESSAGES, 256, 100)
        return run_pair(fork_safe_context(), _ring_producer, consumer, work, spec)
    finally:
        ring.close()
        spec.data_ready.close()
        spec.space_ready.close()


def test_ring_check_passes_a_real_run() -> None:
    check_results([measure_ring(MESSAGES)], MESSAGES)


def test_ring_check_refuses_a_consumer_that_stopped_halfway() -> None:
    result = measure_with(half_consumer)
    assert result.messages < MESSAGES  # the consumer's count, not the request's
    with pytest.raises(AssertionError, match=f"the consumer decoded {result.messages} of"):
        check_results([result], MESSAGES)


def test_priority_check_refuses_lanes_that_do_not_overtake() -> None:
    check_priority_order("ringway", {"critical": 0.01, "high": 0.01, "normal": 0.2, "low": 0.1})
    with pytest.raises(AssertionError, match=r"critical probes took 50\.0 ms"):
        check_priority_order("ringway", {"critical": 0.05, "high": 0.05, "normal": 0.05, "low": 0})


def latency_run(**changes: Any) -> LatencyRun:
    lat = {"p50": 0.001, "p95": 0.002, "p99": 0.003, "max": 0.01, "count": 1000}
    base = LatencyRun(
        messages=1000,
        offered_msgs_per_s=50_000.0,
        max_tick_lag_s=0.0,
        latency_start_s=lat,
        rss_steady_bytes=[1 << 20] * WORKERS,
        rss_after_bytes=[1 << 20] * WORKERS,
    )
    return msgspec.structs.replace(base, **changes)


def test_latency_check_refuses_a_histogram_missing_deliveries() -> None:
    check_latency_run(latency_run(), 1000)
    short = {"p50": 0.001, "p95": 0.002, "p99": 0.003, "max": 0.01, "count": 990}
    with pytest.raises(AssertionError, match="start latency of 990 of 1000"):
        check_latency_run(latency_run(latency_start_s=short), 1000)
    unordered = {"p50": 0.003, "p95": 0.002, "p99": 0.003, "max": 0.01, "count": 1000}
    with pytest.raises(AssertionError):
        check_latency_run(latency_run(latency_start_s=unordered), 1000)
    with pytest.raises(AssertionError):
        check_latency_run(latency_run(rss_steady_bytes=[]), 1000)
