"""The wire data model: `Message` and its msgpack codec (the hot path).

Every message crosses at least two process boundaries (dispatcher -> ring ->
worker, and back for responses and dead letters), so the layout is chosen for
speed: array-like msgspec Structs (no field names on the wire), trailing
defaults omitted, and the payload carried as raw msgpack (`msgspec.Raw`) so the
dispatcher and worker never decode and re-encode user data. Encoders and typed
decoders are module-level and reused; building them per call costs more than
encoding a small message.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, TypeVar, overload

import msgspec

from ipc.errors import CodecError

__all__ = [
    "DECODE_ERRORS",
    "NO_PAYLOAD",
    "Kind",
    "Message",
    "Priority",
    "check_raw",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "encode_batch_into",
    "now_ns",
    "pack_payload",
    "parse_kind",
    "parse_priority",
]

T = TypeVar("T")
E = TypeVar("E", bound=enum.IntEnum)


class Priority(enum.IntEnum):
    """Delivery priority; the value is the ring lane index, and lower lanes drain first."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


class Kind(enum.IntEnum):
    """What a message is for, which decides how the dispatcher routes it."""

    DIRECT = 0
    BROADCAST = 1
    HARD_ONBOARD = 2
    SOFT_ONBOARD = 3
    REQUEST = 4
    RESPONSE = 5
    EVENT = 6


def _parse_enum(cls: type[E], value: object, noun: str) -> E:
    """Map a name (any case), a number or a member to `cls`, or say what is allowed."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        text = value.strip()
        member = cls.__members__.get(text.upper().replace("-", "_"))
        if member is not None:
            return member
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return cls(value)
        except ValueError:
            pass
    names = ", ".join(name.lower() for name in cls.__members__)
    numbers = f"{min(cls)}-{max(cls)}"
    raise ValueError(f"invalid {noun} {value!r}: expected one of {names} (or {numbers})")


def parse_priority(value: str | int | Priority) -> Priority:
    """Accept 'high', 'HIGH', 1 or Priority.HIGH, so config and API callers agree."""
    return _parse_enum(Priority, value, "priority")


def parse_kind(value: str | int | Kind) -> Kind:
    """Accept 'hard_onboard', 'hard-onboard', 2 or Kind.HARD_ONBOARD."""
    return _parse_enum(Kind, value, "kind")


_encoder = msgspec.msgpack.Encoder()

NO_PAYLOAD: msgspec.Raw = msgspec.Raw(_encoder.encode(None))
"""The default payload: msgpack nil (one byte), so an empty message stays tiny."""


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns; machine-wide on Linux, so latencies compare across processes."""
    return time.monotonic_ns()


def pack_payload(obj: Any) -> msgspec.Raw:
    """Encode a user object once, at the edge, so it travels as opaque raw msgpack.

    bytes, bytearray and memoryview become msgpack bin; anything msgspec can
    encode (dicts, lists, str, numbers, Structs, ...) becomes its msgpack form.
    """
    try:
        return msgspec.Raw(_encoder.encode(obj))
    except (TypeError, OverflowError) as exc:
        raise CodecError(f"cannot encode payload of type {type(obj).__name__}: {exc}") from exc


def check_raw(raw: msgspec.Raw) -> msgspec.Raw:
    """A payload given pre-encoded, checked to be one whole msgpack value.

    A broken Raw would spoil the batch frame that carries other callers' messages,
    so every edge (the dispatcher, the client) checks it before framing.  Only its
    structure is checked (decoded as Raw: skipped, not built): a string with bad
    UTF-8 inside spoils nothing but that message's own ``body()``.
    """
    try:
        msgspec.msgpack.decode(raw, type=msgspec.Raw)
    except DECODE_ERRORS as exc:
        raise CodecError(f"payload given as msgspec.Raw is not valid msgpack: {exc}") from exc
    return raw


@lru_cache(maxsize=256)
def _payload_decoder(type_: Any) -> msgspec.msgpack.Decoder[Any]:
    """Typed decoders are costly to build, so body() reuses one per target type."""
    return msgspec.msgpack.Decoder(type_)


