"""The ring against the queues a Python user would reach for, encode to decode.

Each case moves the same Messages from a producer process to a consumer process
(engine.stress.ringdemo and bench.baselines share every line but the transport) and
reports msgs/s measured from the producer's start to the consumer's last decode,
in ``extra_info["msgs_per_s"]`` (median over the rounds).  pytest-benchmark's own
time column is the whole call, process start-up included: compare msgs/s.

Speed is reported, never asserted.  With benchmarks disabled (the default run,
see pyproject addopts) every case runs once at a tiny size as a smoke test.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from importlib.util import find_spec
from typing import TYPE_CHECKING

import pytest

from bench.baselines import (
    Medians,
    measure_faster_fifo,
    measure_mpqueue_batched,
    measure_mpqueue_per_put,
    ratio_lines,
)
from engine.stress.ringdemo import RingResult, measure_ring

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

Measure = Callable[[int, int, int], RingResult]

CASES: dict[str, Measure] = {
    "ringway_ring": measure_ring,
    "mpqueue_per_put": measure_mpqueue_per_put,
    "mpqueue_batched": measure_mpqueue_batched,
    "faster_fifo_put_many": measure_faster_fifo,
}
BATCH = 256
PAYLOAD_BYTES = 100
ROUNDS = 5
# Sizes that take about 0.4-1.5 s a round here; slow transports get fewer
# messages, since msgs/s, not total time, is what is compared.
FULL_MESSAGES = {
    "ringway_ring": 1_000_000,
    "mpqueue_per_put": 200_000,
    "mpqueue_batched": 1_000_000,
    "faster_fifo_put_many": 200_000,
}
SIDE_BY_SIDE_ROUNDS = 3
SIDE_BY_SIDE_MESSAGES = {case: n // 4 for case, n in FULL_MESSAGES.items()}
SMOKE_MESSAGES = 20_000


def check_results(runs: list[RingResult], messages: int) -> None:
    """What the consumer counted: every message (ids checked in order as they came), and
    every byte the producer wrote; a run that took no time measured nothing."""
    for r in runs:
        assert r.messages == messages, f"the consumer decoded {r.messages} of {messages}"
        assert r.bytes_received == r.bytes_sent, f"{r.bytes_received} of {r.bytes_sent} bytes"
        assert r.bytes_received >= messages * PAYLOAD_BYTES, r
        assert r.seconds > 0 and r.msgs_per_s == r.messages / r.seconds, r


def _available(case: str) -> bool:
    return case != "faster_fifo_put_many" or find_spec("faster_fifo") is not None


def _mode(benchmark: BenchmarkFixture) -> str:
    return "smoke sizes, NOT a measurement" if benchmark.disabled else "full sizes"


@pytest.mark.benchmark(group="ring-transport")
@pytest.mark.parametrize("case", list(CASES))
def test_transport(benchmark: BenchmarkFixture, transport_results: Medians, case: str) -> None:
    if not _available(case):
        pytest.skip("faster-fifo is not installed")
    messages = SMOKE_MESSAGES if benchmark.disabled else FULL_MESSAGES[case]
    runs: list[RingResult] = []

    def once() -> None:
        runs.append(CASES[case](messages, BATCH, PAYLOAD_BYTES))

    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)  # type: ignore[no-untyped-call]
    rates = [r.msgs_per_s for r in runs]
    median = statistics.median(rates)
    benchmark.extra_info.update(
        msgs_per_s=median,
        msgs_per_s_rounds=rates,
        messages=messages,
        batch=BATCH,
        payload_bytes=PAYLOAD_BYTES,
    )
    if benchmark.enabled:  # smoke-size figures would only be noise in a test run's summary
        title = f"group, median of {ROUNDS} rounds per case"
        transport_results.setdefault(title, {})[case] = median
    check_results(runs, messages)


@pytest.mark.benchmark(group="ring-ratios")
def test_ratios(benchmark: BenchmarkFixture, transport_results: Medians) -> None:
    """All cases interleaved round by round, so a noisy spell hits them alike."""
    cases = [case for case in CASES if _available(case)]
    rounds = 1 if benchmark.disabled else SIDE_BY_SIDE_ROUNDS
    sizes = {c: SMOKE_MESSAGES if benchmark.disabled else SIDE_BY_SIDE_MESSAGES[c] for c in cases}
    runs: dict[str, list[RingResult]] = {case: [] for case in cases}

    def side_by_side() -> None:
        for _ in range(rounds):
            for case in cases:
                runs[case].append(CASES[case](sizes[case], BATCH, PAYLOAD_BYTES))

    benchmark.pedantic(side_by_side, rounds=1, iterations=1)  # type: ignore[no-untyped-call]
    medians = {case: statistics.median(r.msgs_per_s for r in rs) for case, rs in runs.items()}
    benchmark.extra_info.update(msgs_per_s=medians, rounds=rounds, messages=sizes)
    title = f"side by side, {rounds} interleaved round(s) ({_mode(benchmark)})"
    if benchmark.enabled:
        transport_results[title] = medians
    print(
        f"\nring-transport, median msgs/s, {title}:",
        *ratio_lines(medians, bars=benchmark.enabled),
        sep="\n",
    )
    for case, rs in runs.items():
        check_results(rs, sizes[case])
