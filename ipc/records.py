"""Records a worker sends back to the dispatcher on its return ring.

One return-ring frame is a msgpack array of these tagged records, written at
the end of a worker's loop tick.  ``FrameDone`` is how the dispatcher learns
that every message of one input frame is settled; it is written *before* the
worker commits that frame, so a crash can only repeat a report (which the
dispatcher recognises by position) and never lose one.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from ipc.codec import DECODE_ERRORS, Message
from ipc.errors import CodecError


class FrameDone(msgspec.Struct, array_like=True, tag=0, gc=False):
    """Every message of the input frame ending at ``end`` in ``lane`` is settled."""

    lane: int
    end: int
    delivered: int
    dead_lettered: int
    expired: int
    deferred: int = 0
    """Messages of the frame handed back to the dispatcher (`Deferred`): out of the
    ring, not settled."""


class Reply(msgspec.Struct, array_like=True, tag=1, gc=False):
    """The handler's answer to a request, matched by correlation id."""

    correlation_id: int
    ok: bool
    value: msgspec.Raw
    error: str = ""


class DeadLetter(msgspec.Struct, array_like=True, tag=2):
    """A message that will not be delivered, and why.

    ``lane`` and ``frame_end`` name the input frame it came in: the dispatcher
    keeps the letter provisional until that frame's FrameDone arrives, because a
    worker that dies before reporting the frame has its messages delivered again
    (and one may then succeed).  ``traceback`` is the last failure's formatted
    traceback, bounded by the worker (empty when there was no exception; a
    record from before the field existed decodes with it empty).
    ``payload_dropped`` is True when the worker sent the letter without its
    payload because the record did not fit the return ring: such a letter cannot
    be replayed.  ``replay_error`` is set by the dispatcher's store, never sent:
    why the last replay kept the letter.
    """

    message: Message
    reason: str
    attempts: int
    error: str = ""
    at_ns: int = 0
    lane: int = -1
    frame_end: int = 0
    traceback: str = ""
    payload_dropped: bool = False
    replay_error: str = ""


class Redelivered(msgspec.Struct, array_like=True, tag=3, gc=False):
    """A respawned worker fetched again ``count`` messages its predecessor had fetched."""

    count: int


class WorkerStarted(msgspec.Struct, array_like=True, tag=4, gc=False):
    """A new worker process took over the shard: what its predecessor left unreported is void."""

    pid: int


class AttemptFailed(msgspec.Struct, array_like=True, tag=5, gc=False):
    """A delivery attempt raised and will be retried: what the dispatcher logs as a WARNING.

    Sent only for the failures the worker's rate limit lets through;
    ``suppressed`` counts those held back before this one (see
    `engine.worker.failures`).  ``retry_in_s`` is the backoff before the next attempt.
    """

    message_id: int
    recipient: str
    attempt: int
    max_attempts: int
    retry_in_s: float
    exc_type: str
    error: str
    traceback: str = ""
    suppressed: int = 0


MAX_ERROR_CHARS = 4096
"""The longest error text a record carries (a dead letter's, a failed attempt's, a reply's)."""
MAX_TAGS = 64
MAX_TAG_CHARS = 256
MAX_METADATA = 64
MAX_METADATA_CHARS = 1024
"""Tags and metadata a shrunk dead letter keeps (count, and characters of each)."""
MAX_NAME_CHARS = 1024
"""A shrunk dead letter's recipient, sender, reply_to, dedup_key and user, when even
those alone do not fit the return ring."""


def clip(text: str, limit: int, total: int | None = None) -> str:
    """``text`` cut to at most ``limit`` characters, saying so at the end.

    ``total`` is the length of the whole text when ``text`` is already a prefix of it
    (a caller that avoided copying 10 MB of it).
    """
    total = len(text) if total is None else total
    if total <= limit and len(text) <= limit:
        return text
    marker = f"\u2026 [truncated, {total:,} chars]"
    return text[: max(0, limit - len(marker))] + marker


DEFERRED_OVERHEAD = 32
"""Bytes a `Deferred` record adds to its message: the record's array, tag and three
ints (22 at most) and the message re-encoded with every field (3 more); rounded up.
The dispatcher keeps messages this much below a lane frame's limit, so a return ring
as large as a lane ring can carry any of them back."""


class Deferred(msgspec.Struct, array_like=True, tag=6):
    """A message moved out of the ring: the dispatcher holds it until ``due_ns``.

    Sent for a retry that waits longer than ``ENGINE_MAX_RETRY_HOLD_S`` (``due_ns``
    is when it may run again, CLOCK_MONOTONIC) and for every later message of the
    same recipient and lane the worker fetches meanwhile (``due_ns`` 0: it follows).
    Provisional like a `DeadLetter` until the FrameDone of (``lane``, ``frame_end``)
    arrives: a worker that dies before that report delivers the frame again.
    """

    message: Message
    due_ns: int
    lane: int
    frame_end: int


ReturnRecord = (
    FrameDone | Reply | DeadLetter | Redelivered | WorkerStarted | AttemptFailed | Deferred
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[ReturnRecord])


def encode_records(records: Sequence[ReturnRecord]) -> bytes:
    return _encoder.encode(records)


def decode_records(buf: bytes) -> list[ReturnRecord]:
    try:
        return _decoder.decode(buf)
    except DECODE_ERRORS as exc:
        raise CodecError(f"bad return-ring frame: {exc}") from exc