class Message(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One message on the wire.

    Field order is the wire format (array-like), so only append new fields at
    the end, with defaults: decoders fill missing trailing fields with their
    defaults and skip extra ones, so old and new peers interoperate.

    omit_defaults: msgspec 0.22 ignores it for array-like structs (msgspec
    issue #720), so each default field still costs its 1-byte msgpack form
    (about 10 bytes per message in all). It is kept because it is free
    (measured: same speed) and, once msgspec honours it, the shorter arrays it
    produces are already accepted by every decoder of this type.

    gc=False: with a dict and a tuple field, msgspec would make every instance
    a GC-tracked container, and decoding a 256-message batch would then feed
    the cyclic collector hundreds of objects per batch. A Message cannot be
    part of a reference cycle while its fields hold what they are typed to
    hold (ints, strs, a tuple of strs, a str->str dict, bytes-like Raw), so
    untracking is safe. Never store a Message (or anything referring to one)
    inside its own `metadata` or `tags`.
    """

    id: int
    recipient: str
    sender: str = ""
    kind: Kind = Kind.DIRECT
    priority: Priority = Priority.NORMAL
    payload: msgspec.Raw = NO_PAYLOAD
    created_ns: int = 0
    """CLOCK_MONOTONIC ns at submit (`now_ns()`); the origin of every latency."""
    expires_ns: int = 0
    """CLOCK_MONOTONIC ns after which the message is never delivered; 0 = never."""
    attempt: int = 0
    correlation_id: int = 0
    """Matches a RESPONSE to its REQUEST; 0 = none."""
    reply_to: str = ""
    tags: tuple[str, ...] = ()
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    dedup_key: str = ""
    user: str = ""
    """Who sent it: set by the service from the authenticated token (never the client's
    claim), or by embedding code with ``user=``; empty otherwise."""
    released: bool = False
    """Set by the dispatcher on the first message it writes back to a ring after holding
    the recipient's messages for a long retry (``ENGINE_MAX_RETRY_HOLD_S``): the worker
    stops handing that recipient's messages back from here on."""

    @overload
    def body(self) -> Any: ...

    @overload
    def body(self, type: type[T]) -> T: ...

    def body(self, type: Any = Any) -> Any:
        """Decode the payload, validated as `type`; the only place user data is decoded."""
        try:
            return _payload_decoder(type).decode(self.payload)
        except DECODE_ERRORS as exc:
            raise CodecError(f"payload of message {self.id} is not a valid {type}: {exc}") from exc

    def expired(self, now: int) -> bool:
        """True once `now` (monotonic ns) is past `expires_ns`; 0 never expires."""
        return self.expires_ns != 0 and now >= self.expires_ns


_decoder = msgspec.msgpack.Decoder(Message)
_batch_decoder = msgspec.msgpack.Decoder(list[Message])
_FIELDS: tuple[str, ...] = Message.__struct_fields__

DECODE_ERRORS: tuple[type[Exception], ...] = (
    msgspec.DecodeError,
    UnicodeDecodeError,  # msgspec raises it, not DecodeError, for invalid UTF-8 in a str
    RecursionError,  # deeply nested arrays, even inside a skipped Raw payload
)
"""Everything msgspec raises for bad input; all of it becomes CodecError."""
_PATH = re.compile(r"`\$((?:\[\d+\])+)")


def _explain(exc: Exception, batch: bool) -> str:
    """Name the message and field behind msgspec's positional `$[i][j]` error path.

    Array-like structs have no field names on the wire, so msgspec can only
    report indices; the error path is rare, so spend the time to translate.
    """
    text = str(exc)
    match = _PATH.search(text)
    if match is None:
        return text
    indices = [int(i) for i in re.findall(r"\d+", match.group(1))]
    where = []
    if batch:
        where.append(f"message {indices.pop(0)}")
    if indices and indices[0] < len(_FIELDS):
        where.append(f"field {_FIELDS[indices[0]]!r}")
    return f"{', '.join(where)}: {text}" if where else text


def encode(msg: Message) -> bytes:
    """Encode one message (request/response paths, tests); rings use encode_batch."""
    return _encoder.encode(msg)


def decode(buf: bytes | bytearray | memoryview) -> Message:
    """Decode one message from bytes this process owns (see decode_batch on views)."""
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    try:
        return _decoder.decode(buf)
    except DECODE_ERRORS as exc:
        raise CodecError(f"cannot decode Message: {_explain(exc, batch=False)}") from exc


def encode_batch(msgs: Sequence[Message]) -> bytes:
    """Encode many messages as one msgpack array: one ring frame, one call into C."""
    if not isinstance(msgs, (list, tuple)):
        msgs = list(msgs)
    return _encoder.encode(msgs)


def encode_batch_into(msgs: Sequence[Message], buffer: bytearray, offset: int = 0) -> int:
    """Encode a batch straight into `buffer` at `offset`; returns the bytes written.

    Lets a producer reserve a length prefix and build the frame without an
    intermediate bytes object. `buffer` grows as needed and is truncated to
    the end of the encoded batch (msgspec keeps the allocation for reuse).
    """
    if not isinstance(msgs, (list, tuple)):
        msgs = list(msgs)
    if offset < 0 or offset > len(buffer):
        raise ValueError(f"offset {offset} outside buffer of {len(buffer)} bytes")
    _encoder.encode_into(msgs, buffer, offset)
    return len(buffer) - offset


def decode_batch(buf: bytes | bytearray | memoryview) -> list[Message]:
    """Decode a batch made by encode_batch.

    A decoded `Raw` payload points into the buffer it was decoded from. A view
    into a ring is overwritten once the slot is reclaimed, and an exported
    view keeps a shared-memory segment from closing, so anything but `bytes`
    is copied once here (one memcpy per batch) and every payload then
    references that private copy. A message kept for long (a dead-letter
    store) keeps the whole batch alive: give it `payload.copy()`.
    """
    if not isinstance(buf, bytes):
        buf = bytes(buf)
    try:
        return _batch_decoder.decode(buf)
    except DECODE_ERRORS as exc:
        raise CodecError(
            f"cannot decode Message batch of {len(buf)} bytes: {_explain(exc, batch=True)}"
        ) from exc
