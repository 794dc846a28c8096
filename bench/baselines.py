"""Queue baselines for the ring benchmark: the same Messages, encoded in one process
and decoded in another, through the queues a Python user would reach for first.

Everything but the transport is shared with the ring (`engine.stress.ringdemo`: templates,
id stamping, the id check, the two-process harness and its clock), so a ratio
between two results measures the transports, not the harnesses.

The queues are the standard library's ``multiprocessing.Queue`` (and its fork or
spawn context), not ``multiprocess``: multiprocess pickles through dill's
pure-Python pickler, which would slow the baseline and flatter the ring.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from engine.stress.ringdemo import (
    RingResult,
    Side,
    Workload,
    check_ids,
    fork_safe_context,
    make_templates,
    run_pair,
    stamped,
)
from ipc.codec import decode, decode_batch, encode, encode_batch

FIFO_BYTES = 1 << 22  # faster-fifo's circular buffer: the same 4 MiB the ring gets
FIFO_TIMEOUT_S = 60.0  # per blocking call; the harness bounds the whole run anyway


def _per_put_producer(work: Workload, q: Any, barrier: Any) -> Side:
    """One put per message: what a naive multiprocessing design does."""
    templates = make_templates(work)
    put = q.put
    barrier.wait()
    start = time.monotonic_ns()
    sent = written = 0
    for msgs in stamped(templates, work.messages):
        for m in msgs:
            item = encode(m)
            put(item)
            written += len(item)
        sent += len(msgs)
    return Side(start, sent, written)


def _per_put_consumer(work: Workload, q: Any, barrier: Any) -> Side:
    get = q.get
    barrier.wait()
    expected = read = 0
    while expected < work.messages:
        item = get()
        expected = check_ids([decode(item)], expected)
        read += len(item)
    return Side(time.monotonic_ns(), expected, read)


def _batched_producer(work: Workload, q: Any, barrier: Any) -> Side:
    """One put per encoded batch: the same framing the ring uses."""
    templates = make_templates(work)
    barrier.wait()
    start = time.monotonic_ns()
    sent = written = 0
    for msgs in stamped(templates, work.messages):
        frame = encode_batch(msgs)
        q.put(frame)
        sent += len(msgs)
        written += len(frame)
    return Side(start, sent, written)


def _batched_consumer(work: Workload, q: Any, barrier: Any) -> Side:
    barrier.wait()
    expected = read = 0
    while expected < work.messages:
        frame = q.get()
        expected = check_ids(decode_batch(frame), expected)
        read += len(frame)
    return Side(time.monotonic_ns(), expected, read)


def _fifo_producer(work: Workload, q: Any, barrier: Any) -> Side:
    """put_many of one encoded message per item, ``batch`` items per call."""
    templates = make_templates(work)
    barrier.wait()
    start = time.monotonic_ns()
    sent = written = 0
    for msgs in stamped(templates, work.messages):
        items = [encode(m) for m in msgs]
        q.put_many(items, timeout=FIFO_TIMEOUT_S)
        sent += len(items)
        written += sum(map(len, items))
    return Side(start, sent, written)


def _fifo_consumer(work: Workload, q: Any, barrier: Any) -> Side:
    barrier.wait()
    expected = read = 0
    while expected < work.messages:
        items = q.get_many(timeout=FIFO_TIMEOUT_S, max_messages_to_get=work.batch * 16)
        expected = check_ids([decode(b) for b in items], expected)
        read += sum(map(len, items))
    return Side(time.monotonic_ns(), expected, read)


def measure_mpqueue_per_put(
    messages: int, batch: int = 256, payload_bytes: int = 100
) -> RingResult:
    """multiprocessing.Queue, one message per put (``batch`` only shapes the templates)."""
    ctx = fork_safe_context(multiprocessing)
    work = Workload(messages, batch, payload_bytes)
    q = ctx.Queue()
    try:
        return run_pair(ctx, _per_put_producer, _per_put_consumer, work, q)
    finally:
        q.close()


def measure_mpqueue_batched(
    messages: int, batch: int = 256, payload_bytes: int = 100
) -> RingResult:
    """multiprocessing.Queue, one put per encoded batch of ``batch`` messages."""
    ctx = fork_safe_context(multiprocessing)
    work = Workload(messages, batch, payload_bytes)
    q = ctx.Queue()
    try:
        return run_pair(ctx, _batched_producer, _batched_consumer, work, q)
    finally:
        q.close()


def measure_faster_fifo(messages: int, batch: int = 256, payload_bytes: int = 100) -> RingResult:
    """faster-fifo put_many/get_many; raises ImportError when faster-fifo is missing."""
    import faster_fifo  # optional: only this baseline needs it, so import it here

    ctx = fork_safe_context(multiprocessing)
    work = Workload(messages, batch, payload_bytes)
    q = faster_fifo.Queue(max_size_bytes=FIFO_BYTES)
    try:
        return run_pair(ctx, _fifo_producer, _fifo_consumer, work, q)
    finally:
        q.close()


Medians = dict[str, dict[str, float]]  # table title -> case -> median msgs/s
RING_CASE = "ringway_ring"
BAR_MSGS_PER_S = 2_000_000  # the bar for the ring, encode to decode
BAR_RATIO = 10.0  # ... and its bar against multiprocessing.Queue one message per put


def ratio_lines(medians: dict[str, float], *, bars: bool = True) -> list[str]:
    """The medians, the ring's ratio to each baseline and the issue's bars, as text.

    The bars are reported, never asserted: on a shared 2-core machine a noisy
    neighbour would make a speed assertion fail for reasons unrelated to the code.
    """
    lines = [f"  {case:<22} {rate:>12,.0f} msgs/s" for case, rate in medians.items()]
    ring = medians.get(RING_CASE)
    if ring is None:
        return lines
    for case, rate in medians.items():
        if case != RING_CASE and rate > 0:
            lines.append(f"  ring / {case} = {ring / rate:.1f}x")
    if not bars:
        return lines
    per_put = medians.get("mpqueue_per_put")
    met = "met" if ring >= BAR_MSGS_PER_S else "MISSED"
    text = f"  bars (reported, not asserted): ring >= {BAR_MSGS_PER_S:,} msgs/s: {met}"
    if per_put:
        text += f"; ring >= {BAR_RATIO:.0f}x mpqueue_per_put: "
        text += "met" if ring >= BAR_RATIO * per_put else "MISSED"
    return [*lines, text]
