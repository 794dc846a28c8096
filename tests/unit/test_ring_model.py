"""Property tests of ring framing, wrap-around, commit and resume against a plain model."""

from __future__ import annotations

from collections import deque

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ipc.errors import (
    CorruptFrameError,
    FrameTooLargeError,
    QueueFull,
    RingError,
    UnsupportedPlatformError,
)
from ipc.ring import FRAME_HEADER, HEADER_BYTES, PAD, Ring, RingConsumer, check_platform, frame_size
from ipc.shm import new_engine_prefix
from tests.conftest import RingPair

CAPACITY = 1024


class ModelRing:
    """The ring's accounting written out plainly: positions, pads, fetched, committed."""

    def __init__(self, capacity: int) -> None:
        self.cap = capacity
        self.write = 0
        self.committed = 0
        self.unfetched: deque[tuple[bytes, int]] = deque()  # (payload, end position)
        self.fetched: deque[tuple[bytes, int]] = deque()

    def offer(self, frames: list[bytes]) -> int:
        accepted = 0
        for data in frames:
            total = frame_size(len(data))
            off = self.write % self.cap
            pad = self.cap - off if off + total > self.cap else 0
            if self.write + pad + total - self.committed > self.cap:
                if pad and self.write + pad - self.committed <= self.cap:
                    self.write += pad
                break
            self.write += pad + total
            self.unfetched.append((data, self.write))
            accepted += 1
        return accepted


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = RingPair(new_engine_prefix() + "model", CAPACITY)
        self.model = ModelRing(CAPACITY)
        self.counter = 0

    def teardown(self) -> None:
        self.pair.close()

    def _payload(self, size: int) -> bytes:
        self.counter += 1
        return self.counter.to_bytes(4, "little")[: min(size, 4)].ljust(size, b"\xab")

    @rule(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=6))
    def offer(self, sizes: list[int]) -> None:
        frames = [self._payload(s) for s in sizes]
        got = self.pair.producer.offer(frames)
        want = self.model.offer(frames)
        assert got == want
        assert self.pair.ring.write_pos == self.model.write

    @rule(max_frames=st.integers(1, 8))
    def drain(self, max_frames: int) -> None:
        settled_before = not self.model.fetched
        start = self.pair.consumer.position
        first = self.model.unfetched[0] if self.model.unfetched else None
        next_start = first[1] - frame_size(len(first[0])) if first else self.model.write
        frames, ends = self.pair.consumer.drain(max_frames=max_frames)
        expect = [self.model.unfetched.popleft() for _ in range(len(frames))]
        assert frames == [f for f, _ in expect]
        assert ends == [e for _, e in expect]
        self.model.fetched.extend(expect)
        # It fetched everything it was allowed to.
        assert len(frames) == max_frames or not self.model.unfetched
        # A pad with nothing unsettled before it is reclaimed by the drain itself.
        if settled_before and next_start > start and self.pair.consumer.position > start:
            self.model.committed = start + CAPACITY - start % CAPACITY

    @precondition(lambda self: bool(self.model.fetched))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        k = data.draw(st.integers(1, len(self.model.fetched)))
        end = self.model.fetched[k - 1][1]
        self.pair.consumer.commit(end)
        for _ in range(k):
            self.model.fetched.popleft()
        # A pad directly after the committed frame, once fetched, is reclaimed too.
        following = self.model.fetched or self.model.unfetched
        if following:
            data, nxt_end = following[0]
            next_start = nxt_end - frame_size(len(data))
        else:
            next_start = self.model.write
        pad_follows = next_start > end
        expected = end + (CAPACITY - end % CAPACITY) if pad_follows else end
        if pad_follows and self.pair.consumer.position <= end:
            expected = end  # pad not fetched yet: it is reclaimed by a later drain
        committed = self.pair.ring.committed
        assert committed == expected
        if pad_follows and committed != end:
            assert self.pair.ring.idx[(1024 + end % CAPACITY) >> 3] == PAD
        self.model.committed = committed

    @rule()
    def respawn_consumer(self) -> None:
        """A new consumer resumes at `committed`: every unsettled frame comes again."""
        self.pair.consumer = RingConsumer(
            self.pair.ring, self.pair.data_ready, self.pair.space_ready
        )
        self.model.unfetched = self.model.fetched + self.model.unfetched
        self.model.fetched = deque()

    @invariant()
    def positions_are_ordered(self) -> None:
        ring = self.pair.ring
        assert ring.committed <= ring.read_pos <= ring.write_pos
        assert ring.write_pos - ring.committed <= CAPACITY
        assert ring.committed == self.model.committed


