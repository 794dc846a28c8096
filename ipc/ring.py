"""Single-producer single-consumer ring of byte frames in shared memory.

Layout of the segment (all integers little-endian u64; ARCHITECTURE.md has the rules)::

    0     magic, version, capacity             (written once by the creator)
    128   write      end of published frames   (producer stores, consumer loads)
    256   read       consumer's fetch position (informative: depth, monitoring)
    384   committed  low-water mark of settled frames; space is reclaimed below it
    512   heartbeat  counter the consumer bumps so a monitor can see it is alive
    640   space_wanted  1 while the producer sleeps waiting for space
    1024  data region, ``capacity`` bytes, capacity a power of two

Each position lives on its own 128-byte line (as Agrona spaces them) so the two
processes never write the same cache line.  Positions only grow; the byte
offset is ``pos & (capacity - 1)``.

A frame is an 8-byte header holding the payload length, the payload, and zero
padding to a multiple of 8.  A frame never straddles the end of the region: the
producer writes a PAD header there and continues at offset 0.

Publication: every index is stored with one aligned 8-byte store through
``memoryview.cast("Q")`` (one ``mov`` on x86-64, where stores are not reordered
with earlier stores and loads not with earlier loads).  ``struct.pack_into``
must never be used for a shared index: it zeroes the target before writing and
another process can read that 0.  On other architectures the ring refuses to
start rather than risk torn or reordered indices.

Batching: the producer copies many frames and publishes ``write`` once, then
signals the consumer's eventfd; the consumer drains everything visible and
publishes ``read`` once.  ``commit`` is separate from ``read`` so a consumer
may fetch ahead while keeping frames recoverable: a respawned consumer resumes
at ``committed`` and sees every unsettled frame again.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ipc.errors import (
    CorruptFrameError,
    FrameTooLargeError,
    QueueFull,
    RingError,
    UnsupportedPlatformError,
)
from ipc.shm import Segment
from ipc.wake import EventFd

MAGIC = 0x52494E4757415931  # "RINGWAY1"
VERSION = 1
HEADER_BYTES = 1024
FRAME_HEADER = 8
PAD = 0xFFFF_FFFF_FFFF_FFFF  # header value of the wrap marker
MIN_CAPACITY = 1024

# Slot indices (u64 units) inside the header.
_MAGIC, _VERSION, _CAPACITY = 0, 1, 2
_WRITE = 128 // 8
_READ = 256 // 8
_COMMITTED = 384 // 8
_HEARTBEAT = 512 // 8
_SPACE_WANTED = 640 // 8
_DATA = HEADER_BYTES // 8

# The producer also wakes itself on this period while waiting for space: a
# guard for the one race the flag protocol cannot close without a store-load
# fence (producer sets the flag while the consumer is between its commit store
# and its flag load).  It bounds that rare wait; it is not a poll loop.
SPACE_RECHECK_S = 0.01

_SUPPORTED_MACHINES = frozenset({"x86_64", "amd64"})


def check_platform(machine: str | None = None) -> None:
    """Refuse to run where aligned 8-byte stores are not known to publish in order."""
    m = (machine if machine is not None else platform.machine()).lower()
    if m not in _SUPPORTED_MACHINES:
        raise UnsupportedPlatformError(
            f"the shared-memory ring relies on x86-64 store ordering and this machine is "
            f"{m or 'unknown'!r}; Ringway does not run here yet"
        )


def frame_size(payload_len: int) -> int:
    """Bytes a payload of this length occupies in the ring, header and padding included."""
    return FRAME_HEADER + ((payload_len + 7) & ~7)


def segment_bytes(capacity: int) -> int:
    """Size of the shared-memory segment for a ring of ``capacity`` data bytes."""
    return HEADER_BYTES + capacity


@dataclass(frozen=True)
class RingSpec:
    """What a process needs to attach to one ring: its segment name and wake-ups."""

    name: str
    data_ready: EventFd  # producer -> consumer: frames were published
    space_ready: EventFd  # consumer -> producer: space was committed


class Ring:
    """A mapped ring segment; producers and consumers wrap one of these."""

    __slots__ = ("buf", "capacity", "idx", "mask", "max_payload", "segment")

    def __init__(self, segment: Segment) -> None:
        check_platform()
        self.segment = segment
        self.buf = memoryview(segment.buf)
        self.idx = self.buf.cast("Q")
        if self.idx[_MAGIC] != MAGIC or self.idx[_VERSION] != VERSION:
            self._release()
            raise RingError(f"segment {segment.name!r} does not hold a Ringway ring")
        self.capacity = int(self.idx[_CAPACITY])
        self.mask = self.capacity - 1
        self.max_payload = self.capacity - FRAME_HEADER

    @classmethod
    def create(cls, name: str, capacity: int) -> Ring:
        """Create the segment and initialise an empty ring in it."""
        if capacity < MIN_CAPACITY or capacity & (capacity - 1):
            raise RingError(
                f"ring capacity must be a power of two >= {MIN_CAPACITY}, got {capacity}"
            )
        check_platform()
        seg = Segment.create(name, segment_bytes(capacity))
        idx = memoryview(seg.buf).cast("Q")
        idx[_CAPACITY] = capacity
        idx[_VERSION] = VERSION
        idx[_MAGIC] = MAGIC
        idx.release()
        return cls(seg)

    @classmethod
    def attach(cls, name: str) -> Ring:
        return cls(Segment.attach(name))

    # -- shared positions (for monitors, tests and both ends) -------------------
    @property
    def write_pos(self) -> int:
        return int(self.idx[_WRITE])

    @property
    def read_pos(self) -> int:
        return int(self.idx[_READ])

    @property
    def committed(self) -> int:
        return int(self.idx[_COMMITTED])

    @property
    def heartbeat(self) -> int:
        return int(self.idx[_HEARTBEAT])

    def beat(self) -> None:
        """Bump the heartbeat counter (consumer side only)."""
        self.idx[_HEARTBEAT] = self.idx[_HEARTBEAT] + 1

    def find_corrupt(self, start: int) -> int | None:
        """The position of the first invalid frame header from ``start`` (a frame boundary,
        such as ``committed``) up to the published ``write``; None if every one is valid.

        Invalid: a length that runs past the end of the data region or past ``write``
        (the consumer's `RingConsumer.drain` raises `CorruptFrameError` there).
        """
        idx, cap, mask = self.idx, self.capacity, self.mask
        w = int(idx[_WRITE])
        r = start
        while r < w:
            off = r & mask
            n = idx[(HEADER_BYTES + off) >> 3]
            if n == PAD and off:
                r += cap - off
                continue
            if n > cap - off - FRAME_HEADER or r + frame_size(n) > w:
                return r
            r += frame_size(n)
        return None

    def used_bytes(self) -> int:
        """Bytes not yet reclaimed: published minus committed."""
        return int(self.idx[_WRITE] - self.idx[_COMMITTED])

    def pending_bytes(self) -> int:
        """Bytes published but not yet fetched by the consumer."""
        return int(self.idx[_WRITE] - self.idx[_READ])

    def _release(self) -> None:
        self.idx.release()
        self.buf.release()

    def close(self) -> None:
        """Release the views and the mapping (the creator also unlinks)."""
        if self.segment.buf is not None:
            self._release()
        self.segment.close()


class RingProducer:
    """The one writer of a ring.  Not thread-safe: one producer per ring, by design."""

    __slots__ = ("_committed", "_space", "_wake", "_write", "ring")

    def __init__(self, ring: Ring, data_ready: EventFd, space_ready: EventFd) -> None:
        self.ring = ring
        self._wake = data_ready
        self._space = space_ready
        self._write = ring.write_pos
        self._committed = ring.committed

    def free_bytes(self) -> int:
        self._committed = int(self.ring.idx[_COMMITTED])
        return self.ring.capacity - (self._write - self._committed)

    def _check_size(self, n: int) -> None:
        if n > self.ring.max_payload:
            raise FrameTooLargeError(
                f"a {n:,}-byte frame can never fit in a ring of {self.ring.capacity:,} bytes "
                f"(max payload {self.ring.max_payload:,}); raise ENGINE_RING_BYTES"
            )

    def offer(self, frames: Sequence[bytes | bytearray | memoryview], start: int = 0) -> int:
        """Copy as many of ``frames[start:]`` as fit, publish once; returns how many.

        Never blocks.  A frame larger than the ring raises FrameTooLargeError
        before anything of it is written.
        """
        ring = self.ring
        buf, idx, cap, mask = ring.buf, ring.idx, ring.capacity, ring.mask
        w = self._write
        committed = self._committed
        refreshed = False
        i = start
        end = len(frames)
        while i < end:
            data = frames[i]
            n = len(data)
            total = FRAME_HEADER + ((n + 7) & ~7)
            off = w & mask
            pad = cap - off if off + total > cap else 0
            if w + pad + total - committed > cap:
                if not refreshed:
                    committed = self._committed = int(idx[_COMMITTED])
                    refreshed = True
                    continue
                if n > ring.max_payload:
                    self._check_size(n)
                if pad and w + pad - committed <= cap:
                    # Place the wrap marker now so the frame can start at 0 once
                    # the consumer has passed it.
                    idx[(HEADER_BYTES + off) >> 3] = PAD
                    w += pad
                break
            if pad:
                idx[(HEADER_BYTES + off) >> 3] = PAD
                w += pad
                off = 0
            pos = HEADER_BYTES + off
            idx[pos >> 3] = n
            buf[pos + FRAME_HEADER : pos + FRAME_HEADER + n] = data
            w += total
            i += 1
        if w != self._write:
            self._write = w
            idx[_WRITE] = w  # the one publishing store of this batch
            self._wake.signal()
        return i - start

    def request_space(self, wanted: bool) -> None:
        """Raise (or lower) the flag that makes the consumer signal space after a commit.

        For producers that wait for space their own way (an event loop sharing one
        space eventfd among many rings); re-``offer`` after raising it, then wait.
        """
        self.ring.idx[_SPACE_WANTED] = 1 if wanted else 0

    def write_nowait(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write the whole batch or nothing; raises QueueFull when it does not fit now."""
        for f in frames:
            self._check_size(len(f))
        need = self._bytes_needed(frames)
        if need > self.free_bytes():
            raise QueueFull(
                f"ring {self.ring.segment.name!r} is full: batch needs {need:,} bytes, "
                f"{self.free_bytes():,} of {self.ring.capacity:,} free"
            )
        written = self.offer(frames)
        if written != len(frames):  # cannot happen: space was checked above
            raise RingError(f"wrote {written} of {len(frames)} frames despite free space")

    def _bytes_needed(self, frames: Sequence[bytes | bytearray | memoryview]) -> int:
        """Upper bound of bytes the batch takes from the current position, pads included."""
        w, cap, mask = self._write, self.ring.capacity, self.ring.mask
        start = w
        for f in frames:
            total = frame_size(len(f))
            off = w & mask
            if off + total > cap:
                w += cap - off
            w += total
        return w - start

    def write(
        self, frames: Sequence[bytes | bytearray | memoryview], timeout: float | None = None
    ) -> None:
        """Write every frame, sleeping (never spinning) while the ring is full.

        Raises QueueFull if ``timeout`` seconds pass first; frames written before
        that stay written (the count is in the message).
        """
        for f in frames:
            self._check_size(len(f))
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self.offer(frames)
        while done < len(frames):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise QueueFull(
                    f"ring {self.ring.segment.name!r} stayed full for {timeout}s; "
                    f"{done} of {len(frames)} frames written"
                )
            idx = self.ring.idx
            idx[_SPACE_WANTED] = 1
            try:
                # Re-check after raising the flag: a commit may have slipped in.
                done += self.offer(frames, done)
                if done < len(frames):
                    step = SPACE_RECHECK_S if remaining is None else min(remaining, SPACE_RECHECK_S)
                    self._space.wait(step)
                    done += self.offer(frames, done)
            finally:
                idx[_SPACE_WANTED] = 0

    async def write_async(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        """Like :meth:`write` without a timeout, awaiting space on the running loop."""
        for f in frames:
            self._check_size(len(f))
        done = self.offer(frames)
        while done < len(frames):
            idx = self.ring.idx
            idx[_SPACE_WANTED] = 1
            try:
                done += self.offer(frames, done)
                if done < len(frames):
                    await self._space.wait_async(SPACE_RECHECK_S)
                    done += self.offer(frames, done)
            finally:
                idx[_SPACE_WANTED] = 0


class RingConsumer:
    """The one reader of a ring.  Starts at ``committed``: unsettled frames come again."""

    __slots__ = ("_read", "_space", "_wake", "ring")

    def __init__(self, ring: Ring, data_ready: EventFd, space_ready: EventFd) -> None:
        self.ring = ring
        self._wake = data_ready
        self._space = space_ready
        self._read = ring.committed
        ring.idx[_READ] = self._read

    @property
    def position(self) -> int:
        """Where the next drain starts (end of the last fetched frame)."""
        return self._read

    def drain(
        self, max_frames: int = 1 << 30, max_bytes: int = 1 << 62
    ) -> tuple[list[bytes], list[int]]:
        """Fetch every published frame (up to the limits); publish ``read`` once.

        Returns the payloads and, for each, the ring position just past it: commit
        that position once the frame is settled.
        """
        ring = self.ring
        buf, idx, cap, mask = ring.buf, ring.idx, ring.capacity, ring.mask
        r = self._read
        w = int(idx[_WRITE])
        out: list[bytes] = []
        ends: list[int] = []
        budget = max_bytes
        while r < w and len(out) < max_frames:
            off = r & mask
            pos = HEADER_BYTES + off
            n = idx[pos >> 3]
            if n == PAD:
                r += cap - off
                if not out and idx[_COMMITTED] == r - (cap - off):
                    self._commit_to(r)  # nothing unsettled before the pad: reclaim it now
                continue
            if n > cap - off - FRAME_HEADER or r + FRAME_HEADER + ((n + 7) & ~7) > w:
                if r != self._read:
                    break  # hand out the good frames before it; the next drain raises
                raise CorruptFrameError(
                    f"corrupt frame header {n:#x} at position {r} in ring {ring.segment.name!r} "
                    f"(published up to {w})",
                    r,
                    int(n),
                )
            if out and n > budget:
                break
            out.append(bytes(buf[pos + FRAME_HEADER : pos + FRAME_HEADER + n]))
            r += FRAME_HEADER + ((n + 7) & ~7)
            ends.append(r)
            budget -= n
        if r != self._read:
            self._read = r
            idx[_READ] = r
        return out, ends

    def skip_corrupt(
        self, position: int, starts: frozenset[int] = frozenset()
    ) -> tuple[int, bytes]:
        """Move the read position past the corrupt frame header at ``position``.

        ``position`` is where `drain` raised `CorruptFrameError` (the read position).
        The frame's end is the first 8-aligned position after the header from which
        valid headers lead exactly to the published ``write`` (and each of those
        frames' payload starts with a byte of ``starts``, when given): the frames
        after a broken length are kept.  If none qualifies, everything published up
        to ``write`` is skipped.  Returns that end (commit it once the skipped frame is
        settled) and the bytes between the header and it within the data region: the
        corrupt frame's payload and padding, as far as they can be known.
        """
        if position != self._read:
            raise RingError(f"skip_corrupt at {position}, but the reader is at {self._read}")
        ring = self.ring
        idx, cap, mask = ring.idx, ring.capacity, ring.mask
        w = int(idx[_WRITE])
        known: dict[int, bool] = {}
        end = w
        p = position + FRAME_HEADER
        while p < w:
            if self._leads_to(p, w, starts, known):
                end = p
                break
            p += FRAME_HEADER
        off = position & mask
        start = HEADER_BYTES + off + FRAME_HEADER
        stop = HEADER_BYTES + min(cap, off + (end - position))
        data = bytes(ring.buf[start:stop]) if stop > start else b""
        self._read = end
        idx[_READ] = end
        return end, data

    def _leads_to(self, p: int, w: int, starts: frozenset[int], known: dict[int, bool]) -> bool:
        """True if valid frame headers lead from ``p`` exactly to ``w`` (memoised in ``known``)."""
        ring = self.ring
        buf, idx, cap, mask = ring.buf, ring.idx, ring.capacity, ring.mask
        seen: list[int] = []
        q = p
        ok = False
        while q <= w:
            if q == w:
                ok = True
                break
            if q in known:
                ok = known[q]
                break
            seen.append(q)
            off = q & mask
            n = idx[(HEADER_BYTES + off) >> 3]
            if n == PAD:
                if not off:
                    break
                q += cap - off
                continue
            if not n or n > cap - off - FRAME_HEADER:
                break
            if starts and buf[HEADER_BYTES + off + FRAME_HEADER] not in starts:
                break
            q += FRAME_HEADER + ((n + 7) & ~7)
        for v in seen:
            known[v] = ok
        return ok

    def commit(self, position: int | None = None) -> None:
        """Mark every frame below ``position`` (default: all fetched) as settled."""
        pos = self._read if position is None else position
        idx = self.ring.idx
        if not idx[_COMMITTED] <= pos <= self._read:
            raise RingError(
                f"commit position {pos} outside [{idx[_COMMITTED]}, {self._read}] "
                f"in ring {self.ring.segment.name!r}"
            )
        off = pos & self.ring.mask
        if pos < self._read and off and idx[(HEADER_BYTES + off) >> 3] == PAD:
            # A wrap marker right after the last settled frame holds no message:
            # reclaim it too, or a producer waiting for the wrap would never wake.
            pos += self.ring.capacity - off
        self._commit_to(pos)

    def _commit_to(self, pos: int) -> None:
        idx = self.ring.idx
        idx[_COMMITTED] = pos
        if idx[_SPACE_WANTED]:
            self._space.signal()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until frames may be available; True if woken by the producer."""
        if self._read != self.ring.idx[_WRITE]:
            return True
        return self._wake.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Await until frames may be available (``loop.add_reader`` on the eventfd)."""
        if self._read != self.ring.idx[_WRITE]:
            return True
        return await self._wake.wait_async(timeout)
