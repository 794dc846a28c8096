"""Reporting and committing: return records go out on the return ring, then frames commit.

A frame is committed in its lane only after the ``FrameDone`` that covers it is
published, so a crash can repeat a report but never lose one.  Apart from
settling because this is the one place that rule, the return ring's framing
(count and byte limits, shrinking a record too big for it) and back-pressure
from a lagging dispatcher are handled.
"""

from __future__ import annotations

import msgspec

from engine.worker.delivery import FrameTrack
from engine.worker.failures import MAX_TRACEBACK_CHARS
from engine.worker.state import WorkerState
from ipc.codec import Message
from ipc.records import (
    MAX_ERROR_CHARS,
    MAX_METADATA,
    MAX_METADATA_CHARS,
    MAX_NAME_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    AttemptFailed,
    DeadLetter,
    FrameDone,
    Reply,
    ReturnRecord,
    clip,
    encode_records,
)
from ipc.shard import LANES

RECORDS_PER_FRAME = 512
NIL = msgspec.Raw(b"\xc0")
"""msgpack nil: the value of a failed reply, the payload of a shrunk dead letter."""


class Committing(WorkerState):
    """The flusher: publish return records, then commit the frames they cover."""

    def _maybe_commit(self, track: FrameTrack) -> None:
        frames = self.frames[track.lane]
        if frames and frames[0] is track:
            self.commit_dirty[track.lane] = True
            self.flush_wanted.set()

    async def flusher(self) -> None:
        """Publish return records, then commit the frames they cover (never before)."""
        while True:
            await self.flush_wanted.wait()
            self.flush_wanted.clear()
            await self.flush()
            if self.stopping and self.unsettled == 0 and not self.out:
                return

    async def flush(self) -> None:
        """Serialised: two concurrent flushes could publish FrameDone out of order."""
        async with self.flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        commits: list[tuple[int, int]] = []
        for lane in range(LANES):
            if not self.commit_dirty[lane]:
                continue
            self.commit_dirty[lane] = False
            frames = self.frames[lane]
            end = -1
            while frames and frames[0].remaining == 0:
                t = frames.popleft()
                d, x, e, f = t.counts
                self.uncommitted -= d + x + e + f
                self.out.append(FrameDone(lane, t.end, d, x, e, f))
                end = t.end
            if end >= 0:
                commits.append((lane, end))
        if self.parked_dirty:
            # Before the reports and commits that rely on it: the next worker of this
            # shard must hand back what this one would have (see ShardMemory.save_parked).
            self.parked_dirty = False
            self.shard.save_parked(self.parked)
        if self.out:
            records, self.out = self.out, []
            chunks = self._return_frames(records)
            done = self.returns.offer(chunks)
            if done < len(chunks):
                self.returns_waiting = True
                try:
                    await self.returns.write_async(chunks[done:])
                finally:
                    self.returns_waiting = False
                    self.wake.set()  # the reader may fetch again
        for lane, end in commits:
            self.consumers[lane].commit(end)
        if commits:
            self.wake.set()  # committed frames leave the window: the reader may fetch

    def _return_frames(self, records: list[ReturnRecord]) -> list[bytes]:
        """Encode records into frames that fit the return ring (by count and by bytes)."""
        limit = self.returns.ring.max_payload // 2
        frames: list[bytes] = []
        chunk: list[ReturnRecord] = []
        size = 0
        for original in records:
            rec = original
            one = len(encode_records([rec]))
            if one > limit:
                rec = _shrunk(rec, one, limit)
                one = len(encode_records([rec]))
            if chunk and (len(chunk) >= RECORDS_PER_FRAME or size + one > limit):
                frames.append(encode_records(chunk))
                chunk, size = [], 0
            chunk.append(rec)
            size += one
        if chunk:
            frames.append(encode_records(chunk))
        return frames


def _shrunk(rec: ReturnRecord, size: int, limit: int) -> ReturnRecord:
    """A record too big for the return ring, without its bulk (and saying so).

    A dead letter loses, in this order until it fits: the bulk of its error,
    traceback, tags and metadata (each cut with a marker), its payload (marked
    ``payload_dropped``), then the bulk of its recipient, sender and other names;
    one that still does not fit becomes a short ``record_too_large`` letter.  Never
    a record the ring refuses: that would kill the flusher and so the worker, and
    the frame would come back after every respawn.
    """
    note = f"(a {size:,}-byte record exceeds the return ring's {limit:,}-byte limit)"
    if isinstance(rec, Reply):
        return Reply(rec.correlation_id, False, NIL, f"reply too large {note}")
    if isinstance(rec, AttemptFailed):
        return msgspec.structs.replace(
            rec,
            traceback="",
            error=clip(rec.error, 1000),
            recipient=clip(rec.recipient, MAX_NAME_CHARS),
            exc_type=clip(rec.exc_type, MAX_NAME_CHARS),
        )
    if not isinstance(rec, DeadLetter):
        return rec
    msg = rec.message
    bounded = msgspec.structs.replace(
        rec,
        error=clip(rec.error, MAX_ERROR_CHARS),
        traceback=clip(rec.traceback, MAX_TRACEBACK_CHARS),
        message=msgspec.structs.replace(
            msg, tags=_capped_tags(msg.tags), metadata=_capped_metadata(msg.metadata)
        ),
    )
    if _size(bounded) <= limit:
        return bounded
    msg = msgspec.structs.replace(bounded.message, payload=NIL)
    dropped = msgspec.structs.replace(
        bounded,
        message=msg,
        error=f"{bounded.error} [payload dropped {note}]",
        payload_dropped=True,
    )
    if _size(dropped) <= limit:
        return dropped
    named = msgspec.structs.replace(
        dropped,
        traceback="",
        message=msgspec.structs.replace(
            msg,
            recipient=clip(msg.recipient, MAX_NAME_CHARS),
            sender=clip(msg.sender, MAX_NAME_CHARS),
            reply_to=clip(msg.reply_to, MAX_NAME_CHARS),
            dedup_key=clip(msg.dedup_key, MAX_NAME_CHARS),
            user=clip(msg.user, MAX_NAME_CHARS),
        ),
    )
    if _size(named) <= limit:
        return named
    # Nothing of the message fits: its id, lane and frame still settle it.
    return DeadLetter(
        Message(id=msg.id, recipient="", kind=msg.kind, priority=msg.priority, payload=NIL),
        "record_too_large",
        rec.attempts,
        f"{rec.reason}: {note}"[:MAX_NAME_CHARS],
        rec.at_ns,
        rec.lane,
        rec.frame_end,
        payload_dropped=True,
    )


def _size(rec: ReturnRecord) -> int:
    return len(encode_records([rec]))


def _capped_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    if len(tags) <= MAX_TAGS and all(len(t) <= MAX_TAG_CHARS for t in tags):
        return tags
    capped = tuple(clip(t, MAX_TAG_CHARS) for t in tags[:MAX_TAGS])
    if len(tags) > MAX_TAGS:
        capped += (f"\u2026 [{len(tags) - MAX_TAGS:,} more tags cut]",)
    return capped


def _capped_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) <= MAX_METADATA and all(
        len(k) + len(v) <= MAX_METADATA_CHARS for k, v in metadata.items()
    ):
        return metadata
    half = MAX_METADATA_CHARS // 2
    capped = {clip(k, half): clip(v, half) for k, v in list(metadata.items())[:MAX_METADATA]}
    if len(metadata) > MAX_METADATA:
        capped["\u2026"] = f"[{len(metadata) - MAX_METADATA:,} more entries cut]"
    return capped
