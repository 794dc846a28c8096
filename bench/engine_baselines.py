"""The engine benchmark's baseline and its summary table.

The baseline is the original design, before Ringway: one process, one
``asyncio.PriorityQueue``, the producer puts ``(priority, seq, message)`` and a
single consumer coroutine takes one message at a time and calls the handler
(awaits it, when it is an ``async def``) before it takes the next.  It builds the
same `ipc.codec.Message` the engine's handlers get, from the same items, and is
timed the same way: from the first submit to the moment the last message has
been handled.  It never encodes anything: in one process nothing needs to be.

The queue is bounded (``QUEUE_MAX``), which is the baseline's best case: the
producer then waits for the consumer and the heap stays small.  Unbounded, with
a whole 400,000-message run queued before the consumer starts, heap operations
on the deep heap halve its rate (about 265,000 against 540,000 msgs/s here with
a no-op handler), and the comparison would flatter Ringway.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.stress.ringdemo import fork_safe_context
from ipc.codec import Message, Priority

Item = tuple[str, msgspec.Raw]  # (recipient, pre-packed payload), as given to submit_many
QUEUE_MAX = 256  # the engine's batch size; 1,000 measured ~10% slower, unbounded ~50%


class BaselineRun(msgspec.Struct, frozen=True):
    """One timed baseline run."""

    messages: int
    handled: int
    seconds: float
    msgs_per_s: float


class PriorityQueueBroker:
    """The original design's broker: one PriorityQueue, one sequential consumer.

    Subclasses change ``CONSUMERS`` and ``_consume`` (bench.design_baselines).
    """

    CONSUMERS = 1

    def __init__(self, handler: Callable[[Message], Any], maxsize: int = QUEUE_MAX) -> None:
        self.handler = handler
        self.queue: asyncio.PriorityQueue[tuple[int, int, Message]] = asyncio.PriorityQueue(maxsize)
        self.seq = itertools.count(1)
        self.handled = 0
        self.consumers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.consumers = [loop.create_task(self._consume()) for _ in range(self.CONSUMERS)]

    async def submit(
        self, recipient: str, payload: msgspec.Raw, priority: Priority = Priority.NORMAL
    ) -> int:
        seq = next(self.seq)
        msg = Message(seq, recipient, payload=payload, created_ns=time.monotonic_ns())
        await self.queue.put((priority, seq, msg))
        return seq

    async def submit_many(self, items: Sequence[Item]) -> None:
        for recipient, payload in items:
            await self.submit(recipient, payload)

    async def _consume(self) -> None:
        get, done, handler = self.queue.get, self.queue.task_done, self.handler
        if inspect.iscoroutinefunction(handler):
            while True:
                _, _, msg = await get()
                await handler(msg)
                self.handled += 1
                done()
        while True:
            _, _, msg = await get()
            handler(msg)
            self.handled += 1
            done()

    async def drain(self) -> None:
        await self.queue.join()

    async def stop(self) -> None:
        for task in self.consumers:
            task.cancel()
        await asyncio.gather(*self.consumers, return_exceptions=True)


async def measure_priority_queue(
    handler: Callable[[Message], Any],
    items: Sequence[Item],
    broker_type: type[PriorityQueueBroker] = PriorityQueueBroker,
) -> BaselineRun:
    """Submit every item, wait until each is handled; the clock covers exactly that."""
    broker = broker_type(handler)
    broker.start()
    try:
        t0 = time.perf_counter()
        await broker.submit_many(items)
        await broker.drain()
        seconds = time.perf_counter() - t0
    finally:
        await broker.stop()
    return BaselineRun(len(items), broker.handled, seconds, len(items) / seconds)


def _spin_calls(handler: Callable[[Message], Any], calls: int, barrier: Any, out: Any) -> None:
    msg = Message(0, "Agent-0")
    barrier.wait()
    start = time.monotonic()
    for _ in range(calls):
        handler(msg)
    out.put((start, time.monotonic()))


def measure_parallel_ceiling(
    handler: Callable[[Message], Any], calls_per_process: int, processes: int = 2
) -> BaselineRun:
    """``processes`` bare processes calling a sync handler in a loop, no engine at all.

    What this machine gives a CPU-bound handler on that many cores right now: the
    ceiling of the engine's rate, and the scaling a noisy neighbour left us.
    Timed from the earliest start to the latest end (the processes meet at a
    barrier first, so process start-up is outside the clock).
    """
    ctx = fork_safe_context(multiprocessing)
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_spin_calls, args=(handler, calls_per_process, barrier, out))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        spans = [out.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.exitcode is None:
                p.kill()
    total = calls_per_process * processes
    seconds = max(end for _, end in spans) - min(start for start, _ in spans)
    return BaselineRun(total, total, seconds, total / seconds)


# -- the summary ------------------------------------------------------------------


@dataclass
class Bar:
    """The issue's bar for one case: a rate, a ratio to the baseline, or both."""

    min_msgs_per_s: float | None = None
    min_ratio: float | None = None

    def verdicts(self, ringway: float, ratio: float | None) -> list[str]:
        out = []
        if self.min_msgs_per_s is not None:
            met = "met" if ringway >= self.min_msgs_per_s else "MISSED"
            out.append(f">= {self.min_msgs_per_s:,.0f}/s {met}")
        if self.min_ratio is not None and ratio is not None:
            met = "met" if ratio >= self.min_ratio else "MISSED"
            out.append(f">= {self.min_ratio:g}x {met}")
        return out


