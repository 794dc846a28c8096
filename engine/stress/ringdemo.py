"""Throughput of one shared-memory ring between two processes, encode to decode.

``engine demo`` shows on the user's own machine what the transport under every
worker carries before any handler runs.  The benchmark suite (bench/) reuses the
message building, id check and two-process harness below, so the ring and the
queue baselines pay exactly the same overheads and only the transport differs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import multiprocess
from multiprocess.connection import wait as wait_any

from ipc.codec import Message, decode_batch, encode_batch, now_ns, pack_payload
from ipc.errors import EngineError
from ipc.ring import Ring, RingConsumer, RingProducer, RingSpec
from ipc.shm import EngineLock, new_engine_prefix
from ipc.wake import EventFd

TEMPLATES = 4  # distinct prebuilt batches, cycled so the encoder never sees one hot list
CHILD_TIMEOUT_S = 600.0  # a measurement still running after this has hung
WAKE_TIMEOUT_S = 1.0  # an idle consumer sleeps on the eventfd at most this long per wait

Role = Callable[["Workload", Any, Any], "Side"]
"""One side of a measurement: ``role(workload, channel, barrier)`` -> what it saw."""


class Workload(msgspec.Struct, frozen=True):
    """What to send: shared by both sides of a measurement and reported with its result."""

    messages: int
    batch: int = 256
    payload_bytes: int = 100


class Side(msgspec.Struct, frozen=True):
    """What one side of a measurement saw, counted by that side itself."""

    ns: int  # CLOCK_MONOTONIC: the producer's start, or the consumer's end
    messages: int  # written, or decoded with every id checked in order
    bytes: int  # encoded bytes written or read (ring frames, queue items)


class RingResult(msgspec.Struct, frozen=True):
    """One measured run: how many messages crossed, how long it took, with what setup.

    ``messages`` and ``bytes_received`` are the consumer's own counts, so a check
    on them is a check on what crossed, not on the request.
    """

    messages: int
    seconds: float
    msgs_per_s: float
    batch: int
    payload_bytes: int
    bytes_sent: int
    bytes_received: int


def make_templates(work: Workload) -> list[list[Message]]:
    """Build a few batches once, so the timed loop only stamps ids and encodes."""
    payload = pack_payload(b"x" * work.payload_bytes)
    return [
        [
            Message(
                id=0,
                recipient=f"user-{(t * work.batch + i) % 1000}",
                sender="demo",
                payload=payload,
                created_ns=now_ns(),
            )
            for i in range(work.batch)
        ]
        for t in range(TEMPLATES)
    ]


def stamped(templates: list[list[Message]], messages: int) -> Iterator[list[Message]]:
    """Yield the templates in turn with ids 0..messages-1 stamped in place.

    A yielded list is reused: encode it before asking for the next one.
    """
    batch = len(templates[0])
    for k, first in enumerate(range(0, messages, batch)):
        msgs = templates[k % len(templates)]
        if messages - first < batch:
            msgs = msgs[: messages - first]
        for i, m in enumerate(msgs, first):
            m.id = i
        yield msgs


def check_ids(msgs: list[Message], expected: int) -> int:
    """Raise unless the ids run expected, expected+1, ...; return the next expected id.

    A count alone would miss a lost batch followed by a duplicated one.
    """
    n = len(msgs)
    if [m.id for m in msgs] != list(range(expected, expected + n)):
        got = [m.id for m in msgs[:3]]
        raise EngineError(f"messages lost or out of order: expected ids {expected}.., got {got}")
    return expected + n


def fork_safe_context(lib: Any = multiprocess) -> Any:
    """fork starts fastest but is only safe from a single-threaded parent (ARCHITECTURE.md)."""
    return lib.get_context("fork" if threading.active_count() == 1 else "spawn")


def _child(role: Role, work: Workload, channel: Any, barrier: Any, conn: Any) -> None:
    """Run one side; send ("ok", Side) or ("error", text) and exit 1 on failure."""
    try:
        conn.send(("ok", role(work, channel, barrier)))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    finally:
        conn.close()


def _report(conn: Any) -> tuple[str, Any]:
    """What a finished child sent, or why there is nothing (it died before sending)."""
    try:
        status, value = conn.recv() if conn.poll() else ("error", "no report")
    except EOFError:
        return ("error", "died without a report")
    return str(status), value


def run_pair(
    ctx: Any,
    producer: Role,
    consumer: Role,
    work: Workload,
    channel: Any,
    *,
    timeout: float = CHILD_TIMEOUT_S,
) -> RingResult:
    """Time from the producer's start to the consumer's last decode, in two processes.

    Both sides set up, meet at a barrier, then the producer returns its start and
    the consumer its end (CLOCK_MONOTONIC is machine-wide, so they compare), each
    with what it counted.  When one side fails the other is terminated, never
    waited on forever.
    """
    barrier = ctx.Barrier(2)
    procs, conns = [], []
    for role in (consumer, producer):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child,
            args=(role, work, channel, barrier, send),
            name=role.__name__,
            daemon=True,
        )
        proc.start()
        send.close()
        procs.append(proc)
        conns.append(recv)
    stamps: dict[int, Side] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(stamps) < len(procs):
            ready = wait_any([p.sentinel for p in procs], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise EngineError(f"{work.messages:,} messages took over {timeout}s: hung?")
            for k, (proc, conn) in enumerate(zip(procs, conns, strict=True)):
                if k not in stamps and proc.sentinel in ready:
                    proc.join()
                    status, value = _report(conn)
                    if proc.exitcode != 0 or status != "ok":
                        raise EngineError(f"{proc.name} exited {proc.exitcode}: {value}")
                    stamps[k] = value
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for conn in conns:
            conn.close()
    got, sent = stamps[0], stamps[1]  # the consumer's end, the producer's start
    if got.ns <= sent.ns:
        raise EngineError(
            f"the consumer ended ({got.ns} ns) before the producer started "
            f"({sent.ns} ns): the sides did not share a clock or a barrier"
        )
    seconds = (got.ns - sent.ns) / 1e9
    return RingResult(
        messages=got.messages,
        seconds=seconds,
        msgs_per_s=got.messages / seconds,
        batch=work.batch,
        payload_bytes=work.payload_bytes,
        bytes_sent=sent.bytes,
        bytes_received=got.bytes,
    )


def _ring_producer(work: Workload, spec: RingSpec, barrier: Any) -> Side:
    """Encode each batch into one frame and write it, sleeping while the ring is full."""
    ring = Ring.attach(spec.name)
    try:
        producer = RingProducer(ring, spec.data_ready, spec.space_ready)
        templates = make_templates(work)
        barrier.wait()
        start = time.monotonic_ns()
        sent = written = 0
        for msgs in stamped(templates, work.messages):
            frame = encode_batch(msgs)
            producer.write([frame])
            sent += len(msgs)
            written += len(frame)
        return Side(start, sent, written)
    finally:
        ring.close()


def _ring_consumer(work: Workload, spec: RingSpec, barrier: Any) -> Side:
    """Drain, decode and check every frame, commit after each drain; sleep when empty."""
    ring = Ring.attach(spec.name)
    try:
        consumer = RingConsumer(ring, spec.data_ready, spec.space_ready)
        barrier.wait()
        expected = read = 0
        while expected < work.messages:
            frames, _ = consumer.drain()
            if not frames:
                consumer.wait(WAKE_TIMEOUT_S)
                continue
            for frame in frames:
                expected = check_ids(decode_batch(frame), expected)
                read += len(frame)
            consumer.commit()
        return Side(time.monotonic_ns(), expected, read)
    finally:
        ring.close()


def measure_ring(
    messages: int, batch: int = 256, payload_bytes: int = 100, ring_bytes: int = 1 << 22
) -> RingResult:
    """Push ``messages`` through one ring, producer and consumer in two processes."""
    if messages < 1 or batch < 1 or payload_bytes < 0:
        raise ValueError("messages and batch must be >= 1 and payload_bytes >= 0")
    prefix = new_engine_prefix()
    lock = EngineLock.acquire(prefix)  # so a crashed demo's ring is swept like an engine's
    try:
        ring = Ring.create(prefix + "demo", ring_bytes)
        spec = RingSpec(ring.segment.name, EventFd(), EventFd())
        try:
            work = Workload(messages, batch, payload_bytes)
            return run_pair(fork_safe_context(), _ring_producer, _ring_consumer, work, spec)
        finally:
            ring.close()
            spec.data_ready.close()
            spec.space_ready.close()
    finally:
        lock.release()


def describe(result: RingResult, what: str = "ring") -> str:
    """One readable line, with the setup the figure depends on."""
    return (
        f"{what}: {round(result.msgs_per_s, -3):,.0f} msgs/s ({result.payload_bytes}-byte "
        f"payloads, batches of {result.batch}, producer and consumer in two processes; "
        f"{result.messages:,} messages in {result.seconds:.2f} s)"
    )


def run_ring_demo(seconds: float, batch: int) -> int:
    """Calibrate briefly, then run once sized to last about ``seconds``; print the rate.

    One long run rather than many short ones: process start-up and the first
    fill of the ring are paid once, so the figure is the steady-state rate.
    """
    probe = measure_ring(max(50_000, batch * 50), batch)
    while probe.seconds < min(0.25, seconds / 4):  # too short to show the steady rate
        probe = measure_ring(probe.messages * 4, batch)
    result = measure_ring(max(probe.messages, int(probe.msgs_per_s * seconds)), batch)
    print(describe(result))
    return 0
