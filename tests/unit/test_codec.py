"""The Message wire format: round trips, payload typing, size, and bad input."""

from __future__ import annotations

import contextlib
import gc
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipc.codec import (
    NO_PAYLOAD,
    Kind,
    Message,
    Priority,
    decode,
    decode_batch,
    encode,
    encode_batch,
    encode_batch_into,
    now_ns,
    pack_payload,
    parse_kind,
    parse_priority,
)
from ipc.errors import CodecError, EngineError

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1

wire_ints = st.integers(min_value=INT64_MIN, max_value=UINT64_MAX)
texts = st.text()  # any unicode, including astral-plane characters and NUL
payload_objects = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=UINT64_MAX)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

messages = st.builds(
    Message,
    id=wire_ints,
    recipient=texts,
    sender=texts,
    kind=st.sampled_from(Kind),
    priority=st.sampled_from(Priority),
    payload=payload_objects.map(pack_payload),
    created_ns=wire_ints,
    expires_ns=wire_ints,
    attempt=wire_ints,
    correlation_id=wire_ints,
    reply_to=texts,
    tags=st.lists(texts, max_size=5).map(tuple),
    metadata=st.dictionaries(texts, texts, max_size=5),
    dedup_key=texts,
)


def _raw_bytes(raw: msgspec.Raw) -> bytes:
    return bytes(memoryview(raw))


@given(messages)
def test_message_round_trips_every_field(msg: Message) -> None:
    decoded = decode(encode(msg))
    assert decoded == msg
    assert type(decoded.kind) is Kind
    assert type(decoded.priority) is Priority
    assert _raw_bytes(decoded.payload) == _raw_bytes(msg.payload)


@given(st.lists(messages, max_size=20))
def test_batch_round_trips_in_order(msgs: list[Message]) -> None:
    assert decode_batch(encode_batch(msgs)) == msgs


@given(st.lists(messages, max_size=10), st.integers(min_value=0, max_value=64))
def test_encode_batch_into_writes_at_offset(msgs: list[Message], offset: int) -> None:
    buffer = bytearray(b"\xaa" * offset)
    written = encode_batch_into(msgs, buffer, offset)
    assert buffer[:offset] == b"\xaa" * offset  # the reserved prefix is untouched
    assert written == len(buffer) - offset
    assert decode_batch(memoryview(buffer)[offset:]) == msgs


def test_encode_batch_into_rejects_offset_past_end() -> None:
    with pytest.raises(ValueError, match="offset"):
        encode_batch_into([Message(1, "a")], bytearray(4), 5)


def test_encode_batch_accepts_any_sequence() -> None:
    msgs = (Message(1, "a"), Message(2, "b"))
    assert decode_batch(encode_batch(msgs)) == list(msgs)


def test_decoded_payload_does_not_alias_the_source_buffer() -> None:
    """A view into a ring slot is reused later; decoded payloads must not change with it."""
    buffer = bytearray(encode_batch([Message(1, "a", payload=pack_payload(b"keep"))]))
    view = memoryview(buffer)
    (msg,) = decode_batch(view)
    view.release()
    buffer[:] = b"\x00" * len(buffer)  # would raise BufferError if a view were still exported
    assert msg.body(bytes) == b"keep"


@pytest.mark.parametrize(
    ("obj", "type_"),
    [
        ({"user": "ada", "n": 3}, dict[str, Any]),
        ([1, 2.5, "x", None], list[Any]),
        (b"\x00\xffbinary", bytes),
        ("unicodé ✓ 𝄞", str),
    ],
)
def test_body_returns_the_packed_object(obj: object, type_: type[Any]) -> None:
    msg = decode(encode(Message(7, "r", payload=pack_payload(obj))))
    assert msg.body() == obj
    assert msg.body(type_) == obj


@pytest.mark.parametrize("buffer_type", [bytearray, memoryview])
def test_bytes_like_payloads_travel_as_msgpack_bin(buffer_type: type[Any]) -> None:
    data = b"\x01\x02\x03"
    raw = pack_payload(buffer_type(data))
    assert _raw_bytes(raw) == b"\xc4\x03" + data  # bin8 header + data
    assert Message(1, "r", payload=raw).body(bytes) == data


def test_body_validates_against_the_requested_type() -> None:
    class User(msgspec.Struct):
        name: str

    msg = Message(1, "r", payload=pack_payload({"name": 5}))
    with pytest.raises(CodecError, match="payload of message 1") as info:
        msg.body(User)
    assert isinstance(info.value.__cause__, msgspec.ValidationError)


@pytest.mark.parametrize(
    "raw",
    [b"\xa1\x80", b"\x91" * 100_000 + b"\xc0", b"\xc1", b""],
    ids=["utf8", "deep", "nil", "empty"],
)
def test_body_of_malformed_payload_raises_codec_error(raw: bytes) -> None:
    with pytest.raises(CodecError, match="payload of message 9"):
        Message(9, "r", payload=msgspec.Raw(raw)).body()