BARS: dict[str, Bar] = {
    "noop_null": Bar(500_000, 1.0),
    "noop_python": Bar(500_000, 1.0),
    "cpu_50us": Bar(None, 1.7),
    "io_mock_1ms": Bar(100_000, 100.0),
    "io_python_1ms": Bar(100_000, 100.0),
}


@dataclass
class EngineSummary:
    """What the engine benchmark shows at the end of the run (filled as cases finish)."""

    title: str = ""
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)  # case -> (ring, base)
    cpu: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    """case -> role (dispatcher, workers, monitor) -> (cores busy, CPU µs per message)."""
    ceilings: dict[str, float] = field(default_factory=dict)  # case -> bare-process msgs/s
    latency: dict[str, float] = field(default_factory=dict)
    rss_mib: dict[str, list[float]] = field(default_factory=dict)  # case -> per worker


def summary_lines(s: EngineSummary) -> list[str]:
    """Medians, ratios and the bars (reported, never asserted) as text lines."""
    lines = [
        f"  {'case':<15} {'ringway msgs/s':>15} {'baseline msgs/s':>16} {'ratio':>8}  bars",
    ]
    for case, (ring, base) in s.rates.items():
        ratio = ring / base if base > 0 else None
        bars = BARS[case].verdicts(ring, ratio) if case in BARS else []
        ratio_text = f"{ratio:.2f}x" if ratio is not None else "-"
        lines.append(
            f"  {case:<15} {ring:>15,.0f} {base:>16,.0f} {ratio_text:>8}  {'; '.join(bars)}"
        )
    for case, ceiling in s.ceilings.items():
        ring, base = s.rates.get(case, (0.0, 0.0))
        scaling = f" = {ceiling / base:.2f}x the baseline" if base else ""
        lines.append(
            f"  {case}: 2 bare processes calling the handler in a loop: {ceiling:,.0f} msgs/s"
            f"{scaling} (this machine's ceiling for the ratio, right now)"
        )
    if s.cpu:
        lines.append(
            "  where the CPU went in Ringway's runs (cores busy, CPU µs per message delivered;"
            " others = the rest of the machine):"
        )
    for case, roles in s.cpu.items():
        busy = ", ".join(
            f"{role} {c:.2f}" + ("" if role == "others" else f" ({us:.1f} µs)")
            for role, (c, us) in roles.items()
        )
        lines.append(f"    {case:<15} {busy}")
    if s.latency:
        lat = s.latency
        lines.append(
            f"  submit->handler-start latency at {lat['offered_msgs_per_s']:,.0f} msgs/s offered"
            f" (target {lat['target_msgs_per_s']:,.0f}): p50 {lat['p50_s'] * 1e3:.2f} ms,"
            f" p99 {lat['p99_s'] * 1e3:.2f} ms, max {lat['max_s'] * 1e3:.2f} ms"
        )
    for case, rss in s.rss_mib.items():
        per_worker = ", ".join(f"w{i} {mib:.1f}" for i, mib in enumerate(rss))
        lines.append(f"  worker RSS (MiB) after {case}: {per_worker}")
    lines.append("  bars are reported, never asserted")
    return lines
