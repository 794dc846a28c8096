"""The lease fence the workers read: deadlines, generations, and why a refusal sticks."""

from __future__ import annotations

from ipc.fence import FenceReader, FenceTable, generation_of, now_ms


def test_a_refusal_sticks_for_the_rest_of_the_generation(shm_prefix: str) -> None:
    table = FenceTable.create(shm_prefix + "fence", 4)
    try:
        worker = FenceReader(FenceTable.attach(shm_prefix + "fence", 4))
        now = now_ms()
        assert not worker.allows(0, now)  # closed until a lease opens it
        table.open_until(0, 7, now + 1000)
        assert worker.allows(0, now) and not worker.allows(1, now)
        assert not worker.allows(0, now + 1000)  # the deadline passed: refused ...
        table.open_until(0, 7, now + 5000)  # ... and a late renewal of the same lease
        assert not worker.allows(0, now + 1001)  # does not reopen it (order would break)
        table.open_until(0, 8, now + 5000)  # a new lease (generation) does
        assert worker.allows(0, now + 1001)
        table.close_partition(0)
        assert not worker.allows(0, now + 1001)
        assert generation_of(1 << 24) == 1  # never 0, which means closed
    finally:
        table.close()
