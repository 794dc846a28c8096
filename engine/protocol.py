"""The binary ingress protocol: length-prefixed msgpack frames, typed with msgspec.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack,
one of the tagged, array-like structs below.  The client sends ``Hello``
first (with the token when the service requires one), then any number of
requests without waiting for answers (pipelining); the service answers each
request frame with exactly one ``Ack``, ``Response``, ``BatchAnswer`` or
``Error`` carrying the request's ``seq``, in the order the requests arrived.

Payloads travel as raw msgpack (``msgspec.Raw``): the service passes them to
the rings without decoding and re-encoding them.  The length is checked
against ``ENGINE_MAX_FRAME_BYTES`` before any buffer is allocated for the body.
"""

from __future__ import annotations

import struct
from typing import Final

import msgspec

PROTOCOL_VERSION: Final = 1
NIL: Final = msgspec.Raw(b"\xc0")  # msgpack nil: an ItemAnswer's value when it has none
HEADER: Final = struct.Struct(">I")
HEADER_BYTES: Final = HEADER.size

# Error codes carried by ``Error.code``; the client maps them to typed exceptions.
ERR_AUTH: Final = "auth"  # missing or wrong token
ERR_BAD_FRAME: Final = "bad_frame"  # not msgpack, wrong types, unknown frame kind
ERR_TOO_LARGE: Final = "too_large"  # length header above ENGINE_MAX_FRAME_BYTES
ERR_BAD_REQUEST: Final = "bad_request"  # well-formed frame with invalid content
ERR_TIMEOUT: Final = "timeout"  # a request got no reply in time
ERR_HANDLER: Final = "handler_error"  # the handler rejected the request / it was dead-lettered
ERR_CLOSED: Final = "closed"  # the service is shutting down
ERR_BUSY: Final = "busy"  # too many connections
ERR_INTERNAL: Final = "internal"  # a bug on the server side; the reason says what
ERR_RATE_LIMITED: Final = "rate_limited"  # over ENGINE_RATE_LIMIT; Error.retry_after_s says when


