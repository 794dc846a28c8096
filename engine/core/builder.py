"""Building outgoing messages: option validation, encoding, and packing them into batch frames.

Apart from the dispatcher because none of it touches a ring or the event loop:
a message is checked and encoded once, at the edge, into an ``Outgoing``
tuple whose bytes the dispatcher only appends and concatenates.  A bad option
or payload raises here, before anything of the call is queued.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

import msgspec

from engine.config import Config
from engine.errors import FieldTooLarge, FrameTooLargeError
from ipc.codec import Kind, Priority, check_raw, pack_payload, parse_kind, parse_priority

_PRIORITIES: dict[object, Priority] = {p.name.lower(): p for p in Priority} | {
    p: p for p in Priority
}
_KINDS: dict[object, Kind] = {k.name.lower(): k for k in Kind} | {k: k for k in Kind}
monotonic_ns = time.monotonic_ns
MAX_TTL_S = 31_536_000  # one year, as ENGINE_DEFAULT_TTL_S allows
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class Options(NamedTuple):
    """Validated options shared by the messages of one submit call."""

    priority: Priority
    kind: Kind
    ttl_ns: int
    sender: str
    correlation_id: int
    reply_to: str
    tags: tuple[str, ...]
    metadata: dict[str, str]
    dedup_key: str
    user: str = ""


Outgoing = tuple[int, str, int, bytes]
"""A validated, encoded message: (id, recipient, lane, data); a plain tuple, cheap to make."""


_encode = msgspec.msgpack.Encoder().encode
_EMPTY: dict[str, str] = {}


def _checked_extras(
    sender: object,
    reply_to: object,
    dedup_key: object,
    correlation_id: object,
    tags: Iterable[str],
    metadata: dict[str, str] | None,
    user: object = "",
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Type-check the optional fields here, so a bad one never poisons a worker's batch."""
    for name, value in (
        ("sender", sender),
        ("reply_to", reply_to),
        ("dedup_key", dedup_key),
        ("user", user),
    ):
        if type(value) is not str:
            raise ValueError(f"{name} must be a string, got {_preview(value)}")
    if type(correlation_id) is not int or not 0 <= correlation_id < 1 << 63:
        raise ValueError(f"correlation_id must be an integer in [0, 2**63), got {correlation_id!r}")
    tag_tuple = tuple(tags)
    if not all(type(t) is str for t in tag_tuple):
        raise ValueError(f"tags must be strings, got {_preview(tag_tuple)}")
    meta = dict(metadata or {})
    if not all(type(k) is str and type(v) is str for k, v in meta.items()):
        raise ValueError(f"metadata must map strings to strings, got {_preview(meta)}")
    return tag_tuple, meta


def check_name(field: str, value: str, limit: int) -> None:
    """Refuse a name (recipient, topic, sender, ...) longer than ENGINE_MAX_RECIPIENT_BYTES.

    Measured in UTF-8 bytes; a string of at most ``limit // 4`` characters always
    fits, so the common short name costs one ``len``.
    """
    if len(value) <= limit >> 2:
        return
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise FieldTooLarge(
            f"{field} {_preview(value)} is {size:,} bytes; the limit is {limit:,} "
            "(ENGINE_MAX_RECIPIENT_BYTES)"
        )


def check_extras_size(tags: tuple[str, ...], metadata: dict[str, str], limit: int) -> None:
    """Refuse tags and metadata that encode to more than ENGINE_MAX_METADATA_BYTES together."""
    size = len(_encode((tags, metadata)))
    if size > limit:
        raise FieldTooLarge(
            f"tags and metadata ({len(tags):,} tags, {len(metadata):,} metadata entries) are "
            f"{size:,} bytes; the limit is {limit:,} (ENGINE_MAX_METADATA_BYTES)"
        )


def _preview(value: object, width: int = 40) -> str:
    """The start of a value's repr, for an error that stays short whatever the value."""
    if isinstance(value, str | bytes) and len(value) > width:
        value = value[:width]
        return f"{value!r}..."
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}..."


def pack_frames(items: list[bytes], size: int, max_bytes: int) -> list[tuple[bytes, int]]:
    """Pack encoded messages into batch frames of at most ``size`` items and ``max_bytes``.

    Returns (frame, number of messages in it) pairs.
    """
    if len(items) <= size and 5 + sum(map(len, items)) <= max_bytes:
        # The common case, one frame: lengths summed in C, no loop per message.
        return [(array_header(len(items)) + b"".join(items), len(items))]
    frames: list[tuple[bytes, int]] = []
    start, total = 0, 5
    for i, item in enumerate(items):
        if i > start and (i - start >= size or total + len(item) > max_bytes):
            frames.append((array_header(i - start) + b"".join(items[start:i]), i - start))
            start, total = i, 5
        total += len(item)
    n = len(items) - start
    frames.append((array_header(n) + b"".join(items[start:]), n))
    return frames


