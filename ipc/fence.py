"""The lease fence of a cluster node: until when its workers may deliver each partition.

A cluster node (``engine.broker``) owns partitions under leases; its workers must
stop delivering a partition's messages as soon as the lease may have passed to
another node, even when the node itself is paused (SIGSTOP, swap) and cannot
tell them.  So the node keeps, per partition, one 64-bit word in this segment:
the lease's generation (its epoch, low 24 bits, never 0) and the
CLOCK_MONOTONIC millisecond until which the lease surely holds (40 bits); 0
means not held.  The word is published with one aligned 8-byte store (see
``ipc/ring.py`` on why never ``struct.pack_into``).  CLOCK_MONOTONIC is
machine-wide on Linux, so after a pause the workers see the deadline passed
before any other process can act on it.

A worker that once found the deadline passed keeps refusing that partition for
the rest of the generation (`FenceReader`), even if a late renewal moves the
deadline on: a later message of a recipient must never be delivered after an
earlier one was dropped.  Only a new generation (a new lease) opens it again.
"""

from __future__ import annotations

import time

from ipc.shm import Segment

GEN_SHIFT = 40
UNTIL_MASK = (1 << GEN_SHIFT) - 1
GEN_MASK = (1 << 24) - 1
CLOSED = 0


def now_ms() -> int:
    """CLOCK_MONOTONIC in milliseconds, the unit of the fence words."""
    return time.monotonic_ns() // 1_000_000


def generation_of(epoch: int) -> int:
    """The lease epoch as a fence word holds it (24 bits, never 0, which means closed)."""
    return epoch & GEN_MASK or 1


class FenceTable:
    """One word per partition; the node writes, its workers read."""

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

    def open_until(self, partition: int, epoch: int, until_ms: int) -> None:
        if not 0 <= until_ms <= UNTIL_MASK:
            raise ValueError(f"deadline {until_ms} ms does not fit in {GEN_SHIFT} bits")
        self.words[partition] = (generation_of(epoch) << GEN_SHIFT) | until_ms

    def close_partition(self, partition: int) -> None:
        self.words[partition] = CLOSED

    def close(self) -> None:
        self.words.release()
        self.segment.close()


class FenceReader:
    """A worker's view of the table, with the stickiness described in the module docstring."""

    def __init__(self, table: FenceTable) -> None:
        self.words = table.words
        self.refused: dict[int, int] = {}  # partition -> generation found expired

    def allows(self, partition: int, now: int) -> bool:
        word = self.words[partition]
        generation = word >> GEN_SHIFT
        if generation == CLOSED:
            return False
        if self.refused.get(partition) == generation:
            return False
        if now < word & UNTIL_MASK:
            return True
        self.refused[partition] = generation
        return False
