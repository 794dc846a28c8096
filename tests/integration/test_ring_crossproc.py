"""The ring between real processes: bulk integrity, SIGKILL resume, sleep/wake, lifecycle."""

from __future__ import annotations

import math
import os
import random
import signal
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import multiprocess as mp
import pytest

from ipc.ring import Ring, RingConsumer, RingProducer
from ipc.shm import list_segments
from ipc.wake import EventFd

CTX = mp.get_context("spawn")
HDR = struct.Struct("<QII")  # sequence number, crc32 of the body, body length
POOL_SEED = 1234
MAX_FRAME = 64 * 1024
STRESS_FRAMES = int(os.environ.get("RINGWAY_STRESS_FRAMES", "2000000"))


def _pool() -> bytes:
    return random.Random(POOL_SEED).randbytes(MAX_FRAME * 4)


def _sizes(rng: random.Random) -> Iterator[int]:
    """Frame sizes 1 B .. 64 KiB, log-uniform so small and huge frames both occur often."""
    top = math.log(MAX_FRAME)
    while True:
        yield min(MAX_FRAME, max(1, int(math.exp(rng.random() * top))))


def _producer(
    name: str, data: EventFd, space: EventFd, count: int, seed: int, tiny: bool = True
) -> None:
    """Writes ``count`` checksummed frames; with ``tiny`` False every frame has a header."""
    ring = Ring.attach(name)
    producer = RingProducer(ring, data, space)
    pool = memoryview(_pool())
    rng = random.Random(seed)
    sizes = _sizes(rng)
    seq = 0
    try:
        while seq < count:
            batch: list[bytes] = []
            for _ in range(min(rng.randint(1, 32), count - seq)):
                size = next(sizes) if tiny else max(HDR.size, next(sizes))
                if size < HDR.size:  # too short for a header: content encodes the sequence
                    batch.append(bytes([seq & 0xFF]) * size)
                else:
                    n = size - HDR.size
                    off = rng.randrange(0, len(pool) - n)
                    body = pool[off : off + n]
                    batch.append(HDR.pack(seq, zlib.crc32(body), n) + body)
                seq += 1
            producer.write(batch)
    finally:
        ring.close()


def _check_frame(frame: bytes, expect_seq: int) -> None:
    if len(frame) < HDR.size:
        if frame != bytes([expect_seq & 0xFF]) * len(frame) or not frame:
            raise AssertionError(f"short frame {expect_seq} corrupted: {frame!r}")
        return
    seq, crc, n = HDR.unpack_from(frame)
    body = memoryview(frame)[HDR.size :]
    if seq != expect_seq:
        raise AssertionError(f"expected sequence {expect_seq}, got {seq}")
    if len(body) != n or zlib.crc32(body) != crc:
        raise AssertionError(f"frame {seq} corrupted ({len(body)} bytes, header says {n})")


def test_two_million_random_frames_cross_processes_intact(shm_prefix: str) -> None:
    """Random 1 B-64 KiB frames through a 256 KiB ring: many wraps and full-ring waits."""
    ring = Ring.create(shm_prefix + "bulk", 256 * 1024)
    data, space = EventFd(), EventFd()
    proc = CTX.Process(target=_producer, args=(ring.segment.name, data, space, STRESS_FRAMES, 7))
    consumer = RingConsumer(ring, data, space)
    rng = random.Random(99)
    try:
        proc.start()
        seq = 0
        waits = 0
        while seq < STRESS_FRAMES:
            frames, ends = consumer.drain(max_frames=rng.randint(1, 64))
            if not frames:
                consumer.commit()  # everything fetched is checked: settle before sleeping
                waits += 1
                assert consumer.wait(10.0) or proc.is_alive(), "producer died"
                continue
            for frame in frames:
                _check_frame(frame, seq)
                seq += 1
            # Commit sometimes only part of what was fetched, as a worker does.
            consumer.commit(ends[rng.randrange(len(ends))] if rng.random() < 0.3 else ends[-1])
        consumer.commit()
        proc.join(30)
        assert proc.exitcode == 0
        assert consumer.drain() == ([], [])  # nothing duplicated after the last frame
        assert ring.write_pos > 100 * ring.capacity  # it really wrapped, many times
        assert waits > 0  # the consumer slept at least once rather than spinning
    finally:
        if proc.is_alive():
            proc.kill()
        ring.close()
        data.close()
        space.close()


def _lazy_consumer(name: str, data: EventFd, space: EventFd, stop_at: int, progress: Any) -> None:
    """Commits one batch behind what it fetched; hangs mid-batch once past ``stop_at``.

    Progress goes to shared memory, each value stored *before* the step it
    describes, so the parent knows what the SIGKILL interrupted.
    """
    ring = Ring.attach(name)
    consumer = RingConsumer(ring, data, space)
    pending_end = None
    pending_seq = -1
    while True:
        frames, ends = consumer.drain(max_frames=16)
        if not frames:
            if pending_end is not None:
                progress[1], progress[2] = progress[2], pending_seq
                consumer.commit(pending_end)
                pending_end = None
            consumer.wait(1.0)
            continue
        last_seq = HDR.unpack_from(frames[-1])[0]
        progress[0] = last_seq  # highest sequence fetched
        if last_seq >= stop_at:
            time.sleep(3600)  # stuck while processing: these frames are never settled
        if pending_end is not None:
            progress[1], progress[2] = progress[2], pending_seq
            consumer.commit(pending_end)
        pending_end, pending_seq = ends[-1], last_seq


