"""Every field of a return record is bounded: a dead letter always fits the return ring."""

from __future__ import annotations

import msgspec

from engine.worker.commit import _shrunk
from ipc.codec import Message, pack_payload
from ipc.records import DeadLetter, encode_records

LIMIT = 32 * 1024


def _size(rec: DeadLetter) -> int:
    return len(encode_records([rec]))


def _letter(**fields: object) -> DeadLetter:
    msg = msgspec.structs.replace(Message(id=7, recipient="r", payload=pack_payload("p")), **fields)
    return DeadLetter(msg, "max_attempts", 1, "E: " + "e" * 100_000, 5, 2, 99, "t" * 50_000)


def test_error_tags_and_metadata_are_cut_first_and_the_payload_kept() -> None:
    rec = _letter(tags=tuple(f"t{i}" * 300 for i in range(500)), metadata={"k": "v" * 90_000})
    out = _shrunk(rec, _size(rec), LIMIT)
    assert isinstance(out, DeadLetter) and _size(out) <= LIMIT
    assert out.message.body() == "p" and not out.payload_dropped
    assert out.error.endswith("[truncated, 100,003 chars]")
    assert len(out.message.tags) == 65 and out.message.tags[-1].endswith("436 more tags cut]")
    assert out.message.metadata["k"].endswith("[truncated, 90,000 chars]")


def test_a_large_payload_is_dropped_and_marked() -> None:
    rec = _letter(payload=pack_payload("x" * 100_000))
    out = _shrunk(rec, _size(rec), LIMIT)
    assert isinstance(out, DeadLetter) and _size(out) <= LIMIT
    assert out.payload_dropped and out.message.body() is None and "payload dropped" in out.error


def test_a_recipient_alone_too_large_is_cut_and_then_the_letter_still_settles() -> None:
    rec = _letter(recipient="r" * 100_000, sender="s" * 100_000)
    out = _shrunk(rec, _size(rec), LIMIT)
    assert isinstance(out, DeadLetter) and _size(out) <= LIMIT
    assert out.message.recipient.endswith("[truncated, 100,000 chars]")
    tiny = _shrunk(rec, _size(rec), 600)
    assert isinstance(tiny, DeadLetter) and _size(tiny) <= 600
    assert (tiny.reason, tiny.message.id, tiny.message.recipient) == ("record_too_large", 7, "")
    assert (tiny.lane, tiny.frame_end) == (2, 99)
