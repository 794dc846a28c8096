"""The dead-letter stream ``{ns}:dlq``: durable dead letters of the whole cluster.

A partition owner writes a letter in the same fenced script that acknowledges
the entry it came in (`scripts.SETTLE`), so a letter exists exactly when its
entry was settled by the lease holder.  ``engine dlq list`` reads the stream
through any node; ``replay`` submits the letters again and deletes them.
The stream is capped at ``ENGINE_DLQ_MAX`` entries (oldest dropped), like the
embedded store.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from engine.core.deadletters import DeadLetterView, view
from ipc.codec import DECODE_ERRORS, Message, decode, encode
from ipc.records import DeadLetter

PAGE = 1000
_MISSING_OR_BAD: tuple[type[Exception], ...] = (KeyError, *DECODE_ERRORS)


def letter_fields(dl: DeadLetter, partition: int, node: str) -> list[bytes | str | int]:
    """A dead letter as the flat field list of one XADD (readable with redis-cli)."""
    msg = dl.message
    return [
        "id", msg.id,
        "recipient", msg.recipient,
        "reason", dl.reason,
        "attempts", dl.attempts,
        "error", dl.error,
        "partition", partition,
        "node", node,
        "at_ms", time.time_ns() // 1_000_000,
        "message", encode(msg),
        "payload_dropped", int(dl.payload_dropped),
    ]  # fmt: skip


def entry_letter(fields: dict[bytes, bytes]) -> DeadLetter:
    """A DLQ stream entry back as a DeadLetter; a broken one keeps what can be read."""
    try:
        msg = decode(fields[b"message"])
    except _MISSING_OR_BAD:
        msg = Message(
            id=int(fields.get(b"id", b"0") or 0),
            recipient=fields.get(b"recipient", b"").decode("utf-8", "replace"),
        )
    return DeadLetter(
        message=msg,
        reason=fields.get(b"reason", b"").decode("utf-8", "replace"),
        attempts=int(fields.get(b"attempts", b"0") or 0),
        error=fields.get(b"error", b"").decode("utf-8", "replace"),
        payload_dropped=fields.get(b"payload_dropped", b"0") == b"1",
    )


async def read_letters(client: Redis, key: str, limit: int) -> list[tuple[bytes, DeadLetter]]:
    """The oldest ``limit`` letters with their stream ids, in order."""
    out: list[tuple[bytes, DeadLetter]] = []
    start: bytes | str = "-"
    while len(out) < limit:
        page: Any = await client.xrange(key, min=start, max="+", count=min(PAGE, limit - len(out)))
        if not page:
            break
        out.extend((eid, entry_letter(fields)) for eid, fields in page)
        start = b"(" + page[-1][0]
    return out


async def list_views(
    client: Redis, key: str, limit: int
) -> list[tuple[tuple[int, int], DeadLetterView]]:
    """(position, view) of the oldest ``limit`` letters: the position is the stream id
    (milliseconds, sequence), unique and only growing, as page cursors need."""
    return [(stream_position(eid), view(dl)) for eid, dl in await read_letters(client, key, limit)]


def stream_position(eid: bytes) -> tuple[int, int]:
    ms, _, seq = eid.partition(b"-")
    return int(ms), int(seq)


def replay_options(dl: DeadLetter) -> dict[str, Any]:
    """The submit options that recreate a dead letter as a fresh message (attempts reset)."""
    m = dl.message
    return {
        "priority": m.priority,
        "kind": m.kind,
        "sender": m.sender,
        "tags": m.tags,
        "metadata": m.metadata or None,
        "dedup_key": m.dedup_key,
        "reply_to": m.reply_to,
    }