def test_sigkill_mid_drain_new_consumer_resumes_at_committed(shm_prefix: str) -> None:
    count = 20_000
    ring = Ring.create(shm_prefix + "kill", 64 * 1024)
    data, space = EventFd(), EventFd()
    progress = CTX.Array("q", [-1, -1, -1], lock=False)
    producer = CTX.Process(target=_producer, args=(ring.segment.name, data, space, count, 3, False))
    victim = CTX.Process(
        target=_lazy_consumer, args=(ring.segment.name, data, space, count // 3, progress)
    )
    try:
        producer.start()
        victim.start()
        deadline = time.monotonic() + 60
        while progress[0] < count // 3:  # the victim is now stuck mid-batch
            assert time.monotonic() < deadline, "the first consumer made no progress"
            time.sleep(0.005)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        assert victim.exitcode == -signal.SIGKILL
        fetched, settled_prev, settled_cur = progress[0], progress[1], progress[2]

        consumer = RingConsumer(ring, data, space)  # the respawned consumer
        assert consumer.position == ring.committed
        seen: list[int] = []
        while not seen or seen[-1] < count - 1:
            frames, _ = consumer.drain()
            if not frames:
                assert consumer.wait(10.0) or producer.is_alive()
                continue
            for frame in frames:
                seen.append(HDR.unpack_from(frame)[0])
                _check_frame(frame, seen[0] + len(seen) - 1)
            consumer.commit()
        first = seen[0]
        # Resumed exactly past a committed frame: the last or the one being committed.
        assert first - 1 in (settled_prev, settled_cur), (first, settled_prev, settled_cur)
        # Everything fetched but not committed by the victim comes again; nothing is lost.
        assert first <= fetched + 1
        assert fetched >= first, "the frames the victim fetched but never settled come again"
        assert seen == list(range(first, count))
        producer.join(30)
        assert producer.exitcode == 0
    finally:
        for p in (producer, victim):
            if p.is_alive():
                p.kill()
        ring.close()
        data.close()
        space.close()


def _echo_latency(
    name: str, data: EventFd, space: EventFd, count: int, use_async: bool, out: Any
) -> None:
    ring = Ring.attach(name)
    consumer = RingConsumer(ring, data, space)
    worst = 0
    got = 0

    def take() -> None:
        nonlocal worst, got
        frames, _ = consumer.drain()
        now = time.monotonic_ns()
        for frame in frames:
            worst = max(worst, now - int.from_bytes(frame, "little"))
            got += 1
        if frames:
            consumer.commit()

    if use_async:
        import uvloop

        async def run() -> None:
            while got < count:
                take()
                if got < count:
                    await consumer.wait_async(30.0)

        uvloop.run(run())
    else:
        while got < count:
            take()
            if got < count:
                consumer.wait(30.0)
    out.send((got, worst))
    ring.close()


@pytest.mark.parametrize(("bursts", "use_async"), [(10_000, False), (3_000, True)])
def test_sleep_wake_bursts_are_never_lost(shm_prefix: str, bursts: int, use_async: bool) -> None:
    """One frame per burst with random gaps: a lost wake-up would stall a burst ~30 s."""
    ring = Ring.create(shm_prefix + "wake", 64 * 1024)
    data, space = EventFd(), EventFd()
    here, there = CTX.Pipe()
    proc = CTX.Process(
        target=_echo_latency, args=(ring.segment.name, data, space, bursts, use_async, there)
    )
    producer = RingProducer(ring, data, space)
    rng = random.Random(5)
    try:
        proc.start()
        for _ in range(bursts):
            gap = rng.choice((0.0, 0.0, 0.0001, 0.0005, 0.001))
            if gap:
                time.sleep(gap)
            producer.write([time.monotonic_ns().to_bytes(8, "little")])
        assert here.poll(60), "consumer never reported"
        got, worst_ns = here.recv()
        proc.join(10)
        assert got == bursts
        # Generous: a shared 2-core machine may delay one wake-up, a lost one waits 30 s.
        assert worst_ns < 5e9, f"a burst waited {worst_ns / 1e9:.2f}s: lost wake-up"
    finally:
        if proc.is_alive():
            proc.kill()
        ring.close()
        data.close()
        space.close()


def _attach_and_exit(name: str) -> None:
    ring = Ring.attach(name)
    ring.beat()
    ring.close()


def test_attaching_process_exit_leaves_segment_and_close_removes_it(shm_prefix: str) -> None:
    ring = Ring.create(shm_prefix + "life", 4096)
    try:
        for _ in range(3):  # each child starts (and ends) its own resource tracker
            proc = CTX.Process(target=_attach_and_exit, args=(ring.segment.name,))
            proc.start()
            proc.join(30)
            assert proc.exitcode == 0
        assert list_segments(shm_prefix) == [shm_prefix + "life"]
        assert ring.heartbeat == 3
    finally:
        ring.close()
    assert list_segments(shm_prefix) == []