@given(
    messages,
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_corrupted_frames_raise_only_codec_error(
    msg: Message, flips: list[tuple[int, int]]
) -> None:
    """Valid frames with a few bytes overwritten reach deeper into the decoder than noise."""
    frame = bytearray(encode_batch([msg]))
    for position, value in flips:
        frame[position % len(frame)] = value
    with contextlib.suppress(CodecError):
        for decoded in decode_batch(frame):
            with contextlib.suppress(CodecError):
                decoded.body()


def test_default_payload_is_nil() -> None:
    assert _raw_bytes(NO_PAYLOAD) == b"\xc0"
    assert Message(1, "r").body() is None


def test_pack_payload_rejects_unencodable_objects() -> None:
    with pytest.raises(CodecError, match="object"):
        pack_payload(object())


def test_encoded_size_stays_close_to_the_payload() -> None:
    """A 100-byte payload message costs about 30 bytes more than its payload.

    msgspec 0.22 still writes default fields of array-like structs (issue #720),
    one byte each, so this bounds the per-field overhead rather than omission.
    """
    payload = pack_payload(b"x" * 100)
    minimal = Message(1, "user-42", payload=payload)
    assert len(encode(minimal)) < 130
    typical = Message(
        12345678,
        "user-42",
        sender="svc",
        priority=Priority.HIGH,
        payload=payload,
        created_ns=now_ns(),
    )
    # 36 before the user field, 37 before `released` (its byte, and a 3-byte array header
    # past 15 fields); the dispatcher's builder writes the first 15 fields only.
    assert len(encode(typical)) - len(_raw_bytes(payload)) <= 40
    assert len(encode(Message(1, "r"))) <= 20  # every default field is one byte


def test_decoder_fills_missing_trailing_fields_with_defaults() -> None:
    """Shorter arrays (older peers, or msgspec honouring omit_defaults) still decode."""
    short = msgspec.msgpack.encode([5, "bob"])
    assert decode(short) == Message(5, "bob")


def test_message_is_not_gc_tracked() -> None:
    """gc=False keeps decoded batches out of the cyclic collector (see Message docstring)."""
    msg = Message(1, "r", tags=("a",), metadata={"k": "v"})
    assert not gc.is_tracked(msg)
    assert not any(gc.is_tracked(m) for m in decode_batch(encode_batch([msg] * 3)))


def test_expired_uses_zero_as_never() -> None:
    assert not Message(1, "r").expired(now_ns())
    assert not Message(1, "r", expires_ns=100).expired(99)
    assert Message(1, "r", expires_ns=100).expired(100)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xc1",
        b"\x92",
        b"\xff\xff\xff",
        b"not msgpack at all",
        b"\x9e" + b"\x00" * 3,
        b"\x92\x01\xa1\x80",  # invalid UTF-8 recipient: msgspec raises UnicodeDecodeError
        b"\x96\x01\xa1r\xa0\x00\x02" + b"\x91" * 100_000 + b"\xc0",  # RecursionError in payload
    ],
    ids=repr,
)
def test_decode_of_garbage_raises_codec_error(garbage: bytes) -> None:
    with pytest.raises(CodecError, match="cannot decode Message") as info:
        decode(garbage)
    assert isinstance(info.value.__cause__, (msgspec.DecodeError, ValueError, RecursionError))
    with pytest.raises(CodecError, match="batch"):
        decode_batch(garbage)


@given(st.binary(max_size=64))
def test_decode_of_random_bytes_raises_only_codec_error(garbage: bytes) -> None:
    with contextlib.suppress(CodecError):  # anything else escapes and fails the test
        decode_batch(garbage)


_NIL = msgspec.Raw(b"\xc0")


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        (["not-an-int", "r"], "id"),
        ([1, 2], "recipient"),
        ([1, "r", "", 99], "kind"),  # not a Kind value
        ([1, "r", "", 0, 7], "priority"),  # not a lane
        ([1, "r", "", 0, 2, _NIL, "late"], "created_ns"),
        ([1, "r", "", 0, 2, _NIL, 0, 0, 0, 0, "", ["ok", 3]], "tags"),
        ([1, "r", "", 0, 2, _NIL, 0, 0, 0, 0, "", [], {"k": 1}], "metadata"),
    ],
)
def test_wrong_field_type_raises_codec_error_naming_the_field(wire: list[Any], field: str) -> None:
    buf = msgspec.msgpack.encode(wire)
    with pytest.raises(CodecError, match=f"field '{field}'") as info:
        decode(buf)
    assert isinstance(info.value.__cause__, msgspec.ValidationError)
    batch = msgspec.msgpack.encode([msgspec.Raw(encode(Message(1, "ok"))), msgspec.Raw(buf)])
    with pytest.raises(CodecError, match=f"message 1, field '{field}'"):
        decode_batch(batch)


def test_codec_error_is_a_value_error_and_an_engine_error() -> None:
    with pytest.raises(ValueError, match="cannot decode"):
        decode(b"")
    with pytest.raises(EngineError):
        decode(b"")


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [
        ("critical", Priority.CRITICAL),
        ("HIGH", Priority.HIGH),
        (" Normal ", Priority.NORMAL),
        ("low", Priority.LOW),
        ("3", Priority.LOW),
        (0, Priority.CRITICAL),
        (Priority.HIGH, Priority.HIGH),
    ],
)
def test_parse_priority_accepts_names_numbers_and_members(
    given_value: str | int | Priority, expected: Priority
) -> None:
    assert parse_priority(given_value) is expected


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [
        ("hard_onboard", Kind.HARD_ONBOARD),
        ("Soft-Onboard", Kind.SOFT_ONBOARD),
        ("REQUEST", Kind.REQUEST),
        (6, Kind.EVENT),
        (Kind.RESPONSE, Kind.RESPONSE),
    ],
)
def test_parse_kind_accepts_names_numbers_and_members(
    given_value: str | int | Kind, expected: Kind
) -> None:
    assert parse_kind(given_value) is expected


@pytest.mark.parametrize("bad", ["urgent", "", "-1", 4, -1, True, 2.0, None])
def test_parse_priority_rejects_and_names_allowed_values(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"invalid priority .*critical, high, normal, low") as info:
        parse_priority(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["onboard", "direct!", 7, False])
def test_parse_kind_rejects_and_names_allowed_values(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"invalid kind .*direct, broadcast, hard_onboard") as info:
        parse_kind(bad)
    assert repr(bad) in str(info.value)