class SendOptions(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """Options shared by the messages of one Submit (the Engine's ``submit`` keywords)."""

    priority: str | int = "normal"
    ttl_s: float | None = None
    kind: str | int = "direct"
    sender: str = ""
    reply_to: str = ""
    tags: tuple[str, ...] = ()
    metadata: dict[str, str] = {}
    dedup_key: str = ""


DEFAULT_OPTIONS: Final = SendOptions()


# -- client -> service ---------------------------------------------------------------
class Hello(msgspec.Struct, array_like=True, tag=0):
    """First frame of a connection: protocol version, token (if the service needs one)."""

    version: int = PROTOCOL_VERSION
    token: str = ""
    client: str = ""


class Submit(msgspec.Struct, array_like=True, tag=1):
    """Queue ``items`` ((recipient, raw msgpack payload) pairs) with shared ``options``.

    The Ack comes once every item is in a ring, or, with ``settled``, once every
    item was delivered, dead-lettered or expired.
    """

    seq: int
    items: list[tuple[str, msgspec.Raw]]
    options: SendOptions = DEFAULT_OPTIONS
    settled: bool = False
    keys: list[str] = []
    """One dedup_key per item (an idempotent client's), or none: see ENGINE_DEDUP_WINDOW_S."""


class Request(msgspec.Struct, array_like=True, tag=2):
    """Deliver one message and answer with the handler's return value (a Response)."""

    seq: int
    recipient: str
    payload: msgspec.Raw
    timeout_s: float = 30.0
    options: SendOptions = DEFAULT_OPTIONS
    cache: bool = False
    """A read that may be shared: see ``BatchItem.cache``."""
    cache_ttl_s: float | None = None


class Publish(msgspec.Struct, array_like=True, tag=3):
    """One message to every subscriber of ``topic``; the Ack lists the message ids."""

    seq: int
    topic: str
    payload: msgspec.Raw
    options: SendOptions = DEFAULT_OPTIONS


class Subscribe(msgspec.Struct, array_like=True, tag=4):
    """Add ``recipient`` to ``topic`` (``unsubscribe`` removes it)."""

    seq: int
    topic: str
    recipient: str
    unsubscribe: bool = False


class Register(msgspec.Struct, array_like=True, tag=5):
    """Add ``recipient`` to the broadcast set (``unregister`` removes it)."""

    seq: int
    recipient: str
    unregister: bool = False


class Broadcast(msgspec.Struct, array_like=True, tag=6):
    """One message to every registered recipient; the Ack lists the message ids."""

    seq: int
    payload: msgspec.Raw
    options: SendOptions = DEFAULT_OPTIONS


class BatchItem(msgspec.Struct, array_like=True):
    """One request of a ``Batch`` (the fields of ``engine.core.batch.BatchRequest``)."""

    recipient: str
    payload: msgspec.Raw
    priority: str | int = "normal"
    timeout_s: float = 30.0
    cache: bool = False
    """Identical cacheable requests of one user run once; the answer is cached."""
    cache_ttl_s: float | None = None


class Batch(msgspec.Struct, array_like=True, tag=7):
    """Run ``items`` as requests at once (``request_many``); answered by one ``BatchAnswer``.

    ``concurrency`` 0 means the service's ENGINE_BATCH_CONCURRENCY.
    """

    seq: int
    items: list[BatchItem]
    concurrency: int = 0


# -- service -> client ----------------------------------------------------------------
class Welcome(msgspec.Struct, array_like=True, tag=100):
    """Answer to Hello: the service accepted the connection."""

    version: int
    server: str
    max_frame_bytes: int


class Ack(msgspec.Struct, array_like=True, tag=101):
    """The request ``seq`` succeeded; ``ids`` are the ids of the messages it queued."""

    seq: int
    ids: list[int] = []


class Response(msgspec.Struct, array_like=True, tag=102):
    """The handler's return value (raw msgpack) for Request ``seq``."""

    seq: int
    value: msgspec.Raw


class Error(msgspec.Struct, array_like=True, tag=103):
    """Request ``seq`` failed (seq 0: the connection or a frame that had none)."""

    seq: int
    code: str
    reason: str
    retry_after_s: float = 0.0
    """With code ``rate_limited``: when the frame would be accepted."""


class ItemAnswer(msgspec.Struct, array_like=True):
    """The answer to one request of a Batch: a value (``ok``) or an error code and reason."""

    ok: bool
    value: msgspec.Raw = NIL
    code: str = ""
    reason: str = ""
    cached: bool = False
    deduplicated: bool = False
    duration_s: float = 0.0
    attempts: int = 0


class BatchFigures(msgspec.Struct, array_like=True):
    """The figures of one batch (``engine.core.batch.BatchStats``)."""

    total_duration_s: float
    average_duration_s: float
    cache_hit_rate: float
    deduplication_rate: float
    requests: int
    executed: int


class BatchAnswer(msgspec.Struct, array_like=True, tag=104):
    """The answer to Batch ``seq``: one ItemAnswer per request, in request order."""

    seq: int
    responses: list[ItemAnswer]
    stats: BatchFigures


ClientFrame = Hello | Submit | Request | Publish | Subscribe | Register | Broadcast | Batch
ServerFrame = Welcome | Ack | Response | Error | BatchAnswer

_encoder = msgspec.msgpack.Encoder()
client_decoder: Final = msgspec.msgpack.Decoder(ClientFrame)
server_decoder: Final = msgspec.msgpack.Decoder(ServerFrame)


def encode_frame(frame: ClientFrame | ServerFrame) -> bytes:
    """The frame's msgpack body behind its 4-byte length header."""
    buf = bytearray(HEADER_BYTES)
    _encoder.encode_into(frame, buf, HEADER_BYTES)
    HEADER.pack_into(buf, 0, len(buf) - HEADER_BYTES)
    return bytes(buf)


def encode_frames_into(frames: list[ClientFrame | ServerFrame], out: bytearray) -> None:
    """Append several framed bodies to ``out`` (one socket write for many replies)."""
    for frame in frames:
        start = len(out)
        _encoder.encode_into(frame, out, start + HEADER_BYTES)
        HEADER.pack_into(out, start, len(out) - start - HEADER_BYTES)


def frame_length(header: bytes) -> int:
    """The body length a 4-byte header announces."""
    return int(HEADER.unpack(header)[0])
