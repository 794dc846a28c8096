"""The monitor's side of a corrupt frame header: named after the poison limit, in real
shared memory, even when a careful delivery was running in the lane."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.core.worker_slot import WorkerSlot
from ipc.ring import HEADER_BYTES, frame_size
from ipc.shard import SLOT_ACTIVE, SLOT_FRAME_END, SLOT_INDEX, SLOT_LANE, EngineWakeups, ShardMemory

LANE = 2


@pytest.fixture
def shard(shm_prefix: str) -> Iterator[ShardMemory]:
    wakeups = EngineWakeups.create()
    shard = ShardMemory.create(shm_prefix, 0, wakeups, 65536, 65536)
    yield shard
    shard.close()
    shard.close_wakeups()
    wakeups.close()


def test_a_corrupt_header_is_named_at_the_limit_and_the_running_delivery_not_blamed(
    shard: ShardMemory,
) -> None:
    shard.lane_producers()[LANE].write([b"\x91good", b"\x91spoilt", b"\x91after"])
    bad = frame_size(5)
    ring = shard.lanes[LANE]
    ring.idx[(HEADER_BYTES + bad) >> 3] = 1 << 40
    consumer = shard.lane_consumers()[LANE]
    frames, _ = consumer.drain()
    assert frames == [b"\x91good"]  # fetched, never committed: each worker dies holding it
    slot = WorkerSlot(0, shard)
    idx = shard.slot_idx
    for _ in range(3):
        # A careful worker was delivering the good frame's message when the reader died.
        idx[SLOT_LANE], idx[SLOT_FRAME_END], idx[SLOT_INDEX] = LANE, bad, 0
        idx[SLOT_ACTIVE] = 1
        assert slot.plan.corrupt == set()
        slot.count_crash(limit=3)
    assert slot.plan.corrupt == {(LANE, bad)}
    assert slot.quarantine == set()  # the message being delivered is not the culprit
    assert slot.lane_crashes[LANE] == 0
