"""The shared memory of one worker shard: a ring per priority lane, a return ring, a slot.

The dispatcher creates (and later unlinks) every segment; workers and the
monitor only attach, so a worker or monitor crash never loses queued messages.

Wake-ups: one eventfd per shard says "some lane has frames"; one engine-wide
eventfd says "some lane has space again" and one says "some return ring has
frames", so the dispatcher sleeps on two descriptors however many workers run.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from ipc.codec import Priority
from ipc.ring import Ring, RingConsumer, RingProducer, segment_bytes
from ipc.shm import Segment
from ipc.wake import EventFd

LANES = len(Priority)
SLOT_BYTES = 65536

# Slot fields (u64 indices), written by the worker, read by the monitor after a crash.
SLOT_ACTIVE = 0  # 1 while a delivery of a suspect message runs
SLOT_LANE = 1
SLOT_FRAME_END = 2
SLOT_INDEX = 3
# 4: unused (was the message id, never read)
SLOT_PID = 5  # the worker process attached now: a new monitor waits for it to be gone
SLOT_PID_START = 6  # its start time in ms (psutil create_time): a pid read later may be reused
SLOT_PARKED = 7  # which copy of the parked set is current: 0 none, 1 or 2 (see save_parked)
# The parked set: (lane, recipient) pairs whose messages the worker hands back to the
# dispatcher.  Written by the worker before it commits the frames that depend on it, read
# by the next worker of the shard; two copies, so a worker killed mid-write leaves the
# previous one intact (the selector above is switched with one aligned 8-byte store).
PARKED_AREA_BYTES = (SLOT_BYTES - 1024) // 2
_PARKED_AREAS = (1024, 1024 + PARKED_AREA_BYTES)
_parked_encoder = msgspec.msgpack.Encoder()
_parked_decoder = msgspec.msgpack.Decoder(list[tuple[int, str]])


@dataclass(frozen=True)
class EngineWakeups:
    """Engine-wide eventfds the dispatcher sleeps on."""

    lane_space: EventFd  # a worker committed lane space
    return_ready: EventFd  # a worker published return records

    @classmethod
    def create(cls) -> EngineWakeups:
        return cls(lane_space=EventFd(), return_ready=EventFd())

    def close(self) -> None:
        self.lane_space.close()
        self.return_ready.close()


@dataclass(frozen=True)
class ShardSpec:
    """What a worker (or its monitor) needs to attach to its shard; picklable."""

    index: int
    lane_names: tuple[str, ...]
    return_name: str
    slot_name: str
    lane_ready: EventFd
    return_space: EventFd
    wakeups: EngineWakeups


def shard_bytes(ring_bytes: int, return_ring_bytes: int) -> int:
    """Shared memory one shard takes, for the /dev/shm space check."""
    return LANES * segment_bytes(ring_bytes) + segment_bytes(return_ring_bytes) + SLOT_BYTES


class ShardMemory:
    """The segments of one shard as mapped in this process."""

    def __init__(self, spec: ShardSpec, lanes: list[Ring], returns: Ring, slot: Segment) -> None:
        self.spec = spec
        self.lanes = lanes
        self.returns = returns
        self.slot = slot
        self.slot_idx = memoryview(slot.buf).cast("Q")

    @classmethod
    def create(
        cls, prefix: str, index: int, wakeups: EngineWakeups, ring_bytes: int, return_bytes: int
    ) -> ShardMemory:
        base = f"{prefix}w{index}"
        spec = ShardSpec(
            index=index,
            lane_names=tuple(f"{base}-lane{p.value}" for p in Priority),
            return_name=f"{base}-ret",
            slot_name=f"{base}-slot",
            lane_ready=EventFd(),
            return_space=EventFd(),
            wakeups=wakeups,
        )
        made: list[Ring] = []
        try:
            for name in spec.lane_names:
                made.append(Ring.create(name, ring_bytes))
            returns = Ring.create(spec.return_name, return_bytes)
            made.append(returns)
            slot = Segment.create(spec.slot_name, SLOT_BYTES)
        except BaseException:
            for ring in made:
                ring.close()
            raise
        return cls(spec, made[:LANES], returns, slot)

    @classmethod
    def attach(cls, spec: ShardSpec) -> ShardMemory:
        lanes = [Ring.attach(n) for n in spec.lane_names]
        return cls(spec, lanes, Ring.attach(spec.return_name), Segment.attach(spec.slot_name))

    # Dispatcher side ---------------------------------------------------------
    def lane_producers(self) -> list[RingProducer]:
        wake = self.spec.wakeups
        return [RingProducer(r, self.spec.lane_ready, wake.lane_space) for r in self.lanes]

    def return_consumer(self) -> RingConsumer:
        return RingConsumer(self.returns, self.spec.wakeups.return_ready, self.spec.return_space)

    # Worker side -------------------------------------------------------------
    def lane_consumers(self) -> list[RingConsumer]:
        wake = self.spec.wakeups
        return [RingConsumer(r, self.spec.lane_ready, wake.lane_space) for r in self.lanes]

    def return_producer(self) -> RingProducer:
        return RingProducer(self.returns, self.spec.wakeups.return_ready, self.spec.return_space)

    @staticmethod
    def parked_fits(parked: set[tuple[int, str]]) -> bool:
        """Whether ``save_parked`` can store this set."""
        return len(_parked_encoder.encode(sorted(parked))) + 8 <= PARKED_AREA_BYTES

    def save_parked(self, parked: set[tuple[int, str]]) -> bool:
        """Store the parked set for the shard's next worker; False if it does not fit."""
        data = _parked_encoder.encode(sorted(parked))
        if len(data) + 8 > PARKED_AREA_BYTES:
            return False
        current = self.slot_idx[SLOT_PARKED]
        which = 2 if current == 1 else 1
        start = _PARKED_AREAS[which - 1]
        buf = self.slot.buf
        buf[start + 8 : start + 8 + len(data)] = data
        self.slot_idx[start // 8] = len(data)
        self.slot_idx[SLOT_PARKED] = which  # publish: one aligned store, after the data
        return True

    def load_parked(self) -> set[tuple[int, str]]:
        """The parked set the shard's previous worker left (empty for a new shard)."""
        which = self.slot_idx[SLOT_PARKED]
        if which not in (1, 2):
            return set()
        start = _PARKED_AREAS[which - 1]
        size = self.slot_idx[start // 8]
        return set(_parked_decoder.decode(bytes(self.slot.buf[start + 8 : start + 8 + size])))

    def committed(self) -> tuple[int, ...]:
        """Committed position of every lane: a crash at the same tuple is the same message."""
        return tuple(r.committed for r in self.lanes)

    def close(self) -> None:
        self.slot_idx.release()
        for ring in (*self.lanes, self.returns):
            ring.close()
        self.slot.close()

    def close_wakeups(self) -> None:
        """Owner only: the per-shard eventfds (engine-wide ones are closed by their owner)."""
        self.spec.lane_ready.close()
        self.spec.return_space.close()
