"""The stream entry: one batch of messages for one partition, as the producer wrote it.

Fields: ``m`` is a msgpack array of encoded `Message`s (exactly a ring batch
frame, so the consumer passes each message's bytes through untouched), ``h`` a
small msgpack header ``[node, wall_ns, mono_ns, notify]``: the producing node
(where replies and settle notices go), its two clocks when it wrote the entry
(so another host can translate ``created_ns``/``expires_ns``, which are
CLOCK_MONOTONIC of the producer), and whether the producer waits for a settle
notice.  Acks, claims and the poison counter work per entry, like ring frames.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import msgspec

from ipc.codec import DECODE_ERRORS, Kind, Message, Priority, decode_batch, encode

FIELD_MESSAGES = b"m"
FIELD_HEADER = b"h"
_REQUEST = Kind.REQUEST.value
SAME_HOST_NS = 1_000_000  # clock offsets closer than this: the same host, no translation
_MISSING_OR_BAD: tuple[type[Exception], ...] = (KeyError, *DECODE_ERRORS)


class Header(msgspec.Struct, array_like=True, frozen=True):
    node: str
    wall_ns: int
    mono_ns: int
    notify: bool = False


class Head(msgspec.Struct, array_like=True, gc=False):
    """The leading fields of an encoded Message: enough to route it (the rest is skipped)."""

    id: int
    recipient: str
    sender: str = ""
    kind: int = 0
    priority: Priority = Priority.NORMAL


class RequestHead(msgspec.Struct, array_like=True, gc=False):
    """The fields up to the correlation id, decoded only for entries that hold requests."""

    id: int
    recipient: str
    sender: str = ""
    kind: int = 0
    priority: Priority = Priority.NORMAL
    payload: msgspec.Raw = msgspec.Raw(b"\xc0")
    created_ns: int = 0
    expires_ns: int = 0
    attempt: int = 0
    correlation_id: int = 0


_header_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(Header)
_heads = msgspec.msgpack.Decoder(list[Head])
_request_heads = msgspec.msgpack.Decoder(list[RequestHead])
_raws = msgspec.msgpack.Decoder(list[msgspec.Raw])

_ENTRY_ERRORS: tuple[type[Exception], ...] = (*DECODE_ERRORS, msgspec.ValidationError)
Routed = tuple[int, str, int, bytes]
"""(id, recipient, lane, encoded message): the dispatcher's Outgoing tuple."""


class BadEntry(ValueError):
    """A stream entry this node cannot decode; it is dead-lettered, never retried."""


class Decoded(NamedTuple):
    header: Header
    messages: list[Routed]
    requests: list[int]  # correlation ids of the requests among them


def header(node: str, notify: bool) -> bytes:
    return _header_encoder.encode(Header(node, time.time_ns(), time.monotonic_ns(), notify))


def clock_offset_ns() -> int:
    """This host's CLOCK_MONOTONIC minus its wall clock, now."""
    return time.monotonic_ns() - time.time_ns()


def decode_entry(fields: dict[bytes, bytes] | None, offset_ns: int) -> Decoded:
    """Split an entry into routable messages; ``offset_ns`` is `clock_offset_ns()` here.

    On the producer's host the messages pass through as they are; from another
    host their monotonic timestamps are shifted by the difference of the two
    hosts' clock offsets (wall clocks must be in sync, NTP-close, for TTLs and
    latencies to mean the same there).
    """
    if not fields or FIELD_MESSAGES not in fields or FIELD_HEADER not in fields:
        raise BadEntry(f"entry without the fields m and h: {sorted(fields or {})}")
    frame = fields[FIELD_MESSAGES]
    try:
        head = _header_decoder.decode(fields[FIELD_HEADER])
        heads = _heads.decode(frame)
        raws = _raws.decode(frame)
    except _ENTRY_ERRORS as exc:
        raise BadEntry(f"undecodable entry: {exc}") from exc
    requests: list[int] = []
    if any(h.kind == _REQUEST for h in heads):
        requests = [
            h.correlation_id
            for h in _request_heads.decode(frame)
            if h.kind == _REQUEST and h.correlation_id
        ]
    shift = offset_ns - (head.mono_ns - head.wall_ns)
    if -SAME_HOST_NS < shift < SAME_HOST_NS:
        routed: list[Routed] = [
            (h.id, h.recipient, h.priority, bytes(r)) for h, r in zip(heads, raws, strict=True)
        ]
        return Decoded(head, routed, requests)
    try:
        msgs = decode_batch(frame)
    except DECODE_ERRORS as exc:
        raise BadEntry(f"undecodable entry: {exc}") from exc
    return Decoded(head, [_shifted(m, shift) for m in msgs], requests)


def _shifted(msg: Message, shift: int) -> Routed:
    if msg.created_ns:
        msg.created_ns += shift
    if msg.expires_ns:
        msg.expires_ns += shift
    return (msg.id, msg.recipient, msg.priority, encode(msg))


def messages_of(fields: dict[bytes, bytes] | None) -> list[Message]:
    """Every message of an entry, decoded (dead-lettering a whole entry); [] if it cannot be."""
    try:
        return decode_batch((fields or {})[FIELD_MESSAGES])
    except _MISSING_OR_BAD:
        return []