def array_header(n: int) -> bytes:
    """msgpack array header, so pre-encoded messages concatenate into one batch frame."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + _U16.pack(n)
    return b"\xdd" + _U32.pack(n)


class MessageBuilder:
    """Validates options and encodes messages; hands out the engine's message ids."""

    def __init__(self, config: Config, max_message_bytes: int) -> None:
        self.config = config
        self.max_message_bytes = max_message_bytes
        self.ids = itertools.count(1)  # message ids, and request correlation ids
        self.default_options = self.options()

    def options(
        self,
        *,
        priority: str | int | Priority = Priority.NORMAL,
        ttl: float | None = None,
        kind: str | int | Kind = Kind.DIRECT,
        sender: str = "",
        correlation_id: int = 0,
        reply_to: str = "",
        tags: Iterable[str] = (),
        metadata: dict[str, str] | None = None,
        dedup_key: str = "",
        user: str = "",
    ) -> Options:
        """Validate the per-message options once (a batch shares them)."""
        prio = _PRIORITIES.get(priority)
        if prio is None or type(priority) is bool:
            prio = parse_priority(priority)
        knd = _KINDS.get(kind)
        if knd is None or type(kind) is bool:
            knd = parse_kind(kind)
        if ttl is None:
            ttl = self.config.default_ttl_s
        elif type(ttl) not in (int, float) or not 0 <= ttl <= MAX_TTL_S:
            raise ValueError(f"ttl must be a number of seconds in [0, {MAX_TTL_S}], got {ttl!r}")
        if not (
            tags == ()
            and metadata is None
            and type(sender) is str
            and type(reply_to) is str
            and type(dedup_key) is str
            and type(correlation_id) is int
            and type(user) is str
        ):
            tags, metadata = _checked_extras(
                sender, reply_to, dedup_key, correlation_id, tags, metadata, user
            )
            if tags or metadata:
                check_extras_size(tuple(tags), metadata or _EMPTY, self.config.max_metadata_bytes)
        limit = self.config.max_recipient_bytes
        check_name("sender", sender, limit)
        check_name("reply_to", reply_to, limit)
        check_name("dedup_key", dedup_key, limit)
        return Options(prio, knd, int(ttl * 1e9), sender, correlation_id, reply_to,
                       tuple(tags), metadata or _EMPTY, dedup_key, user)  # fmt: skip

    def build(self, recipient: str, payload: Any, **options: Any) -> Outgoing:
        """Validate and encode one message (see ``build_many``)."""
        opts = self.options(**options) if options else self.default_options
        return self.build_many(((recipient, payload),), opts)[0]

    def build_many(
        self, items: Iterable[tuple[str, Any]], opts: Options, *, raw_checked: bool = False
    ) -> list[Outgoing]:
        """Encode messages that share ``opts``; all or nothing (raises before any is queued).

        The encoded form is a plain tuple in Message's field order, which msgspec
        encodes to exactly the bytes of the array-like Message, without building one.
        ``raw_checked``: every ``msgspec.Raw`` payload came out of a msgspec decode
        (the ingress's frames), which checked its structure, so the batch frame
        cannot be spoiled; bad UTF-8 inside fails that message's ``body()`` only.
        """
        prio, knd, ttl_ns, sender, cid, reply_to, tags, meta, dedup, user = opts
        enc, limit = _encode, self.max_message_bytes
        short = (name_limit := self.config.max_recipient_bytes) >> 2
        out: list[Outgoing] = []
        append = out.append
        # One clock read per call: the messages of one call are created together.
        created = monotonic_ns()
        expires = created + ttl_ns if ttl_ns else 0
        checked: object = None  # the last Raw checked: a broadcast repeats one payload
        # A plain int, not the Priority member: a tuple of atomic values only is
        # untracked by the cyclic GC at its first collection, while one holding an
        # enum member (a class instance) stays tracked and is scanned again and
        # again while the buffers hold it (measured: ~0.4 µs a message).
        lane = int(prio)
        for (recipient, payload), mid in zip(items, self.ids, strict=False):
            if type(recipient) is not str or not recipient:
                raise ValueError(f"recipient must be a non-empty string, got {_preview(recipient)}")
            if len(recipient) > short:
                check_name("recipient", recipient, name_limit)
            if type(payload) is msgspec.Raw:
                if not (raw_checked or payload is checked):
                    check_raw(payload)  # a bad Raw would spoil its whole batch frame
                    checked = payload
                raw = payload
            else:
                raw = pack_payload(payload)
            data = enc(
                (mid, recipient, sender, knd, prio, raw, created,
                 expires, 0, cid, reply_to, tags, meta, dedup, user)
            )  # fmt: skip
            if len(data) > limit:
                raise FrameTooLargeError(
                    f"message to {_preview(recipient)} encodes to {len(data):,} bytes; a ring of "
                    f"ENGINE_RING_BYTES={self.config.ring_bytes:,} carries at most "
                    f"{limit:,} per message"
                )
            append((mid, recipient, lane, data))
        return out
