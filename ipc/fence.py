"""The lease fence of a cluster node: until when its workers may deliver each partition.

A cluster node (``engine.broker``) owns partitions under leases; its workers must
stop delivering a partition's messages as soon as the lease may have passed to
another node, even when the node itself is paused (SIGSTOP, swap) and cannot
tell them.  So the node keeps, per partition, one 64-bit word in this segment:
the CLOCK_MONOTONIC millisecond until which its lease is surely held (0: not
held), published with one aligned 8-byte store (see ``ipc/ring.py`` on why
never ``struct.pack_into``).  A worker reads the word before each delivery;
CLOCK_MONOTONIC is machine-wide on Linux, so after a pause the workers see the
deadline passed before any other process can act on it.
"""

from __future__ import annotations

import time

from ipc.shm import Segment

CLOSED = 0


def now_ms() -> int:
    """CLOCK_MONOTONIC in milliseconds, the unit of the fence words."""
    return time.monotonic_ns() // 1_000_000


class FenceTable:
    """One deadline word per partition; the node writes, its workers read."""

    def __init__(self, segment: Segment, partitions: int) -> None:
        if segment.size < partitions * 8:
            raise ValueError(f"segment of {segment.size} bytes cannot hold {partitions} words")
        self.segment = segment
        self.partitions = partitions
        self.words = memoryview(segment.buf).cast("Q")

    @classmethod
    def create(cls, name: str, partitions: int) -> FenceTable:
        """A new table with every partition closed (a fresh segment is zero-filled)."""
        return cls(Segment.create(name, partitions * 8), partitions)

    @classmethod
    def attach(cls, name: str, partitions: int) -> FenceTable:
        return cls(Segment.attach(name), partitions)

    def open_until(self, partition: int, until_ms: int) -> None:
        self.words[partition] = until_ms

    def close_partition(self, partition: int) -> None:
        self.words[partition] = CLOSED

    def allows(self, partition: int, now: int) -> bool:
        """True while ``partition``'s lease is surely held at ``now`` (monotonic ms)."""
        return now < self.words[partition]

    def close(self) -> None:
        self.words.release()
        self.segment.close()
