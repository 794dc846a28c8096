"""Shared fixtures: unique ring names and a check that tests leave nothing in /dev/shm."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipc.ring import Ring, RingConsumer, RingProducer
from ipc.shm import list_segments, new_engine_prefix
from ipc.wake import EventFd


@pytest.fixture
def shm_prefix() -> Iterator[str]:
    """A fresh engine prefix; fails the test if any segment with it survives."""
    prefix = new_engine_prefix()
    yield prefix
    left = list_segments(prefix)
    assert left == [], f"segments left in /dev/shm: {left}"


class RingPair:
    """A ring with its two wake-ups and one producer and consumer, closed on exit."""

    def __init__(self, name: str, capacity: int) -> None:
        self.ring = Ring.create(name, capacity)
        self.data_ready = EventFd()
        self.space_ready = EventFd()
        self.producer = RingProducer(self.ring, self.data_ready, self.space_ready)
        self.consumer = RingConsumer(self.ring, self.data_ready, self.space_ready)

    def close(self) -> None:
        self.ring.close()
        self.data_ready.close()
        self.space_ready.close()


@pytest.fixture
def ring_pair(shm_prefix: str) -> Iterator[RingPair]:
    pair = RingPair(shm_prefix + "r", 4096)
    yield pair
    pair.close()