TestRingModel = RingMachine.TestCase
TestRingModel.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_frame_that_can_never_fit_is_a_clear_error(ring_pair: RingPair) -> None:
    too_big = b"x" * (4096 - FRAME_HEADER + 1)
    with pytest.raises(FrameTooLargeError, match="can never fit"):
        ring_pair.producer.write([too_big])
    with pytest.raises(FrameTooLargeError):
        ring_pair.producer.offer([b"ok", too_big])
    assert ring_pair.producer.write_nowait([b"x" * (4096 - FRAME_HEADER)]) is None


def test_write_nowait_is_all_or_nothing(ring_pair: RingPair) -> None:
    ring_pair.producer.write_nowait([b"a" * 1000] * 3)
    before = ring_pair.ring.write_pos
    with pytest.raises(QueueFull, match="full"):
        ring_pair.producer.write_nowait([b"b" * 500] * 3)
    assert ring_pair.ring.write_pos == before
    frames, _ = ring_pair.consumer.drain()
    assert frames == [b"a" * 1000] * 3


def test_blocking_write_times_out_with_queue_full(ring_pair: RingPair) -> None:
    ring_pair.producer.write([b"a" * 2000])
    with pytest.raises(QueueFull, match="stayed full"):
        ring_pair.producer.write([b"b" * 2100], timeout=0.05)


def test_commit_outside_fetched_range_is_refused(ring_pair: RingPair) -> None:
    ring_pair.producer.write([b"abc"])
    _, ends = ring_pair.consumer.drain()
    with pytest.raises(RingError, match="outside"):
        ring_pair.consumer.commit(ends[0] + 8)


def test_capacity_must_be_power_of_two(shm_prefix: str) -> None:
    with pytest.raises(RingError, match="power of two"):
        Ring.create(shm_prefix + "bad", 3000)


def test_attach_refuses_a_segment_that_is_not_a_ring(shm_prefix: str) -> None:
    from ipc.shm import Segment

    with Segment.create(shm_prefix + "junk", 8192), pytest.raises(RingError, match="not hold"):
        Ring.attach(shm_prefix + "junk")


def test_non_x86_machine_is_refused() -> None:
    with pytest.raises(UnsupportedPlatformError, match="aarch64"):
        check_platform("aarch64")
    check_platform("x86_64")


def _spoil(pair: RingPair, position: int, header: int) -> None:
    ring = pair.ring
    ring.idx[(HEADER_BYTES + (position & ring.mask)) >> 3] = header


def test_a_corrupt_length_is_skipped_to_the_next_frame_and_the_good_ones_before_it_served(
    ring_pair: RingPair,
) -> None:
    frames = [b"\x91first", b"\x92second-frame", b"\x91third", b"\x91fourth"]
    ring_pair.producer.write(frames)
    bad = frame_size(len(frames[0]))
    _spoil(ring_pair, bad, 1 << 40)
    assert ring_pair.ring.find_corrupt(0) == bad
    got, _ = ring_pair.consumer.drain()
    assert got == [frames[0]]  # the good frame before it comes out first
    with pytest.raises(CorruptFrameError, match="corrupt frame header 0x10000000000") as exc:
        ring_pair.consumer.drain()
    assert (exc.value.position, exc.value.header) == (bad, 1 << 40)
    end, data = ring_pair.consumer.skip_corrupt(bad, frozenset({0x91, 0x92}))
    assert end == bad + frame_size(len(frames[1]))  # only the spoiled frame is skipped
    assert data.rstrip(b"\0") == frames[1]
    got, _ = ring_pair.consumer.drain()
    assert got == frames[2:]


def test_a_length_running_past_write_is_corrupt_and_with_no_boundary_all_is_skipped(
    ring_pair: RingPair,
) -> None:
    ring_pair.producer.write([b"\x91one", b"\x91two"])
    write = ring_pair.ring.write_pos
    _spoil(ring_pair, 0, 100)  # fits the region, but runs past what was published
    with pytest.raises(CorruptFrameError):
        ring_pair.consumer.drain()
    _spoil(ring_pair, frame_size(4), 1 << 50)  # the next header too: no boundary to resume at
    end, data = ring_pair.consumer.skip_corrupt(0, frozenset({0x91}))
    assert end == write and len(data) == write - FRAME_HEADER
    assert ring_pair.consumer.drain() == ([], [])
